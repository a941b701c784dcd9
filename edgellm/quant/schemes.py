"""Quantization schemes as data: one frozen row per scheme (DESIGN §4).

The packing contract, written down once: weight W of a Linear has shape [out, in] (NK layout). `in` is cut into
groups of `group_size`; each group has one scale `max|w| / qmax`. A value is stored as the unsigned nibble
`q = clamp(round(w / scale) + qmax, 0, 2*qmax)` and decoded as `(q - qmax) * scale`. Eight nibbles share one
uint32 along `in`: element i of the eight sits at bits [4i, 4i+4). `in` is zero-padded up to a multiple of
`group_size` (and of 8); the padding is recorded in the manifest.

Asymmetric rows (`zero_point=True`, the GGUF Q4_1 grid) store a per-group minimum as well: `scale = (max - min) /
15`, `q = clamp(round((w - min) / scale), 0, 15)`, decoded as `q * scale + min` (`q_min` beside `q_scale`, same
shape and dtype). Rows with `act_quant="int8"` quantize the activations entering each linear kernel to int8 per
group of `act_group` values (`d = max|x| / 127`, `xq = rint(x / d)`; one packed word: 8 for 4-bit rows, 4 for
8-bit) and take integer dot products against the nibbles (AVX-512 VNNI / AVX2 / NEON sdot); the minimum
multiplies `d * sum(xq)`, the sum of the quantized activations, as llama.cpp's Q4_1 x Q8_1 dot product does. Those
rows are CPU-only.

8-bit rows (`bits=8`, the GGUF Q8_0 grid): `scale = max|w| / 127` per group of 32 (fp16), `q = round(w / scale)`,
stored offset-binary as the byte `q + 128` (the int8 value with its sign bit flipped, so every int8, -128 included,
fits), four bytes per uint32 along `in`, byte i at bits [8i, 8i+8); decoded `(byte - 128) * scale`.

Per-tensor precision (DESIGN §4, source-faithful rule): the embedding and the head are tensor classes of their own.
`precision_plan` picks their rows from the layer scheme's `partners` and the source tensors' types: an 8-bit or wider
source (Q8_0, F16, BF16, F32) stays 8-bit unless the user asks (`--head q4|q8|f16`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QuantScheme:
    """One row of the scheme table."""

    name: str
    bits: int  # 0 = not quantized (weights stored in `weight_dtype`)
    group_size: int
    weight_dtype: str  # storage dtype of unquantized weights (q0) ...
    scale_dtype: str  # ... or of the per-group scales (q4)
    act_dtype: str  # activations, KV cache and norms
    description: str
    zero_point: bool = False  # asymmetric grid: q_min stored beside q_scale (GGUF Q4_1)
    act_quant: str = "none"  # "int8": linear kernels quantize x to int8 per group (integer dot products; CPU)
    # symmetric 4-bit rows: the stored value of a zero weight, decoded (q - q_offset) * scale. 0 = the default grid
    # (q_offset = qmax = 7, q in [0, 14], scale = max|w| / 7); 8 = the GGUF Q4_0 grid (q in [0, 15], 16 levels,
    # scale = the group's signed extreme / -8, as llama.cpp quantizes). Kernels read it through `offset` / `levels`.
    q_offset: int = 0
    # GPTQ act-order (quant/gptq_awq.py): the weight's `in` columns are stored in group order and the linear gathers
    # its input by the `q_perm` parameter (int32 [in]) first, x[..., q_perm]; embeddings never use such a row
    act_order: bool = False
    # int8 rows: x values per activation scale d (whole packed words, dividing group_size; 0 = group_size). The
    # kernels keep one d per packed word anyway, so a word-sized group costs nothing in the dot-product stage and
    # cuts the activation rounding error (SmolLM2: KL 0.0031 -> 0.0007 against groups of 32, docs/fidelity.md)
    act_group: int = 0
    # --head choice -> the row the embedding / head use beside this one (same activations); see precision_plan
    partners: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.bits not in (0, 4, 8):
            raise ValueError(f"scheme {self.name}: bits must be 0, 4 or 8, got {self.bits}")
        if self.bits == 8 and self.zero_point:
            raise ValueError(f"scheme {self.name}: 8-bit rows are symmetric (the Q8_0 grid)")
        if self.bits:
            if self.group_size % self.elems_per_word:
                raise ValueError(
                    f"scheme {self.name}: group_size {self.group_size} must be a multiple of "
                    f"{self.elems_per_word} (values per uint32 word)"
                )
            if self.scale_dtype not in ("float16", "float32"):
                raise ValueError(f"scheme {self.name}: scale_dtype {self.scale_dtype!r} unsupported")
        if self.act_quant not in ("none", "int8"):
            raise ValueError(f"scheme {self.name}: act_quant must be 'none' or 'int8', got {self.act_quant!r}")
        if self.act_quant == "int8" and (not self.bits or self.act_dtype != "float32" or self.group_size % 32):
            raise ValueError(f"scheme {self.name}: int8 activations need 4- or 8-bit weights, float32 activations and "
                             f"groups of a multiple of 32")
        if self.act_group and (self.act_quant != "int8" or self.group_size % self.act_group
                               or self.act_group % self.elems_per_word):
            raise ValueError(f"scheme {self.name}: act_group {self.act_group} must be a whole number of packed words "
                             f"({self.elems_per_word} values) dividing group_size {self.group_size}, on int8 rows")
        if self.q_offset and (self.bits != 4 or self.zero_point or not 0 < self.q_offset < 16):
            raise ValueError(f"scheme {self.name}: q_offset is for symmetric 4-bit rows, in 1..15, got {self.q_offset}")
        bad = [c for c, _ in self.partners if c not in HEAD_CHOICES]
        if bad:
            raise ValueError(f"scheme {self.name}: partner choice {bad[0]!r} is not one of {', '.join(HEAD_CHOICES)}")

    @property
    def act_group_size(self) -> int:
        """int8 rows: x values per activation scale."""
        return self.act_group or self.group_size

    @property
    def cpu_only(self) -> bool:
        """Schemes whose kernels exist for LLVM CPU targets only (integer dot-product instructions)."""
        return self.act_quant != "none"

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def elems_per_word(self) -> int:
        return 32 // self.bits if self.bits else 1

    @property
    def qmax(self) -> int:
        """Symmetric rows: scale = max|w| / qmax (7 for 4 bits, 127 for 8). Asymmetric rows: unused."""
        return (1 << (self.bits - 1)) - 1 if self.bits else 0

    @property
    def offset(self) -> int:
        """Symmetric rows: the stored value of a zero weight, decoded (q - offset) * scale: qmax for 4 bits (q in
        [0, 14]), 128 for 8 bits (offset binary: q in [0, 255] holds every int8, -128 included)."""
        if self.q_offset:
            return self.q_offset
        return 1 << (self.bits - 1) if self.bits == 8 else self.qmax

    @property
    def levels(self) -> int:
        """Largest stored value: 2*qmax (4-bit symmetric), 255 (8-bit) or 2**bits - 1 (asymmetric)."""
        return (1 << self.bits) - 1 if self.zero_point or self.bits == 8 or self.q_offset else 2 * self.qmax

    @property
    def source_bits(self) -> int:
        """Bits a weight is stored in (0 -> the float dtype's width): what the source-faithful rule compares."""
        return self.bits or {"float32": 32, "float16": 16}[self.weight_dtype]

    def partner(self, choice: str) -> QuantScheme:
        """The row for `choice` (q4 | q8 | f16) beside this one; this row itself where it has none."""
        return SCHEMES[dict(self.partners).get(choice, self.name)]

    def padded_in(self, in_features: int) -> int:
        """`in` rounded up to a whole number of groups."""
        if not self.bits:
            return in_features
        g = self.group_size
        return (in_features + g - 1) // g * g

    def bits_per_weight(self) -> float:
        if not self.bits:
            return {"float32": 32.0, "float16": 16.0}[self.weight_dtype]
        scale_bits = {"float32": 32, "float16": 16}[self.scale_dtype] * (2 if self.zero_point else 1)
        return self.bits + scale_bits / self.group_size

    def as_dict(self) -> dict:
        return {
            "scheme": self.name,
            "bits": self.bits,
            "group_size": self.group_size,
            "weight_dtype": self.weight_dtype,
            "scale_dtype": self.scale_dtype,
            "act_dtype": self.act_dtype,
            "layout": ("dense" if not self.bits else
                       "NK, 4 bytes per uint32, byte i at bits 8i, (q - 128) * scale" if self.bits == 8 else
                       "NK, 8 nibbles per uint32, nibble i at bits 4i, "
                       + ("q * scale + min (q_min)" if self.zero_point else
                          f"(q - {self.q_offset}) * scale" if self.q_offset else "(q - qmax) * scale")),
            "zero_point": self.zero_point,
            "act_quant": self.act_quant,
            **({"act_group": self.act_group_size} if self.act_quant == "int8" else {}),
            **({"act_order": True, "layout": "NK in group order (input x[..., q_perm]), 8 nibbles per uint32, "
                "nibble i at bits 4i, q * scale + min (q_min)"} if self.act_order else {}),
        }


HEAD_CHOICES = ("q4", "q8", "f16")  # `edgellm compile --head`


def _partners(q4: str, q8: str, f16: str) -> tuple[tuple[str, str], ...]:
    return (("q4", q4), ("q8", q8), ("f16", f16))


SCHEMES: dict[str, QuantScheme] = {
    s.name: s
    for s in (
        QuantScheme("q0f32", 0, 0, "float32", "float32", "float32", "no quantization, fp32",
                    partners=_partners("q4f32_1", "q8f32_1", "q0f16")),
        QuantScheme("q0f16", 0, 0, "float16", "float16", "float16", "no quantization, fp16",
                    partners=_partners("q4f16_1", "q8f16_1", "q0f16")),
        QuantScheme("q4f32_1", 4, 32, "uint32", "float32", "float32", "INT4 groups of 32, fp32 scales + activations",
                    partners=_partners("q4f32_1", "q8f32_1", "q0f16")),
        QuantScheme("q4f16_1", 4, 32, "uint32", "float16", "float16", "INT4 groups of 32, fp16 scales + activations",
                    partners=_partners("q4f16_1", "q8f16_1", "q0f16")),
        QuantScheme("q4f32_2", 4, 32, "uint32", "float16", "float32",
                    "CPU: INT4 asymmetric groups of 32 (fp16 scale + min, the GGUF Q4_1 grid), fp32 activations "
                    "quantized to int8 per 8 values inside the linear kernels (VNNI / AVX2 / NEON sdot)",
                    zero_point=True, act_quant="int8", act_group=8, partners=_partners("q4f32_2", "q8f32_2", "q0f16")),
        QuantScheme("q4f16_2", 4, 32, "uint32", "float16", "float16",
                    "GPU: INT4 asymmetric groups of 32 (fp16 scale + min, the GGUF Q4_1 grid), fp16 activations",
                    zero_point=True, partners=_partners("q4f16_2", "q8f16_1", "q0f16")),
        QuantScheme("q4f32_3", 4, 32, "uint32", "float16", "float32",
                    "GPU: INT4 asymmetric groups of 32 (fp16 scale + min, the GGUF Q4_1 grid), fp32 activations",
                    zero_point=True, partners=_partners("q4f32_3", "q8f32_1", "q0f16")),
        QuantScheme("q4f16_0", 4, 32, "uint32", "float16", "float16",
                    "GPU: INT4 groups of 32 on the GGUF Q4_0 grid ((q - 8) * fp16 d, 16 levels), fp16 activations",
                    q_offset=8, partners=_partners("q4f16_0", "q8f16_1", "q0f16")),
        QuantScheme("q4f32_0", 4, 32, "uint32", "float16", "float32",
                    "GPU: INT4 groups of 32 on the GGUF Q4_0 grid ((q - 8) * fp16 d, 16 levels), fp32 activations",
                    q_offset=8, partners=_partners("q4f32_0", "q8f32_1", "q0f16")),
        QuantScheme("q8f32_1", 8, 32, "uint32", "float16", "float32",
                    "INT8 groups of 32 (fp16 scale, the GGUF Q8_0 grid), fp32 activations",
                    partners=_partners("q4f32_1", "q8f32_1", "q0f16")),
        QuantScheme("q8f16_1", 8, 32, "uint32", "float16", "float16",
                    "INT8 groups of 32 (fp16 scale, the GGUF Q8_0 grid), fp16 activations",
                    partners=_partners("q4f16_1", "q8f16_1", "q0f16")),
        QuantScheme("q8f32_2", 8, 32, "uint32", "float16", "float32",
                    "CPU: INT8 groups of 32 (fp16 scale, the GGUF Q8_0 grid), fp32 activations quantized to int8 per "
                    "4 values inside the linear kernels (int8 x int8 dot products)",
                    act_quant="int8", act_group=4, partners=_partners("q4f32_2", "q8f32_2", "q0f16")),
    )
}
# GPTQ / AWQ import (quant/gptq_awq.py): asymmetric INT4 with fp32 scale and fp32 min = -zero * scale, which holds
# (q - zero) * fp16 scale exactly (an fp16 min would not); CPU rows take int8 activations, GPU rows fp16. `_ao`:
# GPTQ act-order (columns in group order, x gathered by q_perm). Picked from the checkpoint when --quant is not given.
for _g in (128, 32):
    for _ao in ("", "_ao"):
        SCHEMES[f"q4f32_g{_g}{_ao}"] = QuantScheme(
            f"q4f32_g{_g}{_ao}", 4, _g, "uint32", "float32", "float32",
            f"CPU: GPTQ/AWQ INT4 asymmetric groups of {_g} (fp32 scale + min = -zero * scale), fp32 activations "
            f"quantized to int8 per 8 values inside the linear kernels"
            + (", act-order (x gathered by q_perm)" if _ao else ""),
            zero_point=True, act_quant="int8", act_group=8, act_order=bool(_ao),
            partners=_partners(f"q4f32_g{_g}", "q8f32_2", "q0f16"))
        SCHEMES[f"q4f16_g{_g}{_ao}"] = QuantScheme(
            f"q4f16_g{_g}{_ao}", 4, _g, "uint32", "float32", "float16",
            f"GPU: GPTQ/AWQ INT4 asymmetric groups of {_g} (fp32 scale + min = -zero * scale), fp16 activations"
            + (", act-order (x gathered by q_perm)" if _ao else ""),
            zero_point=True, act_order=bool(_ao), partners=_partners(f"q4f16_g{_g}", "q8f16_1", "q0f16"))

# bits a source tensor type carries (GGUF types and safetensors / torch dtypes)
SOURCE_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8, "F16": 16, "BF16": 16, "F32": 32,
               "float16": 16, "bfloat16": 16, "float32": 32, "F64": 64, "float64": 64,
               "GPTQ_Q4": 4, "AWQ_Q4": 4}  # GPTQ / AWQ packed linears (quant/gptq_awq.py), e.g. a quantized lm_head


