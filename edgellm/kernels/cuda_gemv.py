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
# fp16x2 `(w - (32 + 7/32)) * x + acc` on uint32 registers. TVM's CUDA codegen splits every fp16x2 operation and
# every vector-typed extern call into per-lane scalar fp16 ops (inline asm each, so ptxas cannot pair them again),
# and has no way to declare a helper function; an extern call prints its name verbatim before the arguments, so
# the name is an immediately-invoked device lambda holding the two PTX instructions (HADD2 + HFMA2 in SASS).
H2_FMA_SUB = ("[](uint w, uint x, uint acc) { uint t, r; asm(\"sub.rn.f16x2 %0, %1, %2;\" : \"=r\"(t) : \"r\"(w), "
              "\"r\"(0x50075007u)); asm(\"fma.rn.f16x2 %0, %1, %2, %3;\" : \"=r\"(r) : \"r\"(t), \"r\"(x), "
              "\"r\"(acc)); return r; }")


# The step's loads all issued before its arithmetic: ptxas otherwise sinks most of the 16-byte loads of a step down
# to their first use (it issued 5 of 24 up front, the rest one by one between the FMAs, each exposing a memory
# latency). The xor of one register of every load, shifted right by 32 or more (`vl | 32`, unknown to the
# compiler; PTX clamps such shifts: the result is 0), seeds the step's fp16x2 accumulators: zero, but it depends on
# every load. Cost: about one LOP3 per 16-byte load. With it, all 32 loads of a 4-group 2-row step come first.
H2_ZERO_AFTER = '[](uint v, uint s) { uint r; asm("shr.b32 %0, %1, %2;" : "=r"(r) : "r"(v), "r"(s)); return r; }'


def h2_supports(in_f: int, x_dtype: str, scale_dtype: str, out_dtype: str) -> bool:
    """The fp16x2 GEMV covers fp16 activations, scales and output with `in` a whole number of groups."""
    return in_f % GROUP == 0 and in_f > 0 and x_dtype == scale_dtype == out_dtype == "float16"


