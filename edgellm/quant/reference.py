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
        return _quantize_asym(groups, scheme, _valid(out_f, in_f, in_pad, g))
    if scheme.bits == 4:
        return _quantize_sym4(groups, scheme, _valid(out_f, in_f, in_pad, g))
    scale = np.abs(groups).max(axis=2) / scheme.qmax  # [out, in_pad/g]
    scale = scale.astype(scheme.scale_dtype)
    safe = np.where(scale == 0, 1, scale).astype(np.float32)[:, :, None]
    q = np.clip(np.round(groups / safe) + scheme.offset, 0, scheme.levels).astype(np.uint32)
    return pack(q.reshape(out_f, in_pad), scheme), scale


# 4-bit float sources: besides the plain rule (min/max, or max|w| / 7) the quantizer tries these stretches of the
# grid, refits the scale (and min) to the levels each gives by least squares, and keeps, per group, whichever has the
# smallest squared error after the storage rounding (llama.cpp's make_qx_quants / make_qkx idea, no importance
# weights; the Q4_0 grid keeps llama.cpp's rule alone, see _quantize_sym4). The plain rule is candidate zero and is only replaced by a strictly smaller error, so a
# weight already on the grid (a GGUF source dequantized) packs back to the same values; refitted scales and mins are
# fp16 values (also in fp32 rows) and the stretch -1 is tried, so dequantizing a packed weight and quantizing it again
# gives the same values (q * scale is exact in fp32, and the least-squares refit of exact levels lands on them).
SEARCH_STEPS = np.linspace(-1.0, 1.5, 11, dtype=np.float32)
_BLOCK = 1 << 20  # groups per pass (bounds the temporaries)


