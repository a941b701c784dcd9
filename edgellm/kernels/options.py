"""KernelOptions: the typed choices between kernels of one operation, set with `edgellm compile --opt NAME=VALUE`.

Every field is a closed set of named values. `auto` means the registry's rule for the target (the measured default);
any other value forces that kernel where it applies. The options are part of the artifact's identity: the compile
summary shows them and the manifest records them, together with the kernels the registry actually picked.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields, replace

# name -> (values, help). The first value is the default.
CHOICES: dict[str, tuple[tuple[str, ...], str]] = {
    "cpu_dot": (("auto", "vnni", "pmadd", "sdot", "portable"),
                "CPU int8 linear (q4f32_2): the integer dot-product instructions; auto = the widest the target has "
                "(AVX-512 VNNI, then AVX-512BW/AVX2/SSSE3 pmadd, then NEON sdot, then portable shifts and multiplies)"),
    "cuda_gemv": (("auto", "fp16x2-smem", "fp16x2", "te", "dp4a"),
                  "CUDA INT4 decode GEMV: fp16x2-smem = the hand-written kernel in fp16x2 arithmetic (fp16 "
                  "activations) with x staged once per block in shared memory; fp16x2 = the same arithmetic with "
                  "every warp team reading x from L2 (the previous default); te = the tensor-expression kernel with "
                  "edgellm's warp schedule; dp4a = x quantized to int8 while it is staged (a scale per 8 "
                  "activations, as the Vulkan default) and integer dot products, for the plain GEMVs and gate_up "
                  "with its silu (the norm-fused ones stay fp16x2-smem); auto = dp4a for the plain 4-bit GEMVs "
                  "with `in` >= 2048 (and the 8B-sized MLP's int8 chain), fp16x2-smem for the other 4-bit rows, "
                  "fp16x2 for 8-bit ones"),
    "cuda_gemm": (("auto", "wgmma", "mma-pipelined", "mma", "simt"),
                  "CUDA INT4 prefill GEMM: wgmma = Hopper's warpgroup tensor-core instruction (sm_90 only, built "
                  "for sm_90a; `in` a multiple of 64); mma-pipelined = mma.sync tensor cores with a cp.async "
                  "multi-stage pipeline (`in` a multiple of 64); mma = the single-stage tensor-core kernel; simt = "
                  "FMA tiles; auto = wgmma on sm_90, mma-pipelined on other sm_80+, else mma, simt below sm_80"),
    "cuda_gemm_small": (("gemv", "gemv-simt", "gemm"),
                        "CUDA INT4 linear with a symbolic row count (batch_decode, prefill) when it gets few rows: "
                        "gemv = up to 16 rows go to the batched decode GEMV (kernels/cuda_gemv_batch.py; the host "
                        "code picks per call; 8 and 16 rows on tensor cores), more to the GEMM; gemv-simt = the same "
                        "with every row count in fp16x2 SIMT; gemm = the GEMM for every row count"),
    "cuda_gemm_decode": (("half2", "float"),
                         "how the tensor-core GEMM decodes a weight tile: half2 = two weights per fp16x2 op, float = "
                         "one fp32 op each (same fp16 values)"),
    "cuda_attention": (("auto", "mma", "tvm"),
                       "CUDA ragged prefill attention: mma = edgellm's FlashAttention-2 on mma.sync (sm_80+, fp16, "
                       "head_dim 64/128); tvm = TVM's kernel; auto = mma where it applies"),
    "cuda_kv": (("auto", "owned", "tvm"),
                "CUDA KV cache: owned = edgellm's paged cache (kernels/owned_kv.py; page table and positions are "
                "inputs, so a decode step is one CUDA graph, RoPE + append + attention one kernel a layer); tvm = "
                "TVM's PagedKVCache (its attention is a call into the cache object that splits the graph per "
                "layer); auto = owned on sm_90 with cuda_pdl, else tvm"),
    "cuda_fuse": (("auto", "all", "silu", "off"),
                  "CUDA decode fusions into the INT4 decode GEMV (x staged in shared memory; one-token decode only): "
                  "all = the residual add + RMSNorm before qkv and gate_up staged by the GEMV itself, "
                  "silu(gate) * up computed in gate_up's epilogue (no add_rms_norm / silu_mul kernels between "
                  "them; the same values), and o / down adding their output to the residual; silu = the epilogue "
                  "only; off = separate kernels; auto = the measured default: all but the residual add in o / "
                  "down, and gate_up's norm only up to hidden 2048 (docs/benchmarks/h200-fusion.md)"),
    "cuda_pdl": (("auto", "on", "off"),
                 "CUDA programmatic dependent launch (Hopper): on = every kernel is launched while the previous one "
                 "still runs and waits for it in griddepcontrol.wait (the decode GEMV loads its first weights "
                 "before the wait), hiding the gap between dependent kernels (kernels/cuda_pdl.py; sm_90+ only); "
                 "off = ordinary launches; auto = on for sm_90+"),
    "cuda_argmax": (("warp", "tree"),
                    "CUDA device argmax (greedy decode): warp = each block's candidates meet by warp shuffles, one "
                    "barrier; tree = the shared-memory tree WebGPU uses (two barriers a level: 17 + 13 a token)"),
    "webgpu_gemm": (("auto", "tiled", "simple"),
                    "WebGPU/Vulkan prefill GEMM: tiled = workgroup-memory tiles, the INT4 weight tile decoded once per "
                    "block (`in` a multiple of 32, `out` of 64); simple = one output per thread from storage "
                    "buffers (dlight-like); auto = tiled where it applies"),
    "webgpu_fuse": (("auto", "all", "silu", "off"),
                    "WebGPU/Vulkan decode fusions into the INT4 decode GEMV (dp4a or h2): all = the "
                    "residual add + RMSNorm staged by qkv / gate_up and silu * up in gate_up's epilogue; silu = the "
                    "epilogue alone; off = separate kernels; auto = all (H200, 8B: all 167 tok/s, silu 166)"),
    "webgpu_subgroups": (("auto", "off", "4", "8", "16", "32"),
                         "WebGPU/Vulkan subgroup reductions: N = the decode GEMVs (h2, dp4a) sum a warp's 32 lanes "
                         "by subgroup xor shuffles over runs of N lanes (N=32: no workgroup memory and no barrier at "
                         "their end; the norm's sum of squares one barrier instead of two; dp4a's group maxima "
                         "without one), and at 32 TVM's own reductions (its decode attention) use subgroups too; "
                         "the artifact then runs only on an adapter whose subgroups span at least N consecutive "
                         "lanes (checked at load; `edgellm adapters` shows each adapter's: NVIDIA, AMD and Apple "
                         "GPUs 32, Intel 8-32, Mali 16, lavapipe 8 or 16). H200, 8B decode at 32: h2 +8-9%, dp4a "
                         "+2-4%. off = workgroup memory only, runs on every adapter; auto = both: the library "
                         "without subgroups and a twin built at 32 (lib/model-sg32.so), the runner loading the twin "
                         "where the adapter's probed subgroups span 32 lanes (twice the build time)"),
    "webgpu_dp4a_act": (("8", "32"),
                        "activations one int8 scale covers in the dp4a GEMV (webgpu_gemv auto or dp4a): 8 = a scale per "
                        "packed word, as the CPU int8 kernels (SmolLM2, file weights: 97.9% top-1 of fp32 "
                        "activations' answers); 32 = a scale per group, as llama.cpp's Q8_1 (96.4%)"),
    "webgpu_gemv": (("auto", "h2", "dp4a", "coalesced", "group", "simple"),
                    "WebGPU/Vulkan INT4 decode GEMV: dp4a = integer dot products (WGSL dot4I8Packed): x quantized "
                    "to int8 while it is staged (a scale per webgpu_dp4a_act activations), nibbles spread to bytes "
                    "by masks, fp16 or fp32 activations (q4f16_1 / q4f32_1 grid; H200, 8B decode: 405-409 tok/s "
                    "against h2's 337-340; SmolLM2 from fp32 through the decode path: top-1 and KL against fp32 as "
                    "h2's, docs/vulkan.md); h2 = fp16 activations in vec2<f16> arithmetic, x staged in workgroup "
                    "memory, 16-byte weight loads (fp16 only); coalesced = lane l takes packed word l of each "
                    "32-word step (a warp reads 128 contiguous weight bytes and 512 of activations per load); "
                    "group = a lane owns whole groups of 32 (4 packed words and 32 activations per step, one float32 "
                    "dot per group); simple = the generic GPU schedule; auto = dp4a where it applies, else h2, else "
                    "coalesced (4-bit, group 32, no padding)"),
}


SUBGROUP_TWINS = (32,)  # --opt webgpu_subgroups=auto: the twin libraries' lanes (NVIDIA, AMD, Apple GPUs)


class KernelOptionError(ValueError):
    """An --opt that names no option or no value; the message lists the valid ones."""


@dataclass(frozen=True)
class KernelOptions:
    cpu_dot: str = "auto"
    cuda_gemv: str = "auto"
    cuda_gemm: str = "auto"
    cuda_gemm_small: str = "gemv"
    cuda_gemm_decode: str = "half2"
    cuda_attention: str = "auto"
    cuda_kv: str = "auto"
    cuda_fuse: str = "auto"
    cuda_pdl: str = "auto"
    cuda_argmax: str = "warp"
    webgpu_gemm: str = "auto"
    webgpu_gemv: str = "auto"
    webgpu_fuse: str = "auto"
    webgpu_subgroups: str = "auto"
    webgpu_dp4a_act: str = "8"

    def __post_init__(self) -> None:
        for f in fields(self):
            value, allowed = getattr(self, f.name), CHOICES[f.name][0]
            if value not in allowed:
                close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise KernelOptionError(f"--opt {f.name}={value} is not a value of {f.name}{hint}; use one of "
                                        f"{', '.join(allowed)}")

    @classmethod
    def parse(cls, items: list[str] | tuple[str, ...] | None) -> KernelOptions:
        """['cuda_gemm=simt', ...] -> KernelOptions; unknown names and values fail with the closest valid one."""
        values: dict[str, str] = {}
        for item in items or ():
            name, sep, value = item.partition("=")
            name, value = name.strip().replace("-", "_"), value.strip()
            if not sep or not name or not value:
                raise KernelOptionError(f"--opt {item!r} is not NAME=VALUE; e.g. --opt cuda_gemm=simt "
                                        f"(options: {', '.join(CHOICES)})")
            if name not in CHOICES:
                close = difflib.get_close_matches(name, list(CHOICES), n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise KernelOptionError(f"--opt {name} is not a kernel option{hint}; options: {', '.join(CHOICES)}")
            if name in values and values[name] != value:
                raise KernelOptionError(f"--opt {name} is given twice ({values[name]} and {value}); give it once")
            values[name] = value
        return cls(**values)

    @property
    def subgroup_lanes(self) -> int:
        """--opt webgpu_subgroups as lanes of the main library (0: off, and auto's portable library)."""
        return 0 if self.webgpu_subgroups in ("off", "auto") else int(self.webgpu_subgroups)

    @property
    def subgroup_twins(self) -> tuple[int, ...]:
        """Lanes of the twin libraries a WebGPU build adds (auto: one at 32), each picked at load where it runs."""
        return SUBGROUP_TWINS if self.webgpu_subgroups == "auto" else ()

    def with_subgroups(self, lanes: int) -> KernelOptions:
        """These options with --opt webgpu_subgroups=lanes (a twin's build)."""
        return replace(self, webgpu_subgroups=str(lanes))

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    def changed(self) -> dict[str, str]:
        """The options that differ from their defaults (what the compile summary shows)."""
        default = KernelOptions()
        return {k: v for k, v in asdict(self).items() if getattr(default, k) != v}


def describe() -> str:
    """One paragraph per option, for `edgellm compile --help-opts`."""
    return "\n".join(f"{name}: {' | '.join(values)}\n    {text}" for name, (values, text) in CHOICES.items())
