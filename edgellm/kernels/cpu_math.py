"""Vectorizable float32 math for our CPU kernels.

LLVM lowers `exp`/`exp2` on a vector to one libm call per lane, so a loop that needs them stays scalar (SmolLM2's
silu over 1536 values took 6.5 us per call). These are plain arithmetic and bit operations instead.
"""

from __future__ import annotations

import math

from .._tvm import compiler

tirx = compiler().tirx
T = compiler().T

LOG2E = math.log2(math.e)
# Cephes exp2f: 2**f for |f| <= 0.5, relative error ~2e-7
_EXP2_POLY = (1.535336188319500e-4, 1.339887440266574e-3, 9.618437357674640e-3, 5.550332471162809e-2,
              2.402264791363012e-1, 6.931472028550421e-1, 1.0)


def fast_exp2(x):
    """2**x for a float32 expression: x = n + f, n = round(x); the polynomial for 2**f, 2**n via the exponent bits.

    Clamped to [-127, 127]: 2**-127 comes out as exactly 0 (softmax's masked and underflowing terms).
    """
    f32 = "float32"
    x = tirx.max(tirx.min(x, tirx.const(127.0, f32)), tirx.const(-127.0, f32))
    n = tirx.round(x)
    f = x - n
    p = tirx.const(_EXP2_POLY[0], f32)
    for coef in _EXP2_POLY[1:]:
        p = p * f + tirx.const(coef, f32)
    bits = tirx.shift_left(n.astype("int32") + 127, tirx.const(23, "int32"))
    return tirx.reinterpret(f32, bits) * p


def fast_exp(x):
    return fast_exp2(x * tirx.const(LOG2E, "float32"))


def silu(x):
    """x * sigmoid(x) in float32 with fast_exp (exp(-x) saturates at 2**127 for x < -88: the result is -0)."""
    one = tirx.const(1.0, "float32")
    return x / (one + fast_exp(-x))


@T.macro
def tree_sum16(buf):
    """buf[0] = buf[0] + ... + buf[15], halving with vector adds (buf is changed)."""
    for i in T.vectorized(8):
        buf[i] = buf[i] + buf[i + 8]
    for i in T.vectorized(4):
        buf[i] = buf[i] + buf[i + 4]
    for i in T.vectorized(2):
        buf[i] = buf[i] + buf[i + 2]
    for i in T.vectorized(1):
        buf[i] = buf[i] + buf[i + 1]


@T.macro
def tree_max16(buf):
    """buf[0] = max(buf[0:16]), halving with vector maxes (buf is changed)."""
    for i in T.vectorized(8):
        buf[i] = T.max(buf[i], buf[i + 8])
    for i in T.vectorized(4):
        buf[i] = T.max(buf[i], buf[i + 4])
    for i in T.vectorized(2):
        buf[i] = T.max(buf[i], buf[i + 2])
    for i in T.vectorized(1):
        buf[i] = T.max(buf[i], buf[i + 1])


def add_rms_norm_cpu(hidden: int, eps: float, dtype: str):
    """(x [n, hidden], y [n, hidden], w [hidden]) -> s = x + y, rms_norm(s) * w: the residual add and the next norm
    in one kernel. The sum of squares runs in 16 float32 lanes (unscheduled TVM rms_norm is one serial add chain:
    0.63 us for 576 values); tokens run in parallel from 32 on. hidden % 16 == 0.
    """
    T = compiler().T
    f32, V = "float32", 16
    assert hidden % V == 0

    @T.macro
    def one_token(x, y, w, s, out, t):
        with T.sblock("tok"):
            T.reads()
            T.writes()
            acc = T.sblock_alloc_buffer((V,), f32)
            for i in T.vectorized(V):
                acc[i] = T.float32(0)
            for j in T.serial(hidden // V):
                for i in T.vectorized(V):
                    s[t, j * V + i] = T.Cast(dtype, T.Cast(f32, x[t, j * V + i]) + T.Cast(f32, y[t, j * V + i]))
                    acc[i] = acc[i] + T.Cast(f32, s[t, j * V + i]) * T.Cast(f32, s[t, j * V + i])
            tree_sum16(acc)
            acc[1] = T.rsqrt(acc[0] / T.float32(hidden) + T.float32(eps))
            for j in T.serial(hidden // V):
                for i in T.vectorized(V):
                    out[t, j * V + i] = T.Cast(dtype, T.Cast(f32, s[t, j * V + i]) * acc[1] * T.Cast(f32, w[j * V + i]))

    @T.prim_func(s_tir=True)
    def add_rms_norm(var_x: T.handle, var_y: T.handle, w: T.Buffer((hidden,), dtype), var_s: T.handle,
                     var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(var_x, (n, hidden), dtype)
        y = T.match_buffer(var_y, (n, hidden), dtype)
        s = T.match_buffer(var_s, (n, hidden), dtype)
        out = T.match_buffer(var_out, (n, hidden), dtype)
        if n < 32:
            for t in T.serial(n):
                one_token(x, y, w, s, out, t)
        else:
            for t in T.parallel(n):
                one_token(x, y, w, s, out, t)

    return add_rms_norm