@dataclass(frozen=True)
class PrecisionPlan:
    """The row of each tensor class: `layers` (every projection of the transformer blocks), `embedding` and `head`
    (the same tensor when the embeddings are tied). `head_choice` is what decided the embedding / head rows: the
    user's --head, or `auto` (source-faithful)."""

    layers: QuantScheme
    embedding: QuantScheme
    head: QuantScheme
    head_choice: str = "auto"

    @classmethod
    def uniform(cls, scheme: QuantScheme) -> PrecisionPlan:
        return cls(scheme, scheme, scheme, "uniform")

    def as_dict(self) -> dict:
        return {"layers": self.layers.name, "embedding": self.embedding.name, "head": self.head.name,
                "head_choice": self.head_choice}


def faithful_row(layers: QuantScheme, source_type: str | None) -> QuantScheme:
    """The source-faithful row for an embedding / head tensor of `source_type` beside `layers`: the layer row when it
    stores at least min(source bits, 8) bits per weight, else its 8-bit partner (a 4-bit source stays 4-bit; an
    8-bit or wider one is kept at 8 bits, the Q8_0 grid)."""
    src = SOURCE_BITS.get(source_type or "", 32)
    if layers.source_bits >= min(src, 8):
        return layers
    return layers.partner("q8")


def precision_plan(layers: QuantScheme, embed_type: str | None, head_type: str | None,
                   head: str | None = None) -> PrecisionPlan:
    """Rows for the three tensor classes. head=None: source-faithful (`faithful_row`); q4 | q8 | f16: the user's
    choice for both the embedding and the head. head_type: the untied head's source type (None when tied)."""
    if head is not None:
        if head not in HEAD_CHOICES:
            raise ValueError(f"--head {head!r} is not one of {', '.join(HEAD_CHOICES)}")
        row = layers.partner(head)
        return PrecisionPlan(layers, row, row, head)
    emb = faithful_row(layers, embed_type)
    return PrecisionPlan(layers, emb, emb if head_type is None else faithful_row(layers, head_type), "auto")


def get_scheme(name: str) -> QuantScheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown quantization scheme {name!r}; choose one of {', '.join(sorted(SCHEMES))}") from None
