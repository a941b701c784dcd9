"""Source tensors (HF names, float) -> model parameters in a scheme's storage format, checked both ways.

One generic routine for every architecture: the model file supplies `source_map` (edgellm float name -> HF names
concatenated on axis 0); this module concatenates, checks shape, and quantizes `X.weight` into `X.q_weight` +
`X.q_scale` (+ `X.q_min` for asymmetric schemes) where the model asks for them.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator

import numpy as np

from ..loaders import TensorRef
from . import reference
from .schemes import QuantScheme


QUANT_LEAVES = ("q_weight", "q_scale", "q_min")  # the order reference.quantize returns them in


class WeightMapError(ValueError):
    """A source tensor that is unmapped, missing or mis-shaped; the message names it."""


def _float_target(name: str, params: dict) -> tuple[str, str]:
    """model parameter name -> (float source name, role) where role is dense | q_weight | q_scale | q_min."""
    base, leaf = name.rsplit(".", 1)
    if leaf in QUANT_LEAVES:
        return f"{base}.weight", leaf
    return name, "dense"


def check_coverage(tensors: dict[str, TensorRef], smap: dict[str, list[str]], unused: list[str], params: dict) -> None:
    wanted = {src for srcs in smap.values() for src in srcs}
    missing = sorted(w for w in wanted if w not in tensors)
    if missing:
        raise WeightMapError(f"Parameter not found in source: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    extra = sorted(t for t in tensors if t not in wanted and not any(fnmatch.fnmatch(t, u) for u in unused))
    if extra:
        raise WeightMapError(
            f"source tensor(s) with no place in the model: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else "")
            + " (wrong architecture in config.json, or a checkpoint with extra modules)"
        )
    produced = {_float_target(n, params)[0] for n in params}
    unmapped = sorted(p for p in produced if p not in smap)
    if unmapped:
        raise WeightMapError(f"model parameter(s) with no source mapping: {', '.join(unmapped)}")


def convert(
    tensors: dict[str, TensorRef],
    smap: dict[str, list[str]],
    unused: list[str],
    params: dict[str, tuple[tuple[int, ...], str]],
    float_shapes: dict[str, tuple[int, int]],
    scheme: QuantScheme,
    schemes: dict[str, QuantScheme] | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (param name, array) in `params` order. params: name -> (shape, dtype) the compiled model expects;
    float_shapes: float name -> [out, in] for quantized weights; schemes: float name -> its row where it is not
    `scheme` (per-tensor precision: the embedding / head)."""
    schemes = schemes or {}
    check_coverage(tensors, smap, unused, params)
    done: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in params.items():
        if name in done:
            arr = done.pop(name)
        else:
            src_name, role = _float_target(name, params)
            srcs = smap[src_name]
            parts = [tensors[s].load() for s in srcs]
            try:
                w = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            except ValueError as exc:
                shapes = ", ".join(f"{s}{tuple(p.shape)}" for s, p in zip(srcs, parts))
                raise WeightMapError(f"cannot concatenate {shapes} into {src_name}: {exc}") from None
            want = float_shapes.get(src_name, shape) if role != "dense" else shape
            if tuple(w.shape) != tuple(want):
                shapes = ", ".join(f"{s}{tuple(p.shape)}" for s, p in zip(srcs, parts))
                raise WeightMapError(
                    f"shape mismatch for {src_name}: source {shapes} gives {tuple(w.shape)}, model expects "
                    f"{tuple(want)} (check config.json against the weights)"
                )
            if role == "dense":
                arr = w.astype(dtype)
            else:
                parts = dict(zip(QUANT_LEAVES, reference.quantize(w.astype(np.float32),
                                                                  schemes.get(src_name, scheme))))
                base = src_name[: -len(".weight")]
                arr = parts.pop(role)
                done.update({f"{base}.{leaf}": a for leaf, a in parts.items()})
        if tuple(arr.shape) != tuple(shape) or str(arr.dtype) != dtype:
            raise WeightMapError(f"{name}: produced {arr.dtype}{tuple(arr.shape)}, model expects {dtype}{tuple(shape)}")
        yield name, np.ascontiguousarray(arr)
