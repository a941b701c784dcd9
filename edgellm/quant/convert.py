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


QUANT_LEAVES = ("q_weight", "q_scale", "q_min", "q_perm")  # the order reference.quantize returns them in (q_perm:
# act-order rows only, quant/gptq_awq.py)


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


def grid_holds(source_type: str, scheme: QuantScheme) -> bool:
    """Whether `scheme`'s grid holds every value of a GGUF block type exactly (group 32, fp16-or-wider scales):
    Q4_1 -> asymmetric 4-bit rows; Q4_0 -> asymmetric 4-bit rows (min = -8 d) and the Q4_0 grid (q_offset 8);
    Q4_0 and Q8_0 -> 8-bit rows ((q - 8) and q are int8)."""
    if not scheme.quantized or scheme.group_size != 32:
        return False
    if source_type == "Q4_1":
        return scheme.bits == 4 and scheme.zero_point
    if source_type == "Q4_0":
        return scheme.zero_point or scheme.bits == 8 or (scheme.bits == 4 and scheme.offset == 8 and scheme.levels == 15)
    if source_type == "Q8_0":
        return scheme.bits == 8
    return False


def repack_blocks(refs: list[TensorRef], scheme: QuantScheme) -> tuple[np.ndarray, ...] | None:
    """The sources' stored blocks (concatenated on axis 0) in `scheme`'s format, exactly: what
    `reference.dequantize` gives back equals the GGUF's own dequantization bit for bit. None when a source has no
    blocks or the scheme's grid does not hold its type (the caller quantizes the float values instead)."""
    if not refs or any(r.blocks is None or not grid_holds(r.dtype, scheme) for r in refs):
        return None
    qs, ds, ms = [], [], []
    for r in refs:
        b = r.blocks()
        d = b.d.astype(np.float32)
        if b.kind == "Q8_0":
            q, m = b.q.astype(np.int16), None
        elif b.kind == "Q4_0":
            q, m = b.q.astype(np.int16) - 8, -8 * d  # decoded (q - 8) * d: a signed integer times d
        else:
            q, m = b.q.astype(np.int16), b.m.astype(np.float32)
        if scheme.zero_point:  # q * d + m; Q4_0: q in 0..15 again, min = -8 d (exact in fp16: a power of 2 times d)
            q = q + 8 if b.kind == "Q4_0" else q
        else:  # (stored - offset) * d
            q = q + scheme.offset
        qs.append(q)
        ds.append(d)
        ms.append(m)
    q = np.concatenate(qs, axis=0)
    if q.min() < 0 or q.max() > scheme.levels:
        return None
    scale = np.concatenate(ds, axis=0).astype(scheme.scale_dtype)
    packed = reference.pack(q.astype(np.uint32), scheme)
    if not scheme.zero_point:
        return packed, scale
    qmin = np.concatenate(ms, axis=0).astype(scheme.scale_dtype)
    if not np.isfinite(qmin).all():  # -8 d beyond fp16's range
        return None
    return packed, scale, qmin


def _import_leaves(name: str, params: dict, smap: dict, tensors: dict[str, TensorRef], float_shapes: dict,
                   row) -> dict[str, np.ndarray] | None:
    """Every leaf of `name`'s weight from GPTQ / AWQ sources (or for an act-order row), repacked exactly by
    quant/gptq_awq.py; None for every other weight."""
    from . import gptq_awq

    src_name, role = _float_target(name, params)
    refs = [tensors[s] for s in smap[src_name]] if role != "dense" else []
    if not refs or not gptq_awq.handles(refs, row(src_name)):
        return None
    got, want = (sum(r.shape[0] for r in refs), refs[0].shape[1]), tuple(float_shapes[src_name])
    if got != want or any(r.shape[1] != want[1] for r in refs):
        shapes = ", ".join(f"{r.name}{tuple(r.shape)}" for r in refs)
        raise WeightMapError(f"shape mismatch for {src_name}: source {shapes}, model expects {want} (check "
                             "config.json against the weights)")
    base = src_name[: -len(".weight")]
    return {f"{base}.{leaf}": a for leaf, a in gptq_awq.repack(refs, row(src_name), src_name, want[1]).items()}


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
        elif (leaves := _import_leaves(name, params, smap, tensors, float_shapes,
                                       lambda n: schemes.get(n, scheme))) is not None:
            arr = leaves.pop(name)
            done.update(leaves)
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
                row = schemes.get(src_name, scheme)
                exact = repack_blocks([tensors[s] for s in srcs], row)
                parts = dict(zip(QUANT_LEAVES, exact if exact is not None else
                                 reference.quantize(w.astype(np.float32), row)))
                base = src_name[: -len(".weight")]
                arr = parts.pop(role)
                done.update({f"{base}.{leaf}": a for leaf, a in parts.items()})
        if tuple(arr.shape) != tuple(shape) or str(arr.dtype) != dtype:
            raise WeightMapError(f"{name}: produced {arr.dtype}{tuple(arr.shape)}, model expects {dtype}{tuple(shape)}")
        yield name, np.ascontiguousarray(arr)


def source_row(default: QuantScheme, layer_types: dict[str, int], rows: dict[str, QuantScheme]) -> tuple[QuantScheme, str]:
    """The layers' row when the user gave no --quant: the target's `default` row, or, when every layer weight of the
    source is block-quantized (GGUF Q4_0 / Q4_1 / Q8_0), the row of the same activation kind (act_dtype, act_quant)
    whose grid holds all of them exactly (`grid_holds`), fewest bits first. layer_types: source type -> how many
    layer weights have it. Returns (row, why) for the manifest and the compile summary."""
    types = sorted(layer_types)
    counts = ", ".join(f"{t} x {layer_types[t]}" for t in types)
    if not types or any(t not in ("Q4_0", "Q4_1", "Q8_0") for t in types):
        return default, f"the target's default (source layers {counts or 'none'})"
    if all(grid_holds(t, default) for t in types):
        return default, f"the target's default, whose grid holds the source layers ({counts}) exactly"
    fits = [r for r in rows.values() if r.act_dtype == default.act_dtype and r.act_quant == default.act_quant
            and all(grid_holds(t, r) for t in types)]
    if not fits:
        return default, (f"the target's default: no {default.act_dtype} row holds the source layers ({counts}) "
                         "exactly, so they are re-quantized")
    row = min(fits, key=lambda r: (r.bits_per_weight(), r.name))
    return row, f"source layers {counts}: the row of the target's activations ({default.name}) on their grid, lossless"
