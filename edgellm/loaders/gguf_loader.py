"""GGUF file -> ModelSource: hyper-parameters, tensors (dequantized to float32 on demand), tokenizer, template.

Tensor names follow llama.cpp; GGUF_NAME_MAP below turns them into Hugging Face names explicitly. llama.cpp's
converter permutes the rows of Q and K for the llama architecture (its RoPE pairs adjacent elements); we undo that
so every model sees HF's rotate-half layout.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..artifact import sha256_of
from . import ModelSource, SourceError, TensorRef

SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")

# llama.cpp name (with {i} for the block) -> Hugging Face name
GGUF_NAME_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
# tensors a GGUF may carry that edgellm derives itself
GGUF_IGNORED = ("rope_freqs.weight",)

# tokenizer.ggml.pre -> pre-tokenizer split regex (None: GPT-2's byte-level regex)
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {"llama3": _LLAMA3, "llama-bpe": _LLAMA3, "smaug-bpe": _LLAMA3, "qwen2": _QWEN2}
INDIVIDUAL_DIGITS = {"smollm"}  # SmolLM's tokenizer splits every digit before the byte-level step


def _hf_name(gguf_name: str) -> str | None:
    m = re.match(r"blk\.(\d+)\.(.*)", gguf_name)
    key, i = (f"blk.{{i}}.{m.group(2)}", m.group(1)) if m else (gguf_name, None)
    hf = GGUF_NAME_MAP.get(key)
    return hf.format(i=i) if hf and i is not None else hf


def read_metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # a field type gguf-py cannot decode is not one we use
            continue
    return meta


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` for Q/K rows (interleaved RoPE pairs -> rotate-half)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _loader(reader_tensor, hf_name: str, config: ModelConfig):
    import gguf

    def load() -> np.ndarray:
        t = reader_tensor
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        arr = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape).astype(np.float32)
        if config.arch == "llama":
            if hf_name.endswith("q_proj.weight"):
                arr = _unpermute(arr, config.num_attention_heads)
            elif hf_name.endswith("k_proj.weight"):
                arr = _unpermute(arr, config.num_key_value_heads)
        return arr

    return load


def _block_reader(reader_tensor, hf_name: str, config: ModelConfig):
    """The stored blocks of a Q4_0 / Q4_1 / Q8_0 tensor as QuantBlocks (rows un-permuted as `_loader` does), or None
    for other types. Block layouts (ggml-common.h): Q4_0 = d, 16 bytes of nibbles (byte j: element j low, j + 16
    high); Q4_1 = d, m, the same 16 bytes; Q8_0 = d, 32 int8."""
    from . import QuantBlocks

    kind = reader_tensor.tensor_type.name
    if kind not in ("Q4_0", "Q4_1", "Q8_0"):
        return None

    def blocks() -> QuantBlocks:
        t = reader_tensor
        rows, cols = (int(x) for x in reversed(t.shape.tolist()))
        head = {"Q4_0": 2, "Q4_1": 4, "Q8_0": 2}[kind]
        raw = np.asarray(t.data, dtype=np.uint8).reshape(rows, cols // 32, -1)
        d = np.ascontiguousarray(raw[:, :, 0:2]).view(np.float16)[:, :, 0]
        m = np.ascontiguousarray(raw[:, :, 2:4]).view(np.float16)[:, :, 0] if kind == "Q4_1" else None
        body = raw[:, :, head:]
        if kind == "Q8_0":
            q = np.ascontiguousarray(body).view(np.int8).reshape(rows, cols)
        else:
            q = np.concatenate([body & 15, body >> 4], axis=2).reshape(rows, cols)
        parts = [q, d] + ([m] if m is not None else [])
        if config.arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if hf_name.endswith("q_proj.weight") else config.num_key_value_heads
            parts = [_unpermute(a, heads) for a in parts]
        return QuantBlocks(kind, parts[0], parts[1], parts[2] if m is not None else None)

    return blocks


def build_tokenizer_json(meta: dict) -> str:
    """A tokenizers.Tokenizer (serialized tokenizer.json) from tokenizer.ggml.* metadata (byte-level BPE)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise SourceError(
            f"GGUF tokenizer.ggml.model {kind!r} is not supported (edgellm reads byte-level BPE, 'gpt2'); "
            "use the model's Hugging Face folder, whose tokenizer.json edgellm reads directly"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    pre = meta.get("tokenizer.ggml.pre", "default")
    steps = []
    if pre in INDIVIDUAL_DIGITS:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if pre in PRE_TOKENIZER_SPLITS:
        steps += [
            pre_tokenizers.Split(Regex(PRE_TOKENIZER_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    else:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type", []))
    control = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4]
    tok.add_special_tokens(control)
    tok.add_tokens(user)
    return tok.to_str()


def load_gguf(path: Path) -> ModelSource:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:
        raise SourceError(f"cannot read GGUF file {path}: {exc}") from exc
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    config = ModelConfig.from_gguf_metadata(meta, has_output_tensor="output.weight" in names)
    tensors: dict[str, TensorRef] = {}
    for t in reader.tensors:
        if t.name in GGUF_IGNORED:
            continue
        hf = _hf_name(t.name)
        if hf is None:
            raise SourceError(f"GGUF tensor {t.name!r} in {path.name} has no mapping in GGUF_NAME_MAP")
        if t.tensor_type.name not in SUPPORTED_TYPES:
            raise SourceError(
                f"GGUF tensor {t.name!r} has type {t.tensor_type.name}; edgellm dequantizes "
                f"{', '.join(SUPPORTED_TYPES)}: re-quantize the GGUF to one of those (e.g. Q8_0 or Q4_1)"
            )
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        tensors[hf] = TensorRef(hf, shape, t.tensor_type.name, _loader(t, hf, config), _block_reader(t, hf, config))
    tok_cfg = {
        "chat_template": meta.get("tokenizer.chat_template"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    }
    tokens = meta.get("tokenizer.ggml.tokens", [])
    for key, field in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
        idx = meta.get(f"tokenizer.ggml.{field}")
        if idx is not None and idx < len(tokens):
            tok_cfg[key] = tokens[idx]
    return ModelSource(
        kind="gguf",
        path=path,
        config=config,
        tensors=tensors,
        tokenizer_json=build_tokenizer_json(meta),
        tokenizer_config={k: v for k, v in tok_cfg.items() if v is not None},
        sha256=sha256_of(path),
    )

