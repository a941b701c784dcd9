"""Tiny random Hugging Face checkpoints, generated with transformers (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

SPECS = {
    # plain Llama, untied head, GQA 2:1
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    # Llama 3 rope scaling, tied embeddings
    "llama3": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # Qwen2 with q/k/v bias; hidden and intermediate not multiples of 32 (padding path)
    "qwen2": dict(model_type="qwen2", hidden_size=80, intermediate_size=200, num_hidden_layers=2,
                  num_attention_heads=5, num_key_value_heads=1, tie_word_embeddings=True),
}


def _tokenizer(out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog. café naïve 東京"] * 20, trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}))


def make_checkpoint(out: Path, name: str, seed: int = 0, vocab: int = 320) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SPECS[name])
    model_type = spec.pop("model_type")
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5,
                               bos_token_id=1, eos_token_id=2, **spec)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random biases so the bias path is exercised (HF initializes them to zero)
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.2)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    _tokenizer(out, vocab)
    return out
