"""Quantization schemes as data: one frozen row per scheme (DESIGN §4).

The packing contract, written down once: weight W of a Linear has shape [out, in] (NK layout). `in` is cut into
groups of `group_size`; each group has one scale `max|w| / qmax`. A value is stored as the unsigned nibble
`q = clamp(round(w / scale) + qmax, 0, 2*qmax)` and decoded as `(q - qmax) * scale`. Eight nibbles share one
uint32 along `in`: element i of the eight sits at bits [4i, 4i+4). `in` is zero-padded up to a multiple of
`group_size` (and of 8); the padding is recorded in the manifest.

Asymmetric rows (`zero_point=True`, the GGUF Q4_1 grid) store a per-group minimum as well: `scale = (max - min) /
15`, `q = clamp(round((w - min) / scale), 0, 15)`, decoded as `q * scale + min` (`q_min` beside `q_scale`, same
shape and dtype). Rows with `act_quant="int8"` quantize the activations entering each linear kernel to int8 per
group of `group_size` (`d = max|x| / 127`, `xq = rint(x / d)`) and take integer dot products against the nibbles
(AVX-512 VNNI / AVX2 / NEON sdot); the minimum multiplies the exact float sum of x. Those rows are CPU-only.
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

    def __post_init__(self) -> None:
        if self.bits not in (0, 4):
            raise ValueError(f"scheme {self.name}: bits must be 0 or 4, got {self.bits}")
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
        if self.act_quant == "int8" and (self.bits != 4 or self.act_dtype != "float32" or self.group_size % 32):
            raise ValueError(f"scheme {self.name}: int8 activations need 4-bit weights, float32 activations and "
                             f"groups of a multiple of 32")

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
        """Symmetric rows: offset added before storing, q in [0, 2*qmax]. Asymmetric rows: unused (q in [0, 15])."""
        return (1 << (self.bits - 1)) - 1 if self.bits else 0

    @property
    def levels(self) -> int:
        """Largest stored value: 2*qmax (symmetric) or 2**bits - 1 (asymmetric)."""
        return (1 << self.bits) - 1 if self.zero_point else 2 * self.qmax

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
            "layout": ("dense" if not self.bits else "NK, 8 nibbles per uint32, nibble i at bits 4i, "
                       + ("q * scale + min (q_min)" if self.zero_point else "(q - qmax) * scale")),
            "zero_point": self.zero_point,
            "act_quant": self.act_quant,
        }


SCHEMES: dict[str, QuantScheme] = {
    s.name: s
    for s in (
        QuantScheme("q0f32", 0, 0, "float32", "float32", "float32", "no quantization, fp32"),
        QuantScheme("q0f16", 0, 0, "float16", "float16", "float16", "no quantization, fp16"),
        QuantScheme("q4f32_1", 4, 32, "uint32", "float32", "float32", "INT4 groups of 32, fp32 scales + activations"),
        QuantScheme("q4f16_1", 4, 32, "uint32", "float16", "float16", "INT4 groups of 32, fp16 scales + activations"),
        QuantScheme("q4f32_2", 4, 32, "uint32", "float16", "float32",
                    "CPU: INT4 asymmetric groups of 32 (fp16 scale + min, the GGUF Q4_1 grid), fp32 activations "
                    "quantized to int8 per group inside the linear kernels (VNNI / AVX2 / NEON sdot)",
                    zero_point=True, act_quant="int8"),
    )
}


def get_scheme(name: str) -> QuantScheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown quantization scheme {name!r}; choose one of {', '.join(sorted(SCHEMES))}") from None
