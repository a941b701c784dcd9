"""Who measured a record: the device's identity, carried by every bench record (runtime only, no compiler)."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

from ..device_runners.host import host_info

EMULATED_ENV = "EDGELLM_EMULATED"  # set by whoever starts a device under qemu: the emulated core, e.g. cortex-a76


def normalize_arch(name: str | None) -> str:
    """x86_64 / aarch64 spelled one way (amd64 -> x86_64, arm64 -> aarch64); '' for none."""
    a = (name or "").split("-", 1)[0].lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(a, a)


@functools.lru_cache(maxsize=1)
def gpus() -> tuple[str, ...]:
    """GPU names: nvidia-smi's list, else a Jetson's board model (Tegra boards have no nvidia-smi)."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10)
            names = tuple(x.strip() for x in out.stdout.splitlines() if x.strip())
            if out.returncode == 0 and names:
                return names
        except (OSError, subprocess.SubprocessError):
            pass
    board = board_model()
    return (board,) if "jetson" in board.lower() else ()


@functools.lru_cache(maxsize=1)
def board_model() -> str:
    """The device tree's model (e.g. 'Raspberry Pi 5 Model B Rev 1.0'), '' on machines without one."""
    try:
        return Path("/proc/device-tree/model").read_bytes().rstrip(b"\x00").decode(errors="replace").strip()
    except OSError:
        return ""


def compiler_loaded() -> bool:
    """True when this process has TVM's compiler library mapped (a device server must not)."""
    try:
        return "libtvm_compiler" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def device_identity(name: str | None = None, digest: str | None = None, device: str | None = None) -> dict:
    """host_info + board + GPUs + versions + the artifact's root digest; `emulated` names the emulated core when
    the device runs under qemu (its speeds are not the board's)."""
    from .. import __version__
    from .._tvm import tvm_version

    h = host_info().as_dict()
    emulated = os.environ.get(EMULATED_ENV) or None
    if emulated:  # qemu-user shows the host's /proc/cpuinfo: name the emulated core, and where it ran
        h["cpu_model"] = f"{emulated} (qemu on {h['cpu_model']})"
    return {**h, "name": name or os.environ.get("EDGELLM_DEVICE_NAME") or h["name"], "board": board_model(),
            "gpus": list(gpus()), "device": device, "tvm_version": tvm_version(), "edgellm_version": __version__,
            "emulated": emulated, "tvm_compiler_loaded": compiler_loaded(),
            "artifact_digest": digest}
