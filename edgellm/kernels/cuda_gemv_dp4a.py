"""The one-token INT4 decode GEMV with int8 activations and integer dot products on CUDA (`--opt cuda_gemv=auto`
for `in` >= AUTO_MIN_IN, every GEMV it covers with `--opt cuda_gemv=dp4a`).

kernels/cuda/int4_gemv_dp4a.cu: x quantized to int8 while the block stages it (a scale d per packed word of 8
activations, as the WebGPU/Vulkan default, webgpu_linear.int4_gemv_dp4a with act_group 8, and the CPU int8 rows),
two dp4a per weight word, one float FMA per group and row with the weight scale. About half the instructions of
cuda_gemv.int4_gemv_h2 per weight byte. The values differ from the fp16x2 kernel's by the activations' rounding
(|error| <= sum |w| d / 2 per output; docs/fidelity.md measured the same arithmetic on Vulkan: SmolLM2 top-1 97.8%
of the fp16 activations' answers, KL 6e-4, 65.5% / 65.7% against fp32).

Where the registry takes it (`applies`): the plain decode GEMV (no bias) and, with the option, gate_up with its silu
epilogue, on the 4-bit symmetric grids (q4f16_1, q4f16_0), sm_61+; the GEMVs that stage the residual add + RMSNorm
keep int4_gemv_h2. Work split and configs: int4_gemv_h2's picks for the shape (cuda_gemv.xs_gemv_config /
fused_gemv_config); on sm_90 the short rows in blocks of 16 warps where 256 blocks remain (Llama-3-8B's o:
`gemv_config`), and the long rows of several steps a lane (Llama-3-8B's down) through a cp.async ring in shared
memory (`ring_plan`).
"""

from __future__ import annotations

from .._tvm import compiler
from .cuda import cuda_source
from .cuda_gemv import GROUP, QMAX, prefetches_l2

_SRC = cuda_source("int4_gemv_dp4a.cu")
MIN_SM = 61  # dp4a
# (warps, rows, unroll, ksplit) of the silu GEMV (gate_up) by `in`, in place of int4_gemv_h2's pick: every block
# quantizes the whole x while it stages it, so fewer, wider blocks quantize it fewer times (an A/B knob of
# bench/gpu_pdl.py)
SILU_CONFIG: dict[int, tuple[int, int, int, int]] = {}
# (warps, rows, unroll, ksplit) of gate_up + silu in the quantized MLP chain (registry.dp4a_mlp): 8 outputs a block,
# one packed word of its quantized output. 4 warps of 4 rows (two outputs a warp); H200, Llama-3-8B tg128
# (docs/benchmarks/h200-pdl.md run 44): 631.3 tok/s against 614.7 with 8 warps of 2 rows (gate_up 18.4 -> 19.7 us)
QOUT_SILU_CONFIG = (4, 4, 2, 1)
# the chain where `hidden` is at least this: above cuda_gemv.FUSED_NORM_SILU_AUTO_MAX gate_up does not stage the norm
# itself (0: that rule); an A/B knob of bench/gpu_pdl.py
CHAIN_MIN_HIDDEN = 0
# --opt cuda_gemv=auto takes these kernels for the plain decode GEMVs (and the MLP chain) whose `in` is at least this.
# H200, tg128 against fp16 activations (docs/benchmarks/h200-pdl.md runs 40-47): Llama-3.2-1B (o and down, `in` 2048
# and 8192) +2.4-2.7%, Llama-3-8B (o, and the chain for its MLP) +2-3%; SmolLM2-135M (`in` 576 and 1536) lost 4.6%
# with every GEMV on dp4a, so it keeps fp16x2. gate_up + silu quantizing x in every block (without the chain) only
# with --opt cuda_gemv=dp4a: it lost on the 8B (18.5 -> 21-24 us)
AUTO_MIN_IN = 2048
# (warps, rows, unroll, ksplit) of the plain and `preq` dp4a GEMVs by (in, out), in place of gemv_config's; an A/B
# knob of bench/gpu_pdl.py
PLAIN_CONFIG: dict[tuple[int, int], tuple[int, int, int, int]] = {}
# the long-`in` GEMVs (down; `in` >= 8192) take a lane's whole share of the row in one step where it is at most this
# many groups, so every weight load of a block goes before its PDL wait. H200 (h200-pdl.md runs 48-49): the 1B's
# down (`in` 8192, 4 groups a lane) 4.13 -> 2.64 us a layer, tg128 2,487.0-2,493.8 -> 2,520.1-2,530.9 (gate_up before
# it slowed 8.49 -> 9.14 us: down's early loads take part of the bandwidth). The 8B's (14,336: 7 a lane) keeps
# int4_gemv_h2's 2 a step in registers: 4 a step lost 6% (634.9 -> 596.0), 7 in one step (8 warps) 7%; on sm_90 it
# takes the cp.async ring instead (ring_plan below)
LONG_IN_UNROLL = 4
# On sm_90 the short GEMVs (int4_gemv_h2's pick of 8 warps: o) take blocks of 16 warps where that still leaves at
# least this many blocks: half as many blocks quantize the whole x after their wait. H200, Llama-3-8B's o (4096 ->
# 4096: 256 blocks instead of 512; docs/benchmarks/h200-pdl.md run 60): 3.20 -> 2.95 us a layer end to end, tg128
# 672.5 / 673.0 -> 681.1 tok/s, bit-equal (the same teams of 2 warps). The 1B's o (2048 -> 2048) would leave 128
# blocks, not measured: it keeps 8 warps
WIDE_MIN_BLOCKS = 256


