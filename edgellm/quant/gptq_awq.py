"""GPTQ and AWQ checkpoints (Hugging Face folders with `quantization_config`): read their packed INT4 tensors and
repack them losslessly into edgellm's asymmetric rows (`q4f32_g128`, `q4f16_g32_ao`, ... in quant/schemes.py).

Both formats store, per linear `X`, 4-bit values q, per-group integer zero points z and fp16 scales s, and mean
`W[o, k] = (q[k, o] - z[g(k), o]) * s[g(k), o]`:

GPTQ (auto-gptq / GPTQModel / optimum, `quant_method: gptq`)
  X.qweight int32 [in/8, out]   nibble j (bits 4j) of word [i, o] is q[8i + j, o] (packed along `in`)
  X.qzeros  int32 [G, out/8]    nibble j of word [g, c] is the stored zero of column 8c + j (packed along `out`)
  X.scales  fp16  [G, out]
  X.g_idx   int32 [in]          the group of each input column: k // group_size, or a permutation of it with
                                act-order (`desc_act`: columns quantized in order of decreasing Hessian diagonal)
  `checkpoint_format` gptq (v1, the default): z = stored + 1 (the old packer stored zero - 1); gptq_v2: z = stored.
AWQ (AutoAWQ GEMM, `quant_method: awq`, `version: gemm`)
  X.qweight int32 [in, out/8]   packed along `out` in the interleaved order [0, 2, 4, 6, 1, 3, 5, 7]: nibble i of
                                word [k, c] is q[k, 8c + ORDER[i]]
  X.qzeros  int32 [G, out/8]    the same packing; z = stored
  X.scales  fp16  [G, out]      groups are contiguous along `in` (k // group_size)

Stored as edgellm's asymmetric grid `q * scale + min` with scale = s and min = -z * s, both fp32: q * s has at most
4 + 11 significant bits and -z * s at most 5 + 11, so both are exact in fp32 and so is their sum, which is exactly
(q - z) * s (an fp16 min would round z * s to 11 bits). The packed params dequantize bit for bit to the source.

Act-order: the columns of each group are gathered into contiguous groups (a stable argsort of g_idx, `q_perm`) and
the linear gathers its input the same way first (`x[..., q_perm]`, rows `*_ao`): y = W x = W[:, perm] x[perm].
Layers fused by edgellm (q/k/v, gate/up) share their input and, in GPTQ, their Hessian, hence their g_idx; a
checkpoint where they differ is refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..loaders import SourceError, TensorRef
from .schemes import SCHEMES, QuantScheme

log = logging.getLogger("edgellm")

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ GEMM word holds column 8c + AWQ_ORDER[i]
GROUP_SIZES = (128, 32)


@dataclass(frozen=True)
class ImportFormat:
    """What a checkpoint's quantization_config says, validated."""

    method: str  # gptq | awq
    group_size: int
    zero_offset: int  # added to the stored zero: 1 for GPTQ v1, 0 for GPTQ v2 and AWQ
    checkpoint_format: str  # gptq | gptq_v2 | gemm (AWQ)

    def describe(self) -> str:
        return f"{self.method.upper()} 4-bit group {self.group_size} ({self.checkpoint_format})"


def _refuse(field: str, value, why: str) -> SourceError:
    return SourceError(f"quantization_config {field}={value!r} is not supported: {why}")


def read_format(raw: dict, folder: Path | None = None) -> ImportFormat | None:
    """The validated import format of a config.json (or of auto-gptq's quantize_config.json beside it), or None for
    a float checkpoint. Unsupported variants raise SourceError naming the field and value."""
    qc = raw.get("quantization_config")
    if qc is None and folder is not None and (folder / "quantize_config.json").exists():
        try:
            qc = {"quant_method": "gptq", **json.loads((folder / "quantize_config.json").read_text())}
        except ValueError as exc:
            raise SourceError(f"{folder / 'quantize_config.json'} is not valid JSON ({exc})") from None
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise SourceError(f"config.json quantization_config is a {type(qc).__name__}, not an object")
    method = str(qc.get("quant_method", "")).lower()
    if method not in ("gptq", "awq"):
        raise _refuse("quant_method", qc.get("quant_method"), "edgellm imports gptq and awq checkpoints (or "
                      "float ones: dequantize it with its own tools and save safetensors)")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise _refuse("bits", bits, "edgellm imports 4-bit GPTQ / AWQ only")
    group = qc.get("group_size", qc.get("q_group_size"))
    if group not in GROUP_SIZES:
        raise _refuse("group_size", group, "edgellm's import rows take groups of 128 or 32 (per-channel -1 and other "
                      "sizes have no row)")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise _refuse("version", qc.get("version"), "edgellm reads AutoAWQ's GEMM packing only (not gemv, "
                          "exllama, marlin or ipex): re-save it with version gemm")
        if qc.get("zero_point", True) is not True:
            raise _refuse("zero_point", qc.get("zero_point"), "AWQ without zero points has no GEMM checkpoint layout")
        return ImportFormat("awq", group, 0, "gemm")
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if qc.get("is_marlin_format") or fmt not in ("gptq", "gptq_v2"):
        field, value = ("is_marlin_format", True) if qc.get("is_marlin_format") else ("checkpoint_format", fmt)
        raise _refuse(field, value, "edgellm reads the gptq and gptq_v2 layouts (not marlin, bitblas or "
                      "exllama v2 repacks): save it with checkpoint_format gptq")
    return ImportFormat("gptq", group, 1 if fmt == "gptq" else 0, fmt)


