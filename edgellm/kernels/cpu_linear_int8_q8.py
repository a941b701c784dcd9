"""CPU linear kernel for 8-bit weights (the Q8_0 grid) with int8 activations: int8 x int8 integer dot products.

Used by `act_quant="int8"` rows with `bits=8` (q8f32_2: the 8-bit embedding / tied head beside q4f32_2; the head is
the largest GEMV of a small model, 49152 x 576 for SmolLM2). Same two stages as kernels/cpu_linear_int8.py:

1. quantize x [m, k] per group of the row's `act_group` values (one word, 4; `d = max|x| / 127`,
   `xq = rint(x * 127 / max|x|)`), four bytes per int32 word in element order, i.e. the order of the weight bytes in
   weight word j; per word also `d` and `128 * sum(xq)` of its 4 bytes (the offset-binary correction, an integer).
2. parallel over tiles of `nt` output rows: per chunk of V words (4V weights) one integer dot product per row, one
   int->float convert and one FMA with `scale * d` (per-lane group scales).

The weight byte is offset binary, `u = q + 128`. The dot product of q with xq, exact in int32 on every path:
  vnni     vpdpbusd(u, xq) (u8 x s8) - 128 * sum(xq)
  pmadd    u split into nibbles (u = 16 hi + lo): vpmaddubsw on each (no int16 saturation: 2 * 15 * 127),
           vpmaddwd by 1 and by 16, minus 128 * sum(xq)
  sdot     NEON sdot(u ^ 0x80808080, xq): the xor gives q as a signed byte
  generic  the same xor, sign-extended bytes multiplied in int32 lanes
`quant.reference.linear_int8` (8-bit rows) is the numpy definition.
"""

from __future__ import annotations

from .._tvm import compiler
from ..quant.schemes import QuantScheme
from .cpu_linear_int8 import _PMADD, OPAQUE, STACK, DotPath, _with_params, tile_plan, vector_helpers

CORRECTED = ("vnni", "pmadd")  # families that multiply the unsigned byte u and subtract 128 * sum(xq)


def _dot8_fn(path: DotPath):
    """(T, w, a) -> int32xV: per lane, sum over its 4 bytes of u * a (CORRECTED families) or q * a (the others);
    w: uint32xV weight words, a: int32xV packed int8 activations."""
    v = path.lanes
    iv, bv, hv = f"int32x{v}", f"int8x{4 * v}", f"int16x{2 * v}"
    if path.family in ("vnni", "sdot"):
        intrin = (f"llvm.x86.avx512.vpdpbusd.{32 * v}" if path.family == "vnni"
                  else f"llvm.aarch64.neon.sdot.v{v}i32.v{4 * v}i8")

        def dot(T, w, a):
            if path.family == "sdot":
                w = T.bitwise_xor(w, T.Broadcast(T.uint32(0x80808080), v))
            return T.call_llvm_pure_intrin(iv, intrin, T.Broadcast(T.int32(0), v), T.reinterpret(bv, w),
                                           T.reinterpret(bv, a))

        return dot
    if path.family == "pmadd":
        ubsw, wd = _PMADD[v]

        def dot(T, w, a):
            mask = T.Broadcast(T.uint32(0x0F0F0F0F), v)
            lo = T.bitwise_and(w, mask)
            hi = T.bitwise_and(T.shift_right(w, T.Broadcast(T.uint32(4), v)), mask)
            lo16 = T.call_llvm_pure_intrin(hv, ubsw, T.reinterpret(bv, lo), T.reinterpret(bv, a))
            hi16 = T.call_llvm_pure_intrin(hv, ubsw, T.reinterpret(bv, hi), T.reinterpret(bv, a))
            return (T.call_llvm_pure_intrin(iv, wd, lo16, T.Broadcast(T.int16(1), 2 * v))
                    + T.call_llvm_pure_intrin(iv, wd, hi16, T.Broadcast(T.int16(16), 2 * v)))

        return dot

    def dot(T, w, a):  # portable: q (sign-extended after the xor) times x's sign-extended byte, in int32 lanes
        ws = T.reinterpret(iv, T.bitwise_xor(w, T.Broadcast(T.uint32(0x80808080), v)))
        total = None
        for b in range(4):
            left, right = T.Broadcast(T.int32(24 - 8 * b), v), T.Broadcast(T.int32(24), v)
            qb = T.shift_right(T.shift_left(ws, left), right)
            xb = T.shift_right(T.shift_left(a, left), right)
            total = qb * xb if total is None else total + qb * xb
        return total

    return dot


