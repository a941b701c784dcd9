"""ModelConfig (from a Hugging Face config.json or GGUF metadata) and CompileOptions."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("edgellm")

SUPPORTED_ARCHS = ("llama", "qwen2")
ARCH_OF_HF_TYPE = {"llama": "llama", "qwen2": "qwen2", "smollm2": "llama", "mistral": "llama"}


class ConfigError(ValueError):
    """A model configuration edgellm cannot lower; the message names the value and the fix."""


@dataclass
class ModelConfig:
    arch: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.arch not in SUPPORTED_ARCHS:
            raise ConfigError(
                f"unsupported architecture {self.arch!r}; edgellm lowers {', '.join(SUPPORTED_ARCHS)} "
                "(Llama 2/3, SmolLM2, TinyLlama, Qwen2)"
            )
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
            log.debug("head_dim not given; derived %d = hidden_size / num_attention_heads", self.head_dim)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.rope_scaling:
            self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)

    # ---- constructors -------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        model_type = cfg.get("model_type")
        if model_type not in ARCH_OF_HF_TYPE:
            raise ConfigError(
                f"unsupported architecture: config.json has model_type {model_type!r}; edgellm supports "
                f"{', '.join(sorted(ARCH_OF_HF_TYPE))}"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"unsupported hidden_act {act!r} for {model_type}; only 'silu' is implemented")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool)
                   or cfg.get(k) <= 0]
        if missing:
            raise ConfigError(f"config.json ({model_type}) lacks a positive integer {', '.join(missing)}; a "
                              "Hugging Face config of this architecture has them: fix or replace config.json")
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        known = {f.name for f in dataclasses.fields(cls)}
        arch = ARCH_OF_HF_TYPE[model_type]
        return cls(
            arch=arch,
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=cfg["num_attention_heads"],
            num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab_size=cfg["vocab_size"],
            head_dim=cfg.get("head_dim") or 0,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6 if arch == "qwen2" else 1e-5),
            rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
            rope_scaling=cfg.get("rope_scaling") or _rope_params_scaling(cfg.get("rope_parameters")),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            kwargs={k: v for k, v in cfg.items() if k not in known},
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], has_output_tensor: bool) -> ModelConfig:
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise ConfigError(
                f"unsupported architecture: GGUF general.architecture is {arch!r}; edgellm supports "
                f"{', '.join(SUPPORTED_ARCHS)}"
            )

        def g(key, default=None):
            return meta.get(f"{arch}.{key}", default)

        heads = int(g("attention.head_count"))
        rope_scaling = None
        if g("rope.scaling.type") not in (None, "none"):
            rope_scaling = {
                "rope_type": g("rope.scaling.type"),
                "factor": g("rope.scaling.factor"),
                "original_max_position_embeddings": g("rope.scaling.original_context_length"),
            }
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            arch=arch,
            hidden_size=int(g("embedding_length")),
            intermediate_size=int(g("feed_forward_length")),
            num_hidden_layers=int(g("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=int(g("attention.head_count_kv", heads)),
            vocab_size=int(g("vocab_size", len(meta.get("tokenizer.ggml.tokens", [])))),
            head_dim=int(g("attention.key_length", 0) or 0),
            rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(g("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            tie_word_embeddings=not has_output_tensor,
            attention_bias=arch == "qwen2",
            max_position_embeddings=int(g("context_length", 2048)),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[] if eos is None else [int(eos)],
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**d)


def _rope_params_scaling(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """transformers >= 5 folds rope settings into `rope_parameters`; only a non-default type is scaling."""
    if not params or params.get("rope_type", "default") == "default":
        return None
    return {k: v for k, v in params.items() if k != "rope_theta"}


def _normalize_rope_scaling(rs: dict[str, Any]) -> dict[str, Any] | None:
    rs = dict(rs)
    rope_type = rs.pop("type", None) or rs.get("rope_type")
    if rope_type in (None, "default"):
        return None
    rs["rope_type"] = rope_type
    if rope_type == "llama3":
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if k not in rs]
        if missing:
            raise ConfigError(f"llama3 rope_scaling lacks {missing}")
        return rs
    raise ConfigError(f"unsupported rope_scaling type {rope_type!r}; edgellm implements 'llama3'")


@dataclass
class RuntimeOptions:
    """Shapes fixed at compile time and recorded in the manifest."""

    context_window: int = 2048
    prefill_chunk: int = 256
    page_size: int = 16
    max_batch: int = 1

    def __post_init__(self) -> None:
        for name in ("context_window", "prefill_chunk", "page_size", "max_batch"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.page_size != 16:  # kv_cache.py's CPU attention and the CUDA kernels index 16-token pages
            raise ConfigError(f"page_size {self.page_size} is not supported: edgellm's attention kernels are built "
                              "for 16-token KV-cache pages; use --page-size 16 (the default)")
        if self.prefill_chunk > self.context_window:
            self.prefill_chunk = self.context_window
