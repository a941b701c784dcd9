"""What machine this is: one place for physical cores, CPU model, machine name, OS and versions.

Runners size their thread pool from it and bench records carry it, so a record says where it was measured.
Runtime only: no compiler import.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class HostInfo:
    name: str  # the machine's network name
    machine: str  # x86_64, aarch64 ...
    cpu_model: str
    physical_cores: int
    logical_cpus: int
    os: str
    python: str

    def as_dict(self) -> dict:
        return asdict(self)


def _cpuinfo() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return f.readlines()
    except OSError:
        return []


def physical_cores(lines: list[str] | None = None) -> int:
    """Distinct (physical id, core id) pairs of /proc/cpuinfo; the logical CPU count where it has none (Arm
    kernels list processors only)."""
    cores, phys = set(), None
    for line in _cpuinfo() if lines is None else lines:
        if line.startswith("physical id"):
            phys = line.split(":", 1)[1].strip()
        elif line.startswith("core id"):
            cores.add((phys, line.split(":", 1)[1].strip()))
    return len(cores) or os.cpu_count() or 1


def cpu_model(lines: list[str] | None = None) -> str:
    """'model name' (x86), else the Arm 'CPU part' as a name where known, else what platform says."""
    lines = _cpuinfo() if lines is None else lines
    for line in lines:
        if line.startswith(("model name", "Model name")):
            return line.split(":", 1)[1].strip()
    parts = {"0xd03": "Cortex-A53", "0xd08": "Cortex-A72", "0xd0b": "Cortex-A76", "0xd42": "Cortex-A78AE",
             "0xd41": "Cortex-A78", "0x004": "Carmel", "0xd4f": "Neoverse-V2", "0xd0c": "Neoverse-N1"}
    for line in lines:
        if line.startswith("CPU part"):
            part = line.split(":", 1)[1].strip().lower()
            return parts.get(part, f"Arm CPU part {part}")
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=1)
def host_info() -> HostInfo:
    lines = _cpuinfo()
    return HostInfo(name=platform.node(), machine=platform.machine(), cpu_model=cpu_model(lines),
                    physical_cores=physical_cores(lines), logical_cpus=os.cpu_count() or 1,
                    os=f"{platform.system()} {platform.release()}", python=sys.version.split()[0])
