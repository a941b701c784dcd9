"""Numpy reference of the INT4 / INT8 packing and of the int8-activation linear (the definition every TIR kernel is
tested against)."""

from __future__ import annotations

import numpy as np

from .schemes import QuantScheme


def quantize(w: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, ...]:
    """w: float [out, in] -> (q_weight uint32 [out, in_pad/per_word], q_scale [out, in_pad/group]) for symmetric
    rows, plus q_min [out, in_pad/group] for asymmetric (zero_point) rows."""
    if w.ndim != 2:
        raise ValueError(f"quantize expects a 2-D [out, in] weight, got shape {w.shape}")
    out_f, in_f = w.shape
    in_pad = scheme.padded_in(in_f)
    w = w.astype(np.float32)
    if in_pad != in_f:
        w = np.pad(w, ((0, 0), (0, in_pad - in_f)))
    g = scheme.group_size
    groups = w.reshape(out_f, in_pad // g, g)
    if scheme.zero_point:
        return _quantize_asym(groups, scheme)
    if scheme.q_offset:
        return _quantize_q4_0(groups, scheme)
    scale = np.abs(groups).max(axis=2) / scheme.qmax  # [out, in_pad/g]
    scale = scale.astype(scheme.scale_dtype)
    safe = np.where(scale == 0, 1, scale).astype(np.float32)[:, :, None]
    q = np.clip(np.round(groups / safe) + scheme.offset, 0, scheme.levels).astype(np.uint32)
    return pack(q.reshape(out_f, in_pad), scheme), scale


def _quantize_asym(groups: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min/max grid per group (GGUF Q4_1): scale = (max - min) / 15, q = round((w - min) / scale)."""
    out_f = groups.shape[0]
    lo, hi = groups.min(axis=2), groups.max(axis=2)
    # fp16 values even where stored in fp32 (the GPTQ/AWQ rows): q * scale is then exact in fp32, so a kernel's FMA
    # and numpy's multiply-then-add decode alike
    scale = ((hi - lo) / scheme.levels).astype(np.float16).astype(scheme.scale_dtype)
    qmin = lo.astype(np.float16).astype(scheme.scale_dtype)
    s32 = scale.astype(np.float32)[:, :, None]
    safe = np.where(s32 == 0, 1, s32)
    q = np.clip(np.rint((groups - qmin.astype(np.float32)[:, :, None]) / safe), 0, scheme.levels).astype(np.uint32)
    return pack_nibbles(q.reshape(out_f, -1)), scale, qmin


def _quantize_q4_0(groups: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """The GGUF Q4_0 grid as llama.cpp quantizes it (quantize_row_q4_0_ref): d = the group's signed extreme / -8
    (so that element lands on q = 0), q = min(15, trunc(w / d + 8.5)); decoded (q - 8) * d."""
    out_f = groups.shape[0]
    idx = np.abs(groups).argmax(axis=2)[:, :, None]
    extreme = np.take_along_axis(groups, idx, axis=2)[:, :, 0]
    d = (extreme / -float(scheme.offset)).astype(np.float32)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, np.float32(1)), np.float32(0)).astype(np.float32)
    q = np.clip(np.trunc(groups * inv[:, :, None] + np.float32(scheme.offset + 0.5)), 0, scheme.levels)
    return pack_nibbles(q.astype(np.uint32).reshape(out_f, -1)), d.astype(scheme.scale_dtype)


def pack(q: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """Stored values [out, in] -> uint32 words in `scheme`'s width (nibbles or bytes)."""
    return pack_bytes(q) if scheme.bits == 8 else pack_nibbles(q)


def unpack(packed: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """uint32 words -> stored values uint8 [out, in_pad] in `scheme`'s width."""
    return unpack_bytes(packed) if scheme.bits == 8 else unpack_nibbles(packed)


def pack_bytes(q: np.ndarray) -> np.ndarray:
    """uint [out, in] (in % 4 == 0, values < 256) -> uint32 [out, in/4]; byte i of 4 at bits 8i (little endian)."""
    out_f, in_f = q.shape
    return np.ascontiguousarray(q.astype(np.uint8)).view("<u4").reshape(out_f, in_f // 4).astype(np.uint32)


def unpack_bytes(packed: np.ndarray) -> np.ndarray:
    """uint32 [out, in/4] -> uint8 [out, in]."""
    return np.ascontiguousarray(packed.astype("<u4")).view(np.uint8).reshape(packed.shape[0], -1)


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint [out, in] (in % 8 == 0, values < 16) -> uint32 [out, in/8]; element i of 8 at bits 4i."""
    out_f, in_f = q.shape
    q = q.astype(np.uint32).reshape(out_f, in_f // 8, 8)
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
    return np.bitwise_or.reduce(q << shifts, axis=2).astype(np.uint32)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint32 [out, in/8] -> uint8 [out, in]."""
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
    q = (packed[:, :, None] >> shifts) & np.uint32(15)
    return q.reshape(packed.shape[0], -1).astype(np.uint8)


def dequantize(q_weight: np.ndarray, q_scale: np.ndarray, in_features: int, scheme: QuantScheme,
               q_min: np.ndarray | None = None) -> np.ndarray:
    """Inverse of `quantize`: -> float32 [out, in_features] (padding dropped)."""
    g = scheme.group_size
    scale = np.repeat(q_scale.astype(np.float32), g, axis=1)
    if scheme.zero_point:
        if q_min is None:
            raise ValueError(f"scheme {scheme.name} is asymmetric: dequantize needs q_min")
        q = unpack_nibbles(q_weight).astype(np.float32)
        return (q * scale + np.repeat(q_min.astype(np.float32), g, axis=1))[:, :in_features]
    q = unpack(q_weight, scheme).astype(np.float32) - scheme.offset
    return (q * scale)[:, :in_features]


def quantize_activations(x: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """x float32 [m, k] (k % group_size == 0) -> (int8 [m, k], scale float32 [m, k/group]) with
    d = max|x_g| / 127 and xq = rint(x * (127 / max|x_g|)) (0 for an all-zero group): the int8 linear kernels'
    first stage, bit for bit."""
    m, k = x.shape
    xg = x.astype(np.float32).reshape(m, k // group_size, group_size)
    amax = np.abs(xg).max(axis=2)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, np.float32(1)), np.float32(0))
    xq = np.rint(xg * inv.astype(np.float32)[:, :, None]).astype(np.int8)
    return xq.reshape(m, k), (amax / np.float32(127)).astype(np.float32)


def linear_int8(x: np.ndarray, q_weight: np.ndarray, q_scale: np.ndarray, q_min: np.ndarray | None,
                scheme: QuantScheme) -> np.ndarray:
    """What an `act_quant="int8"` linear kernel computes, x float32 [m, in] -> [m, out], with xq, d from
    `quantize_activations` per activation group a of `scheme.act_group_size` values (inside weight group g(a)):

    4-bit rows: sum_a scale_g(a) * d_a * (nibbles . xq)_a + min_g(a) * d_a * sum(xq_a)  (symmetric: min = -offset * scale)
    8-bit rows: sum_a scale_g(a) * d_a * (q . xq)_a  with q = byte - 128 (int8 x int8)

    The minimum meets the sum of the quantized activations, as llama.cpp's Q4_1 x Q8_1 does (min * s with
    s = d * sum(xq)): the result is then exactly the dot product of the dequantized weights with the dequantized
    activations, and the rounding errors of x cancel instead of being multiplied by the all-positive (w - min)."""
    g, ag = scheme.group_size, scheme.act_group_size
    out_f = q_weight.shape[0]
    kp = q_weight.shape[1] * scheme.elems_per_word
    x = np.pad(x.astype(np.float32), ((0, 0), (0, kp - x.shape[1])))
    xq, xd = quantize_activations(x, ag)
    groups = kp // ag
    q = unpack(q_weight, scheme).astype(np.float32)
    if scheme.bits == 8:
        q = q - scheme.offset
    q = q.reshape(out_f, groups, ag).transpose(1, 2, 0)  # [groups, ag, out]
    xqg = xq.astype(np.float32).reshape(x.shape[0], groups, ag).transpose(1, 0, 2)  # [groups, m, ag]
    scale = np.repeat(q_scale.astype(np.float32), g // ag, axis=1)  # per activation group
    qmin = None
    if scheme.bits == 4:
        qmin = q_min.astype(np.float32) if scheme.zero_point else -float(scheme.offset) * q_scale.astype(np.float32)
        qmin = np.repeat(qmin, g // ag, axis=1)
    xsum = xqg.sum(axis=2).T * xd  # [m, groups]: d * sum(xq), the dequantized activations' sum
    out = np.empty((x.shape[0], out_f), np.float32)
    for o in range(0, out_f, 4096):  # blocks of output rows bound the [groups, m, rows] integer dot products
        sl = slice(o, o + 4096)
        # integer dot products per activation group, in float32 through BLAS: every partial sum is an integer below
        # 32 * 128 * 127 < 2**24, so the result is exact
        idot = np.matmul(xqg, q[:, :, sl]).transpose(1, 2, 0)  # [m, rows, groups]
        res = (idot * scale[None, sl] * xd[:, None, :]).sum(axis=2)
        out[:, sl] = res if qmin is None else res + xsum @ qmin[sl].T
    return out
