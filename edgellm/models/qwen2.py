"""Qwen2: the Llama block with biases on q/k/v (ModelConfig.attention_bias, set from model_type 'qwen2').

Everything else (GQA, RoPE on the paged cache, SwiGLU, RMSNorm, optional tied embeddings) is llama.py's code.
"""

from .llama import LlamaForCausalLM, source_map


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Distinct class so artifacts and errors name the architecture; attention bias comes from the config."""


__all__ = ["Qwen2ForCausalLM", "source_map"]
