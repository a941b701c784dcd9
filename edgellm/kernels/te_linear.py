"""Tensor-expression kernels for the weight-side ops: linear (dense or INT4-packed weights) and embedding lookup.

Each builder returns an unscheduled PrimFunc whose attribute `edgellm.kernel` names its kind; the registry gives it
a target-specific schedule (kernels/schedule_cpu.py, kernels/schedule_gpu.py). The INT4 decode sits inside the
kernel (block "dequant", inlined or computed per weight tile), so dequantize and matmul are one kernel by
construction. Accumulation is in float32 for every scheme.
"""

from __future__ import annotations

from .._tvm import compiler
from ..quant.schemes import QuantScheme

ACC = "float32"
OPAQUE = 8  # relax OpPatternKind.kOpaque: keeps FuseOps from merging (and unscheduling) our kernels


def _decode_weight(te, scheme: QuantScheme, out_f: int, in_f: int):
    """Placeholders for the stored weight and a `w[n, k]` float32 expression decoding it."""
    if not scheme.quantized:
        w = te.placeholder((out_f, in_f), scheme.weight_dtype, "weight")
        return [w], w
    kp, g, per = scheme.padded_in(in_f), scheme.group_size, scheme.elems_per_word
    qw = te.placeholder((out_f, kp // per), "uint32", "q_weight")
    qs = te.placeholder((out_f, kp // g), scheme.scale_dtype, "q_scale")
    qm = te.placeholder((out_f, kp // g), scheme.scale_dtype, "q_min") if scheme.zero_point else None

    def deq(n, k):
        shift = ((k % per) * scheme.bits).astype("uint32")
        nib = (qw[n, k // per] >> shift) & ((1 << scheme.bits) - 1)
        if qm is not None:
            return nib.astype(ACC) * qs[n, k // g].astype(ACC) + qm[n, k // g].astype(ACC)
        return (nib.astype(ACC) - float(scheme.offset)) * qs[n, k // g].astype(ACC)

    return [qw, qs] + ([qm] if qm is not None else []), te.compute((out_f, in_f), deq, name="dequant")


def linear(rows: int | None, in_f: int, out_f: int, scheme: QuantScheme, out_dtype: str, bias: bool):
    """y[m, n] = sum_k x[m, k] * W[n, k] (+ b[n]); rows=None gives a symbolic row count. Unscheduled: the registry
    gives it the target's schedule (schedule_cpu / schedule_gpu) or a hand-written kernel of the same signature."""
    c = compiler()
    te, tirx = c.te, c.tirx
    m = tirx.Var("m", "int64") if rows is None else rows
    x = te.placeholder((m, in_f), out_dtype, "x")
    weights, w = _decode_weight(te, scheme, out_f, in_f)
    k = te.reduce_axis((0, in_f), "k")
    acc = te.compute((m, out_f), lambda i, n: te.sum(x[i, k].astype(ACC) * w[n, k].astype(ACC), axis=k), name="matmul")
    args = [x, *weights]
    out = acc
    if bias:
        b = te.placeholder((out_f,), out_dtype, "bias")
        args.append(b)
        out = te.compute((m, out_f), lambda i, n: (acc[i, n] + b[n].astype(ACC)).astype(out_dtype), name="epilogue")
    elif out_dtype != ACC:
        out = te.compute((m, out_f), lambda i, n: acc[i, n].astype(out_dtype), name="epilogue")
    kind = "gemv" if rows == 1 else "gemm"
    func = te.create_prim_func([*args, out])
    return func.without_attr("global_symbol").with_attrs({"edgellm.kernel": kind, "op_pattern": OPAQUE})


def embedding(vocab: int, hidden: int, scheme: QuantScheme, out_dtype: str):
    """out[t, j] = W[ids[t], j] for a symbolic number of tokens."""
    c = compiler()
    te, tirx = c.te, c.tirx
    n = tirx.Var("n", "int64")
    ids = te.placeholder((n,), "int32", "ids")
    weights, w = _decode_weight(te, scheme, vocab, hidden)
    out = te.compute((n, hidden), lambda t, j: w[ids[t], j].astype(out_dtype), name="embed")
    func = te.create_prim_func([ids, *weights, out])
    return func.without_attr("global_symbol").with_attrs({"edgellm.kernel": "embedding", "op_pattern": OPAQUE})