def int4_gemv_h2(in_f: int, out_f: int, bias: bool, warps: int = 4, rows: int = 2, unroll: int = 4,
                 ksplit: int = 1, fence: bool = True):
    """Same function and arguments as `int4_gemv(in_f, out_f, "float16", "float16", "float16", bias)` (x, q_weight,
    q_scale, [bias], out), already scheduled for CUDA (fp16x2 arithmetic, see the comment above). `ksplit` > 1:
    the block's warps form `warps / ksplit` row teams of `ksplit` warps that share `rows` rows, each warp taking
    every ksplit-th 32-group slice of `in`; the partial sums meet in shared memory (more loads in flight for
    shapes with few rows). `fence`: issue every load of a step before its arithmetic (H2_ZERO_AFTER)."""
    from tvm.script import tirx as T

    c = compiler()
    if not h2_supports(in_f, "float16", "float16", "float16"):
        raise ValueError(f"int4_gemv_h2 needs `in` a positive multiple of {GROUP}, got {in_f}")
    for name, v in (("warps", warps), ("rows", rows), ("unroll", unroll), ("ksplit", ksplit)):
        if v < 1:
            raise ValueError(f"int4_gemv_h2: {name} must be >= 1, got {v}")
    if warps % ksplit:
        raise ValueError(f"int4_gemv_h2: warps ({warps}) must be a multiple of ksplit ({ksplit})")
    G, W, R, U, KS = in_f // GROUP, warps, rows, unroll, ksplit
    TEAMS = W // KS
    VL = 32 * KS  # "virtual lanes" of a row team: lane l of warp k takes groups k*32 + l, + VL, ...
    full, tail = G // (VL * U), G % (VL * U) > 0  # steps where every lane has all `unroll` groups, then a guarded one
    nb = (out_f + TEAMS * R - 1) // (TEAMS * R)
    full_mask = T.uint32(0xFFFFFFFF)

    def half_lo(u):  # the low fp16 of a uint32 register, as float32
        return T.Cast("float32", T.reinterpret("float16", T.Cast("uint16", T.bitwise_and(u, T.uint32(0xFFFF)))))

    def half_hi(u):
        return T.Cast("float32", T.reinterpret("float16", T.Cast("uint16", T.shift_right(u, T.uint32(16)))))

    @T.macro
    def step(x32, qw, qs, acc, wv, xv, sc, xp, hs, dep, row0, vl, it, guard):
        for u in T.unroll(U):  # every 16-byte load of the step first, then the arithmetic
            if not guard or (it * U + u) * VL + vl < G:
                for r in T.unroll(R):
                    for v in T.vectorized(4):
                        wv[(u * R + r) * 4 + v] = qw[T.min(row0 + r, out_f - 1), ((it * U + u) * VL + vl) * 4 + v]
                for q in T.unroll(4):
                    for v in T.vectorized(4):
                        xv[u * 16 + q * 4 + v] = x32[((it * U + u) * VL + vl) * 16 + q * 4 + v]
                for r in T.unroll(R):  # the scales too: a load issued at its use would stall a latency per group
                    sc[u * R + r] = T.reinterpret("uint16", qs[T.min(row0 + r, out_f - 1), (it * U + u) * VL + vl])
        if fence and not guard:
            dep[0] = T.call_pure_extern("uint32", H2_ZERO_AFTER, functools.reduce(T.bitwise_xor, [
                *[wv[i * 4] for i in range(U * R)], *[xv[i * 4] for i in range(U * 4)],
                *[T.Cast("uint32", sc[i]) for i in range(U * R)]]), T.bitwise_or(T.Cast("uint32", vl), T.uint32(32)))
        else:
            dep[0] = T.uint32(0)
        for u in T.unroll(U):
            if not guard or (it * U + u) * VL + vl < G:
                for i in T.unroll(2 * R):
                    hs[i] = dep[0]  # 0, after every load of the step (H2_ZERO_AFTER)
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
                            hs[r * 2 + q % 2] = T.call_pure_extern("uint32", H2_FMA_SUB, T.bitwise_or(T.bitwise_and(
                                T.shift_right(wv[(u * R + r) * 4 + q], T.uint32(4 * sh)), T.uint32(0x000F000F)),
                                T.uint32(H2_BASE_BITS)), xp[sh], hs[r * 2 + q % 2])
                for r in T.unroll(R):
                    acc[r] = acc[r] + ((half_lo(hs[r * 2]) + half_hi(hs[r * 2]))
                                       + (half_lo(hs[r * 2 + 1]) + half_hi(hs[r * 2 + 1]))) * (
                        T.Cast("float32", T.reinterpret("float16", sc[u * R + r])) * T.float32(1 << H2_SHIFT))

    @T.macro
    def store(out, bias_buf, row, value):
        if row < out_f:
            if bias:
                out[0, row] = T.Cast("float16", value + T.Cast("float32", bias_buf[row]))
            else:
                out[0, row] = T.Cast("float16", value)

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer((1, in_f), "float16"), qw: T.Buffer((out_f, in_f // PER_WORD), "uint32"),
               qs: T.Buffer((out_f, G), "float16"), b_h: T.handle, out: T.Buffer((1, out_f), "float16")):
        bias_buf = T.match_buffer(b_h, (out_f,), "float16")
        x32 = T.decl_buffer((in_f // 2,), "uint32", data=x.data)  # x as pairs of halves: 16-byte loads, permutes
        bx = T.launch_thread("blockIdx.x", nb)
        ty = T.launch_thread("threadIdx.y", W)
        tx = T.launch_thread("threadIdx.x", 32)
        acc = T.alloc_buffer((R,), "float32", scope="local")
        wv = T.alloc_buffer((U * R * 4,), "uint32", scope="local")
        xv = T.alloc_buffer((U * 16,), "uint32", scope="local")
        sc = T.alloc_buffer((U * R,), "uint16", scope="local")  # fp16 scale bits
        xp = T.alloc_buffer((4,), "uint32", scope="local")
        hs = T.alloc_buffer((2 * R,), "uint32", scope="local")  # fp16x2 group accumulators (even, odd words)
        red = T.alloc_buffer((1,), "float32", scope="local")
        dep = T.alloc_buffer((1,), "uint32", scope="local")
        part = T.alloc_buffer((W * R,), "float32", scope="shared")  # ksplit > 1: the warps' partial sums
        row0 = T.meta_var((bx * TEAMS + ty // KS) * R)  # first row of this warp's team
        vl = T.meta_var((ty % KS) * 32 + tx)
        for r in T.unroll(R):
            acc[r] = T.float32(0)
        for it in range(full):
            step(x32, qw, qs, acc, wv, xv, sc, xp, hs, dep, row0, vl, it, False)
        if tail:
            step(x32, qw, qs, acc, wv, xv, sc, xp, hs, dep, row0, vl, full, True)
        for r in T.unroll(R):
            red[0] = acc[r]
            for o in T.unroll(5):
                red[0] = red[0] + T.tvm_warp_shuffle_xor(full_mask, red[0], 16 >> o, 32, 32)
            if KS == 1:
                if tx == 0:
                    store(out, bias_buf, row0 + r, red[0])
            elif tx == 0:
                part[ty * R + r] = red[0]
        if KS > 1:
            T.tvm_storage_sync("shared")
            if ty % KS == 0 and tx < R:  # the team's first warp: lane r sums row r's ksplit partials
                red[0] = part[ty * R + tx]
                for k in T.unroll(1, KS):
                    red[0] = red[0] + part[(ty + k) * R + tx]
                store(out, bias_buf, row0 + tx, red[0])

    params = list(kernel.params)
    keep = params[:3] + ([params[3]] if bias else []) + [params[4]]
    func = c.tirx.PrimFunc(keep, kernel.body, kernel.ret_type, kernel.attrs)
    return func.with_attrs({"edgellm.kernel": "gemv", "op_pattern": 8, "tirx.is_scheduled": True, "tir.noalias": True,
                            "edgellm.gemv": f"h2_w{W}r{R}u{U}k{KS}" + ("" if fence else "_nofence")})
