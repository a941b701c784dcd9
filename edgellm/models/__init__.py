"""Architecture registry: ModelConfig.arch -> (model class, source name map)."""

from __future__ import annotations

from ..config import SUPPORTED_ARCHS, ConfigError, ModelConfig


def get_architecture(cfg: ModelConfig):
    if cfg.arch == "llama":
        from . import llama

        return llama.LlamaForCausalLM, llama.source_map
    if cfg.arch == "qwen2":
        from . import qwen2

        return qwen2.Qwen2ForCausalLM, qwen2.source_map
    raise ConfigError(f"no model file for architecture {cfg.arch!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
