"""Read what a built library really contains: ELF/Mach-O machine, Mach-O platform, CUDA fatbin entries.

Used by tests, `edgellm package` and anyone checking an artifact before shipping it to a device.
"""

from __future__ import annotations

import struct
import tarfile
from pathlib import Path

ELF_MACHINES = {62: "x86_64", 183: "aarch64", 40: "arm", 243: "riscv"}
MACHO_CPUS = {0x0100000C: "arm64", 0x01000007: "x86_64"}
MACHO_PLATFORMS = {1: "macos", 2: "ios", 3: "tvos", 4: "watchos", 7: "ios-simulator"}
FATBIN_MAGIC = 0xBA55ED50
LC_BUILD_VERSION = 0x32


def object_format(data: bytes) -> dict:
    """{'format': 'elf'|'macho'|'unknown', 'machine': ..., 'type': ..., 'platform': ...}"""
    if data[:4] == b"\x7fELF":
        e_type, e_machine = struct.unpack_from("<HH", data, 16)
        kind = {1: "relocatable", 2: "executable", 3: "shared"}.get(e_type, str(e_type))
        return {"format": "elf", "machine": ELF_MACHINES.get(e_machine, str(e_machine)), "type": kind}
    if data[:4] == b"\xcf\xfa\xed\xfe":
        cpu, _sub, filetype, ncmds, _size = struct.unpack_from("<iiIII", data, 4)
        return {"format": "macho", "machine": MACHO_CPUS.get(cpu & 0xFFFFFFFF, hex(cpu)),
                "type": {1: "relocatable", 2: "executable", 6: "shared"}.get(filetype, str(filetype)),
                "platform": _macho_platform(data, ncmds)}
    return {"format": "unknown", "machine": None, "type": None}


def _macho_platform(data: bytes, ncmds: int) -> str | None:
    off = 32
    for _ in range(ncmds):
        cmd, size = struct.unpack_from("<II", data, off)
        if cmd == LC_BUILD_VERSION:
            return MACHO_PLATFORMS.get(struct.unpack_from("<I", data, off + 8)[0], "other")
        off += size
    return None


def fatbin_entries(data: bytes) -> list[dict]:
    """Every entry of every CUDA fatbin embedded in `data`: kind (cubin|ptx) and arch (sm_XX)."""
    entries, start = [], 0
    while (i := data.find(struct.pack("<I", FATBIN_MAGIC), start)) >= 0:
        _magic, _ver, hsz, fsz = struct.unpack_from("<IHHQ", data, i)
        p, end = i + hsz, i + hsz + fsz
        while p + 32 <= end:
            kind, _u, ehsz, size, _c, _u2, _minor, _major, arch = struct.unpack_from("<HHIQIIHHI", data, p)
            entries.append({"kind": {1: "ptx", 2: "cubin"}.get(kind, str(kind)), "arch": f"sm_{arch}"})
            p += ehsz + size
        start = max(end, i + 4)
    return entries


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers() if m.isfile()}


def describe_library(path: Path) -> dict:
    """Summary of lib/model.so or lib/model.tar for checks and `edgellm targets --inspect`-style output."""
    path = Path(path)
    if path.suffix == ".tar":
        members = tar_members(path)
        return {"members": {n: object_format(d) for n, d in members.items()},
                "fatbin": [e for d in members.values() for e in fatbin_entries(d)]}
    data = path.read_bytes()
    return {"object": object_format(data), "fatbin": fatbin_entries(data),
            "cuda_source": b"extern \"C\" __global__" in data}


__all__ = ["object_format", "fatbin_entries", "tar_members", "describe_library"]
