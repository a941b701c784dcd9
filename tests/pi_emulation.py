"""Shared by the tests that run aarch64 code under qemu-aarch64-static: the arm64 root fixture and a runner for
a Python script on the emulated board (the arm64 root's python3 with the aarch64 TVM runtime)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI") == "true"
ROOT = Path(os.environ.get("EDGELLM_ARM64_ROOT", Path.home() / ".cache" / "edgellm" / "arm64-rootfs"))


@pytest.fixture(scope="session")
def arm64_root() -> Path:
    """The arm64 root of scripts/arm64-rootfs.sh (built the first time: a few minutes; then a no-op)."""
    tools = [t for t in ("qemu-aarch64-static", "debootstrap") if shutil.which(t) is None]
    if tools:
        msg = f"needs {', '.join(tools)} (apt-get install qemu-user-static debootstrap; .ci/run does)"
        pytest.fail(msg) if IN_CI else pytest.skip(msg)
    script = Path(__file__).resolve().parents[1] / "scripts" / "arm64-rootfs.sh"
    subprocess.run(["bash", str(script), str(ROOT)], check=True, capture_output=True, timeout=900)
    os.environ["EDGELLM_ARM64_ROOT"] = str(ROOT)
    return ROOT


def run_on_board(root: Path, cpu: str, script: str, *args: str, timeout: float = 600) -> str:
    """Run the Python source `script` on an emulated `cpu` core (QEMU_CPU) and return its stdout."""
    from edgellm.device_runners.emulate import python_command

    cmd, env = python_command(root, cpu, ["-c", script, *args])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"emulated {cpu} run failed (exit {res.returncode}): {res.stderr[-3000:]}"
    return res.stdout
