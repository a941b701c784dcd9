"""CPU linear kernels with int8 activations and integer dot products (schemes with `act_quant="int8"`).

One PrimFunc per linear, already scheduled (it carries `tirx.is_scheduled`, the attribute dlight reads), in two stages:

1. quantize x [m, k] per group of the row's `act_group` values (one word, 8: `scheme.act_group_size`):
   `d = max|x| / 127`, `xq = rint(x * 127 / max|x|)`, packed so that int32 word j
   of `xl` holds the bytes xq[8j], xq[8j+2], xq[8j+4], xq[8j+6] and `xh` the odd ones. That is the order of the
   nibbles in weight word j after `w & 0x0F0F0F0F` (even elements) and `(w >> 4) & 0x0F0F0F0F` (odd elements), so
   the stored weight layout needs no repacking. Per word the stage also writes `d` and `d * sum(xq)` of the
   word's 8 values (the minimum term meets the quantized activations, as in llama.cpp's Q4_1 x Q8_1).
2. parallel over tiles of `nt` output rows: per chunk of V words (V int32 lanes, 8V weights) two integer
   dot-product instructions, one int->float convert and two FMAs per row; each weight byte is read once per x row.

The dot product per kernel (`plan`: the widest path the target's features allow whose vector divides a row):
  vnni     vpdpbusd (u8 x s8 -> s32; AVX-512 VNNI + VL), 16/8/4 lanes
  pmadd    vpmaddubsw + vpmaddwd: AVX-512BW 16 lanes, AVX2 8, SSSE3 4
  sdot     NEON sdot (AArch64 dotprod, e.g. Raspberry Pi 5's Cortex-A76), 4 lanes
  generic  shifts and 32-bit multiplies on 4 or 8 lanes (Raspberry Pi 4's Cortex-A72, plain x86-64)
Every path computes the same integers; `quant.reference.linear_int8` is the numpy definition. 8-bit weights (the
Q8_0 grid) have their own kernel beside this one: kernels/cpu_linear_int8_q8.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._tvm import compiler
from ..quant.schemes import QuantScheme

OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps leaves the kernel alone
# Local buffers stay stack allocas (registers after LLVM's SROA): inside a parallel loop TVM would otherwise give
# each one a TVMBackendAllocWorkspace call per iteration.
STACK = {"disable_lower_builtin": True}
MAX_TASKS = 64  # parallel tasks per kernel: enough to balance any core count we target, few enough to be cheap


@dataclass(frozen=True)
class DotPath:
    """How one kernel takes its dot products: instruction family and int32 lanes per vector."""

    family: str  # vnni | pmadd | sdot | generic
    lanes: int

    @property
    def name(self) -> str:
        return f"{self.family}x{self.lanes}"


def plan(target, words: int, family: str | None = None) -> DotPath:
    """The widest integer dot-product path the target has whose vector divides a row's `words` packed words;
    `family` (vnni | pmadd | sdot | generic) keeps only that family (KernelOptions.cpu_dot), refused with the
    reason when the target lacks it."""
    has = compiler().tvm.target.codegen.target_has_features
    options: list[tuple[str, int]] = []
    if target is not None and target.kind.name == "llvm":
        if has("avx512vnni", target) and has("avx512vl", target):
            options += [("vnni", 16), ("vnni", 8), ("vnni", 4)]
        if has("avx512bw", target):
            options.append(("pmadd", 16))
        if has("avx2", target):
            options.append(("pmadd", 8))
        if has("ssse3", target):
            options.append(("pmadd", 4))
        if has("dotprod", target):
            options.append(("sdot", 4))
        if has("avx", target):
            options.append(("generic", 8))
    options.append(("generic", 4))
    if family is not None:
        options = [(f, v) for f, v in options if f == family]
        if not options:
            raise ValueError(f"--opt cpu_dot: target {target} has no {family} dot product instructions; use "
                             "cpu_dot=auto (or a family its features allow)")
    family, lanes = next(((f, v) for f, v in options if words % v == 0), ("generic", 4))
    return DotPath(family, lanes)


_PMADD = {  # lanes -> (u8 x s8 -> s16 pairs, s16 x s16 -> s32 pairs)
    16: ("llvm.x86.avx512.pmaddubs.w.512", "llvm.x86.avx512.pmaddw.d.512"),
    8: ("llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"),
    4: ("llvm.x86.ssse3.pmadd.ub.sw.128", "llvm.x86.sse2.pmadd.wd"),
}


def _dot_fn(path: DotPath):
    """(T, w_lo, a_lo, w_hi, a_hi) -> int32xV: per lane, sum over its 4 bytes of w_lo*a_lo + w_hi*a_hi
    (w: nibbles 0..15 in bytes, a: int8 activations in bytes)."""
    v = path.lanes
    iv, bv, hv = f"int32x{v}", f"int8x{4 * v}", f"int16x{2 * v}"
    if path.family in ("vnni", "sdot"):
        intrin = (f"llvm.x86.avx512.vpdpbusd.{32 * v}" if path.family == "vnni"
                  else f"llvm.aarch64.neon.sdot.v{v}i32.v{4 * v}i8")

        def dot(T, wl, al, wh, ah):
            first = T.call_llvm_pure_intrin(iv, intrin, T.Broadcast(T.int32(0), v), T.reinterpret(bv, wl),
                                            T.reinterpret(bv, al))
            return T.call_llvm_pure_intrin(iv, intrin, first, T.reinterpret(bv, wh), T.reinterpret(bv, ah))

        return dot
    if path.family == "pmadd":
        ubsw, wd = _PMADD[v]

        def dot(T, wl, al, wh, ah):
            # each 16-bit pair sum is at most 2 * 15 * 127 = 3810, so lo + hi cannot saturate
            lo = T.call_llvm_pure_intrin(hv, ubsw, T.reinterpret(bv, wl), T.reinterpret(bv, al))
            hi = T.call_llvm_pure_intrin(hv, ubsw, T.reinterpret(bv, wh), T.reinterpret(bv, ah))
            return T.call_llvm_pure_intrin(iv, wd, lo + hi, T.Broadcast(T.int16(1), 2 * v))

        return dot

    def dot(T, wl, al, wh, ah):  # portable: per byte b, the nibble times x's sign-extended byte, in int32 lanes
        total = None
        for w, a in ((wl, al), (wh, ah)):
            for b in range(4):
                nib = T.bitwise_and(T.shift_right(T.reinterpret(iv, w), T.Broadcast(T.int32(8 * b), v)),
                                    T.Broadcast(T.int32(15), v))
                xb = T.shift_right(T.shift_left(a, T.Broadcast(T.int32(24 - 8 * b), v)), T.Broadcast(T.int32(24), v))
                total = nib * xb if total is None else total + nib * xb
        return total

    return dot


def tile_plan(scheme: QuantScheme, in_f: int, out_f: int, target, family: str | None):
    """The shapes an int8-activation linear kernel is tiled by (4-bit and 8-bit weights alike): padded `in` kp,
    packed words W per row, groups G of gs elements, words per group wpg, the dot path and its lanes V, groups per
    chunk GV, chunks C, output rows per tile nt, tiles, parallel tasks P of TP tiles, the float vector type fv, and
    `expand` (word lane -> group lane within a chunk)."""
    per = scheme.elems_per_word
    kp = scheme.padded_in(in_f)
    W, G, gs = kp // per, kp // scheme.group_size, scheme.group_size
    wpg = gs // per  # words per group
    path = plan(target, W, family)
    V = path.lanes
    GV = V // wpg if V >= wpg else 1
    nt = next(t for t in (4, 2, 1) if out_f % t == 0)
    tiles = out_f // nt
    P = min(tiles, MAX_TASKS)
    return (kp, W, G, gs, wpg, path, V, GV, W // V, nt, tiles, P, (tiles + P - 1) // P, f"float32x{V}",
            [i // wpg for i in range(V)])


def vector_helpers(T, in_f: int, pad: bool, V: int, GV: int, wpg: int, expand, bias: bool):
    """The TVMScript pieces both int8-activation kernels (4-bit here, 8-bit in cpu_linear_int8_q8) build from a
    tile_plan: xval (x[m, k], zero past `in_f` when `in` is padded), group_vec (the V/wpg per-group values of chunk
    `ch` of row n, each repeated for its wpg words, float32xV), epilogue (+ bias) and hsum (the lanes of a vector
    summed by halving shuffles)."""

    def xval(x, m, k):
        return T.if_then_else(k < in_f, x[m, k], T.float32(0)) if pad else x[m, k]

    def group_vec(buf, n, ch):
        g = T.Cast(f"float32x{GV}", buf[n, T.ramp(ch * GV, 1, GV)]) if GV > 1 else \
            T.Broadcast(T.Cast("float32", buf[n, ch * V // wpg]), V)
        return T.Shuffle([g] * wpg, expand) if GV > 1 else g

    def epilogue(total, bias_buf, n):
        return total + bias_buf[n] if bias else total

    def hsum(vec):
        lanes = V
        while lanes > 1:
            half = lanes // 2
            vec = T.Shuffle([vec], list(range(half))) + T.Shuffle([vec], list(range(half, lanes)))
            lanes = half
        return vec

    return xval, group_vec, epilogue, hsum


def linear_int8(rows: int | None, in_f: int, out_f: int, scheme: QuantScheme, bias: bool, target=None,
                family: str | None = None):
    """y[m, n] = sum_k x[m, k] W[n, k] (+ b[n]) for an INT4 weight (q_weight, q_scale[, q_min]) with int8
    activations; rows=None gives a symbolic row count (prefill, batch decode). `family` restricts `plan`."""
    c = compiler()
    T = c.tvm.script.tirx
    target = target if target is not None else c.Target.current(allow_none=True)
    kp, W, G, gs, wpg, path, V, GV, C, nt, tiles, P, TP, fv, expand = tile_plan(scheme, in_f, out_f, target, family)
    AG, ags = kp // scheme.act_group_size, scheme.act_group_size  # activation groups (stage 1): d per `ags` values
    wpa = ags // scheme.elems_per_word  # words per activation group
    dot = _dot_fn(path)
    asym = scheme.zero_point
    neg_qmax = -float(scheme.qmax)
    sdt = scheme.scale_dtype
    gemm = rows is None
    MT = 4 if gemm else 1  # rows of x per weight-tile pass (prefill / batch decode)
    pad = kp != in_f
    mask = T.Broadcast(T.uint32(0x0F0F0F0F), V)
    four = T.Broadcast(T.uint32(4), V)

    xval, group_vec, epilogue, hsum = vector_helpers(T, in_f, pad, V, GV, wpg, expand, bias)

    def minimum(buf, n, ch, sc):
        return group_vec(buf, n, ch) if asym else sc * T.Broadcast(T.float32(neg_qmax), V)

    @T.macro
    def rows_block(acc, qw, qs, qm, xl, xh, xd, xs, out, bias_buf, p, tt, m0, mt):
        """Rows m0 .. m0+mt of x against the tile's nt weight rows: each weight vector is unpacked once and
        used for all mt rows of x."""
        for r in T.unroll(nt):
            for i in T.unroll(mt):
                acc[r, i, T.ramp(0, 1, V)] = T.Broadcast(T.float32(0), V)
        for ch in range(C):
            for r in T.unroll(nt):
                n = T.meta_var((p * TP + tt) * nt + r)
                w = T.meta_var(qw[n, T.ramp(ch * V, 1, V)])
                w_lo = T.meta_var(T.bitwise_and(w, mask))
                w_hi = T.meta_var(T.bitwise_and(T.shift_right(w, four), mask))
                sc = T.meta_var(group_vec(qs, n, ch))
                mn = T.meta_var(minimum(qm, n, ch, sc))
                for i in T.unroll(mt):
                    d = T.meta_var(dot(T, w_lo, xl[m0 + i, T.ramp(ch * V, 1, V)], w_hi, xh[m0 + i, T.ramp(ch * V, 1, V)]))
                    acc[r, i, T.ramp(0, 1, V)] = (acc[r, i, T.ramp(0, 1, V)]
                                                  + T.Cast(fv, d) * (sc * xd[m0 + i, T.ramp(ch * V, 1, V)])
                                                  + mn * xs[m0 + i, T.ramp(ch * V, 1, V)])
        for r in T.unroll(nt):
            for i in T.unroll(mt):
                n = T.meta_var((p * TP + tt) * nt + r)
                total = T.meta_var(T.Shuffle([hsum(acc[r, i, T.ramp(0, 1, V)])], [0]))
                out[m0 + i, n] = epilogue(total, bias_buf, n)

    @T.macro
    def decode_tile(wu, su, qw, qs, qm, p, tt):
        """GEMM: unpack the tile's nt weight rows once (nibble vectors, per-lane scale and min) into this task's
        scratch; every row of x then reads them with plain vector loads."""
        for ch in range(C):
            for r in T.unroll(nt):
                n = T.meta_var((p * TP + tt) * nt + r)
                w = T.meta_var(qw[n, T.ramp(ch * V, 1, V)])
                wu[p, r, ch, 0, T.ramp(0, 1, V)] = T.bitwise_and(w, mask)
                wu[p, r, ch, 1, T.ramp(0, 1, V)] = T.bitwise_and(T.shift_right(w, four), mask)
                su[p, r, ch, 0, T.ramp(0, 1, V)] = group_vec(qs, n, ch)
                su[p, r, ch, 1, T.ramp(0, 1, V)] = minimum(qm, n, ch, group_vec(qs, n, ch))

    @T.macro
    def rows_block_decoded(acc, wu, su, xl, xh, xd, xs, out, bias_buf, p, tt, m0, mt):
        for r in T.unroll(nt):
            for i in T.unroll(mt):
                acc[r, i, T.ramp(0, 1, V)] = T.Broadcast(T.float32(0), V)
        for ch in range(C):
            for r in T.unroll(nt):
                for i in T.unroll(mt):
                    d = T.meta_var(dot(T, wu[p, r, ch, 0, T.ramp(0, 1, V)], xl[m0 + i, T.ramp(ch * V, 1, V)],
                                       wu[p, r, ch, 1, T.ramp(0, 1, V)], xh[m0 + i, T.ramp(ch * V, 1, V)]))
                    acc[r, i, T.ramp(0, 1, V)] = (acc[r, i, T.ramp(0, 1, V)]
                                                  + T.Cast(fv, d) * (su[p, r, ch, 0, T.ramp(0, 1, V)]
                                                                     * xd[m0 + i, T.ramp(ch * V, 1, V)])
                                                  + su[p, r, ch, 1, T.ramp(0, 1, V)] * xs[m0 + i, T.ramp(ch * V, 1, V)])
        for r in T.unroll(nt):
            for i in T.unroll(mt):
                n = T.meta_var((p * TP + tt) * nt + r)
                total = T.meta_var(T.Shuffle([hsum(acc[r, i, T.ramp(0, 1, V)])], [0]))
                out[m0 + i, n] = epilogue(total, bias_buf, n)

    m_var = c.tirx.Var("m", "int64") if gemm else None
    M = m_var if gemm else rows

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x_h: T.handle, qw: T.Buffer((out_f, W), "uint32"), qs: T.Buffer((out_f, G), sdt),
               qm: T.Buffer((out_f, G), sdt), b_h: T.handle, out_h: T.handle):
        x = T.match_buffer(x_h, (M, in_f), "float32")
        bias_buf = T.match_buffer(b_h, (out_f,), "float32")
        out = T.match_buffer(out_h, (M, out_f), "float32")
        xl = T.alloc_buffer((M, W), "int32")
        xh = T.alloc_buffer((M, W), "int32")
        xd = T.alloc_buffer((M, W), "float32")
        xs = T.alloc_buffer((M, W), "float32")
        for m in (T.parallel(M) if gemm else T.serial(M)):
            fs = T.alloc_buffer((1,), "float32", scope="local", annotations=STACK)  # max|x| of a group
            iw = T.alloc_buffer((3,), "int32", scope="local", annotations=STACK)  # the two packed words, sum of xq
            for g in range(AG):
                fs[0] = T.float32(0)
                for k in range(ags):
                    fs[0] = T.max(fs[0], T.fabs(xval(x, m, g * ags + k)))
                inv = T.meta_var(T.if_then_else(fs[0] > T.float32(0), T.float32(127) / fs[0], T.float32(0)))
                for j in range(wpa):
                    xd[m, g * wpa + j] = fs[0] / T.float32(127)
                    iw[0] = 0
                    iw[1] = 0
                    iw[2] = 0
                    for b in range(4):
                        k0 = T.meta_var(g * ags + j * 8 + 2 * b)
                        qa = T.meta_var(T.Cast("int32", T.round(xval(x, m, k0) * inv)))
                        qb = T.meta_var(T.Cast("int32", T.round(xval(x, m, k0 + 1) * inv)))
                        iw[0] = iw[0] | T.shift_left(T.bitwise_and(qa, 255), b * 8)
                        iw[1] = iw[1] | T.shift_left(T.bitwise_and(qb, 255), b * 8)
                        iw[2] = iw[2] + qa + qb
                    xl[m, g * wpa + j] = iw[0]
                    xh[m, g * wpa + j] = iw[1]
                    # the min term meets d * sum(xq) of the word's 8 values (llama.cpp's Q8_1 `s`), not sum(x)
                    xs[m, g * wpa + j] = T.Cast("float32", iw[2]) * (fs[0] / T.float32(127))
        wu = T.alloc_buffer((P if gemm else 1, nt, C, 2, V), "uint32")
        su = T.alloc_buffer((P if gemm else 1, nt, C, 2, V), "float32")
        for p in T.parallel(P):
            acc = T.alloc_buffer((nt, MT, V), "float32", scope="local")
            for tt in range(TP):
                if p * TP + tt < tiles:
                    if gemm:
                        if M >= MT:  # decoding the tile pays off once a block of MT rows of x reuses it
                            decode_tile(wu, su, qw, qs, qm, p, tt)
                            for mb in range(M // MT):
                                rows_block_decoded(acc, wu, su, xl, xh, xd, xs, out, bias_buf, p, tt, mb * MT, MT)
                            for mr in range(M % MT):
                                rows_block_decoded(acc, wu, su, xl, xh, xd, xs, out, bias_buf, p, tt,
                                                   M // MT * MT + mr, 1)
                        else:  # a few rows (batch decode of 1-3 sequences): straight from the packed weights
                            for mr in range(M):
                                rows_block(acc, qw, qs, qm, xl, xh, xd, xs, out, bias_buf, p, tt, mr, 1)
                    else:
                        rows_block(acc, qw, qs, qm, xl, xh, xd, xs, out, bias_buf, p, tt, 0, 1)

    func = kernel
    # drop the parameters this scheme / bias does not use
    params = list(func.params)
    keep = [params[0], params[1], params[2]] + ([params[3]] if asym else []) + ([params[4]] if bias else []) + [params[5]]
    func = _with_params(func, keep)
    kind = "gemm" if gemm else "gemv"
    return func.with_attrs({"edgellm.kernel": kind, "op_pattern": OPAQUE, "tirx.is_scheduled": True,
                            "tir.noalias": True, "edgellm.dot": path.name})


def _with_params(func, keep):
    """The PrimFunc with only `keep` among its parameters (the others must be unused)."""
    return compiler().tirx.PrimFunc(keep, func.body, func.ret_type, func.attrs)
