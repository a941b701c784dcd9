"""Static archives and the objects in them: write an indexed `ar` archive with the platform's archiver, read one
back (GNU and BSD/Darwin formats) and find the static-initializer sections that register a TVM system library.

Used by `edgellm package` to check what it wrote and by the tests.
"""

from __future__ import annotations

import platform
import shutil
import struct
import subprocess
from pathlib import Path

AR_MAGIC = b"!<arch>\n"


class ArchiverMissing(RuntimeError):
    """No archiver for the platform is on PATH; the message names the packages that provide one."""


# tool candidates in order; each entry: (executable, extra args before `rcsD`)
ARCHIVERS = {
    "elf": [("aarch64-linux-gnu-ar", []), ("llvm-ar", ["--format=gnu"])]
    + [(f"llvm-ar-{v}", ["--format=gnu"]) for v in range(20, 13, -1)],
    "macho": [("llvm-ar", ["--format=darwin"])] + [(f"llvm-ar-{v}", ["--format=darwin"]) for v in range(20, 13, -1)],
}
INSTALL_HINT = {
    "elf": "install one: `apt-get install binutils-aarch64-linux-gnu` (aarch64-linux-gnu-ar) or `apt-get install llvm` "
           "(llvm-ar; the Android NDK's toolchains/llvm/prebuilt/*/bin has one too)",
    "macho": "install llvm-ar: `apt-get install llvm` on Debian/Ubuntu, `brew install llvm` on macOS "
             "(it writes the Darwin archive format with a __.SYMDEF index, as Xcode's `libtool -static` does)",
}


def find_archiver(fmt: str) -> list[str]:
    for exe, extra in ARCHIVERS[fmt]:
        path = shutil.which(exe)
        if path:
            return [path, *extra]
    if fmt == "macho" and platform.system() == "Darwin" and shutil.which("libtool"):
        return ["libtool"]
    tried = ", ".join(e for e, _ in ARCHIVERS[fmt][:3])
    raise ArchiverMissing(f"no archiver for {'Mach-O' if fmt == 'macho' else 'ELF'} objects on PATH (tried {tried}); "
                          f"{INSTALL_HINT[fmt]}")


def write_archive(out: Path, objects: list[Path], fmt: str) -> None:
    """Indexed static archive of `objects` (in the given order), deterministic: zero timestamps, uids and modes."""
    tool = find_archiver(fmt)
    if Path(tool[0]).name == "libtool":
        cmd = [*tool, "-static", "-D", "-o", str(out), *map(str, objects)]
    else:
        cmd = [tool[0], "rcsD", *tool[1:], str(out), *map(str, objects)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")


def read_archive(path: Path) -> tuple[dict[str, bytes], list[str]]:
    """(member name -> bytes, symbols of the archive index) for a GNU or BSD/Darwin `ar` archive."""
    data = Path(path).read_bytes()
    if not data.startswith(AR_MAGIC):
        raise ValueError(f"{path} is not an ar archive (no !<arch> magic)")
    members: dict[str, bytes] = {}
    symbols: list[str] = []
    longnames = b""
    pos = len(AR_MAGIC)
    while pos + 60 <= len(data):
        hdr = data[pos : pos + 60]
        name = hdr[:16].decode().rstrip()
        size = int(hdr[48:58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)
        if name.startswith("#1/"):  # BSD: name stored at the start of the body
            n = int(name[3:])
            name, body = body[:n].rstrip(b"\0").decode(), body[n:]
        if name in ("/", "/SYM64/"):
            symbols += _gnu_index(body, wide=name == "/SYM64/")
        elif name == "//":
            longnames = body
        elif name.startswith("__.SYMDEF"):
            symbols += _bsd_index(body)
        else:
            if name.startswith("/") and name[1:].isdigit():
                off = int(name[1:])
                name = longnames[off : longnames.index(b"/\n", off)].decode()
            members[name.rstrip("/")] = body
    return members, symbols


def _gnu_index(body: bytes, wide: bool) -> list[str]:
    w = 8 if wide else 4
    (count,) = struct.unpack_from(">Q" if wide else ">I", body, 0)
    strtab = body[w + count * w :]
    return [s.decode() for s in strtab.split(b"\0")[:count]]


def _bsd_index(body: bytes) -> list[str]:
    (ranlib_bytes,) = struct.unpack_from("<I", body, 0)
    n = ranlib_bytes // 8
    strs_off = 4 + ranlib_bytes + 4
    out = []
    for i in range(n):
        (stroff, _obj) = struct.unpack_from("<II", body, 4 + 8 * i)
        end = body.index(b"\0", strs_off + stroff)
        out.append(body[strs_off + stroff : end].decode())
    return out


def section_names(obj: bytes) -> list[str]:
    """Section names of an ELF64 or Mach-O 64 relocatable object (Mach-O: `segment,section`)."""
    if obj[:4] == b"\x7fELF":
        shoff, = struct.unpack_from("<Q", obj, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", obj, 0x3A)
        str_off = struct.unpack_from("<Q", obj, shoff + shstrndx * shentsize + 0x18)[0]
        names = []
        for i in range(shnum):
            (name_off,) = struct.unpack_from("<I", obj, shoff + i * shentsize)
            end = obj.index(b"\0", str_off + name_off)
            names.append(obj[str_off + name_off : end].decode())
        return names
    if obj[:4] == b"\xcf\xfa\xed\xfe":
        ncmds, = struct.unpack_from("<I", obj, 16)
        off, names = 32, []
        for _ in range(ncmds):
            cmd, size = struct.unpack_from("<II", obj, off)
            if cmd == 0x19:  # LC_SEGMENT_64
                nsects, = struct.unpack_from("<I", obj, off + 64)
                for s in range(nsects):
                    so = off + 72 + 80 * s
                    sect = obj[so : so + 16].rstrip(b"\0").decode()
                    seg = obj[so + 16 : so + 32].rstrip(b"\0").decode()
                    names.append(f"{seg},{sect}")
            off += size
        return names
    return []


def has_static_init(obj: bytes) -> bool:
    """True when the object carries a static constructor (.init_array / __mod_init_func), how a system lib registers."""
    return any(n == ".init_array" or n.endswith(",__mod_init_func") for n in section_names(obj))


__all__ = ["ArchiverMissing", "find_archiver", "write_archive", "read_archive", "section_names", "has_static_init"]