def _valid(out_f: int, in_f: int, in_pad: int, g: int) -> np.ndarray:
    """float32 [out * groups, g]: 1 for a weight, 0 for padding (which the search's fit and error ignore)."""
    return np.broadcast_to((np.arange(in_pad) < in_f).astype(np.float32).reshape(1, -1, g),
                           (out_f, in_pad // g, g)).reshape(-1, g)


def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float32)


def _sym_levels(scheme: QuantScheme) -> tuple[int, int]:
    """Signed levels L = q - offset of a symmetric 4-bit row: [-7, 7] (default grid) or [-8, 7] (the Q4_0 grid)."""
    return -scheme.offset, scheme.levels - scheme.offset


def _sym_round(v: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """The row's rounding of w / d to a level (the Q4_0 grid rounds halves up, as llama.cpp's trunc(v + 8.5))."""
    lo, hi = _sym_levels(scheme)
    return np.clip(np.floor(v + np.float32(0.5)) if scheme.q_offset else np.round(v), lo, hi)


def _quantize_sym4(groups: np.ndarray, scheme: QuantScheme, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric 4-bit rows, decoded (q - offset) * d. Plain rule: d = max|w| / 7 (default grid), or the Q4_0 grid as
    llama.cpp quantizes it (quantize_row_q4_0_ref: d = the group's signed extreme / -8, so that element lands on
    q = 0, q = min(15, trunc(w / d + 8.5)) with the fp32 d, stored as fp16); then the search above (the default
    grid only)."""
    out_f, ng, g = groups.shape
    flat = groups.reshape(-1, g)
    lo, hi = _sym_levels(scheme)
    store = _f16 if scheme.scale_dtype == "float16" else (lambda a: a.astype(np.float32))
    d_all = np.empty((flat.shape[0], 1), np.float32)
    q_all = np.empty(flat.shape, np.uint32)
    for b in range(0, flat.shape[0], _BLOCK):
        x, v = flat[b : b + _BLOCK], valid[b : b + _BLOCK]
        if scheme.q_offset:
            ext = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
            d0 = (ext / -float(scheme.offset)).astype(np.float32)
            inv = np.where(d0 != 0, np.float32(1) / np.where(d0 != 0, d0, np.float32(1)), np.float32(0))
            lv0 = np.clip(np.trunc(x * inv.astype(np.float32) + np.float32(scheme.offset + 0.5)), 0,
                          scheme.levels) - scheme.offset
        else:
            ext = np.abs(x).max(axis=1, keepdims=True)
            d0 = (ext / np.float32(scheme.qmax)).astype(np.float32)
            lv0 = _sym_round(x / np.where(store(d0) != 0, store(d0), 1), scheme)
        best_d, best_lv = d0, lv0
        best_e = (v * (x - store(d0) * lv0) ** 2).sum(axis=1, keepdims=True)
        # the Q4_0 grid keeps llama.cpp's rule alone: its 16 levels already hold the extreme exactly, and on SmolLM2
        # (docs/fidelity.md) the squared-error search clipped extremes that matter more than the error it saved
        for st in () if scheme.q_offset else SEARCH_STEPS:
            if st == 0:
                continue
            dc = ext / (-(scheme.offset + st) if scheme.q_offset else (scheme.qmax + st))
            lv = np.clip(np.rint(x / np.where(dc != 0, dc, 1)), lo, hi)
            den = (v * lv * lv).sum(axis=1, keepdims=True)
            d = _f16(np.where(den > 0, (v * x * lv).sum(axis=1, keepdims=True) / np.where(den > 0, den, 1), 0))
            lv = _sym_round(x / np.where(d != 0, d, 1), scheme)
            e = (v * (x - d * lv) ** 2).sum(axis=1, keepdims=True)
            better = e < best_e
            best_d, best_lv, best_e = (np.where(better, d, best_d), np.where(better, lv, best_lv),
                                       np.where(better, e, best_e))
        d_all[b : b + _BLOCK] = best_d
        q_all[b : b + _BLOCK] = (best_lv + scheme.offset).astype(np.uint32)
    return pack_nibbles(q_all.reshape(out_f, -1)), d_all.reshape(out_f, ng).astype(scheme.scale_dtype)


def _quantize_asym(groups: np.ndarray, scheme: QuantScheme, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray,
                                                                                     np.ndarray]:
    """Asymmetric grid per group (GGUF Q4_1), decoded q * scale + min, q = round((w - min) / scale). Plain rule:
    min/max (scale = (max - min) / 15, as llama.cpp's quantize_row_q4_1_ref); then the search above, which refits
    scale and min together. Scale and min are fp16 values even where stored in fp32 (the GPTQ/AWQ rows): q * scale
    is then exact in fp32, so a kernel's FMA and numpy's multiply-then-add decode alike."""
    out_f, ng, g = groups.shape
    flat = groups.reshape(-1, g)
    top = np.float32(scheme.levels)
    s_all = np.empty((flat.shape[0], 1), np.float32)
    m_all = np.empty((flat.shape[0], 1), np.float32)

    def levels(x, s, m):
        return np.clip(np.rint((x - m) / np.where(s != 0, s, 1)), 0, top)

    for b in range(0, flat.shape[0], _BLOCK):
        x, v = flat[b : b + _BLOCK], valid[b : b + _BLOCK]
        lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        n = v.sum(axis=1, keepdims=True)

        def err(s, m):
            return (v * (x - (s * levels(x, s, m) + m)) ** 2).sum(axis=1, keepdims=True)

        best_s, best_m = _f16((hi - lo) / top), _f16(lo)
        best_e = err(best_s, best_m)
        span = np.where(hi > lo, hi - lo, 1)
        for st in SEARCH_STEPS:
            if st == 0:
                continue
            lv = np.clip(np.rint((x - lo) * ((top + st) / span)), 0, top)
            sl, sll = (v * lv).sum(axis=1, keepdims=True), (v * lv * lv).sum(axis=1, keepdims=True)
            sx, sxl = (v * x).sum(axis=1, keepdims=True), (v * x * lv).sum(axis=1, keepdims=True)
            det = n * sll - sl * sl
            ok = det > 0
            s = _f16(np.where(ok, (n * sxl - sl * sx) / np.where(ok, det, 1), 0))
            m = _f16(np.where(ok, (sll * sx - sl * sxl) / np.where(ok, det, 1), lo))
            e = err(s, m)
            better = (e < best_e) & (s > 0)
            best_s, best_m, best_e = (np.where(better, s, best_s), np.where(better, m, best_m),
                                      np.where(better, e, best_e))
        s_all[b : b + _BLOCK], m_all[b : b + _BLOCK] = best_s, best_m
    scale = s_all.reshape(out_f, ng).astype(scheme.scale_dtype)
    qmin = m_all.reshape(out_f, ng).astype(scheme.scale_dtype)
    s32, m32 = scale.astype(np.float32)[:, :, None], qmin.astype(np.float32)[:, :, None]
    q = levels(groups, s32, m32).astype(np.uint32)
    return pack_nibbles(q.reshape(out_f, -1)), scale, qmin


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
               q_min: np.ndarray | None = None, dtype=np.float32) -> np.ndarray:
    """Inverse of `quantize`: -> `dtype` (float32) [out, in_features] (padding dropped)."""
    g = scheme.group_size
    scale = np.repeat(q_scale.astype(dtype), g, axis=1)
    if scheme.zero_point:
        if q_min is None:
            raise ValueError(f"scheme {scheme.name} is asymmetric: dequantize needs q_min")
        q = unpack_nibbles(q_weight).astype(dtype)
        return (q * scale + np.repeat(q_min.astype(dtype), g, axis=1))[:, :in_features]
    q = unpack(q_weight, scheme).astype(dtype) - scheme.offset
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

    4-bit rows: sum_a scale_g(a) * d_a * (nibbles . xq)_a + min_g(a) * d_a * sum(xq_a)
                (symmetric rows: min = -offset * scale)
    8-bit rows: sum_a scale_g(a) * d_a * (q . xq)_a  with q = byte - 128 (int8 x int8)

    The minimum meets the sum of the quantized activations, as llama.cpp's Q4_1 x Q8_1 does (min * s with
    s = d * sum(xq)): the result is then exactly the dot product of the dequantized weights with the dequantized
    activations, and the rounding errors of x cancel instead of being multiplied by the all-positive (w - min)."""
    ag = scheme.act_group_size
    out_f = q_weight.shape[0]
    kp = q_weight.shape[1] * scheme.elems_per_word
    x = np.pad(x.astype(np.float32), ((0, 0), (0, kp - x.shape[1])))
    xq, xd = quantize_activations(x, ag)
    m = x.shape[0]
    # in float64 as one product of the dequantized activations (d_a * xq) and weights (`dequantize`: scale * q + min):
    # every product is exact there and the sum rounds at 2**-53, so this is the formula's value to float32 rounding
    # (the kernels' float32 sums differ from it by their own order); one BLAS call, not a dot product per group
    xdeq = (xq.astype(np.float64).reshape(m, kp // ag, ag) * xd.astype(np.float64)[:, :, None]).reshape(m, kp)
    out = np.empty((m, out_f), np.float32)
    for o in range(0, out_f, 4096):  # blocks of output rows bound the float64 weights
        sl = slice(o, o + 4096)
        w = dequantize(q_weight[sl], q_scale[sl], kp, scheme, None if q_min is None else q_min[sl], np.float64)
        out[:, sl] = xdeq @ w.T
    return out
