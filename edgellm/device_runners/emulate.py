"""Run aarch64 CPU artifacts (rpi4, rpi5, custom aarch64 llvm) on an x86 machine under qemu-aarch64-static.

The arm64 root filesystem (python3 + the aarch64 TVM runtime wheel, no compiler library) comes from
scripts/arm64-rootfs.sh. QEMU_CPU is set to the board's core so instructions the board lacks (SVE, ...) trap as
they would on the device. Emulation is for correctness: it runs 100-300x slower than the board.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..artifact import Artifact
from .remote import PREFIX

ROOT_ENV = "EDGELLM_ARM64_ROOT"


class EmulationError(RuntimeError):
    pass


def arm64_root() -> Path:
    root = Path(os.environ.get(ROOT_ENV, Path.home() / ".cache" / "edgellm" / "arm64-rootfs"))
    if not (root / ".edgellm-complete").exists():
        raise EmulationError(
            f"no arm64 root filesystem at {root}; create it with `scripts/arm64-rootfs.sh {root}` "
            f"(needs qemu-user-static and debootstrap) or point {ROOT_ENV} at one"
        )
    if shutil.which("qemu-aarch64-static") is None:
        raise EmulationError("qemu-aarch64-static is not on PATH: apt-get install qemu-user-static")
    return root


def qemu_cpu_for(manifest: dict) -> str:
    t = manifest["target"]
    triple = t.get("host_triple") or ""
    if t.get("kind") != "llvm" or not triple.startswith("aarch64"):
        raise EmulationError(f"artifact target {t['preset']} ({triple or t.get('kind')}) is not an aarch64 CPU target; "
                             "emulation runs rpi4 / rpi5 / aarch64 llvm artifacts")
    return t["features"].get("qemu_cpu") or t["tvm_target"].get("mcpu") or "cortex-a72"


def _command(artifact: Path, request: dict, root: Path, src: Path) -> tuple[list[str], dict]:
    art = Artifact.open(artifact, verify=False)
    env = {**os.environ, "QEMU_CPU": qemu_cpu_for(art.manifest),
           "PYTHONPATH": f"{root / 'opt' / 'edgellm-site'}:{src}", "TVM_NUM_THREADS": str(request.get("threads") or 2)}
    env.pop("PYTHONHOME", None)
    cmd = ["qemu-aarch64-static", "-L", str(root), str(root / "usr" / "bin" / "python3"), "-m",
           "edgellm.device_runners.remote", str(Path(artifact).resolve()), json.dumps(request)]
    return cmd, env


def stream_remote(artifact: str | Path, request: dict, timeout: float = 1800) -> Iterator[dict]:
    """Run one request on the emulated device; yield each `edgellm:` JSON line as it arrives."""
    root = arm64_root()
    with tempfile.TemporaryDirectory(prefix="edgellm-src-") as tmp:
        src = Path(tmp)
        shutil.copytree(Path(__file__).resolve().parents[1], src / "edgellm",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        cmd, env = _command(Path(artifact), request, root, src)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for line in proc.stdout:
                if line.startswith(PREFIX):
                    yield json.loads(line[len(PREFIX):])
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
        if proc.returncode != 0:
            raise EmulationError(f"emulated run failed (exit {proc.returncode}): {proc.stderr.read()[-2000:]}")


def run_remote(artifact: str | Path, request: dict, timeout: float = 1800) -> list[dict]:
    return list(stream_remote(artifact, request, timeout))
