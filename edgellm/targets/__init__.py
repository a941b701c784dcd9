"""Target presets as data: preset -> TVM target dict, host target, export format, toolchain, features.

Resolution order: `auto`/`cuda` (probe the local GPU), a preset name, else a raw TVM target JSON
(`--target '{"kind": "llvm", ...}'`). Features a target lacks are switched off with a log line.
"""

from __future__ import annotations

import difflib
import json
import logging
import platform
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("edgellm")


class TargetError(ValueError):
    """An unknown or unusable target; the message lists the presets and the fix."""


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    device: str  # TVM device kind the runner opens: cpu | cuda | metal | opencl | webgpu (--target vulkan)
    target: dict[str, Any]  # TVM target JSON; "host" values are filled in at resolve time
    host: dict[str, Any] | None = None  # host-side (CPU) code for GPU targets
    export: str = "so"  # so: shared library; tar: object files for static linking (iOS, Android, macOS)
    toolchain: str | None = None  # C++ driver that links the .so; None: the host's default
    features: dict[str, Any] = field(default_factory=dict)
    default_quant: str = "q4f16_1"
    codegen: str | None = None  # the TVM global the build needs (checked before any weight is read)

    def resolved(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        return _fill_host(self.target), (_fill_host(self.host) if self.host else None)


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


X86_HOST = {"kind": "llvm", "mtriple": "x86_64-unknown-linux-gnu"}
AARCH64 = "aarch64-linux-gnu"


def _cuda(arch: str, host: dict, name: str, desc: str, toolchain: str | None = None) -> TargetPreset:
    return TargetPreset(
        name, desc, "cuda",
        {"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
         "thread_warp_size": 32, "max_num_threads": 1024},
        host=host, toolchain=toolchain, features={"fp16": True, "threads": "gpu", "shared_memory": 49152,
                                                  "fatbin": arch},
    )


def _arm_cpu(name: str, mcpu: str, desc: str) -> TargetPreset:
    return TargetPreset(
        name, desc, "cpu", {"kind": "llvm", "mtriple": AARCH64, "mcpu": mcpu, "mattr": ["+neon"]},
        toolchain=f"{AARCH64}-g++", features={"fp16": False, "threads": "4 cores", "qemu_cpu": mcpu},
        default_quant="q4f32_2",
    )


GPU_LIMITS = {"max_threads_per_block": 256, "max_shared_memory_per_block": 32768, "thread_warp_size": 32}

PRESETS: dict[str, TargetPreset] = {
    p.name: p
    for p in (
        TargetPreset("host", "this machine's CPU (LLVM, native vector width)", "cpu",
                     {"kind": "llvm", "mtriple": "host", "mcpu": "host"},
                     features={"fp16": True, "threads": "physical cores"}, default_quant="q4f32_2"),
        _cuda("sm_80", X86_HOST, "cuda-sm80", "NVIDIA A100 (Ampere), x86-64 host"),
        _cuda("sm_86", X86_HOST, "cuda-sm86", "NVIDIA RTX 30xx / A10 (Ampere), x86-64 host"),
        _cuda("sm_89", X86_HOST, "cuda-sm89", "NVIDIA RTX 40xx / L4 (Ada), x86-64 host"),
        _cuda("sm_90", X86_HOST, "cuda-sm90", "NVIDIA H100 / H200 (Hopper), x86-64 host"),
        _cuda("sm_87", {"kind": "llvm", "mtriple": AARCH64, "mcpu": "cortex-a78"}, "jetson-orin",
              "NVIDIA Jetson AGX/Orin (sm_87, Cortex-A78AE host)", f"{AARCH64}-g++"),
        _cuda("sm_72", {"kind": "llvm", "mtriple": AARCH64, "mcpu": "carmel"}, "jetson-xavier",
              "NVIDIA Jetson Xavier (sm_72, Carmel host)", f"{AARCH64}-g++"),
        _arm_cpu("rpi4", "cortex-a72", "Raspberry Pi 4 (Cortex-A72, NEON)"),
        _arm_cpu("rpi5", "cortex-a76", "Raspberry Pi 5 (Cortex-A76, NEON)"),
        TargetPreset("metal", "Apple GPU on macOS (Metal; link the .tar with the macOS toolchain)", "metal",
                     {"kind": "metal", **GPU_LIMITS, "max_function_args": 31},
                     host={"kind": "llvm", "mtriple": "arm64-apple-macos", "mcpu": "apple-m1"}, export="tar",
                     features={"fp16": True, "threads": "gpu", "shared_memory": 32768}),
        TargetPreset("ios", "iPhone / iPad GPU (Metal; static objects for an Xcode app)", "metal",
                     {"kind": "metal", **GPU_LIMITS, "max_function_args": 31},
                     host={"kind": "llvm", "mtriple": "arm64-apple-ios", "mcpu": "apple-a14"}, export="tar",
                     features={"fp16": True, "threads": "gpu", "shared_memory": 32768}),
        TargetPreset("android", "Android arm64-v8a GPU (OpenCL; static objects for an app)", "opencl",
                     {"kind": "opencl", "max_threads_per_block": 256, "max_shared_memory_per_block": 16384,
                      "thread_warp_size": 1},
                     host={"kind": "llvm", "mtriple": "aarch64-linux-android"}, export="tar",
                     features={"fp16": True, "threads": "gpu", "shared_memory": 16384}),
        # Vulkan through WebGPU (docs/vulkan.md): TVM's webgpu codegen writes WGSL, edgellm's runtime plugin runs it
        # on wgpu-native's Vulkan backend. Host code for the build machine's architecture (generic CPU, so the .so
        # runs on any GPU box of that architecture). q4f32_1 by default: every adapter runs it; q4f16_1 on request
        # needs the adapter's shader-f16 (the runner checks; the manifest's quant.act_dtype records the choice).
        TargetPreset("vulkan", "Vulkan GPU through WebGPU: TVM's WGSL kernels on wgpu-native (AMD, Intel, NVIDIA, "
                     "Mesa: Mali, Adreno, V3D, lavapipe)", "webgpu",
                     {"kind": "webgpu", "max_num_threads": 256, "max_shared_memory_per_block": 32768,
                      "thread_warp_size": 1},
                     host={"kind": "llvm", "mtriple": "host"}, toolchain=None, default_quant="q4f32_1",
                     features={"fp16": "q4f16_1 on request (adapter needs shader-f16)", "threads": "gpu",
                               "backend": "wgpu-native on Vulkan", "shared_memory": 32768, "index_bits": 32,
                               "runtime": "edgellm WebGPU plugin (C++, built at first run)"},
                     codegen="target.build.webgpu"),
        # The same WGSL with aarch64 host code (Raspberry Pi 5's VideoCore VII through Mesa's v3dv, Mali / Adreno
        # boards): linked by the cross g++; the runner needs the plugin built for aarch64 on the board or
        # EDGELLM_WEBGPU_PLUGIN pointing at one (bench/vulkan_aarch64.py builds one and runs it under qemu).
        TargetPreset("vulkan-arm64", "Vulkan GPU of an aarch64 Linux board through WebGPU (Pi 5 v3dv, Mali, Adreno)",
                     "webgpu",
                     {"kind": "webgpu", "max_num_threads": 256, "max_shared_memory_per_block": 32768,
                      "thread_warp_size": 1},
                     host={"kind": "llvm", "mtriple": AARCH64}, toolchain=f"{AARCH64}-g++", default_quant="q4f32_1",
                     features={"fp16": "q4f16_1 on request (adapter needs shader-f16)", "threads": "gpu",
                               "backend": "wgpu-native on Vulkan", "shared_memory": 32768, "index_bits": 32,
                               "runtime": "edgellm WebGPU plugin built for aarch64 (EDGELLM_WEBGPU_PLUGIN)"},
                     codegen="target.build.webgpu"),
    )
}


@dataclass(frozen=True)
class ResolvedTarget:
    preset: str  # preset name, or "custom"
    device: str
    target_json: dict[str, Any]
    host_json: dict[str, Any] | None
    export: str
    toolchain: str | None
    features: dict[str, Any]
    default_quant: str = "q4f32_2"

    def tvm(self, subgroup_lanes: int = 0):
        """The TVM Target. `subgroup_lanes` 32 (webgpu; --opt webgpu_subgroups=32): TVM's own reductions (its
        attention, dlight's rules) meet in subgroup shuffles over warps of 32 lanes (its WGSL codegen's
        supports_subgroups, which sets thread_warp_size 32 whatever it is given, so narrower widths leave the
        target as it is), right on adapters whose subgroups span 32 consecutive lanes."""
        from .._tvm import compiler

        Target = compiler().Target
        tj = self.tvm_json(subgroup_lanes)
        return Target(tj, Target(self.host_json)) if self.host_json else Target(tj)

    def tvm_json(self, subgroup_lanes: int = 0) -> dict[str, Any]:
        """The device target's JSON as `tvm(subgroup_lanes)` builds it (what the manifest records)."""
        if subgroup_lanes >= 32 and self.target_json["kind"] == "webgpu":
            return {**self.target_json, "supports_subgroups": True, "thread_warp_size": 32}
        return self.target_json

    @property
    def host_triple(self) -> str | None:
        return (self.host_json or self.target_json).get("mtriple")

    @property
    def kind(self) -> str:
        return self.target_json["kind"]

    def as_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "device": self.device, "kind": self.kind, "tvm_target": self.target_json,
                "tvm_host": self.host_json, "host_triple": self.host_triple, "export": self.export,
                "toolchain": self.toolchain, "features": self.features}


