"""GPU-specific variant of the INT4 linear kernel (decode GEMV), same signature as `te_linear.linear(1, ...)`.

`te_linear.linear` decodes each weight as `(nibble - 7) * scale` in float32: an integer-to-float conversion and a
multiply per weight. On a GPU at memory speed that arithmetic is the limit (an H100 converts int32 to float32 at
a quarter of its FMA rate). This variant computes the same function with fewer and cheaper operations:

* per group of 32 weights, `dot = sum_j x_j * (nib_j - 7)` in float32, then `acc += dot * scale` once per group;
* `nib - 7` without a conversion: the bit pattern `0x4B000000 | nib` is the float `2^23 + nib`, so
  `reinterpret_f32(0x4B000000 | nib) - (2^23 + 7)` is `nib - 7` exactly (float32 holds every integer below 2^24).

The result equals `te_linear.linear`'s up to float32 summation order. Blocks: `x_f32` (x in float32), `group_dot`
(per row and group), `matmul` (sum over groups with the scale), `epilogue` (cast, bias). The schedule is in
kernels/schedule_gpu.py.

`int4_gemv_h2` (below) is the fp16 one the CUDA pipeline uses by default: two weights per fp16x2 instruction,
written pre-scheduled; `int4_gemv` + its schedule stay for float32 activations (q4f32_*) and --opt cuda_gemv=te.
"""

from __future__ import annotations

import functools

from .._tvm import compiler

ACC = "float32"
MAGIC = 0x4B000000  # float32 exponent of 2^23: the low 23 bits then hold an integer exactly
GROUP, PER_WORD, BITS, QMAX = 32, 8, 4, 7


def supports(in_f: int, group_size: int, bits: int, elems_per_word: int) -> bool:
    """This variant covers 4-bit, 8-per-word, group-32 weights whose `in` needs no padding."""
    return bits == BITS and elems_per_word == PER_WORD and group_size == GROUP and in_f % GROUP == 0


