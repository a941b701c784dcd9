"""Numpy reference of the INT4 packing (the definition every TIR kernel is tested against)."""

from __future__ import annotations

import numpy as np

from .schemes import QuantScheme


def quantize(w: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """w: float [out, in] -> (q_weight uint32 [out, in_pad/8], q_scale [out, in_pad/group])."""
    if w.ndim != 2:
        raise ValueError(f"quantize expects a 2-D [out, in] weight, got shape {w.shape}")
    out_f, in_f = w.shape
    in_pad = scheme.padded_in(in_f)
    w = w.astype(np.float32)
    if in_pad != in_f:
        w = np.pad(w, ((0, 0), (0, in_pad - in_f)))
    g = scheme.group_size
    groups = w.reshape(out_f, in_pad // g, g)
    scale = np.abs(groups).max(axis=2) / scheme.qmax  # [out, in_pad/g]
    scale = scale.astype(scheme.scale_dtype)
    safe = np.where(scale == 0, 1, scale).astype(np.float32)[:, :, None]
    q = np.clip(np.round(groups / safe) + scheme.qmax, 0, 2 * scheme.qmax).astype(np.uint32)
    return pack_nibbles(q.reshape(out_f, in_pad)), scale


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


def dequantize(q_weight: np.ndarray, q_scale: np.ndarray, in_features: int, scheme: QuantScheme) -> np.ndarray:
    """Inverse of `quantize`: -> float32 [out, in_features] (padding dropped)."""
    q = unpack_nibbles(q_weight).astype(np.float32) - scheme.qmax
    scale = np.repeat(q_scale.astype(np.float32), scheme.group_size, axis=1)
    return (q * scale)[:, :in_features]
