"""Numpy reference forward pass of the Llama/Qwen2 graph, on float weights in edgellm's parameter naming.

It is the oracle the compiled model is checked against (tests, `edgellm verify`): feed it the artifact's weights
dequantized with quant.reference and the logits must agree with the compiled kernels.
"""

from __future__ import annotations

import math

import numpy as np

from ..config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = cfg.rope_scaling
    if rs and rs.get("rope_type") == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = np.clip((old / wavelen - lo) / (hi - lo), 0.0, 1.0)
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        inv = np.where((wavelen <= old / lo) & (wavelen >= old / hi), mid, scaled)
    return inv


def _rope(x: np.ndarray, pos: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """x [s, heads, d] rotate-half RoPE at positions pos [s]."""
    ang = pos[:, None].astype(np.float64) * inv[None, :]  # [s, d/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(np.float32)


def _rms(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + eps) * w).astype(np.float32)


def forward(cfg: ModelConfig, w: dict[str, np.ndarray], ids: list[int], linear=None) -> np.ndarray:
    """Logits [s, vocab] for a whole sequence from position 0 (causal).

    `linear(x, name)` computes x @ W^T for the weight `name` (default: float matmul on w[name]); schemes whose
    kernels quantize activations pass `int8_linear(artifact)`."""
    mm = linear or (lambda x, name: x @ w[name].T)
    h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = w["model.embed_tokens.weight"][np.asarray(ids)].astype(np.float32)  # [s, hidden]
    s = x.shape[0]
    pos, inv = np.arange(s), rope_inv_freq(cfg)
    mask = np.triu(np.full((s, s), -np.inf, dtype=np.float32), 1)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        y = _rms(x, w[f"{p}.input_layernorm.weight"], cfg.rms_norm_eps)
        qkv = mm(y, f"{p}.self_attn.qkv_proj.weight")
        if cfg.attention_bias:
            qkv = qkv + w[f"{p}.self_attn.qkv_proj.bias"]
        qkv = qkv.reshape(s, h + 2 * kv, d)
        q, k, v = _rope(qkv[:, :h], pos, inv), _rope(qkv[:, h : h + kv], pos, inv), qkv[:, h + kv :]
        k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)  # GQA
        att = np.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("hqk,khd->qhd", att, v).reshape(s, h * d)
        x = x + mm(o, f"{p}.self_attn.o_proj.weight")
        y = _rms(x, w[f"{p}.post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate, up = np.split(mm(y, f"{p}.mlp.gate_up_proj.weight"), 2, axis=-1)
        x = x + mm(gate / (1 + np.exp(-gate)) * up, f"{p}.mlp.down_proj.weight")
    x = _rms(x, w["model.norm.weight"], cfg.rms_norm_eps)
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    return mm(x, head).astype(np.float32)


def float_weights(artifact) -> dict[str, np.ndarray]:
    """An artifact's parameters as float32 in edgellm naming, packed weights dequantized by the numpy reference."""
    from ..quant.reference import dequantize

    m = artifact.manifest
    cfg = ModelConfig.from_dict(m["model"]["config"])
    raw = {e["name"]: np.asarray(a) for e, a in artifact.iter_params()}
    in_of = _in_features(cfg)
    out: dict[str, np.ndarray] = {}
    for name, arr in raw.items():
        if name.endswith(".q_weight"):
            base = name[: -len(".q_weight")]
            scheme = tensor_scheme(m["quant"], f"{base}.weight")
            w = dequantize(arr, raw[f"{base}.q_scale"], in_of(base), scheme, raw.get(f"{base}.q_min"))
            if f"{base}.q_perm" in raw:  # act-order: column j of the stored weight is input column q_perm[j]
                w[:, raw[f"{base}.q_perm"]] = w.copy()
            out[f"{base}.weight"] = w
        elif not name.endswith((".q_scale", ".q_min", ".q_perm")):
            out[name] = arr.astype(np.float32)
    return out


def int8_linear(artifact):
    """The `linear` hook of `forward` for a scheme with int8 activations: exactly what its CPU kernels compute
    (bias excluded; forward adds it), on the artifact's packed weights (quant.reference.linear_int8)."""
    from ..quant import get_scheme
    from ..quant.reference import linear_int8

    quant = artifact.manifest["quant"]
    raw = {e["name"]: np.asarray(a) for e, a in artifact.iter_params()}
    dense = float_weights(artifact) if any(get_scheme(s).act_quant != "int8"
                                           for s in quant.get("per_tensor", {}).values()) else {}

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        scheme = tensor_scheme(quant, name)
        if scheme.act_quant != "int8":  # e.g. an f16 head beside int8 layers: a float kernel
            return x @ dense[name].T
        base = name[: -len(".weight")]
        if f"{base}.q_perm" in raw:  # act-order: the kernel sees x[..., q_perm]
            x = x[..., raw[f"{base}.q_perm"]]
        return linear_int8(x, raw[f"{base}.q_weight"], raw[f"{base}.q_scale"], raw.get(f"{base}.q_min"), scheme)

    return linear


def tensor_scheme(quant: dict, name: str):
    """The row a float weight `name` is stored in, from the manifest's quant entry (per-tensor precision: the
    embedding / head may differ from the layers' scheme)."""
    from dataclasses import replace

    from ..quant import get_scheme

    scheme = get_scheme(quant.get("per_tensor", {}).get(name, quant["scheme"]))
    if scheme.act_quant == "int8" and "act_group" not in quant:  # built before act_group: x per weight group
        scheme = replace(scheme, act_group=0)
    return scheme


def _in_features(cfg: ModelConfig):
    def f(base: str) -> int:
        if base.endswith(("o_proj",)):
            return cfg.num_attention_heads * cfg.head_dim
        if base.endswith("down_proj"):
            return cfg.intermediate_size
        return cfg.hidden_size

    return f