def _check_codegen(p: TargetPreset) -> None:
    if p.codegen is None:
        return
    import tvm_ffi

    from .._tvm import compiler_available

    compiler_available()  # loads the compiler library, which registers the code generators
    if tvm_ffi.get_global_func(p.codegen, allow_missing=True) is None:
        raise TargetError(
            f"target {p.name!r} needs TVM's {p.codegen.rsplit('.', 1)[-1]} code generator ({p.codegen}), which this "
            "TVM install lacks (a runtime-only TVM cannot compile): install the full apache-tvm==0.27.0.post1 wheel. "
            "See docs/targets.md."
        )


def local_cuda_arch() -> str | None:
    """sm_XX of the first local NVIDIA GPU, probed out of process (nvidia-smi) with a timeout."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"sm_{out[0].replace('.', '')}" if out and out[0][:1].isdigit() else None


_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x86_64h": "x86_64", "i486": "i386", "i586": "i386",
                 "i686": "i386", "arm64_32": "aarch64_32"}


def _check_llvm(t: dict[str, Any]) -> None:
    """An LLVM triple and CPU that this TVM's LLVM knows, checked here: an unknown triple crashes LLVM itself."""
    from .._tvm import compiler

    codegen = compiler().tvm.target.codegen
    triple = t.get("mtriple", "host")
    if not isinstance(triple, str):
        raise TargetError(f"raw target mtriple {triple!r} is not a string; use e.g. \"aarch64-linux-gnu\"")
    if triple != "host":
        arch = triple.split("-")[0]
        arch = _ARCH_ALIASES.get(arch, "arm" if arch.startswith("armv") else "thumb" if arch.startswith("thumbv") else arch)
        known = set(codegen.llvm_get_targets())
        if arch not in known or triple.count("-") < 1:
            raise TargetError(f"raw target mtriple {triple!r} names no architecture this TVM's LLVM can generate "
                              f"code for (arch {triple.split('-')[0]!r}); use a triple such as x86_64-unknown-linux-gnu "
                              "or aarch64-linux-gnu, or a preset")
    cpu = t.get("mcpu")
    if cpu not in (None, "host") and (not isinstance(cpu, str) or not codegen.llvm_is_valid_cpu(
            cpu, host_triple() if triple == "host" else triple)):
        raise TargetError(f"raw target mcpu {cpu!r} is not a CPU LLVM knows for {triple}; use e.g. cortex-a76, "
                          "skylake, or leave mcpu out")