def gemv_config(in_f: int, out_f: int, sm: int = 0) -> tuple[int, int, int, int]:
    """(warps, rows, unroll, ksplit) of the plain and `preq` dp4a GEMVs on sm_`sm`: PLAIN_CONFIG's where it names the
    shape, else int4_gemv_h2's work split for it (cuda_gemv.xs_gemv_config), the long `in` (>= 8192) in one step
    where a lane's groups are at most LONG_IN_UNROLL, on sm_90 the short ones in blocks of 16 warps where
    WIDE_MIN_BLOCKS allow. A lane sums its groups in the same order at any unroll and in any number of teams: the
    same values."""
    from .cuda_gemv import xs_gemv_config

    if (in_f, out_f) in PLAIN_CONFIG:
        return PLAIN_CONFIG[(in_f, out_f)]
    w, r, u, k, _ = xs_gemv_config(in_f, out_f)
    per_lane = steps_per_lane(in_f, 1, k)  # a lane's groups
    if in_f >= 8192 and u < per_lane <= LONG_IN_UNROLL:
        u = per_lane
    if sm >= 90 and w == 8 and -(-out_f // outputs_per_block(16, r, k)) >= WIDE_MIN_BLOCKS:
        w = 16
    return w, r, u, k


def applies(in_f: int, out_f: int, sm: int, bias: bool, zero_point: bool, silu: bool = False) -> bool:
    """Plain (or silu-fused) 4-bit symmetric rows with no bias, `in` a whole number of groups, sm_61+."""
    return (sm >= MIN_SM and not bias and not zero_point and in_f % GROUP == 0 and in_f > 0
            and (not silu or out_f % 2 == 0))


def outputs_per_block(warps: int, rows: int, ksplit: int, silu: bool = False) -> int:
    """Outputs a block writes: its warps / ksplit teams, each `rows` rows (silu: rows / 2 gate-up pairs)."""
    return warps // ksplit * (rows // 2 if silu else rows)


def qout_fits(out: int, warps: int, rows: int, ksplit: int, silu: bool = False) -> bool:
    """Whether a `qout` GEMV of this config can write its `out` outputs (after silu) as whole packed words: a block's
    outputs a multiple of 8 dividing `out`."""
    per_block = outputs_per_block(warps, rows, ksplit, silu)
    return per_block % 8 == 0 and out % per_block == 0


def smem_bytes(in_f: int, warps: int, rows: int, unroll: int = 1, depth: int = 0, qout_floats: int = 0) -> int:
    """The staged x: per packed word 8 bytes of int8, its d and OFF * sum(q); the K-split partials; a `qout`
    GEMV's outputs; with `depth` the cp.async ring of weights (depth steps of unroll x rows 16-byte words a
    thread, 16-byte aligned)."""
    base = in_f // 8 * 16 + warps * rows * 4 + qout_floats * 4
    return base if depth == 0 else base + 15 + depth * unroll * rows * warps * 32 * 16


# The cp.async ring (int4_gemv_dp4a's D, sm_80+): a thread's weights D steps ahead in shared memory instead of one
# step in registers, the first D steps issued before the PDL wait. The plain and `preq` GEMVs with a long `in` (>=
# ASYNC_MIN_IN) that take more than one step a lane take it on sm_90+, ASYNC_DEFAULT steps of ASYNC_UNROLL groups
# deep, where the block's shared memory stays under ASYNC_MAX_SMEM (two blocks an SM of sm_90's 227 KB). H200,
# Llama-3-8B (docs/benchmarks/h200-pdl.md runs 53-54), down (`in` 14,336, blocks of 16 warps, teams of 2) end to end
# a layer and tg128: registers, 4 steps of 2 groups 11.5-11.7 us, 633.9-634.9 tok/s; ring 2 deep of 2 groups 7.96-
# 8.05 us, 651.1-659.0; 3 deep of 1 group 7.86 us, **668.7**; 4 deep of 1 group 655.3; 3 or 4 deep of 2 groups (one
# block an SM) 623.9 / 611.8; blocks of 8 warps 612.5. gate_up before down slows by 1.4-2.3 us (down's weights
# stream under its tail): the pair 29.6 -> 27.2 us. gate_up itself (`in` 4096, 2 steps) lost with a ring 2 deep
# (586.8: 5 blocks an SM instead of 7).
ASYNC_MIN_IN = 8192
ASYNC_DEFAULT = 3
ASYNC_UNROLL = 1
ASYNC_MAX_SMEM = 112 << 10
# by (in, out) of the GEMV (gate_up + silu: out = 2 x inter), in place of the rule above, in the split it is asked
# with (0: the registers); an A/B knob of bench/gpu_pdl.py
ASYNC_DEPTH: dict[tuple[int, int], int] = {}


def ring_plan(in_f: int, out_f: int, sm: int,
              cfg: tuple[int, int, int, int] | None = None) -> tuple[tuple[int, int, int, int], int]:
    """(work split, ring depth) of a dp4a GEMV: `cfg` (default gemv_config's) and ASYNC_DEPTH's depth where it names
    the shape (sm_80+); else, for the rule above, the split with ASYNC_UNROLL groups a step and ASYNC_DEFAULT deep;
    else `cfg` and 0. A split the caller fixes (`cfg` given: gate_up + silu's QOUT_SILU_CONFIG, whose ring lost)
    takes a ring from ASYNC_DEPTH only. Depths are capped at the steps a lane and 4. A lane sums its groups in the
    same order at any unroll and depth: the same values."""
    fixed = cfg is not None
    cfg = cfg or gemv_config(in_f, out_f, sm)
    w, r, u, k = cfg
    if (in_f, out_f) in ASYNC_DEPTH:
        return cfg, (min(ASYNC_DEPTH[(in_f, out_f)], steps_per_lane(in_f, u, k), 4) if sm >= 80 else 0)
    if (fixed or sm < 90 or in_f < ASYNC_MIN_IN or steps_per_lane(in_f, u, k) < 2
            or (in_f, out_f) in PLAIN_CONFIG):
        return cfg, 0
    d = min(ASYNC_DEFAULT, steps_per_lane(in_f, ASYNC_UNROLL, k), 4)
    if d < 1 or smem_bytes(in_f, w, r, ASYNC_UNROLL, d, w * r) > ASYNC_MAX_SMEM:
        return cfg, 0
    return (w, r, ASYNC_UNROLL, k), d


def steps_per_lane(in_f: int, unroll: int, ksplit: int) -> int:
    """int4_gemv_dp4a's steps a lane: its groups (`in` / 32 over 32 x ksplit lanes) `unroll` at a time."""
    return -(-(in_f // GROUP) // (32 * ksplit * unroll))


def int4_gemv_dp4a(in_f: int, out_f: int, warps: int, rows: int, unroll: int, ksplit: int, offset: int = QMAX,
                   silu: bool = False, pdl: bool = False, preq: bool = False, qout: bool = False, depth: int = 0):
    """y[1, out] = x[1, in] W^T (silu: silu(gate) * up [1, out / 2], gate rows first), arguments (x, q_weight,
    q_scale, out) as int4_gemv_h2's without bias, already scheduled. `pdl` (sm_90): the first step's weight loads
    (and the L2 prefetch of the block's rows where cuda_gemv.prefetches_l2) before the wait for the kernel before.
    `preq`: x arrives quantized, uint32 [in / 8, 4] (add_rms_norm_q8's or a `qout` GEMV's output: per packed word of 8
    activations its int8 pairs, d and sum(q)); `qout`: the output leaves quantized the same way, uint32 [out' / 8, 4]
    (a block's outputs whole words: warps / ksplit x outputs a team a multiple of 8)."""
    from tvm.script import tirx as T

    from .cuda_pdl import WAITS_INSIDE

    if in_f % GROUP or in_f <= 0:
        raise ValueError(f"int4_gemv_dp4a needs `in` a positive multiple of {GROUP}, got {in_f}")
    if warps % ksplit or min(warps, rows, unroll, ksplit) < 1:
        raise ValueError(f"int4_gemv_dp4a: warps {warps} must be a positive multiple of ksplit {ksplit}")
    if silu and (rows % 2 or out_f % 2):
        raise ValueError(f"int4_gemv_dp4a: silu needs an even `rows` and `out` (got {rows}, {out_f})")
    if not 0 <= offset < 16:
        raise ValueError(f"int4_gemv_dp4a: offset must be in 0..15, got {offset}")
    G, W = in_f // GROUP, warps
    nout = out_f // 2 if silu else out_f
    per_block = outputs_per_block(W, rows, ksplit, silu)
    if qout and not qout_fits(nout, W, rows, ksplit, silu):
        raise ValueError(f"int4_gemv_dp4a: qout needs a block's {per_block} outputs a multiple of 8 dividing {nout}")
    nb = (nout + per_block - 1) // per_block
    pf = pdl and prefetches_l2(in_f, out_f)
    b = {True: "true", False: "false"}
    if not 0 <= depth <= min(4, steps_per_lane(in_f, unroll, ksplit)):
        raise ValueError(f"int4_gemv_dp4a: depth {depth} must be 0..4 and at most the steps a lane")
    call = (f"edgellm_q4gemv_dp4a<{W}, {rows}, {unroll}, {ksplit}, {G}, {nout}, {offset}, {b[silu]}, {b[pf]}, "
            f"{b[pdl]}, {b[preq]}, {b[qout]}" + (f", {depth}>" if depth else ">"))
    mark = WAITS_INSIDE if pdl else "edgellm_noop"
    smem = smem_bytes(in_f, W, rows, unroll, depth, per_block if qout else 0)
    x_shape, x_dtype = ((in_f // 8, 4), "uint32") if preq else ((1, in_f), "float16")
    o_shape, o_dtype = ((nout // 8, 4), "uint32") if qout else ((1, nout), "float16")

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer(x_shape, x_dtype), qw: T.Buffer((out_f, G * 4), "uint32"),
               qs: T.Buffer((out_f, G), "float16"), out: T.Buffer(o_shape, o_dtype)):
        with T.sblock("root"):
            T.reads()
            T.writes()
            T.launch_thread("blockIdx.x", nb)
            T.launch_thread("threadIdx.x", W * 32)
            sm = T.alloc_buffer((smem,), "uint8", scope="shared.dyn")
            T.evaluate(T.call_extern("void", mark))
            T.evaluate(T.cuda.func_call(call, x.data, qw.data, qs.data, out.data, sm.data, source_code=_SRC))

    grid = "" if offset == QMAX else f"_o{offset}"
    return kernel.with_attrs({"edgellm.kernel": "gemv", "op_pattern": 8, "tirx.is_scheduled": True,
                              "tir.noalias": True,
                              "edgellm.gemv": f"dp4a_w{W}r{rows}u{unroll}k{ksplit}" + grid + ("_silu" if silu else "")
                              + ("_pf" if pf else "") + ("_preq" if preq else "")
                              + ("_qout" if qout else "") + (f"_cp{depth}" if depth else "")})


def norm_q8_supports(hidden: int) -> bool:
    """add_rms_norm_q8's one block of hidden / 8 threads in whole warps: hidden a multiple of 256, at most 8192."""
    return hidden > 0 and hidden % 256 == 0 and hidden <= 8192


def add_rms_norm_q8(hidden: int, eps: float):
    """(x + y, rms_norm(x + y) * w quantized for a `preq` GEMV) for one token: arguments x [1, hidden], y [1, hidden],
    w [hidden] (fp16); outputs x + y [1, hidden] fp16 and uint32 [hidden / 8, 4]. One block of hidden / 8 threads
    (hidden a multiple of 256, at most 8192); launched like every kernel of the chain (cuda_pdl adds its wait)."""
    from tvm.script import tirx as T

    if not norm_q8_supports(hidden):
        raise ValueError(f"add_rms_norm_q8 needs `hidden` a multiple of 256 up to 8192, got {hidden}")
    nt = hidden // 8
    call = f"edgellm_add_rms_norm_q8<{hidden}>"

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer((1, hidden), "float16"), y: T.Buffer((1, hidden), "float16"),
               w: T.Buffer((hidden,), "float16"), xo: T.Buffer((1, hidden), "float16"), hq: T.Buffer((hidden // 8, 4), "uint32")):
        with T.sblock("root"):
            T.reads()
            T.writes()
            T.launch_thread("blockIdx.x", 1)
            T.launch_thread("threadIdx.x", nt)
            red = T.alloc_buffer((32,), "float32", scope="shared")
            T.evaluate(T.cuda.func_call(call, x.data, y.data, w.data, xo.data, hq.data, T.float32(eps), red.data,
                                        source_code=_SRC))

    return kernel.with_attrs({"op_pattern": 8, "tirx.is_scheduled": True, "tir.noalias": True})
