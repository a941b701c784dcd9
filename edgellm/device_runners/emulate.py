"""Run aarch64 CPU artifacts (rpi4, rpi5, custom aarch64 llvm) on an x86 machine under qemu-aarch64-static.

The arm64 root filesystem (python3 + the aarch64 TVM runtime wheel, no compiler library) comes from
scripts/arm64-rootfs.sh. QEMU_CPU is set to the board's core so instructions the board lacks (SVE, ...) trap as
they would on the device. Emulation is for correctness: it runs 100-300x slower than the board.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..artifact import Artifact
from .remote import PREFIX

ROOT_ENV = "EDGELLM_ARM64_ROOT"


class EmulationError(RuntimeError):
    """A user-fixable reason the artifact cannot run under emulation; the message is one line with the fix."""


def arm64_root() -> Path:
    """The arm64 root filesystem, after checking that it is complete and that qemu-aarch64-static is installed."""
    root = Path(os.environ.get(ROOT_ENV, Path.home() / ".cache" / "edgellm" / "arm64-rootfs"))
    if shutil.which("qemu-aarch64-static") is None:
        raise EmulationError("--emulate needs qemu-aarch64-static, which is not on PATH: "
                             "apt-get install qemu-user-static debootstrap, then run scripts/arm64-rootfs.sh")
    if not (root / ".edgellm-complete").exists():
        raise EmulationError(
            f"--emulate needs an arm64 root filesystem and there is none at {root}: create it with "
            f"`scripts/arm64-rootfs.sh {root}` (a few minutes, once; needs qemu-user-static and debootstrap) "
            f"or point {ROOT_ENV} at one"
        )
    return root


def qemu_cpu_for(manifest: dict) -> str:
    """QEMU_CPU for an aarch64 CPU artifact (the board's core); any other artifact is refused, naming its
    architecture."""
    t = manifest.get("target") or {}
    triple = t.get("host_triple") or ""
    arch = triple.split("-", 1)[0] or "unknown"
    if t.get("kind") != "llvm" or arch not in ("aarch64", "arm64"):
        what = f"{t.get('kind')} code" if t.get("kind") != "llvm" else f"{arch} code"
        fix = ("run it without --emulate" if t.get("kind") == "llvm" and arch == platform.machine()
               else "run it on its device")
        raise EmulationError(f"--emulate runs aarch64 CPU artifacts (rpi4, rpi5, an aarch64 llvm target); this one "
                             f"is target {t.get('preset')} with {what} ({triple or 'no CPU triple'}): {fix}")
    return (t.get("features") or {}).get("qemu_cpu") or (t.get("tvm_target") or {}).get("mcpu") or "cortex-a72"


def check_emulatable(artifact: str | Path) -> tuple[Artifact, str]:
    """(artifact, QEMU_CPU) once the artifact is an aarch64 CPU build; raises EmulationError (or ArtifactError)
    otherwise. Checked before the emulator set-up, so a wrong artifact is named as such whatever is installed."""
    art = Artifact.open(artifact, verify=False)
    return art, qemu_cpu_for(art.manifest)


def python_command(root: Path, cpu: str, args: list[str], path: list[Path] = (), threads: int = 2
                   ) -> tuple[list[str], dict]:
    """(argv, env) running the arm64 root's python3 with `args` under qemu-aarch64-static as core `cpu`, the
    aarch64 TVM runtime and `path` importable."""
    env = {**os.environ, "QEMU_CPU": cpu, "TVM_NUM_THREADS": str(threads),
           "PYTHONPATH": ":".join([str(root / "opt" / "edgellm-site"), *map(str, path)])}
    env.pop("PYTHONHOME", None)
    # the arm64 root is edgellm's own folder: let its python keep the bytecode it compiles (under qemu a start that
    # imports the runtime took 14 s compiling TVM's modules, 8 s loading them once written)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return ["qemu-aarch64-static", "-L", str(root), str(root / "usr" / "bin" / "python3"), *args], env


def _command(artifact: Path, request: dict | list[dict], root: Path, src: Path) -> tuple[list[str], dict]:
    _art, cpu = check_emulatable(artifact)
    first = request[0] if isinstance(request, list) and request else request
    threads = first.get("threads") if isinstance(first, dict) else None
    return python_command(root, cpu, ["-m", "edgellm.device_runners.remote", str(Path(artifact).resolve()),
                                      json.dumps(request)], [src], threads or 2)


def stream_remote(artifact: str | Path, request: dict | list[dict], timeout: float = 1800) -> Iterator[dict]:
    """Run one request (or a list of them, in order, in one emulated process: the artifact loads once) on the
    emulated device; yield each `edgellm:` JSON line as it arrives."""
    check_emulatable(artifact)  # the artifact's architecture first: an x86 build is refused as such
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


def run_remote(artifact: str | Path, request: dict | list[dict], timeout: float = 1800) -> list[dict]:
    return list(stream_remote(artifact, request, timeout))