def resolve(spec: str) -> ResolvedTarget:
    spec = spec.strip()
    if spec in ("cuda", "auto"):
        arch = local_cuda_arch()
        if arch is None:
            if spec == "auto":
                return resolve("host")
            raise TargetError("--target cuda means the local GPU, but no NVIDIA GPU answered nvidia-smi here; "
                              f"cross-compile with one of {', '.join(n for n in PRESETS if n.startswith('cuda-'))}")
        p = _cuda(arch, X86_HOST if platform.machine() == "x86_64" else {"kind": "llvm", "mtriple": AARCH64},
                  "cuda", f"local GPU ({arch})")
        return _from_preset(p)
    if spec in PRESETS:
        return _from_preset(PRESETS[spec])
    if spec.startswith("{"):
        try:
            t = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise TargetError(f"--target looks like JSON but does not parse: {exc}") from None
        host = t.pop("host", None)
        kind = t.get("kind")
        devices = {"llvm": "cpu", "cuda": "cuda", "metal": "metal", "opencl": "opencl"}
        if kind not in devices:
            raise TargetError(f"raw target kind {kind!r} is not supported; use one of {', '.join(devices)} or a preset")
        for part in (t, host):
            if isinstance(part, dict) and part.get("kind") == "llvm":
                _check_llvm(part)
        export = "tar" if kind in ("metal", "opencl") else "so"
        return ResolvedTarget("custom", devices[kind], _fill_host(t), _fill_host(host) if host else None, export, None,
                              {"fp16": kind != "llvm"}, "q4f32_2" if kind == "llvm" else "q4f16_1")
    close = difflib.get_close_matches(spec, list(PRESETS), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise TargetError(f"unknown target {spec!r}; presets: {', '.join(PRESETS)}.{hint} Or pass a TVM target JSON.")


def _from_preset(p: TargetPreset) -> ResolvedTarget:
    _check_codegen(p)
    t, h = p.resolved()
    return ResolvedTarget(p.name, p.device, t, h, p.export, p.toolchain, dict(p.features), p.default_quant)


def table() -> list[dict[str, Any]]:
    return [
        {"name": p.name, "device": p.device, "target": json.dumps(p.target),
         "host": {"host": "this machine"}.get((p.host or p.target).get("mtriple", "-"), (p.host or p.target).get("mtriple", "-")),
         "export": p.export,
         "toolchain": p.toolchain or "host c++", "default_quant": p.default_quant, "features": p.features,
         "description": p.description}
        for p in PRESETS.values()
    ]