@dataclass
class Packed4:
    """One linear's source values: q uint8 [out, in], zero int16 [out, G] (as the runtimes apply it), scale fp16
    [out, G], g_idx int32 [in]."""

    q: np.ndarray
    zero: np.ndarray
    scale: np.ndarray
    g_idx: np.ndarray

    def dequantize(self) -> np.ndarray:
        """(q - z) * s per element, float32 [out, in]: the source's own dequantization."""
        z = self.zero[:, self.g_idx].astype(np.float32)
        return (self.q.astype(np.float32) - z) * self.scale[:, self.g_idx].astype(np.float32)


@dataclass
class PackedRef(TensorRef):
    """A GPTQ / AWQ linear exposed under its float name `X.weight`: `load()` gives the dequantized float32 weight,
    `packed()` the exact source values, `act_order` whether its groups are not contiguous along `in`."""

    packed: Callable[[], Packed4] | None = None
    act_order: bool = False
    fmt: ImportFormat | None = None


def unpack_along_in(words: np.ndarray) -> np.ndarray:
    """int32 [R, C] -> uint8 [8R, C]: nibble j of word [r, c] is row 8r + j (GPTQ qweight)."""
    u = words.view(np.uint32)
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, :, None]
    return ((u[:, None, :] >> shifts) & np.uint32(15)).reshape(-1, u.shape[1]).astype(np.uint8)


def unpack_along_out(words: np.ndarray, order: tuple[int, ...] = tuple(range(8))) -> np.ndarray:
    """int32 [R, C] -> uint8 [R, 8C]: nibble i of word [r, c] is column 8c + order[i] (GPTQ qzeros: sequential;
    AWQ: AWQ_ORDER)."""
    u = words.view(np.uint32)
    shifts = (np.arange(8, dtype=np.uint32) * 4)[None, None, :]
    nib = ((u[:, :, None] >> shifts) & np.uint32(15)).astype(np.uint8)  # [R, C, i]
    out = np.empty_like(nib)
    out[:, :, list(order)] = nib
    return out.reshape(u.shape[0], -1)


def _unpack(prefix: str, t: dict[str, np.ndarray], fmt: ImportFormat, out_f: int, in_f: int) -> Packed4:
    groups = t["scales"].shape[0]
    if fmt.method == "gptq":
        q = unpack_along_in(t["qweight"]).T  # [out, in]
        stored = unpack_along_out(t["qzeros"])[:, :out_f]
        if fmt.zero_offset and (stored == 15).any():
            raise SourceError(f"{prefix}.qzeros holds a stored zero of 15 in a gptq (v1) checkpoint: the old packer "
                              "wrote zero 0 as -1, which runtimes read differently; re-save it with "
                              "checkpoint_format gptq_v2")
        g_idx = t["g_idx"].astype(np.int64) if "g_idx" in t else np.arange(in_f) // fmt.group_size
    else:
        q = unpack_along_out(t["qweight"], AWQ_ORDER).T
        stored = unpack_along_out(t["qzeros"], AWQ_ORDER)[:, :out_f]
        g_idx = np.arange(in_f) // fmt.group_size
    zero = stored.T.astype(np.int16) + fmt.zero_offset
    scales = t["scales"]
    if scales.dtype != np.float16 and not np.array_equal(scales.astype(np.float16).astype(scales.dtype), scales):
        raise SourceError(f"{prefix}.scales are {scales.dtype} values that fp16 does not hold: the import rows are "
                          "exact for fp16 scales (the GPTQ / AWQ default) only")
    if g_idx.shape != (in_f,) or g_idx.min() < 0 or g_idx.max() >= groups:
        raise SourceError(f"{prefix}.g_idx does not map {in_f} input columns into {groups} groups; the checkpoint "
                          "is damaged")
    return Packed4(np.ascontiguousarray(q[:out_f, :in_f]), np.ascontiguousarray(zero),
                   np.ascontiguousarray(scales.astype(np.float16).T), g_idx.astype(np.int32))


