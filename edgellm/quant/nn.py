"""Weight-carrying layers for tvm.relax.frontend.nn that store weights in a scheme's format.

Models build their projections from these two classes; quantizing a model is choosing the scheme, never editing the
model file. The kernels come from the registry the model was given (edgellm/kernels/registry.py). Parameter names: `weight` (q0 schemes) or `q_weight` + `q_scale` (q4 schemes; asymmetric ones add
`q_min`), plus `bias`.
"""

from __future__ import annotations

from .._tvm import compiler
from ..kernels import KernelRegistry
from .schemes import QuantScheme

nn = compiler().nn


def _weight_params(module, out_f: int, in_f: int, scheme: QuantScheme) -> None:
    if scheme.quantized:
        kp = scheme.padded_in(in_f)
        module.q_weight = nn.Parameter((out_f, kp // scheme.elems_per_word), "uint32")
        module.q_scale = nn.Parameter((out_f, kp // scheme.group_size), scheme.scale_dtype)
        if scheme.zero_point:
            module.q_min = nn.Parameter((out_f, kp // scheme.group_size), scheme.scale_dtype)
        if scheme.act_order:  # GPTQ act-order: `in` stored in group order, the input gathered alike
            module.q_perm = nn.Parameter((in_f,), "int32")
    else:
        module.weight = nn.Parameter((out_f, in_f), scheme.weight_dtype)


def _weights(module, scheme: QuantScheme) -> list:
    if not scheme.quantized:
        return [module.weight]
    return [module.q_weight, module.q_scale] + ([module.q_min] if scheme.zero_point else [])


def linear_call(x, weights: list, in_f: int, out_f: int, scheme: QuantScheme, kernels: KernelRegistry, bias=None):
    """x [..., in] -> [..., out] through one edgellm linear kernel (decode-shaped input gets the GEMV)."""
    lead = list(x.shape[:-1])
    rows = 1
    for d in lead:
        rows = rows * d
    static_one = isinstance(rows, int) and rows == 1
    x2 = x.reshape(rows, in_f)
    func = kernels.linear(1 if static_one else None, in_f, out_f, scheme, x.dtype, bias is not None)
    args = [x2, *weights] + ([bias] if bias is not None else [])
    out = nn.op.tensor_ir_op(func, "linear_gemv" if static_one else "linear", args,
                             nn.Tensor.placeholder((rows, out_f), x.dtype))
    return out.reshape(*lead, out_f)


def _gather_last(x, perm):
    """x[..., perm] as one tensor expression (relax's take would print TVM's out-of-bounds warning for its fast
    mode; perm is a permutation, checked when the weights are packed)."""
    te = compiler().te

    def f(x_te, p_te):
        return te.compute(x_te.shape, lambda *i: x_te[(*i[:-1], p_te[i[-1]])], name="act_order_gather")

    return nn.op.tensor_expr_op(f, "act_order_gather", [x, perm])


class Linear(nn.Module):
    """y = x W^T (+ b) with W [out, in] stored in `scheme`'s format."""

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, dtype: str, kernels: KernelRegistry,
                 bias: bool = False):
        self.in_features, self.out_features, self.scheme, self.kernels = in_features, out_features, scheme, kernels
        _weight_params(self, out_features, in_features, scheme)
        self.bias = nn.Parameter((out_features,), dtype) if bias else None

    def forward(self, x):
        if self.scheme.act_order:  # W x = W[:, perm] x[perm] (quant/gptq_awq.py)
            x = _gather_last(x, self.q_perm)
        return linear_call(x, _weights(self, self.scheme), self.in_features, self.out_features, self.scheme,
                           self.kernels, self.bias)


class Embedding(nn.Module):
    """Token embedding [vocab, hidden] in `scheme`'s format; `as_linear` reuses it as a tied lm_head."""

    def __init__(self, vocab: int, hidden: int, scheme: QuantScheme, dtype: str, kernels: KernelRegistry):
        if scheme.act_order:
            raise ValueError(f"scheme {scheme.name} permutes a linear's input; an embedding cannot use it")
        self.vocab, self.hidden, self.scheme, self.dtype, self.kernels = vocab, hidden, scheme, dtype, kernels
        _weight_params(self, vocab, hidden, scheme)

    def forward(self, ids):
        """ids int32 [n] -> [n, hidden]."""
        func = self.kernels.embedding(self.vocab, self.hidden, self.scheme, self.dtype)
        n = ids.shape[0]
        return nn.op.tensor_ir_op(func, "embedding", [ids, *_weights(self, self.scheme)],
                                  nn.Tensor.placeholder((n, self.hidden), self.dtype))

    def as_linear(self, x):
        return linear_call(x, _weights(self, self.scheme), self.hidden, self.vocab, self.scheme, self.kernels)