def int4_gemv(in_f: int, out_f: int, x_dtype: str, scale_dtype: str, out_dtype: str, bias: bool):
    """y[1, n] = sum_k x[1, k] * W[n, k] (+ b[n]) with W packed as in quant/reference.py (nibble i at bits 4i,
    offset +7, one scale per 32 along `in`). Arguments: x, q_weight, q_scale, [bias], out."""
    c = compiler()
    te, tirx = c.te, c.tirx
    if in_f % GROUP:
        raise ValueError(f"int4_gemv needs `in` a multiple of {GROUP}, got {in_f}")
    groups = in_f // GROUP
    x = te.placeholder((1, in_f), x_dtype, "x")
    qw = te.placeholder((out_f, in_f // PER_WORD), "uint32", "q_weight")
    qs = te.placeholder((out_f, groups), scale_dtype, "q_scale")
    xf = te.compute((1, in_f), lambda i, k: x[i, k].astype(ACC), name="x_f32")

    def centered(n, g, j):  # float(nib - 7) for weight j of group g in row n, with no int->float conversion
        word = qw[n, g * (GROUP // PER_WORD) + j // PER_WORD]
        bits = ((word >> ((j % PER_WORD) * BITS).astype("uint32")) & tirx.const(15, "uint32")) | tirx.const(MAGIC, "uint32")
        return tirx.reinterpret(ACC, bits) - float(2**23 + QMAX)

    j = te.reduce_axis((0, GROUP), "j")
    dot = te.compute((1, out_f, groups), lambda i, n, g: te.sum(xf[i, g * GROUP + j] * centered(n, g, j), axis=j),
                     name="group_dot")
    g = te.reduce_axis((0, groups), "g")
    acc = te.compute((1, out_f), lambda i, n: te.sum(dot[i, n, g] * qs[n, g].astype(ACC), axis=g), name="matmul")
    args = [x, qw, qs]
    out = acc
    if bias:
        b = te.placeholder((out_f,), out_dtype, "bias")
        args.append(b)
        out = te.compute((1, out_f), lambda i, n: (acc[i, n] + b[n].astype(ACC)).astype(out_dtype), name="epilogue")
    elif out_dtype != ACC:
        out = te.compute((1, out_f), lambda i, n: acc[i, n].astype(out_dtype), name="epilogue")
    func = te.create_prim_func([*args, out])
    return func.without_attr("global_symbol").with_attrs({"edgellm.kernel": "gemv", "op_pattern": 8})


# ---------------------------------------------------------------------------------------------------------------
# Decode GEMV in fp16x2 arithmetic (CUDA sm_53+; built and measured for sm_80/sm_90), written pre-scheduled (tirx.is_scheduled): the TE route above
# spends about 4 instructions per weight (shift, and, or-to-float, subtract, FMA; the int->float trick is one op
# per weight), which caps the large shapes at ~2 TB/s. Here two weights share each instruction:
#
# * `(w >> 4s) & 0x000F000F` puts nibble s of word w in the low half and nibble s+4 in the high half; or-ing
#   H2_BASE_BITS makes each half the fp16 `32 + nib/32` exactly (fp16's ulp at 32 is 1/32), and subtracting
#   `32 + 7/32` gives `(nib - 7) / 32` exactly. The pair (s, s+4) meets the activations (x[8j+s], x[8j+s+4]),
#   built once per group with two byte-permutes per pair and shared by the warp's rows.
# * HFMA2 accumulates a group's 32 products in fp16x2: two accumulators per row (even and odd words), so each
#   fp16 lane sums 8 products. Scaling the weights by 1/32 (|nib - 7| / 32 <= 1/4) bounds that sum by
#   2 max|x|: no overflow while |x| < 32768 (real activations, outliers of a few thousand included; the GPU check
#   runs x with +-2000 channels). Products of |x| < 2^-9 are fp16 subnormals (absolute error 2^-25): only an x
#   that small everywhere would lose relative accuracy. Per group the 4 lanes go to fp32 and meet the scale
#   (times 32) in one FFMA; rows end in a warp shuffle reduction. H100 relative error against numpy float64:
#   4.6-5.0e-4 (the float32 TE kernel: 2.1e-4; the fp16 output rounding alone is ~1.5e-4).
#
# Work split: a block is `warps` warps; `ksplit` consecutive warps form a team that owns `rows` consecutive output
# rows; virtual lane v (warp k of the team, lane l: v = 32k + l) takes groups v, v + 32 ksplit, ... in steps of
# `unroll` groups (unroll x rows 16-byte weight loads in flight per lane per step, coalesced: a warp's load
# instruction reads 512 contiguous bytes of one row); the team's partial sums meet in shared memory.
# ---------------------------------------------------------------------------------------------------------------
H2_BASE_BITS = 0x50005000  # fp16 32.0 in both halves: or a nibble into the low mantissa bits -> 32 + nib/32
H2_SHIFT = 5  # the 1/32 above, undone in fp32 on the group's scale
H2_BASE_BITS8, H2_SHIFT8 = 0x40004000, 9  # 8-bit rows: fp16 2.0, whose ulp is 1/512: or a byte in -> 2 + byte/512


def h2_fma_sub(const_bits: int) -> str:
    """fp16x2 `(w - c) * x + acc` on uint32 registers, c = the fp16 pair `const_bits`. TVM's CUDA codegen splits
    every fp16x2 operation and every vector-typed extern call into per-lane scalar fp16 ops (inline asm each, so
    ptxas cannot pair them again), and has no way to declare a helper function; an extern call prints its name
    verbatim before the arguments, so the name is an immediately-invoked device lambda holding the two PTX
    instructions (HADD2 + HFMA2 in SASS). The subtracted pair is 32 + offset/32 (4-bit: the row's offset, 0 for
    the asymmetric rows) or 2 + 128/512 (8-bit)."""
    return ("[](uint w, uint x, uint acc) { uint t, r; asm(\"sub.rn.f16x2 %0, %1, %2;\" : \"=r\"(t) : \"r\"(w), "
            f"\"r\"(0x{const_bits:08X}u)); asm(\"fma.rn.f16x2 %0, %1, %2, %3;\" : \"=r\"(r) : \"r\"(t), \"r\"(x), "
            "\"r\"(acc)); return r; }")


def h2_fma_sub16(offset: int) -> str:
    """fp16x2 `(w / 16 - (2 + offset/32)) * x + acc`, w = `(word & 0x00F000F0) | 0x50005000` = 32 + nib/2 in each
    half (the nibble sits on mantissa bits 4..7, worth 1/2 each at 32): w / 16 = 2 + nib/32, so the first FMA gives
    (nib - offset) / 32 exactly (the exact product and difference are representable: no rounding), as the other
    decode does with a shift and a subtraction. Nibbles 1 and 5 of a word need no shift, and 2, 3, 6, 7 come from
    one `word >> 8`: one shift per word instead of three (int4_gemv_h2's `fold_shift`)."""
    c = 0xC000 + offset * 16  # -(2 + offset/32) in fp16: exponent of 2, mantissa offset/64 * 1024
    return ("[](uint w, uint x, uint acc) { uint t, r; asm(\"fma.rn.f16x2 %0, %1, %2, %3;\" : \"=r\"(t) : \"r\"(w), "
            f"\"r\"(0x2C002C00u), \"r\"(0x{c:04X}{c:04X}u)); asm(\"fma.rn.f16x2 %0, %1, %2, %3;\" : \"=r\"(r) : "
            "\"r\"(t), \"r\"(x), \"r\"(acc)); return r; }")


H2_FMA_SUB = h2_fma_sub(0x50075007)  # the q4f16_1 grid: (nib - 7) / 32
# fp16x2 `x * (1/32, 1/32) + acc`: the group's sum of x for the asymmetric rows' min term (scaled like the products)
H2_XSUM = ("[](uint x, uint acc) { uint r; asm(\"fma.rn.f16x2 %0, %1, %2, %3;\" : \"=r\"(r) : \"r\"(x), "
           "\"r\"(0x28002800u), \"r\"(acc)); return r; }")



# The step's loads all issued before its arithmetic: ptxas otherwise sinks most of the 16-byte loads of a step down
# to their first use (it issued 5 of 24 up front, the rest one by one between the FMAs, each exposing a memory
# latency). The xor of one register of every load, shifted right by 32 or more (`vl | 32`, unknown to the
# compiler; PTX clamps such shifts: the result is 0), seeds the step's fp16x2 accumulators: zero, but it depends on
# every load. Cost: about one LOP3 per 16-byte load. With it, all 32 loads of a 4-group 2-row step come first.
H2_ZERO_AFTER = '[](uint v, uint s) { uint r; asm("shr.b32 %0, %1, %2;" : "=r"(r) : "r"(v), "r"(s)); return r; }'


# With PDL a decode GEMV's blocks become resident while the kernel before it still runs and wait there
# (`griddepcontrol.wait`); its weights are parameters nothing of the step writes. Before the wait, one thread of
# each block asks the L2 for the block's whole rows (weights, scales, mins) with Hopper's bulk prefetch: the
# matrix then streams from HBM under the previous kernel (attention, another GEMV) instead of after it, and the
# GEMV's own loads hit L2. Matrices above PREFETCH_L2_MAX bytes of weights are left alone (a 50 MB L2 would evict
# what it prefetched before its use: Llama-3-8B's gate_up is 59 MB, down 29 MB). 0 turns it off.
PREFETCH_L2_MAX = 16 << 20
# cp.async.bulk.prefetch.L2 (PTX 8.0, sm_90): [p, p + n) into L2, p and n multiples of 16; no register is written
L2_PREFETCH = ('[](const void* p, unsigned n) { asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(p), '
               '"r"(n) : "memory"); }')


# Larger matrices: with PREFETCH_PARTIAL, the first PREFETCH_L2_MAX / rows bytes of each row (the kernel's first
# steps walk every row of a block from its start, so those hit L2), whole 16-byte units, at least 256 a row.
PREFETCH_PARTIAL = False
PREFETCH_MIN_ROW = 256


def prefetches_l2(in_f: int, out_f: int, bits: int = 4) -> bool:
    """Whether the PDL decode GEMV of this shape prefetches its rows into L2 before its wait (PREFETCH_L2_MAX)."""
    return 0 < out_f * in_f * bits // 8 <= PREFETCH_L2_MAX


def partial_prefetch_row_bytes(in_f: int, out_f: int, bits: int = 4) -> int:
    """Bytes of each weight row prefetched where the whole matrix is over PREFETCH_L2_MAX (PREFETCH_PARTIAL);
    0: none."""
    if not PREFETCH_PARTIAL or prefetches_l2(in_f, out_f, bits) or PREFETCH_L2_MAX <= 0:
        return 0
    per_row = PREFETCH_L2_MAX // out_f // 16 * 16
    return per_row if per_row >= PREFETCH_MIN_ROW else 0


def h2_supports(in_f: int, x_dtype: str, scale_dtype: str, out_dtype: str) -> bool:
    """The fp16x2 GEMV covers fp16 activations, scales and output with `in` a whole number of groups."""
    return in_f % GROUP == 0 and in_f > 0 and x_dtype == scale_dtype == out_dtype == "float16"


def int4_gemv_h2(in_f: int, out_f: int, bias: bool, warps: int = 4, rows: int = 2, unroll: int = 4,
                 ksplit: int = 1, fence: bool = True, offset: int = QMAX, zero_point: bool = False,
                 xsmem: bool = False, fold_shift: bool = False, norm_eps: float | None = None,
                 residual: bool = True, silu: bool = False, norm_add: bool = True, res_in: bool = False,
                 pdl: bool = False):
    """Same function and arguments as `int4_gemv(in_f, out_f, "float16", "float16", "float16", bias)` (x, q_weight,
    q_scale, [bias], out), already scheduled for CUDA (fp16x2 arithmetic, see the comment above). `ksplit` > 1:
    the block's warps form `warps / ksplit` row teams of `ksplit` warps that share `rows` rows, each warp taking
    every ksplit-th 32-group slice of `in`; the partial sums meet in shared memory (more loads in flight for
    shapes with few rows). `fence`: issue every load of a step before its arithmetic (H2_ZERO_AFTER).
    `offset`: the row's stored value of a zero weight (7: q4f16_1, 8: the Q4_0 grid of q4f16_0), decoded
    (nib - offset) * scale. `zero_point` (the Q4_1 grid of q4f16_2): nib * scale + min, one more argument q_min
    after q_scale, computed as (nib - 8) * scale + (min + 8 scale): the fp16x2 products stay centred (as small as
    the symmetric grids'), and per group the lane sums its 32 x (fp16x2, scaled by 1/32) for the second term in
    fp32. The plain `nib * scale + min * sum(x)` loses ~1.4e-3 relative (numpy model, tests/test_gpu_schemes.py):
    its two terms are each several times their sum.
    `xsmem`: the block stages x once in shared memory, already in the (x[8j+s], x[8j+s+4]) pairs the arithmetic
    takes, laid out [word q of the group][group][4 pairs] so a warp's 16-byte reads are conflict-free; the warps
    then read x from there (4 LDS.128 per group, shared by the `rows` rows) instead of each team re-reading it
    from L2 and permuting it (8 KB of x per 2-4 rows at `in` 4096: as many L2 bytes as the weights). Where there
    is a whole step, its weight loads are issued before the staging, so the block's first HBM round trip overlaps
    it (a lone guarded step loads after it: the other order measured 2-6% slower, docs/benchmarks/h200-gemv.md).
    `fold_shift` (with xsmem): nibbles (1, 5) and (3, 7) decoded in place (h2_fma_sub16), one shift per word: 13
    instructions per packed word instead of 15, the same values.

    Decode fusions (xsmem only; docs/benchmarks/h200-fusion.md), each the same values as the unfused kernels:
    `norm_eps` (the residual add and RMSNorm before the GEMV, cuda_math.add_rms_norm_gpu's function): the arguments
    become (x, delta, norm_weight, q_weight, ...), and every block stages rms_norm(x + delta) * w instead of x, in
    add_rms_norm_gpu's arithmetic and summation order (see `fused_norm_supports`); with `residual`, block 0 also
    writes x + delta as a second output (the residual stream the later layers read).
    `silu` (gate_up, no bias): the team's `rows` rows are gate rows i.. and their up rows inter + i..; the output is
    silu(gate) * up [1, out_f / 2], rounded as the GEMV's fp16 output and then cuda_math.silu_mul_gpu round it (no
    silu_mul kernel, and half the output bytes).
    `res_in` (the producer side, no bias): one more argument, the residual x [1, out_f], after the weights; the
    output is x + y rounded as add_rms_norm_gpu rounds it (y first rounded to fp16), the new residual stream.
    `norm_add=False` (with norm_eps): the consumer of such a producer: arguments (s, norm weight, weights), the norm
    of s staged without an add, no residual output.

    `pdl` (xsmem only; programmatic dependent launch, kernels/cuda_pdl.py): the first step's weight loads (the lone
    guarded step's where there is no whole one) are issued, the next kernel is let launch, then the kernel waits for
    the previous one (`griddepcontrol.wait`) before it reads x (or the residual) and before any store; the weights
    are parameters no kernel of the step writes, so the block's first HBM round trip overlaps the previous
    kernel's tail."""
    return _gemv_h2(in_f, out_f, bias, warps, rows, unroll, ksplit, fence, 4, 8 if zero_point else offset,
                    zero_point, xsmem, fold_shift, norm_eps, residual and norm_add, silu, norm_add, res_in, pdl)


NORM_VEC = 8  # fp16 values per 16-byte chunk of add_rms_norm_gpu (its default `lanes`), one staged word of x here
# Where the fused norm's weight is loaded: "early", into registers before the PDL wait (with the weights' first
# step; without PDL before the sum of squares), a parameter nothing of the step writes, so the staging after the wait
# is one L2 round trip (x and delta); "late", after the sum of squares and its barrier (the kernels before run 32): a
# second round trip. The same values. An A/B knob (bench/gpu_pdl.py).
NORM_WEIGHT = "early"


def fused_norm_supports(hidden: int) -> bool:
    """The norm prologue reproduces add_rms_norm_gpu's sum of squares exactly when that kernel gives each thread
    one 16-byte chunk (hidden / 8 <= 1024 threads): per chunk 8 squares in order, a warp-butterfly tree over 32
    consecutive chunks, then the warps' sums in order; the GEMV block's staging rounds see the same chunks in the
    same warps-of-32 (round i, warp w: chunks (i W + w) 32 ..)."""
    return hidden % (GROUP) == 0 and hidden // NORM_VEC <= 1024


def int8_gemv_h2(in_f: int, out_f: int, bias: bool, warps: int = 4, rows: int = 2, unroll: int = 2,
                 ksplit: int = 1, fence: bool = True):
    """The 8-bit rows (q8f16_1, the Q8_0 grid: byte i of a word is element i, decoded (byte - 128) * scale), same
    arguments as the INT4 GEMV (x, q_weight [out, in/4], q_scale, [bias], out), fp16x2 arithmetic as
    `int4_gemv_h2`: `(w & 0x00FF00FF) | 0x40004000` is (2 + b0/512, 2 + b2/512), minus 2 + 128/512 gives
    ((b - 128) / 512) exactly, times (x0, x2); the shifted word gives (b1, b3). A lane takes a whole group per
    step (two 16-byte loads per row); per byte of weights half the instructions of the INT4 GEMV."""
    return _gemv_h2(in_f, out_f, bias, warps, rows, unroll, ksplit, fence, 8, 128, False)


def _gemv_h2(in_f: int, out_f: int, bias: bool, warps: int, rows: int, unroll: int, ksplit: int, fence: bool,
             bits: int, offset: int, zero_point: bool, xsmem: bool = False, fold_shift: bool = False,
             norm_eps: float | None = None, residual: bool = True, silu: bool = False, norm_add: bool = True,
             res_in: bool = False, pdl: bool = False):
    from tvm.script import tirx as T

    from .cuda_pdl import LAUNCH_DEPENDENTS, TRIGGER_FIRST, WAIT

    c = compiler()
    if not h2_supports(in_f, "float16", "float16", "float16"):
        raise ValueError(f"int4_gemv_h2 needs `in` a positive multiple of {GROUP}, got {in_f}")
    for name, v in (("warps", warps), ("rows", rows), ("unroll", unroll), ("ksplit", ksplit)):
        if v < 1:
            raise ValueError(f"int4_gemv_h2: {name} must be >= 1, got {v}")
    if warps % ksplit:
        raise ValueError(f"int4_gemv_h2: warps ({warps}) must be a multiple of ksplit ({ksplit})")
    if xsmem and bits != 4:
        raise ValueError("int4_gemv_h2: xsmem covers the 4-bit rows only")
    if fold_shift and not xsmem:
        raise ValueError("int4_gemv_h2: fold_shift needs xsmem")
    if NORM_WEIGHT not in ("early", "late"):
        raise ValueError(f"cuda_gemv.NORM_WEIGHT must be early or late, got {NORM_WEIGHT!r}")
    if bits == 4 and not 0 <= offset < 16:
        raise ValueError(f"int4_gemv_h2: offset must be in 0..15, got {offset}")
    norm = norm_eps is not None
    if (norm or silu) and not xsmem:
        raise ValueError("int4_gemv_h2: the norm / silu fusions need xsmem")
    if norm and not fused_norm_supports(in_f):
        raise ValueError(f"int4_gemv_h2: the norm prologue covers `in` up to {1024 * NORM_VEC}, got {in_f}")
    if res_in and (bias or silu or norm):
        raise ValueError("int4_gemv_h2: res_in takes no bias, silu or norm")
    if pdl and not xsmem:
        raise ValueError("int4_gemv_h2: pdl places its wait after the first weight loads, which needs xsmem")
    if silu and (bias or rows % 2 or out_f % 2):
        raise ValueError(f"int4_gemv_h2: silu needs no bias, an even `rows` and `out` (got {rows}, {out_f})")
    G, W, R, U, KS = in_f // GROUP, warps, rows, unroll, ksplit
    WPG = GROUP * bits // 32  # uint32 words per group and row: 4 (4-bit), 8 (8-bit)
    if bits == 4:
        fma_sub, base, shift = (H2_FMA_SUB if offset == QMAX else h2_fma_sub(0x50005000 + offset * 0x10001),
                                H2_BASE_BITS, H2_SHIFT)
    else:
        fma_sub, base, shift = h2_fma_sub(0x40804080), H2_BASE_BITS8, H2_SHIFT8
    fma_sub16 = h2_fma_sub16(offset) if bits == 4 else ""
    TEAMS = W // KS
    VL = 32 * KS  # "virtual lanes" of a row team: lane l of warp k takes groups k*32 + l, + VL, ...
    full, tail = G // (VL * U), G % (VL * U) > 0  # steps where every lane has all `unroll` groups, then a guarded one
    H = R // 2 if silu else R  # output values per team: silu pairs rows (i, inter + i)
    OUT = out_f // 2 if silu else out_f
    nb = (OUT + TEAMS * H - 1) // (TEAMS * H)
    NVW = (in_f // NORM_VEC + 31) // 32  # norm: warps of 32 chunks whose sums of squares meet in order
    XFILL = (G * 4 + W * 32 - 1) // (W * 32)  # xsmem: staging rounds, one 16-byte word of x per thread each
    full_mask = T.uint32(0xFFFFFFFF)
    pf = pdl and prefetches_l2(in_f, out_f, bits)
    pf_row = partial_prefetch_row_bytes(in_f, out_f, bits) if pdl else 0
    BLK = TEAMS * H  # outputs of a block: rows bx * BLK .. (and their up rows at + OUT with silu)
    WROW, SROW = G * WPG * 4, G * 2  # weight / scale bytes of a row

    def half_lo(u):  # the low fp16 of a uint32 register, as float32
        return T.Cast("float32", T.reinterpret("float16", T.Cast("uint16", T.bitwise_and(u, T.uint32(0xFFFF)))))

    def half_hi(u):
        return T.Cast("float32", T.reinterpret("float16", T.Cast("uint16", T.shift_right(u, T.uint32(16)))))

    def rowc(p0, r):  # weight row of slot r of the team whose first output is p0 (clamped: loads stay in bounds)
        if silu:
            return T.min(p0 + r % H, OUT - 1) + r // H * OUT
        return T.min(p0 + r, out_f - 1)

    def fence_regs(wv, xv, sc, mn):  # one register of every load of a step
        regs = [*[wv[i * 4] for i in range(U * R * WPG // 4)], *([] if xsmem else [xv[i * 4] for i in range(U * 4)]),
                *[T.Cast("uint32", sc[i]) for i in range(U * R)]]
        return regs + ([T.Cast("uint32", mn[i]) for i in range(U * R)] if zero_point else [])

    @T.macro
    def load(x32, qw, qs, qm, wv, xv, sc, mn, row0, vl, it, guard):
        for u in T.unroll(U):  # every 16-byte load of the step first, then the arithmetic
            if not guard or (it * U + u) * VL + vl < G:
                for r in T.unroll(R):
                    if WPG == 4:
                        for v in T.vectorized(4):
                            wv[(u * R + r) * 4 + v] = qw[rowc(row0, r), ((it * U + u) * VL + vl) * 4 + v]
                    else:
                        for h in T.unroll(WPG // 4):
                            for v in T.vectorized(4):
                                wv[(u * R + r) * WPG + h * 4 + v] = qw[rowc(row0, r), ((it * U + u) * VL + vl)
                                                                       * WPG + h * 4 + v]
                if not xsmem:
                    for q in T.unroll(4):
                        for v in T.vectorized(4):
                            xv[u * 16 + q * 4 + v] = x32[((it * U + u) * VL + vl) * 16 + q * 4 + v]
                for r in T.unroll(R):  # the scales too: a load issued at its use would stall a latency per group
                    sc[u * R + r] = T.reinterpret("uint16", qs[rowc(row0, r), (it * U + u) * VL + vl])
                if zero_point:
                    for r in T.unroll(R):
                        mn[u * R + r] = T.reinterpret("uint16", qm[rowc(row0, r), (it * U + u) * VL + vl])

    @T.macro
    def prefetch_rows(qw, qs_flat, qm_flat, bx):  # the block's rows into L2: one thread, before the wait
        for part in T.unroll(2 if silu else 1):
            n = T.min(BLK, OUT - bx * BLK)
            r0 = bx * BLK + part * OUT
            T.evaluate(T.call_extern("void", L2_PREFETCH, T.address_of(qw[r0, 0]), T.Cast("uint32", n * WROW)))
            # scales (and mins): the rows' bytes widened to 16-byte bounds, kept inside the tensor
            s0 = T.bitwise_and(r0 * SROW, T.int32(-16))
            s1 = T.min(T.bitwise_and((r0 + n) * SROW + 15, T.int32(-16)), (out_f * SROW) // 16 * 16)
            if s1 > s0:
                T.evaluate(T.call_extern("void", L2_PREFETCH, T.address_of(qs_flat[s0 // 2]),
                                         T.Cast("uint32", s1 - s0)))
                if zero_point:
                    T.evaluate(T.call_extern("void", L2_PREFETCH, T.address_of(qm_flat[s0 // 2]),
                                             T.Cast("uint32", s1 - s0)))

    @T.macro
    def prefetch_row_starts(qw, bx, tid):  # PREFETCH_PARTIAL: the first pf_row bytes of each of the block's rows
        for part in T.unroll(2 if silu else 1):
            if tid < T.min(BLK, OUT - bx * BLK):
                T.evaluate(T.call_extern("void", L2_PREFETCH, T.address_of(qw[bx * BLK + part * OUT + tid, 0]),
                                         T.uint32(pf_row)))

    @T.macro
    def compute(xsh, acc, wv, xv, sc, mn, xp, hs, xs, dep, row0, vl, it, guard):
        if fence and not guard:
            dep[0] = T.call_pure_extern("uint32", H2_ZERO_AFTER, functools.reduce(T.bitwise_xor, fence_regs(
                wv, xv, sc, mn)), T.bitwise_or(T.Cast("uint32", vl), T.uint32(32)))
        else:
            dep[0] = T.uint32(0)
        for u in T.unroll(U):
            if not guard or (it * U + u) * VL + vl < G:
                for i in T.unroll(2 * R):
                    hs[i] = dep[0]  # 0, after every load of the step (H2_ZERO_AFTER)
                if bits == 4 and xsmem:
                    for q in T.unroll(4):  # word q of the group: its 4 pairs (x0,x4) (x1,x5) (x2,x6) (x3,x7) staged
                        for v in T.vectorized(4):
                            xv[u * 16 + q * 4 + v] = xsh[(q * G + (it * U + u) * VL + vl) * 4 + v]
                        for r in T.unroll(R):
                            if fold_shift:  # nibbles (2h, 2h+4) at bits 0, (2h+1, 2h+5) at bits 4 of w >> 8h
                                for h in T.unroll(2):
                                    hs[r * 2 + q % 2] = T.call_pure_extern("uint32", fma_sub, T.bitwise_or(
                                        T.bitwise_and(T.shift_right(wv[(u * R + r) * 4 + q], T.uint32(8 * h)),
                                                      T.uint32(0x000F000F)), T.uint32(base)),
                                        xv[u * 16 + q * 4 + 2 * h], hs[r * 2 + q % 2])
                                    hs[r * 2 + q % 2] = T.call_pure_extern("uint32", fma_sub16, T.bitwise_or(
                                        T.bitwise_and(T.shift_right(wv[(u * R + r) * 4 + q], T.uint32(8 * h)),
                                                      T.uint32(0x00F000F0)), T.uint32(base)),
                                        xv[u * 16 + q * 4 + 2 * h + 1], hs[r * 2 + q % 2])
                            else:
                                for sh in T.unroll(4):
                                    hs[r * 2 + q % 2] = T.call_pure_extern("uint32", fma_sub, T.bitwise_or(
                                        T.bitwise_and(T.shift_right(wv[(u * R + r) * 4 + q], T.uint32(4 * sh)),
                                                      T.uint32(0x000F000F)), T.uint32(base)),
                                        xv[u * 16 + q * 4 + sh], hs[r * 2 + q % 2])
                elif bits == 4:
                    for q in T.unroll(4):  # word q of the group: x[8q .. 8q+7] as 4 uint32 = (x0,x1) (x2,x3) ...
                        xp[0] = T.bitwise_or(T.bitwise_and(xv[u * 16 + q * 4], T.uint32(0xFFFF)),
                                             T.shift_left(xv[u * 16 + q * 4 + 2], T.uint32(16)))  # (x0, x4)
                        xp[1] = T.bitwise_or(T.shift_right(xv[u * 16 + q * 4], T.uint32(16)),
                                             T.bitwise_and(xv[u * 16 + q * 4 + 2], T.uint32(0xFFFF0000)))  # (x1, x5)
                        xp[2] = T.bitwise_or(T.bitwise_and(xv[u * 16 + q * 4 + 1], T.uint32(0xFFFF)),
                                             T.shift_left(xv[u * 16 + q * 4 + 3], T.uint32(16)))  # (x2, x6)
                        xp[3] = T.bitwise_or(T.shift_right(xv[u * 16 + q * 4 + 1], T.uint32(16)),
                                             T.bitwise_and(xv[u * 16 + q * 4 + 3], T.uint32(0xFFFF0000)))  # (x3, x7)
                        for r in T.unroll(R):
                            for sh in T.unroll(4):
                                hs[r * 2 + q % 2] = T.call_pure_extern("uint32", fma_sub, T.bitwise_or(T.bitwise_and(
                                    T.shift_right(wv[(u * R + r) * 4 + q], T.uint32(4 * sh)), T.uint32(0x000F000F)),
                                    T.uint32(base)), xp[sh], hs[r * 2 + q % 2])
                else:
                    for q in T.unroll(8):  # word q of the group: x[4q .. 4q+3] as 2 uint32 = (x0,x1) (x2,x3)
                        xp[0] = T.bitwise_or(T.bitwise_and(xv[u * 16 + q * 2], T.uint32(0xFFFF)),
                                             T.shift_left(xv[u * 16 + q * 2 + 1], T.uint32(16)))  # (x0, x2)
                        xp[1] = T.bitwise_or(T.shift_right(xv[u * 16 + q * 2], T.uint32(16)),
                                             T.bitwise_and(xv[u * 16 + q * 2 + 1], T.uint32(0xFFFF0000)))  # (x1, x3)
                        for r in T.unroll(R):
                            for sh in T.unroll(2):
                                hs[r * 2 + q % 2] = T.call_pure_extern("uint32", fma_sub, T.bitwise_or(T.bitwise_and(
                                    T.shift_right(wv[(u * R + r) * WPG + q], T.uint32(8 * sh)), T.uint32(0x00FF00FF)),
                                    T.uint32(base)), xp[sh], hs[r * 2 + q % 2])
                if zero_point:  # the group's sum of x / 32 in two fp16x2 chains, shared by the R rows
                    xs[0] = dep[0]
                    xs[1] = dep[0]
                    for i in T.unroll(16):
                        xs[i % 2] = T.call_pure_extern("uint32", H2_XSUM, xv[u * 16 + i], xs[i % 2])
                    for r in T.unroll(R):
                        acc[r] = acc[r] + ((half_lo(hs[r * 2]) + half_hi(hs[r * 2]))
                                           + (half_lo(hs[r * 2 + 1]) + half_hi(hs[r * 2 + 1]))) * (
                            T.Cast("float32", T.reinterpret("float16", sc[u * R + r])) * T.float32(1 << shift)) + (
                            (half_lo(xs[0]) + half_hi(xs[0])) + (half_lo(xs[1]) + half_hi(xs[1]))) * (
                            (T.Cast("float32", T.reinterpret("float16", mn[u * R + r]))
                             + T.Cast("float32", T.reinterpret("float16", sc[u * R + r])) * T.float32(offset))
                            * T.float32(32))
                else:
                    for r in T.unroll(R):
                        acc[r] = acc[r] + ((half_lo(hs[r * 2]) + half_hi(hs[r * 2]))
                                           + (half_lo(hs[r * 2 + 1]) + half_hi(hs[r * 2 + 1]))) * (
                            T.Cast("float32", T.reinterpret("float16", sc[u * R + r])) * T.float32(1 << shift))

    @T.macro
    def step(x32, xsh, qw, qs, qm, acc, wv, xv, sc, mn, xp, hs, xs, dep, row0, vl, it, guard):
        load(x32, qw, qs, qm, wv, xv, sc, mn, row0, vl, it, guard)
        compute(xsh, acc, wv, xv, sc, mn, xp, hs, xs, dep, row0, vl, it, guard)

    @T.macro
    def load_res(xres, xr, row0, tx):  # res_in: the residual of the rows this lane stores
        if KS == 1:
            for r in T.unroll(R):
                xr[r] = xres[0, T.min(row0 + r, out_f - 1)]
        else:
            xr[0] = xres[0, T.min(row0 + T.min(tx, R - 1), out_f - 1)]

    @T.macro
    def store(out, bias_buf, gq, row, value, xres_row):
        if row < out_f:
            if bias:
                out[0, row] = T.Cast("float16", value + T.Cast("float32", bias_buf[row]))
            elif res_in:  # add_rms_norm_gpu's sum of the residual and the rounded GEMV output
                gq[0] = T.Cast("float16", value)
                out[0, row] = T.Cast("float16", T.Cast("float32", xres_row) + T.Cast("float32", gq[0]))
            else:
                out[0, row] = T.Cast("float16", value)

    @T.macro
    def store_silu(out, gq, p, gate, up):  # silu_mul_gpu's arithmetic on the two rows rounded to fp16
        if p < OUT:
            gq[0] = T.Cast("float16", gate)
            gq[1] = T.Cast("float16", up)
            out[0, p] = T.Cast("float16", T.Cast("float32", gq[0]) / (T.float32(1) + T.exp(-T.Cast("float32", gq[0])))
                               * T.Cast("float32", gq[1]))

    @T.macro
    def stage_x(x32, xsh, xf, xt, ty, tx):  # word j = 4g + q of x (x[8j .. 8j+7]) -> its 4 pairs at [q][g]
        for i in T.unroll(XFILL):
            if i * W * 32 + ty * 32 + tx < G * 4:
                for v in T.vectorized(4):
                    xf[v] = x32[(i * W * 32 + ty * 32 + tx) * 4 + v]
                xt[0] = T.bitwise_or(T.bitwise_and(xf[0], T.uint32(0xFFFF)), T.shift_left(xf[2], T.uint32(16)))
                xt[1] = T.bitwise_or(T.shift_right(xf[0], T.uint32(16)), T.bitwise_and(xf[2], T.uint32(0xFFFF0000)))
                xt[2] = T.bitwise_or(T.bitwise_and(xf[1], T.uint32(0xFFFF)), T.shift_left(xf[3], T.uint32(16)))
                xt[3] = T.bitwise_or(T.shift_right(xf[1], T.uint32(16)), T.bitwise_and(xf[3], T.uint32(0xFFFF0000)))
                for v in T.vectorized(4):
                    xsh[(((i * W * 32 + ty * 32 + tx) % 4) * G + (i * W * 32 + ty * 32 + tx) // 4) * 4 + v] = xt[v]

    @T.macro
    def load_nw(nw, nv, ty, tx):  # the norm weight of the thread's chunks: a parameter, loaded before the PDL wait
        for i in T.unroll(XFILL):
            if i * W * 32 + ty * 32 + tx < G * 4:
                for e in T.vectorized(NORM_VEC):
                    nv[i * NORM_VEC + e] = nw[(i * W * 32 + ty * 32 + tx) * NORM_VEC + e]

    @T.macro
    def stage_norm(x, dl, nw, nv, s_out, xsh, xa, ya, sv, hv, nacc, nred, bx, ty, tx):
        xsh16 = T.decl_buffer((G * 32,), "float16", data=xsh.data, scope="shared")  # the pairs as 8 halves
        # pass 1: s = x + delta rounded to fp16, per 16-byte chunk its 8 squares in order, the warp's butterfly
        # (add_rms_norm_gpu's order: chunk t = i W 32 + 32 w + lane is that kernel's thread t)
        for i in T.unroll(XFILL):
            nacc[0] = T.float32(0)
            if i * W * 32 + ty * 32 + tx < G * 4:
                for e in T.vectorized(NORM_VEC):
                    xa[e] = x[0, (i * W * 32 + ty * 32 + tx) * NORM_VEC + e]
                if norm_add:
                    for e in T.vectorized(NORM_VEC):
                        ya[e] = dl[0, (i * W * 32 + ty * 32 + tx) * NORM_VEC + e]
                for e in T.unroll(NORM_VEC):
                    if norm_add:
                        sv[i * NORM_VEC + e] = T.Cast("float16", T.Cast("float32", xa[e]) + T.Cast("float32", ya[e]))
                    else:
                        sv[i * NORM_VEC + e] = xa[e]
                    nacc[0] = nacc[0] + T.Cast("float32", sv[i * NORM_VEC + e]) * T.Cast("float32",
                                                                                        sv[i * NORM_VEC + e])
            for k in T.unroll(5):
                nacc[0] = nacc[0] + T.tvm_warp_shuffle_xor(full_mask, nacc[0], T.shift_left(1, k), 32, 32)
            if tx == 0:
                nred[i * W + ty] = nacc[0]
        T.tvm_storage_sync("shared")
        nacc[0] = T.float32(0)
        for k in T.unroll(NVW):
            nacc[0] = nacc[0] + nred[k]
        nacc[0] = T.rsqrt(nacc[0] / T.float32(in_f) + T.float32(norm_eps))
        # pass 2: the normalized row, staged as the (x[s], x[s+4]) pairs; block 0 writes the residual x + delta
        if NORM_WEIGHT == "late":
            load_nw(nw, nv, ty, tx)
        for i in T.unroll(XFILL):
            if i * W * 32 + ty * 32 + tx < G * 4:
                for e in T.unroll(NORM_VEC):
                    hv[(e % 4) * 2 + e // 4] = T.Cast("float16", T.Cast("float32", sv[i * NORM_VEC + e]) * nacc[0]
                                                      * T.Cast("float32", nv[i * NORM_VEC + e]))
                for e in T.vectorized(NORM_VEC):
                    xsh16[(((i * W * 32 + ty * 32 + tx) % 4) * G + (i * W * 32 + ty * 32 + tx) // 4) * NORM_VEC
                          + e] = hv[e]
                if residual:
                    if bx == 0:
                        for e in T.vectorized(NORM_VEC):
                            s_out[0, (i * W * 32 + ty * 32 + tx) * NORM_VEC + e] = sv[i * NORM_VEC + e]

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer((1, in_f), "float16"), d_h: T.handle, nw_h: T.handle,
               qw: T.Buffer((out_f, G * WPG), "uint32"), qs: T.Buffer((out_f, G), "float16"), m_h: T.handle,
               b_h: T.handle, r_h: T.handle, out: T.Buffer((1, OUT), "float16"), s_h: T.handle):
        qm = T.match_buffer(m_h, (out_f, G), "float16")
        bias_buf = T.match_buffer(b_h, (out_f,), "float16")
        dl = T.match_buffer(d_h, (1, in_f), "float16")
        nw = T.match_buffer(nw_h, (in_f,), "float16")
        s_out = T.match_buffer(s_h, (1, in_f), "float16")
        xres = T.match_buffer(r_h, (1, out_f), "float16")
        x32 = T.decl_buffer((in_f // 2,), "uint32", data=x.data)  # x as pairs of halves: 16-byte loads, permutes
        qs_flat = T.decl_buffer((out_f * G,), "float16", data=qs.data)  # scales / mins by byte range (prefetch)
        qm_flat = T.decl_buffer((out_f * G,), "float16", data=qm.data) if zero_point else qs_flat
        bx = T.launch_thread("blockIdx.x", nb)
        ty = T.launch_thread("threadIdx.y", W)
        tx = T.launch_thread("threadIdx.x", 32)
        acc = T.alloc_buffer((R,), "float32", scope="local")
        wv = T.alloc_buffer((U * R * WPG,), "uint32", scope="local")
        xv = T.alloc_buffer((U * 16,), "uint32", scope="local")
        sc = T.alloc_buffer((U * R,), "uint16", scope="local")  # fp16 scale bits
        mn = T.alloc_buffer((U * R,), "uint16", scope="local")  # fp16 min bits (zero_point)
        xs = T.alloc_buffer((2,), "uint32", scope="local")  # fp16x2 sums of x / 32 (zero_point)
        xp = T.alloc_buffer((4,), "uint32", scope="local")
        hs = T.alloc_buffer((2 * R,), "uint32", scope="local")  # fp16x2 group accumulators (even, odd words)
        red = T.alloc_buffer((2,), "float32", scope="local")
        fin = T.alloc_buffer((R,), "float32", scope="local")  # silu: the rows' sums
        gq = T.alloc_buffer((2,), "float16", scope="local")
        dep = T.alloc_buffer((1,), "uint32", scope="local")
        part = T.alloc_buffer((W * R,), "float32", scope="shared")  # ksplit > 1: the warps' partial sums
        xsh = T.alloc_buffer((G * 16 if xsmem else 4,), "uint32", scope="shared")  # xsmem: x as [q][g][pairs]
        xf = T.alloc_buffer((4,), "uint32", scope="local")
        xt = T.alloc_buffer((4,), "uint32", scope="local")
        xa = T.alloc_buffer((NORM_VEC,), "float16", scope="local")  # norm: x
        ya = T.alloc_buffer((NORM_VEC,), "float16", scope="local")  # norm: delta
        sv = T.alloc_buffer((XFILL * NORM_VEC,), "float16", scope="local")  # norm: x + delta of the thread's chunks
        nv = T.alloc_buffer((XFILL * NORM_VEC if norm else 1,), "float16", scope="local")  # norm: its weight
        hv = T.alloc_buffer((NORM_VEC,), "float16", scope="local")
        nacc = T.alloc_buffer((1,), "float32", scope="local")
        nred = T.alloc_buffer((XFILL * W if norm else 1,), "float32", scope="shared")
        xr = T.alloc_buffer((R,), "float16", scope="local")  # res_in: the residual of the rows this lane stores
        row0 = T.meta_var((bx * TEAMS + ty // KS) * H)  # first output of this warp's team
        vl = T.meta_var((ty % KS) * 32 + tx)
        for r in T.unroll(R):
            acc[r] = T.float32(0)
        if res_in and not pdl:  # loaded first: a load at the store would add a memory round trip to the kernel's end
            load_res(xres, xr, row0, tx)
        if xsmem:
            if full > 0:  # the first step's weights in flight while x is staged
                load(x32, qw, qs, qm, wv, xv, sc, mn, row0, vl, 0, False)
            elif pdl and tail:  # the lone guarded step too: before the wait it overlaps the previous kernel
                load(x32, qw, qs, qm, wv, xv, sc, mn, row0, vl, full, True)
            if pdl:  # everything above reads weights only; x, the residual and every store come after the wait
                if pf:
                    if ty == 0 and tx == 0:
                        prefetch_rows(qw, qs_flat, qm_flat, bx)
                if pf_row > 0:
                    prefetch_row_starts(qw, bx, ty * 32 + tx)
                if norm and NORM_WEIGHT == "early":
                    load_nw(nw, nv, ty, tx)
                if TRIGGER_FIRST:
                    T.evaluate(T.call_extern("void", LAUNCH_DEPENDENTS))
                T.evaluate(T.call_extern("void", WAIT))
                if not TRIGGER_FIRST:
                    T.evaluate(T.call_extern("void", LAUNCH_DEPENDENTS))
                if res_in:
                    load_res(xres, xr, row0, tx)
            if norm:
                if not pdl and NORM_WEIGHT == "early":
                    load_nw(nw, nv, ty, tx)
                stage_norm(x, dl, nw, nv, s_out, xsh, xa, ya, sv, hv, nacc, nred, bx, ty, tx)
            else:
                stage_x(x32, xsh, xf, xt, ty, tx)
            T.tvm_storage_sync("shared")
            if full > 0:
                compute(xsh, acc, wv, xv, sc, mn, xp, hs, xs, dep, row0, vl, 0, False)
            for it in range(1, full):
                step(x32, xsh, qw, qs, qm, acc, wv, xv, sc, mn, xp, hs, xs, dep, row0, vl, it, False)
        else:
            for it in range(full):
                step(x32, xsh, qw, qs, qm, acc, wv, xv, sc, mn, xp, hs, xs, dep, row0, vl, it, False)
        if tail and xsmem and pdl and full == 0:  # loaded before the wait
            compute(xsh, acc, wv, xv, sc, mn, xp, hs, xs, dep, row0, vl, full, True)
        elif tail:  # (xsmem, no whole step, no PDL: loading it before the staging measured 2-6% slower, 8B qkv / o)
            step(x32, xsh, qw, qs, qm, acc, wv, xv, sc, mn, xp, hs, xs, dep, row0, vl, full, True)
        for r in T.unroll(R):
            red[0] = acc[r]
            for o in T.unroll(5):
                red[0] = red[0] + T.tvm_warp_shuffle_xor(full_mask, red[0], 16 >> o, 32, 32)
            if KS == 1:
                if silu:
                    fin[r] = red[0]
                elif tx == 0:
                    store(out, bias_buf, gq, row0 + r, red[0], xr[r])
            elif tx == 0:
                part[ty * R + r] = red[0]
        if KS == 1 and silu:
            if tx == 0:
                for r in T.unroll(H):
                    store_silu(out, gq, row0 + r, fin[r], fin[r + H])
        if KS > 1:
            T.tvm_storage_sync("shared")
            if ty % KS == 0 and tx < H:  # the team's first warp: lane r sums row r's ksplit partials
                red[0] = part[ty * R + tx]
                for k in T.unroll(1, KS):
                    red[0] = red[0] + part[(ty + k) * R + tx]
                if silu:  # and its up row's
                    red[1] = part[ty * R + tx + H]
                    for k in T.unroll(1, KS):
                        red[1] = red[1] + part[(ty + k) * R + tx + H]
                    store_silu(out, gq, row0 + tx, red[0], red[1])
                else:
                    store(out, bias_buf, gq, row0 + tx, red[0], xr[0])

    px, pd, pn, pqw, pqs, pm, pb, pr, pout, ps = kernel.params
    keep = ([px] + ([pd] if norm and norm_add else []) + ([pn] if norm else []) + [pqw, pqs]
            + ([pm] if zero_point else []) + ([pb] if bias else []) + ([pr] if res_in else []) + [pout]
            + ([ps] if norm and residual else []))
    func = c.tirx.PrimFunc(keep, kernel.body, kernel.ret_type, kernel.attrs)
    grid = "" if (bits, offset, zero_point) == (4, QMAX, False) else f"_q{bits}o{offset}" + ("z" if zero_point else "")
    fused = (("_norm" + ("" if residual else "_nores") + ("" if norm_add else "_noadd") if norm else "")
             + ("_silu" if silu else "") + ("_res" if res_in else ""))
    return func.with_attrs({"edgellm.kernel": "gemv", "op_pattern": 8, "tirx.is_scheduled": True, "tir.noalias": True,
                            "edgellm.gemv": f"h2_w{W}r{R}u{U}k{KS}" + ("" if fence else "_nofence")
                            + ("_xs" if xsmem else "") + ("_fs" if fold_shift else "") + grid + fused
                            + ("_pf" if pf else "") + (f"_pf{pf_row}" if pf_row else "")})


def int8_gemv_config(in_f: int, out_f: int) -> tuple[int, int, int, int]:
    """(warps, rows, unroll, ksplit) of int8_gemv_h2: the INT4 pick for the shape (schedule_gpu.h2_gemv_config)
    with half the groups per step, i.e. the same weight bytes in flight per lane (a group is 32 bytes a row here,
    16 there)."""
    from .schedule_gpu import h2_gemv_config

    w, r, u, k = h2_gemv_config(in_f, out_f)
    return w, r, max(1, u // 2), k


# xs_gemv_config's pick for `in` >= 8192 (the down projections of Llama-3.2-1B and Llama-3-8B): blocks of 16 warps
# (8 teams of 2), so half as many blocks stage the whole x (28 KB at the 8B's 14,336) as with 8 warps; the same sums.
# H200 tg128, two calls (docs/benchmarks/h200-pdl.md, runs 29-30): 8B 584.2 -> 594.5 and 586.3 -> 593.1, 1B
# 2,346 -> 2,373; down kernel end to end 12.9 -> 12.2 us (8B), 4.75 -> 4.31 (1B). 32 warps: 8B equal, 1B -4%.
LONG_IN_CONFIG = (16, 2, 2, 2, True)
# fused_gemv_config: warps times this for the norm at 2048 <= `in` < 4096 and `out` >= 16384 (Llama-3.2-1B's
# gate_up with the norm and silu: 2,048 blocks of 4 warps each stage the norm of x, 12 KB of L2 reads a block); 1
# keeps the unfused pick's warps. An A/B knob (bench/gpu_pdl.py).
FUSED_GATE_UP_WIDEN = 1


def xs_gemv_config(in_f: int, out_f: int) -> tuple[int, int, int, int, bool]:
    """(warps, rows, unroll, ksplit, fold_shift) of int4_gemv_h2(..., xsmem=True) for a shape: the registry's
    default 4-bit decode GEMV. H200, weights from HBM, docs/benchmarks/h200-gemv.md (us, before -> this pick): a long
    `in` (down: 8B 13.7 -> 11.5, 1B 6.8 -> 5.1) with 2 rows a team, `in` split over 2 warps, 2 groups a step and the
    folded shifts (blocks of 16 warps since run 30: LONG_IN_CONFIG); many rows (gate_up: 8B 20.9 -> 18.2, 1B 8.0 ->
    7.1) 2 rows a warp, a whole `in` of 4096 in one 4-group step; the head (128,256 rows) the previous 4 rows x 2 groups with the folded shifts (its timings swing
    by 10% between identical runs); the short ones (qkv, o) 2 rows a
    team of 2 warps with everything in one step. Fewer than 64 groups (SmolLM2): the previous rule's 4x2x1x1."""
    groups = in_f // GROUP
    if groups < 64:
        return 4, 2, 1, 1, False
    if in_f >= 8192:
        return LONG_IN_CONFIG
    if out_f >= 65536:
        return 4, 4, 2, 1, True
    if out_f >= 16384:
        return 4, 2, 4, 1, True
    return 8, 2, 4, 2, False


# --opt cuda_fuse=auto puts the norm into gate_up (with the silu epilogue) only up to this `in`: at Llama-3-8B's
# 4096 that kernel breaks even with add_rms_norm + gate_up (21.0 against 18.5 + 1.8 us and a boundary) and the step
# was faster with the norm in qkv alone (H200 tg128 476.8 against 470.2 tok/s, unfused 460.4); at 576 and 2048 the
# whole fusion gained 12-15% and 5-8% (docs/benchmarks/h200-fusion.md)
FUSED_NORM_SILU_AUTO_MAX = 2048

# fused_gemv_config's pick for the silu GEMV (gate_up, with or without the norm) by `in`, in place of the rule below
# (an A/B knob of bench/gpu_pdl.py): `rows` 4 gives each warp two outputs (gate and up rows of each), half the warps
# for the same matrix. Each output row still sums the same products in the same order (rows are independent).
SILU_CONFIG: dict[int, tuple[int, int, int, int, bool]] = {}
# the same for the norm GEMV without silu (qkv with the residual add + norm), by `in`
NORM_CONFIG: dict[int, tuple[int, int, int, int, bool]] = {}


def fused_gemv_config(in_f: int, out_f: int, norm: bool, silu: bool = False) -> tuple[int, int, int, int, bool]:
    """(warps, rows, unroll, ksplit, fold_shift) of a fused decode GEMV (int4_gemv_h2 with norm_eps / silu): the
    unfused pick's (xs_gemv_config) rows, steps and ksplit, so each output row sums the same products in the same
    order; with the norm at `in` >= 4096, twice its warps per block: every block stages the norm (x, delta and the
    norm weight from L2), and fewer blocks read less. H200, weights from HBM (docs/benchmarks/h200-fusion.md), us:
    8B gate_up + norm + silu 24.8 -> 20.8 with 8 warps (the unfused add_rms_norm + GEMV + silu_mul: 20.8), 8B qkv +
    norm 7.85 -> 6.91 with 16 (unfused: 7.86); at `in` 2048 and 576 the unfused pick's warps were as fast."""
    if silu and in_f in SILU_CONFIG:
        return SILU_CONFIG[in_f]
    if norm and not silu and in_f in NORM_CONFIG:
        return NORM_CONFIG[in_f]
    w, r, u, k, fold = xs_gemv_config(in_f, out_f)
    if norm and in_f >= 4096:
        w *= 2
    elif norm and in_f >= 2048 and out_f >= 16384:
        w *= FUSED_GATE_UP_WIDEN
    return w, r, u, k, fold