def _shapes(prefix: str, refs: dict[str, TensorRef], fmt: ImportFormat) -> tuple[int, int]:
    """(out, in) of a packed linear from its tensors' shapes, checked against each other."""
    for n in ("qweight", "qzeros"):
        if refs[f"{prefix}.{n}"].dtype not in ("I32", "U32"):
            raise SourceError(f"{prefix}.{n} is {refs[f'{prefix}.{n}'].dtype}: edgellm reads 32-bit packed words "
                              "(GPTQModel's pack_dtype int32, the default); re-save it with that")
    qw, qz, sc = (refs[f"{prefix}.{n}"].shape for n in ("qweight", "qzeros", "scales"))
    out_f = sc[1] if len(sc) == 2 else -1
    in_f = qw[0] * 8 if fmt.method == "gptq" else qw[0]
    expect_qw = (in_f // 8, out_f) if fmt.method == "gptq" else (in_f, out_f // 8)
    groups = -(-in_f // fmt.group_size)
    ok = (len(qw) == 2 and tuple(qw) == expect_qw and out_f % 8 == 0 and tuple(qz) == (sc[0], out_f // 8)
          and (sc[0] == groups or (fmt.method == "gptq" and sc[0] >= groups)))
    if not ok:
        raise SourceError(f"{prefix}: qweight {tuple(qw)}, qzeros {tuple(qz)}, scales {tuple(sc)} do not fit "
                          f"{fmt.describe()}; the checkpoint does not match its quantization_config")
    return out_f, in_f


def _loader(prefix: str, refs: dict[str, TensorRef], fmt: ImportFormat, out_f: int, in_f: int):
    names = [n for n in ("qweight", "qzeros", "scales", "g_idx") if f"{prefix}.{n}" in refs]

    def packed() -> Packed4:
        return _unpack(prefix, {n: refs[f"{prefix}.{n}"].load() for n in names}, fmt, out_f, in_f)

    return packed


def wrap_tensors(tensors: dict[str, TensorRef], fmt: ImportFormat) -> dict[str, TensorRef]:
    """Replace each packed linear's qweight / qzeros / scales (/ g_idx) by one PackedRef named `X.weight`."""
    prefixes = sorted(n[: -len(".qweight")] for n in tensors if n.endswith(".qweight"))
    if not prefixes:
        raise SourceError(f"config.json says {fmt.describe()} but no tensor ends in .qweight; the weights do not "
                          "match the config")
    out = dict(tensors)
    for prefix in prefixes:
        missing = [n for n in ("qzeros", "scales") if f"{prefix}.{n}" not in tensors]
        if missing:
            raise SourceError(f"{prefix}.qweight has no {prefix}.{missing[0]}; the checkpoint is incomplete")
        out_f, in_f = _shapes(prefix, tensors, fmt)
        for n in ("qweight", "qzeros", "scales", "g_idx"):
            out.pop(f"{prefix}.{n}", None)
        packed = _loader(prefix, tensors, fmt, out_f, in_f)
        act = False
        if f"{prefix}.g_idx" in tensors:
            g_idx = tensors[f"{prefix}.g_idx"].load()
            act = not np.array_equal(g_idx, np.arange(in_f) // fmt.group_size)
        out[f"{prefix}.weight"] = PackedRef(f"{prefix}.weight", (out_f, in_f), f"{fmt.method.upper()}_Q4",
                                            lambda p=packed: p().dequantize(), packed=packed, act_order=act, fmt=fmt)
    stray = sorted(n for n in out if n.rsplit(".", 1)[-1] in ("qzeros", "scales", "g_idx", "qweight"))
    if stray:
        raise SourceError(f"{stray[0]} has no {stray[0].rsplit('.', 1)[0]}.qweight beside it; the checkpoint is "
                          "incomplete")
    return out


# ---- compile: the row, and the exact repack ----------------------------------------------------------------------

def packed_refs(tensors: dict[str, TensorRef]) -> list[PackedRef]:
    return [t for t in tensors.values() if isinstance(t, PackedRef)]


def import_row(fmt: ImportFormat, act_order: bool, cpu: bool) -> QuantScheme:
    """The exact row of a checkpoint on a CPU (int8 activations) or GPU (fp16 activations) target."""
    return SCHEMES[f"q4f{32 if cpu else 16}_g{fmt.group_size}{'_ao' if act_order else ''}"]


def source_scheme(tensors: dict[str, TensorRef], target_kind: str, fp16: bool, requested: str | None,
                  scheme: QuantScheme, source: str) -> QuantScheme:
    """The row to build a checkpoint with: `scheme` for a float / GGUF source; for GPTQ / AWQ the exact import row
    when --quant is not given, the requested row where it is one of the import rows of the right group (or a
    wider row: q0* / q8*, re-quantized from the dequantized weights), else SourceError in one line."""
    refs = packed_refs(tensors)
    if not refs:
        return scheme
    fmt, act = refs[0].fmt, any(r.act_order for r in refs)
    cpu = target_kind == "llvm"
    if not cpu and not fp16:
        raise SourceError(f"{source} is a {fmt.describe()} checkpoint and this GPU target has fp16 off: the import "
                          "rows take fp16 activations on GPUs; pass --quant q0f32 (dequantized weights)")
    row = import_row(fmt, act, cpu)
    if requested is None:
        log.info("%s: %s -> %s (exact repack)", source, fmt.describe(), row.name)
        return row
    if scheme.bits != 4:
        return scheme  # q0* / q8*: from the dequantized weights (q0f32 holds them exactly)
    if scheme.zero_point and scheme.group_size == fmt.group_size and (scheme.act_order or not act) \
            and scheme.scale_dtype == "float32":
        return scheme
    if scheme.zero_point and scheme.group_size == fmt.group_size and scheme.scale_dtype == "float32":
        raise SourceError(f"--quant {requested}: {source} is a {fmt.describe()} act-order checkpoint, whose columns "
                          f"need an act-order row: leave --quant out (this target's is {row.name})")
    raise SourceError(f"--quant {requested}: {source} is a {fmt.describe()}{' act-order' if act else ''} checkpoint "
                      f"and re-quantizing its 4-bit weights onto another grid would lose them; leave --quant out "
                      f"(this target's exact row is {row.name}) or pick q0f32 / q0f16 / q8*")


def handles(refs: list[TensorRef], scheme: QuantScheme) -> bool:
    """Whether `repack` makes this weight: a 4-bit import-row weight from a packed source, or any weight of an
    act-order row (its q_perm leaf)."""
    return scheme.act_order or (scheme.bits == 4 and any(isinstance(r, PackedRef) for r in refs))


def repack(refs: list[TensorRef], scheme: QuantScheme, name: str, in_f: int) -> dict[str, np.ndarray]:
    """The sources of one edgellm weight (concatenated on `out`) -> {q_weight, q_scale, q_min[, q_perm]}.
    Packed sources are repacked exactly; a float source of an act-order row (e.g. a layer the checkpoint left
    unquantized) is quantized on the row's grid with the identity permutation."""
    from . import reference

    g = scheme.group_size
    if not all(isinstance(r, PackedRef) for r in refs):
        if any(isinstance(r, PackedRef) for r in refs):
            raise SourceError(f"{name}: its sources mix GPTQ/AWQ-packed and float tensors; edgellm fuses them into "
                              "one weight and cannot store both exactly")
        w = np.concatenate([r.load() for r in refs], axis=0).astype(np.float32)
        leaves = dict(zip(("q_weight", "q_scale", "q_min"), reference.quantize(w, scheme)))
        return {**leaves, "q_perm": np.arange(in_f, dtype=np.int32)} if scheme.act_order else leaves
    parts = [r.packed() for r in refs]
    fmt = refs[0].fmt
    if fmt.group_size != g or not scheme.zero_point or scheme.scale_dtype != "float32":
        raise SourceError(f"{name}: a {fmt.describe()} weight needs an import row of group {fmt.group_size} "
                          f"(q4f32_g{fmt.group_size} / q4f16_g{fmt.group_size}), not {scheme.name}")
    g_idx = parts[0].g_idx
    for r, p in zip(refs[1:], parts[1:]):
        if not np.array_equal(p.g_idx, g_idx):
            raise SourceError(f"{r.name} and {refs[0].name} have different g_idx (act-order permutations) but edgellm "
                              "fuses them into one linear with one input permutation; not supported")
    perm = np.argsort(g_idx, kind="stable")
    if not np.array_equal(g_idx[perm], np.arange(in_f) // g):
        raise SourceError(f"{refs[0].name}: g_idx does not give every group exactly {g} columns; no row holds it")
    if not scheme.act_order and not np.array_equal(perm, np.arange(in_f)):
        raise SourceError(f"{name}: act-order g_idx needs an act-order row (q4f*_g{g}_ao), not {scheme.name}")
    q = np.concatenate([p.q[:, perm] for p in parts], axis=0)
    zero = np.concatenate([p.zero for p in parts], axis=0).astype(np.float32)
    scale = np.concatenate([p.scale for p in parts], axis=0).astype(np.float32)
    groups = scheme.padded_in(in_f) // g
    zero, scale = zero[:, :groups], scale[:, :groups]  # GPTQ may carry spare group rows past ceil(in / g)
    q = np.pad(q, ((0, 0), (0, scheme.padded_in(in_f) - in_f)))
    out = {"q_weight": reference.pack_nibbles(q), "q_scale": scale, "q_min": -(zero * scale)}
    if scheme.act_order:
        out["q_perm"] = perm.astype(np.int32)
    return out
