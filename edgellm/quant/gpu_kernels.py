"""GPU-specific variant of the INT4 linear kernel (decode GEMV), same signature as `kernels.linear(1, ...)`.

`kernels.linear` decodes each weight as `(nibble - 7) * scale` in float32: an integer-to-float conversion and a
multiply per weight. On a GPU at memory speed that arithmetic is the limit (an H100 converts int32 to float32 at
a quarter of its FMA rate). This variant computes the same function with fewer and cheaper operations:

* per group of 32 weights, `dot = sum_j x_j * (nib_j - 7)` in float32, then `acc += dot * scale` once per group;
* `nib - 7` without a conversion: the bit pattern `0x4B000000 | nib` is the float `2^23 + nib`, so
  `reinterpret_f32(0x4B000000 | nib) - (2^23 + 7)` is `nib - 7` exactly (float32 holds every integer below 2^24).

The result equals `kernels.linear`'s up to float32 summation order. Blocks: `x_f32` (x in float32), `group_dot`
(per row and group), `matmul` (sum over groups with the scale), `epilogue` (cast, bias). The schedule is in
compile/gpu_schedules.py.
"""

from __future__ import annotations

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
