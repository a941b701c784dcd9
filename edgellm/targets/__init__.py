"""Target presets as data: preset name -> TVM target dict, host triple, export format, toolchain, features.

Resolution order: a preset name, else a raw TVM target JSON (`--target '{"kind": "llvm", ...}'`).
"""

from __future__ import annotations

import difflib
import json
import platform
from dataclasses import dataclass, field
from typing import Any


class TargetError(ValueError):
    """An unknown or unusable target; the message lists the presets."""


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    device: str  # TVM device kind the runner opens: cpu | cuda | metal | opencl | vulkan
    target: dict[str, Any]  # TVM target JSON; "mcpu": "host" and "mtriple": "host" are filled at resolve time
    export: str = "so"  # so | tar
    toolchain: str | None = None  # None: the host's default C++ compiler
    features: dict[str, Any] = field(default_factory=dict)
    default_quant: str = "q4f32_1"

    def resolved(self) -> dict[str, Any]:
        return _fill_host(self.target)


def host_triple() -> str:
    m = platform.machine().lower()
    if platform.system() == "Darwin":
        return "arm64-apple-macos" if m in ("arm64", "aarch64") else "x86_64-apple-macos"
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m) + "-unknown-linux-gnu"


def host_cpu() -> str:
    from .._tvm import compiler

    return str(compiler().tvm.target.codegen.llvm_get_system_cpu())


def _fill_host(t: dict[str, Any]) -> dict[str, Any]:
    t = dict(t)
    if t.get("mtriple") == "host":
        t["mtriple"] = host_triple()
    if t.get("mcpu") == "host":
        t["mcpu"] = host_cpu()
    return t


PRESETS: dict[str, TargetPreset] = {
    p.name: p
    for p in (
        TargetPreset(
            "host", "this machine's CPU (LLVM, native vector width)", "cpu",
            {"kind": "llvm", "mtriple": "host", "mcpu": "host"},
            features={"fp16": False, "threads": "physical cores"},
        ),
    )
}


@dataclass(frozen=True)
class ResolvedTarget:
    preset: str  # preset name, or "custom"
    device: str
    target_json: dict[str, Any]
    export: str
    toolchain: str | None
    features: dict[str, Any]

    def tvm(self):
        from .._tvm import compiler

        return compiler().Target(self.target_json)

    def as_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "device": self.device, "tvm_target": self.target_json, "export": self.export,
                "toolchain": self.toolchain, "features": self.features,
                "host_triple": self.target_json.get("mtriple") or (self.target_json.get("host") or {}).get("mtriple")}


def resolve(spec: str) -> ResolvedTarget:
    spec = spec.strip()
    if spec in PRESETS:
        p = PRESETS[spec]
        return ResolvedTarget(p.name, p.device, p.resolved(), p.export, p.toolchain, dict(p.features))
    if spec.startswith("{"):
        try:
            t = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise TargetError(f"--target looks like JSON but does not parse: {exc}") from None
        kind = t.get("kind")
        if kind != "llvm":
            raise TargetError(f"raw target kind {kind!r} is not supported yet; use kind 'llvm' or a preset: {', '.join(PRESETS)}")
        return ResolvedTarget("custom", "cpu", _fill_host(t), "so", None, {"fp16": False})
    close = difflib.get_close_matches(spec, list(PRESETS), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise TargetError(f"unknown target {spec!r}; presets: {', '.join(PRESETS)}.{hint} Or pass a TVM target JSON.")


def table() -> list[dict[str, Any]]:
    return [
        {"name": p.name, "device": p.device, "target": json.dumps(p.target), "export": p.export,
         "toolchain": p.toolchain or "host c++", "default_quant": p.default_quant, "description": p.description}
        for p in PRESETS.values()
    ]
