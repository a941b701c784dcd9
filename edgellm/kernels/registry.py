"""One registry maps (operation, scheme, target, KernelOptions) to a kernel, builds each kernel once, and records
what it picked.

Models ask the registry for every hand-written or scheduled kernel (`KernelRegistry.linear`, `.embedding`,
`.add_rms_norm`, `.silu_mul`, `.fused_gemv`, `.argmax`, and the KV cache's attention and RoPE through `.kv_cache_kernels`); they
never look at the ambient target. Every returned PrimFunc is already scheduled for the registry's target (it
carries `tirx.is_scheduled`), so the compile pipeline only schedules what TVM itself emits (dlight).

The rules below are the measured defaults (docs/benchmarks/); KernelOptions force another kernel where it applies.
`chosen` lists, per operation, the kernels picked, and goes into the manifest so two artifacts built alike cannot
differ invisibly.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from .._tvm import quick_script_parsing
from ..quant.schemes import QuantScheme
from . import cuda_gemv_dp4a, cuda_pdl
from .options import KernelOptions


class KernelRegistry:
    def __init__(self, target, options: KernelOptions | None = None,
                 on_build: Callable[[str, int], None] | None = None):
        """on_build(kernel name, kernels built so far) is called after each new build (compile progress)."""
        self.target, self._on_build = target, on_build
        self.options = options or KernelOptions()
        self.kind: str = target.kind.name  # llvm | cuda | metal | opencl | webgpu ...
        self.chosen: dict[str, set[str]] = defaultdict(set)
        self._built: dict[tuple, object] = {}
        # a kernel was built with subgroup shuffles (the manifest then records their width); TVM's own kernels use
        # them where the target has supports_subgroups (TargetPreset.tvm with subgroup_lanes)
        self._sg_used = self.kind == "webgpu" and bool(target.attrs.get("supports_subgroups", False))
        if self.kind == "cuda" and self.options.cuda_gemm == "wgmma":  # refused before any model is traced
            from .cuda_gemm import gemm_choice

            gemm_choice(4096, 4096, self.sm, "wgmma")
        if self.options.cuda_pdl == "on" and not (self.kind == "cuda" and cuda_pdl.supported(self.sm)):
            raise ValueError(f"--opt cuda_pdl=on needs a CUDA target of sm_{cuda_pdl.MIN_SM} or newer (Hopper), "
                             f"not {self._target_name()}; leave cuda_pdl at auto")

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    def _once(self, key: tuple, op: str, name: str, build: Callable[[], object]):
        """Build (or reuse) the kernel `name` for `key`; record that `op` uses it."""
        self.chosen[op].add(name)
        if key not in self._built:
            with quick_script_parsing():
                self._built[key] = build()
            if self._on_build is not None:
                self._on_build(name, len(self._built))
        return self._built[key]

    @property
    def sm(self) -> int:
        """CUDA compute capability as an integer (90 for sm_90), 0 elsewhere."""
        arch = str(self.target.attrs.get("arch", "")) if self.kind == "cuda" else ""
        digits = "".join(ch for ch in arch[3:] if ch.isdigit()) if arch.startswith("sm_") else ""
        return int(digits or 0)

    @property
    def pdl(self) -> bool:
        """Whether this build launches its CUDA kernels with programmatic dependent launch (kernels/cuda_pdl.py)."""
        return self.kind == "cuda" and cuda_pdl.supported(self.sm) and self.options.cuda_pdl != "off"

    def _target_name(self) -> str:
        return f"{self.kind} {self.target.attrs.get('arch', '')}".strip()

    @property
    def webgpu_sg(self) -> int:
        """Lanes the WebGPU decode GEMVs reduce over by subgroup shuffles (--opt webgpu_subgroups; 0: none)."""
        v = self.options.subgroup_lanes
        if self.kind != "webgpu" or not v:
            return 0
        warp = int(self.target.attrs.get("thread_warp_size", 1))
        if self.target.attrs.get("supports_subgroups", False) and warp != v:
            raise ValueError(f"--opt webgpu_subgroups={v} with a target whose subgroup warp is {warp} lanes: build "
                             "the target with TargetPreset.tvm(subgroup_lanes=...) of the same width")
        return v

    def _sg(self) -> int:
        """webgpu_sg, for a kernel being built with it (recorded: the artifact then needs such an adapter)."""
        self._sg_used = self._sg_used or self.webgpu_sg > 0
        return self.webgpu_sg

    def _dp4a_act(self) -> int:
        """--opt webgpu_dp4a_act: activations an int8 scale of the dp4a GEMV covers."""
        return int(self.options.webgpu_dp4a_act)

    def manifest_entry(self) -> dict:
        """Options and kernels picked; `subgroup_lanes` where a kernel uses subgroup shuffles over that many lanes
        (runtime/devices.py refuses an adapter whose subgroups span fewer)."""
        entry = {"options": self.options.as_dict(), "chosen": {op: sorted(v) for op, v in sorted(self.chosen.items())}}
        if self._sg_used:
            entry["subgroup_lanes"] = self.webgpu_sg
        return entry

    # ---- linear and embedding ----------------------------------------------------------------------------------
    def linear(self, rows: int | None, in_f: int, out_f: int, scheme: QuantScheme, out_dtype: str, bias: bool):
        """y = x W^T (+ b) for `scheme`'s stored weight; rows=1 is the decode GEMV, None a symbolic row count."""
        op = "linear_gemv" if rows == 1 else "linear"
        name, build = self._pick_linear(rows, in_f, out_f, scheme, out_dtype, bias)
        return self._once(("linear", name, rows, in_f, out_f, scheme, out_dtype, bias), op, name, build)

    def _pick_linear(self, rows, in_f, out_f, scheme, out_dtype, bias) -> tuple[str, Callable[[], object]]:
        from . import te_linear

        gemv, t, o = rows == 1, self.target, self.options
        if scheme.act_quant == "int8":
            from . import cpu_linear_int8 as cpu

            if self.kind != "llvm":
                raise ValueError(f"scheme {scheme.name} has CPU kernels only; target {self.kind} needs another scheme")
            family = {"auto": None, "portable": "generic"}.get(o.cpu_dot, o.cpu_dot)
            path = cpu.plan(t, scheme.padded_in(in_f) // scheme.elems_per_word, family)
            if scheme.bits == 8:  # the Q8_0 grid (8-bit embedding / head): int8 x int8
                from . import cpu_linear_int8_q8 as cpu8

                return f"int8x8_dot_{path.name}", lambda: cpu8.linear_int8_q8(rows, in_f, out_f, scheme, bias, t,
                                                                            family)
            return f"int8_dot_{path.name}", lambda: cpu.linear_int8(rows, in_f, out_f, scheme, bias, t, family)

        def te():
            return te_linear.linear(rows, in_f, out_f, scheme, out_dtype, bias)

        if self.kind == "llvm":
            from .schedule_cpu import schedule_cpu_linear

            return "te_cpu", lambda: schedule_cpu_linear(te(), t, gemv)
        from . import schedule_gpu as sg

        # the hand-written CUDA kernels cover 4-bit, 8 per word, group-32 weights with no padding: the grid from the
        # row (q_offset 7 or 8: (q - offset) * scale; zero_point: q * scale + min); `grid7` is the q4*_1 grid, the
        # only one the older kernels (fp32 TE GEMV, first tensor-core GEMM, WebGPU GEMV) decode
        plain = (scheme.quantized and scheme.group_size == 32 and scheme.padded_in(in_f) == in_f
                 and scheme.scale_dtype.startswith("float"))
        int4 = plain and scheme.bits == 4 and scheme.elems_per_word == 8
        grid7 = int4 and not scheme.zero_point and scheme.offset == 7
        fp16 = out_dtype == scheme.scale_dtype == "float16"
        if gemv and self.kind == "cuda" and plain:
            from . import cuda_gemv

            h2 = o.cuda_gemv in ("auto", "fp16x2", "fp16x2-smem", "dp4a") and fp16 and cuda_gemv.h2_supports(
                in_f, out_dtype, scheme.scale_dtype, out_dtype)
            if h2 and scheme.bits == 8:  # the 8-bit embedding / head rows (q8f16_1, the Q8_0 grid)
                cfg = cuda_gemv.int8_gemv_config(in_f, out_f)
                return "int8_gemv_fp16x2", lambda: cuda_gemv.int8_gemv_h2(in_f, out_f, bias, *cfg)
            if h2 and int4:
                zp, off, grid = scheme.zero_point, scheme.offset, _grid_suffix(scheme)
                if self._cuda_dp4a(in_f) and cuda_gemv_dp4a.applies(in_f, out_f, self.sm, bias, zp):
                    cfg, d = cuda_gemv_dp4a.ring_plan(in_f, out_f, self.sm)
                    return f"int4_gemv_dp4a{grid}", lambda: cuda_gemv_dp4a.int4_gemv_dp4a(in_f, out_f, *cfg, offset=off,
                                                                                         pdl=self.pdl, depth=d)
                if o.cuda_gemv in ("auto", "fp16x2-smem", "dp4a"):  # x in shared memory (docs/benchmarks/h200-gemv.md)
                    *cfg, fold = cuda_gemv.xs_gemv_config(in_f, out_f)
                    return f"int4_gemv_fp16x2_smem{grid}", lambda: cuda_gemv.int4_gemv_h2(
                        in_f, out_f, bias, *cfg, offset=off, zero_point=zp, xsmem=True, fold_shift=fold,
                        pdl=self.pdl)
                cfg = sg.h2_gemv_config(in_f, out_f)
                return f"int4_gemv_fp16x2{grid}", lambda: cuda_gemv.int4_gemv_h2(in_f, out_f, bias, *cfg,
                                                                                   offset=off, zero_point=zp)
            if grid7 and cuda_gemv.supports(in_f, 32, 4, 8):
                return "int4_gemv_te", lambda: sg.schedule_gpu_int4_gemv(
                    cuda_gemv.int4_gemv(in_f, out_f, out_dtype, scheme.scale_dtype, out_dtype, bias), t)
        if not gemv and self.kind == "cuda":
            from . import cuda_gemm

            if int4 and fp16 and self.sm >= 80 and o.cuda_gemm != "simt" and rows is None \
                    and cuda_gemm.tc_supports(in_f, out_f, out_dtype, scheme.scale_dtype, out_dtype):
                if o.cuda_gemm in ("auto", "wgmma", "mma-pipelined") and cuda_gemm.tc2_supports(
                        in_f, out_f, out_dtype, scheme.scale_dtype, out_dtype):
                    cfg = cuda_gemm.gemm_choice(in_f, out_f, self.sm, o.cuda_gemm)  # wgmma on sm_90
                    zp, off = scheme.zero_point, scheme.offset
                    name = cuda_gemm.gemm_kernel_name(cfg[0]) + _grid_suffix(scheme)
                    if o.cuda_gemm_small != "gemm":  # m <= 16 (batch_decode, short chunks): the batched GEMV
                        from . import cuda_gemv_batch as gb

                        mma = o.cuda_gemm_small == "gemv"
                        return f"{name}+gemv_batch{gb.ROWS_MAX}" + ("" if mma else "_simt"), \
                            lambda: gb.int4_linear_small_rows(in_f, out_f, bias, cfg, offset=off, zero_point=zp,
                                                              mma=mma)
                    return name, lambda: cuda_gemm.int4_gemm_tc2(in_f, out_f, bias, *cfg, offset=off,
                                                                 zero_point=zp)
                if grid7:
                    half2 = o.cuda_gemm_decode == "half2"
                    return f"int4_gemm_mma_{o.cuda_gemm_decode}", lambda: cuda_gemm.int4_gemm_tc(
                        in_f, out_f, bias, half2=half2)

            def tiled():
                return sg.schedule_gpu_tiled_gemm(te(), t) or sg.schedule_gpu_linear(te(), t, gemv=False)

            return "gemm_simt", tiled
        if gemv and self.kind == "webgpu" and plain and scheme.bits == 8 and scheme.elems_per_word == 4 and fp16 \
                and not scheme.zero_point and scheme.offset == 128 and o.webgpu_gemv in ("auto", "h2", "dp4a"):
            from . import webgpu_linear  # the 8-bit head / embedding rows (q8f16_1)

            if webgpu_linear.h2_supports(in_f, out_f, out_dtype, scheme.scale_dtype, out_dtype, t):
                return "int8_gemv_h2_webgpu", lambda: webgpu_linear.int4_gemv_h2(in_f, out_f, bias, bits=8,
                                                                                  sg=self._sg())
        if gemv and self.kind == "webgpu" and grid7 and o.webgpu_gemv != "simple":  # other grids: the TE GEMV
            from . import cuda_gemv, webgpu_linear

            if o.webgpu_gemv in ("auto", "dp4a") and webgpu_linear.dp4a_supports(
                    in_f, out_f, out_dtype, scheme.scale_dtype, out_dtype, t,
                    act_group=self._dp4a_act()):  # int8 activations, dot4I8Packed (docs/vulkan.md: why auto)
                return "int4_gemv_dp4a_webgpu", lambda: webgpu_linear.int4_gemv_dp4a(
                    in_f, out_f, bias, x_dtype=out_dtype, scale_dtype=scheme.scale_dtype, out_dtype=out_dtype,
                    sg=self._sg(), act_group=self._dp4a_act())
            if o.webgpu_gemv in ("auto", "h2", "dp4a") and webgpu_linear.h2_supports(
                    in_f, out_f, out_dtype, scheme.scale_dtype, out_dtype, t):  # docs/benchmarks/vulkan-h200.md
                return "int4_gemv_h2_webgpu", lambda: webgpu_linear.int4_gemv_h2(in_f, out_f, bias, sg=self._sg())
            if o.webgpu_gemv in ("auto", "coalesced", "h2", "dp4a"):  # H200, 8B shapes: 0.4 -> 1.0-1.6 TB/s
                return "int4_gemv_coalesced_webgpu", lambda: webgpu_linear.int4_gemv_coalesced(
                    in_f, out_f, out_dtype, scheme.scale_dtype, out_dtype, bias)
            if cuda_gemv.supports(in_f, 32, 4, 8):
                return "int4_gemv_group_webgpu", lambda: webgpu_linear.int4_gemv(
                    in_f, out_f, out_dtype, scheme.scale_dtype, out_dtype, bias, t)
        if not gemv and self.kind == "webgpu" and o.webgpu_gemm != "simple":
            from . import webgpu_linear

            if webgpu_linear.tiled_supports(scheme.padded_in(in_f), out_f):
                return "gemm_tiled_webgpu", lambda: webgpu_linear.gemm(te(), t)
        return ("gemv_te_gpu" if gemv else "gemm_te_gpu"), lambda: sg.schedule_gpu_linear(te(), t, gemv)

    def embedding(self, vocab: int, hidden: int, scheme: QuantScheme, out_dtype: str):
        from . import te_linear

        if self.kind == "llvm":
            from .schedule_cpu import schedule_cpu_embedding as schedule
        else:
            from .schedule_gpu import schedule_gpu_embedding as schedule
        t = self.target
        return self._once(("embedding", vocab, hidden, scheme, out_dtype), "embedding", f"embedding_{self.kind}",
                          lambda: schedule(te_linear.embedding(vocab, hidden, scheme, out_dtype), t))

    # ---- elementwise and norms ---------------------------------------------------------------------------------
    def add_rms_norm(self, hidden: int, eps: float, dtype: str):
        """(x + y, rms_norm(x + y) * w) in one kernel, or None where there is none (the model uses two ops)."""
        if self.kind == "llvm" and hidden % 16 == 0:
            from . import cpu_math

            return self._once(("add_rms_norm", "cpu", hidden, eps, dtype), "add_rms_norm", "add_rms_norm_cpu16",
                              lambda: cpu_math.add_rms_norm_cpu(hidden, eps, dtype))
        if self.kind == "cuda":
            from . import cuda_math

            return self._once(("add_rms_norm", "cuda", hidden, eps, dtype), "add_rms_norm", "add_rms_norm_cuda_vec16",
                              lambda: cuda_math.add_rms_norm_gpu(hidden, eps, dtype))
        if self.kind == "webgpu":
            from . import webgpu_math

            return self._once(("add_rms_norm", "webgpu", hidden, eps, dtype), "add_rms_norm", "add_rms_norm_webgpu",
                              lambda: webgpu_math.add_rms_norm_webgpu(hidden, eps, dtype))
        return None

    def silu_mul(self, inter: int, dtype: str):
        """silu(gate) * up over [rows, 2 inter] -> [rows, inter] as a PrimFunc (CUDA), or None: on CPU the model
        writes it as a tensor expression with the vectorizable exp (`cpu_silu`), elsewhere as two Relax ops."""
        if self.kind == "cuda":
            from . import cuda_math

            return self._once(("silu_mul", inter, dtype), "silu_mul", "silu_mul_cuda_vec16",
                              lambda: cuda_math.silu_mul_gpu(inter, dtype))
        return None

    @property
    def decode_fusion(self) -> str:
        """Which decode fusions this build makes (--opt cuda_fuse): all | silu | off (off off CUDA); auto = all, but
        gate_up takes the norm only up to `in` cuda_gemv.FUSED_NORM_SILU_AUTO_MAX (`fused_gemv`)."""
        if self.kind == "webgpu":  # --opt webgpu_fuse (auto = all: docs/benchmarks/vulkan-h200.md)
            return {"auto": "all"}.get(self.options.webgpu_fuse, self.options.webgpu_fuse)
        if self.kind != "cuda":
            return "off"
        return {"auto": "all"}.get(self.options.cuda_fuse, self.options.cuda_fuse)

    def fused_gemv(self, in_f: int, out_f: int, scheme: QuantScheme, dtype: str, bias: bool,
                   norm_eps: float | None, silu: bool, add: bool = True):
        """The one-token decode GEMV with the residual add + RMSNorm before it (`norm_eps`: arguments x, delta,
        norm weight, the weights, [bias]; outputs y and x + delta) and/or silu(gate) * up after it (`silu`: the
        gate_up linear, output [1, out_f / 2]), as the same values as the separate kernels; None where this build
        keeps them apart (not CUDA, --opt cuda_fuse, a GEMV other than the 4-bit one with x in shared memory).
        `add=False`: the norm of x itself (x already holds the residual sum: `residual_gemv` wrote it); arguments x,
        norm weight, the weights; one output."""
        from . import cuda_gemv

        fuse = self.decode_fusion
        if fuse == "off" or (norm_eps is not None and fuse != "all") or (norm_eps is None and not silu):
            return None
        if not add and (self.kind != "cuda" or norm_eps is None):
            return None
        if self.kind == "webgpu":
            return self._webgpu_fused_gemv(in_f, out_f, scheme, dtype, bias, norm_eps, silu)
        stem = self._cuda_xs_gemv_stem(in_f, scheme, dtype)
        if stem is None or (norm_eps is not None and not cuda_gemv.fused_norm_supports(in_f)) or (silu and bias):
            return None
        if (norm_eps is not None and silu and self.options.cuda_fuse == "auto"
                and in_f > cuda_gemv.FUSED_NORM_SILU_AUTO_MAX):
            return None  # the model then takes add_rms_norm + the silu epilogue alone (measured faster there)
        *cfg, fold = cuda_gemv.fused_gemv_config(in_f, out_f, norm_eps is not None, silu)
        if silu and cfg[1] % 2:
            return None
        zp, off = scheme.zero_point, scheme.offset
        if (norm_eps is None and self.options.cuda_gemv == "dp4a"
                and cuda_gemv_dp4a.applies(in_f, out_f, self.sm, bias, zp, silu=True)):  # gate_up + silu, int8 x
            name = "int4_gemv_dp4a" + _grid_suffix(scheme) + "_silu"
            dcfg = cuda_gemv_dp4a.SILU_CONFIG.get(in_f, tuple(cfg))
            return self._once(("fused_gemv", name, in_f, out_f, scheme, dtype, bias, None, dcfg), "linear_gemv",
                              name, lambda: cuda_gemv_dp4a.int4_gemv_dp4a(in_f, out_f, *dcfg, offset=off, silu=True,
                                                                          pdl=self.pdl))
        name = stem + ("_norm" if norm_eps is not None else "") + ("" if add else "_noadd") + ("_silu" if silu else "")
        return self._once(("fused_gemv", name, in_f, out_f, scheme, dtype, bias, norm_eps), "linear_gemv", name,
                          lambda: cuda_gemv.int4_gemv_h2(in_f, out_f, bias, *cfg, offset=off, zero_point=zp,
                                                         xsmem=True, fold_shift=fold, norm_eps=norm_eps, silu=silu,
                                                         norm_add=add, pdl=self.pdl))

    def dp4a_mlp(self, hidden: int, inter: int, scheme: QuantScheme, dtype: str, eps: float):
        """The one-token MLP with int8 activations from the norm to down (--opt cuda_gemv=dp4a, CUDA): (add_rms_norm_q8:
        x + delta and the normed x quantized a packed word at a time; gate_up + silu taking it and leaving its output
        quantized the same way; down taking that), so no GEMV quantizes its input in every block; None elsewhere
        (other options, --opt cuda_fuse=all, a gate_up that stages the norm itself, shapes it does not cover)."""
        from . import cuda_gemv

        o = self.options
        min_hidden = cuda_gemv_dp4a.CHAIN_MIN_HIDDEN or cuda_gemv.FUSED_NORM_SILU_AUTO_MAX + 1
        if (self.kind != "cuda" or not self._cuda_dp4a(hidden) or o.cuda_fuse != "auto"
                or hidden < min_hidden or not cuda_gemv_dp4a.norm_q8_supports(hidden)
                or self._cuda_xs_gemv_stem(hidden, scheme, dtype) is None
                or not cuda_gemv_dp4a.applies(hidden, 2 * inter, self.sm, False, scheme.zero_point, silu=True)
                or not cuda_gemv_dp4a.applies(inter, hidden, self.sm, False, scheme.zero_point)):
            return None
        gu_cfg = cuda_gemv_dp4a.QOUT_SILU_CONFIG
        w, r, _, k = gu_cfg
        if not cuda_gemv_dp4a.qout_fits(inter, w, r, k, silu=True):
            return None
        dn_cfg, dn_d = cuda_gemv_dp4a.ring_plan(inter, hidden, self.sm)
        off, grid = scheme.offset, _grid_suffix(scheme)
        norm = self._once(("add_rms_norm_q8", hidden, eps), "add_rms_norm", "add_rms_norm_q8",
                          lambda: cuda_gemv_dp4a.add_rms_norm_q8(hidden, eps))
        gu_d = cuda_gemv_dp4a.ring_plan(hidden, 2 * inter, self.sm, gu_cfg)[1]
        gate_up = self._once(("dp4a_qout", hidden, 2 * inter, scheme, gu_cfg, gu_d), "linear_gemv",
                             f"int4_gemv_dp4a{grid}_silu_qout", lambda: cuda_gemv_dp4a.int4_gemv_dp4a(
                                 hidden, 2 * inter, *gu_cfg, offset=off, silu=True, pdl=self.pdl, preq=True, qout=True,
                                 depth=gu_d))
        down = self._once(("dp4a_preq", inter, hidden, scheme, dn_cfg, dn_d), "linear_gemv",
                          f"int4_gemv_dp4a{grid}_preq",
                          lambda: cuda_gemv_dp4a.int4_gemv_dp4a(inter, hidden, *dn_cfg, offset=off, pdl=self.pdl,
                                                                preq=True, depth=dn_d))
        return norm, gate_up, down

    def residual_gemv(self, in_f: int, out_f: int, scheme: QuantScheme, dtype: str):
        """The one-token decode GEMV that adds its output to the residual stream (o / down before a GEMV that takes
        the norm with `fused_gemv(add=False)`): arguments y's input, the weights, x; output x + y, rounded as
        add_rms_norm_gpu rounds it. Only with --opt cuda_fuse=all: measured within 1% of the default (H200 8B
        tg128 483.4 against 475.3 / 482.8, docs/benchmarks/h200-fusion.md), None otherwise."""
        from . import cuda_gemv

        if self.kind != "cuda" or self.options.cuda_fuse != "all":
            return None
        stem = self._cuda_xs_gemv_stem(in_f, scheme, dtype)
        if stem is None:
            return None
        *cfg, fold = cuda_gemv.xs_gemv_config(in_f, out_f)  # the plain GEMV's: the same sums
        zp, off = scheme.zero_point, scheme.offset
        name = stem + "_res"
        return self._once(("residual_gemv", name, in_f, out_f, scheme, dtype), "linear_gemv", name,
                          lambda: cuda_gemv.int4_gemv_h2(in_f, out_f, False, *cfg, offset=off, zero_point=zp,
                                                         xsmem=True, fold_shift=fold, res_in=True, pdl=self.pdl))

    def _cuda_dp4a(self, in_f: int) -> bool:
        """Whether a CUDA decode GEMV of this `in` takes int8 activations (cuda_gemv_dp4a): --opt cuda_gemv=dp4a, or
        auto where `in` >= cuda_gemv_dp4a.AUTO_MIN_IN."""
        g = self.options.cuda_gemv
        return g == "dp4a" or (g == "auto" and in_f >= cuda_gemv_dp4a.AUTO_MIN_IN)

    def _cuda_xs_gemv_stem(self, in_f: int, scheme: QuantScheme, dtype: str) -> str | None:
        """The name of the decode GEMV with x staged in shared memory for this row (`_pick_linear`'s
        int4_gemv_fp16x2_smem + the grid's suffix), where the fused and residual variants can stand in for it: 4-bit,
        8 per word, group 32, no padding, fp16, no act-order gather; None elsewhere."""
        from . import cuda_gemv

        if not (self.options.cuda_gemv in ("auto", "fp16x2-smem", "dp4a") and scheme.quantized and scheme.bits == 4
                and scheme.elems_per_word == 8 and scheme.group_size == 32 and not scheme.act_order
                and scheme.padded_in(in_f) == in_f and dtype == scheme.scale_dtype == "float16"
                and cuda_gemv.h2_supports(in_f, dtype, dtype, dtype)):
            return None
        return "int4_gemv_fp16x2_smem" + _grid_suffix(scheme)

    def _webgpu_fused_gemv(self, in_f, out_f, scheme, dtype, bias, norm_eps, silu):
        """webgpu_linear.int4_gemv_dp4a (auto, dp4a) or int4_gemv_h2 (h2, or auto where dp4a does not fit) with the
        fusions, where the unfused GEMV would be it (q4f16_1's grid)."""
        from . import webgpu_linear

        grid7 = (scheme.quantized and scheme.bits == 4 and scheme.elems_per_word == 8 and scheme.group_size == 32
                 and not scheme.zero_point and scheme.offset == 7 and not scheme.act_order)
        if not grid7 or self.options.webgpu_gemv not in ("auto", "h2", "dp4a") or scheme.padded_in(in_f) != in_f \
                or (silu and bias):
            return None
        shape = (in_f, out_f, dtype, scheme.scale_dtype, dtype, self.target)
        dp4a = self.options.webgpu_gemv in ("auto", "dp4a") and webgpu_linear.dp4a_supports(
            *shape, norm=norm_eps is not None, act_group=self._dp4a_act())  # the norm-fused one stages more
        if dp4a:
            kind = "dp4a"
        elif self.options.webgpu_gemv != "dp4a" and webgpu_linear.h2_supports(*shape):
            kind = "h2"
        else:
            return None
        name = f"int4_gemv_{kind}_webgpu" + ("_norm" if norm_eps is not None else "") + ("_silu" if silu else "")
        if kind == "dp4a":
            def make():
                return webgpu_linear.int4_gemv_dp4a(in_f, out_f, bias, norm_eps=norm_eps, silu=silu, x_dtype=dtype,
                                                    scale_dtype=scheme.scale_dtype, out_dtype=dtype, sg=self._sg(),
                                                    act_group=self._dp4a_act())
        else:
            def make():
                return webgpu_linear.int4_gemv_h2(in_f, out_f, bias, norm_eps=norm_eps, silu=silu, sg=self._sg())
        return self._once(("fused_gemv", name, in_f, out_f, scheme, dtype, bias, norm_eps), "linear_gemv", name, make)

    @property
    def cpu_silu(self):
        """The scalar silu with a vectorizable exp for CPU tensor expressions, or None off the CPU."""
        if self.kind != "llvm":
            return None
        from .cpu_math import silu

        self.chosen["silu_mul"].add("silu_mul_cpu_te")
        return silu

    def argmax(self, vocab: int):
        """(partial, final, parts) of the two-stage device argmax, or None where the target has none (CPU: the
        logits come back to the host anyway). The kernels are plain TIR: warp shuffles on CUDA, workgroup-memory
        trees on webgpu."""
        if self.kind not in ("cuda", "webgpu"):
            return None
        from . import cuda_math

        parts, reduce = cuda_math.ARGMAX_PARTS, self._argmax_reduce()
        partial = self._once(("argmax_partial", vocab, "float32"), "argmax", "argmax_two_stage",
                             lambda: cuda_math.argmax_partial_gpu(vocab, reduce=reduce))  # greedy_step's key too
        final = self._once(("argmax_final", vocab), "argmax", "argmax_two_stage",
                           lambda: cuda_math.argmax_final_gpu(vocab, reduce=reduce))
        return partial, final, parts

    def _argmax_reduce(self) -> str:
        """How the device argmax's blocks meet their candidates: CUDA warp shuffles (one barrier; the tree took two
        a level, 17 + 13 a token), else the workgroup-memory tree. `--opt cuda_argmax=tree` keeps the tree."""
        return "warp" if self.kind == "cuda" and self.options.cuda_argmax == "warp" else "tree"

    def greedy_step(self, vocab: int, dtype: str):
        """(partial, advance, parts) ending the owned cache's `decode_greedy` (CUDA): the first argmax stage on the
        head's `dtype` logits as they are (no cast kernel) and cuda_math.greedy_advance_gpu; None elsewhere."""
        if self.kind != "cuda":
            return None
        from . import cuda_math

        parts = cuda_math.ARGMAX_PARTS
        partial = self._once(("argmax_partial", vocab, dtype), "argmax", "argmax_two_stage",
                             lambda: cuda_math.argmax_partial_gpu(vocab, dtype=dtype, reduce=self._argmax_reduce()))
        advance = self._once(("greedy_advance", vocab), "greedy_step", "greedy_advance",
                             lambda: cuda_math.greedy_advance_gpu(vocab, reduce=self._argmax_reduce()))
        return partial, advance, parts

    # ---- KV cache ----------------------------------------------------------------------------------------------
    def kv_cache_kernels(self, *, heads: int, kv_heads: int, head_dim: int, v_head_dim: int, dtype: str,
                         attn_kind: str, rope_inline: bool, rope: dict | None,
                         rope_scaling: dict | None = None) -> dict[str, object]:
        """Kernels to put in place of TVM's PagedKVCache functions of the same name (see kernels/kv_cache.py).
        `rope`: {theta, scale, scaling (prepared), rotary_dim} when edgellm's RoPE may replace TVM's;
        `rope_scaling`: the scaling as TIRPagedKVCache prepared it (for TVM's own kernels rebuilt here)."""
        ours: dict[str, object] = {}
        if self.kind == "webgpu":
            return self._webgpu_kv_cache_kernels(heads, kv_heads, head_dim, dtype, attn_kind, rope_scaling)
        if self.kind == "cuda":
            from . import cuda_attention

            if self.options.cuda_attention != "tvm" and cuda_attention.supports(
                    self.target, dtype, head_dim, v_head_dim, attn_kind, rope_inline):
                ours["tir_attention_prefill_ragged"] = self._once(
                    ("attn_prefill", kv_heads, heads, head_dim, dtype), "attention_prefill", "attention_prefill_mma",
                    lambda: cuda_attention.attention_prefill_ragged_cuda(kv_heads, heads, head_dim, dtype))
            else:
                self.chosen["attention_prefill"].add("attention_prefill_tvm")
            return ours
        if self.kind != "llvm":
            return ours
        from . import cpu_attention as cpu_attn

        if head_dim % 16 == 0 and v_head_dim == head_dim and attn_kind == "mha":
            ours["tir_attention_decode_cpu"] = self._once(
                ("attn_decode_cpu", kv_heads, heads, head_dim, dtype), "attention_decode", "attention_decode_cpu_splitkv",
                lambda: cpu_attn.attention_decode_cpu(kv_heads, heads, head_dim, dtype))
            ours["tir_attention_prefill_ragged_cpu"] = self._once(
                ("attn_prefill_cpu", kv_heads, heads, head_dim, dtype), "attention_prefill", "attention_prefill_cpu",
                lambda: cpu_attn.attention_prefill_ragged_cpu(kv_heads, heads, head_dim, dtype))
        if rope is not None and cpu_attn.rope_supported(rope["scaling"]) and rope["rotary_dim"] % 2 == 0:
            ours["tir_split_rotary"] = self._once(
                ("rope_cpu", rope["theta"], rope["scale"], head_dim, heads, kv_heads, dtype, repr(rope["scaling"]),
                 rope["rotary_dim"]), "rope", "rope_cpu_per_token",
                lambda: cpu_attn.split_rotary_cpu(rope["theta"], rope["scale"], head_dim, heads, kv_heads, dtype,
                                                  rope["scaling"], rope["rotary_dim"]))
        return ours

    def _webgpu_kv_cache_kernels(self, heads, kv_heads, head_dim, dtype, attn_kind, rope_scaling) -> dict:
        """webgpu: TVM's decode attention with one query head a workgroup (kernels/webgpu_attention.py; H200 run 12,
        8B shapes: its kernel ~411 -> ~325 us a token, decode +8%); TVM's other cache kernels as they are."""
        from . import webgpu_attention as wa

        bdy, rope_scaling = wa.DECODE_BDY_MAX, {} if rope_scaling is None else rope_scaling  # TVM's needs a dict
        # bdy None: TVM's kernel (the bench's A/B); MLA has no decode kernel in TVM's cache
        if bdy is None or attn_kind != "mha" or not wa.fits(heads, kv_heads, head_dim, self.target, bdy):
            self.chosen["attention_decode"].add("attention_decode_tvm")
            return {}
        return {name: self._once(
            ("attn_decode_webgpu", bdy, kv_heads, heads, head_dim, dtype, sliding, repr(rope_scaling)),
            "attention_decode", f"attention_decode_tvm_q{bdy}",
            lambda sliding=sliding: wa.attention_decode(kv_heads, heads, head_dim, dtype, sliding, rope_scaling,
                                                        self.target, bdy))
            for name, sliding in (("tir_attention_decode", False), ("tir_attention_decode_sliding_window", True))}


def _grid_suffix(scheme: QuantScheme) -> str:
    """The kernel-name suffix of a 4-bit row's grid: "" for q4*_1's (q - 7) * s, _o8 for the Q4_0 grid, _min for
    q * s + min (the Q4_1 grid)."""
    return "_min" if scheme.zero_point else "" if scheme.offset == 7 else f"_o{scheme.offset}"