def linear_int8_q8(rows: int | None, in_f: int, out_f: int, scheme: QuantScheme, bias: bool, target=None,
                   family: str | None = None):
    """y[m, n] = sum_k x[m, k] W[n, k] (+ b[n]) for an 8-bit weight (q_weight, q_scale) with int8 activations;
    rows=None gives a symbolic row count (prefill, batch decode). `family` restricts `plan`."""
    c = compiler()
    T = c.tvm.script.tirx
    target = target if target is not None else c.Target.current(allow_none=True)
    if scheme.bits != 8 or scheme.zero_point:
        raise ValueError(f"linear_int8_q8 takes symmetric 8-bit rows, not {scheme.name}")
    per = scheme.elems_per_word  # 4
    kp, W, G, gs, wpg, path, V, GV, C, nt, tiles, P, TP, fv, expand = tile_plan(scheme, in_f, out_f, target, family)
    AG, ags = kp // scheme.act_group_size, scheme.act_group_size  # activation groups (stage 1): d per `ags` values
    wpa = ags // per  # words per activation group
    dot = _dot8_fn(path)
    corrected = path.family in CORRECTED
    sdt = scheme.scale_dtype
    gemm = rows is None
    MT = 4 if gemm else 1  # rows of x per pass over a weight tile (prefill / batch decode)
    pad = kp != in_f

    xval, group_vec, epilogue, hsum = vector_helpers(T, in_f, pad, V, GV, wpg, expand, bias)

    def idot(T, w, xw, xc, m, ch):
        d = dot(T, w, xw[m, T.ramp(ch * V, 1, V)])
        return d - xc[m, T.ramp(ch * V, 1, V)] if corrected else d

    @T.macro
    def rows_block(acc, qw, qs, xw, xc, xd, out, bias_buf, p, tt, m0, mt):
        """Rows m0 .. m0+mt of x against the tile's nt weight rows: each weight vector is loaded once for all mt."""
        for r in T.unroll(nt):
            for i in T.unroll(mt):
                acc[r, i, T.ramp(0, 1, V)] = T.Broadcast(T.float32(0), V)
        for ch in range(C):
            for r in T.unroll(nt):
                n = T.meta_var((p * TP + tt) * nt + r)
                w = T.meta_var(qw[n, T.ramp(ch * V, 1, V)])
                sc = T.meta_var(group_vec(qs, n, ch))
                for i in T.unroll(mt):
                    d = T.meta_var(idot(T, w, xw, xc, m0 + i, ch))
                    acc[r, i, T.ramp(0, 1, V)] = (acc[r, i, T.ramp(0, 1, V)]
                                                  + T.Cast(fv, d) * (sc * xd[m0 + i, T.ramp(ch * V, 1, V)]))
        for r in T.unroll(nt):
            for i in T.unroll(mt):
                n = T.meta_var((p * TP + tt) * nt + r)
                total = T.meta_var(T.Shuffle([hsum(acc[r, i, T.ramp(0, 1, V)])], [0]))
                out[m0 + i, n] = epilogue(total, bias_buf, n)

    m_var = c.tirx.Var("m", "int64") if gemm else None
    M = m_var if gemm else rows

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x_h: T.handle, qw: T.Buffer((out_f, W), "uint32"), qs: T.Buffer((out_f, G), sdt), b_h: T.handle,
               out_h: T.handle):
        x = T.match_buffer(x_h, (M, in_f), "float32")
        bias_buf = T.match_buffer(b_h, (out_f,), "float32")
        out = T.match_buffer(out_h, (M, out_f), "float32")
        xw = T.alloc_buffer((M, W), "int32")
        xc = T.alloc_buffer((M, W), "int32")
        xd = T.alloc_buffer((M, W), "float32")
        for m in (T.parallel(M) if gemm else T.serial(M)):
            fs = T.alloc_buffer((1,), "float32", scope="local", annotations=STACK)  # max|x| of a group
            iw = T.alloc_buffer((2,), "int32", scope="local", annotations=STACK)  # packed word, sum of its bytes
            for g in range(AG):
                fs[0] = T.float32(0)
                for k in range(ags):
                    fs[0] = T.max(fs[0], T.fabs(xval(x, m, g * ags + k)))
                inv = T.meta_var(T.if_then_else(fs[0] > T.float32(0), T.float32(127) / fs[0], T.float32(0)))
                for j in range(wpa):
                    xd[m, g * wpa + j] = fs[0] / T.float32(127)
                    iw[0] = 0
                    iw[1] = 0
                    for b in range(per):
                        qa = T.meta_var(T.Cast("int32", T.round(xval(x, m, g * ags + j * per + b) * inv)))
                        iw[0] = iw[0] | T.shift_left(T.bitwise_and(qa, 255), b * 8)
                        iw[1] = iw[1] + qa
                    xw[m, g * wpa + j] = iw[0]
                    xc[m, g * wpa + j] = iw[1] * 128
        for p in T.parallel(P):
            acc = T.alloc_buffer((nt, MT, V), "float32", scope="local")
            for tt in range(TP):
                if p * TP + tt < tiles:
                    if gemm:
                        for mb in range(M // MT):
                            rows_block(acc, qw, qs, xw, xc, xd, out, bias_buf, p, tt, mb * MT, MT)
                        for mr in range(M % MT):
                            rows_block(acc, qw, qs, xw, xc, xd, out, bias_buf, p, tt, M // MT * MT + mr, 1)
                    else:
                        rows_block(acc, qw, qs, xw, xc, xd, out, bias_buf, p, tt, 0, 1)

    params = list(kernel.params)
    func = _with_params(kernel, params[:3] + ([params[3]] if bias else []) + [params[4]])
    kind = "gemm" if gemm else "gemv"
    return func.with_attrs({"edgellm.kernel": kind, "op_pattern": OPAQUE, "tirx.is_scheduled": True,
                            "tir.noalias": True, "edgellm.dot": path.name})
