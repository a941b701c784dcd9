"""A GPTQ checkpoint of the embedded SmolLM2-135M, end to end: its GGUF weights (dequantized) quantized onto GPTQ's
grid by tests/test_gptq_awq.py's round-to-nearest quantizer and packer (no Hessian: the format is what is under
test, not GPTQ's error compensation), written as a Hugging Face folder, compiled with no --quant (the exact import
row), and verified against a q0f32 build of the same folder (`edgellm verify --reference-kind q0f32`: the
dequantized weights exactly, so what is left is the row's int8 activations).

Usage: python bench/gptq_smollm2.py [--group 128] [--act-order] [--out /tmp/gptq-smollm2] [--chunks 4]
Prints the compile summary and the verify table; writes OUT/result.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def write_folder(out: Path, group: int, act_order: bool) -> str:
    from safetensors.numpy import save_file
    from test_gptq_awq import SHARED_INPUT, pack_gptq, quantize_rtn

    from edgellm.loaders import open_model

    src = open_model(None)
    cfg = src.config
    rng = np.random.default_rng(0)
    tensors, perms = {}, {}
    for name, ref in src.tensors.items():
        w = ref.load().astype(np.float32)
        part = name.split(".")
        if name.endswith("_proj.weight"):
            in_f = w.shape[1]
            if act_order:  # a fixed random column order per shared input stands in for GPTQ's Hessian order
                perm = perms.setdefault((part[2], SHARED_INPUT[part[4]]), rng.permutation(in_f))
                g_idx = np.empty(in_f, np.int64)
                g_idx[perm] = np.arange(in_f) // group
            else:
                g_idx = np.arange(in_f) // group
            q, zero, scale = quantize_rtn(w, g_idx, -(-in_f // group), sym=False, min_zero=0)
            packed = pack_gptq(q, zero, scale, g_idx, v1=False)
            tensors.update({f"{name[: -len('.weight')]}.{k}": v for k, v in packed.items()})
        else:
            tensors[name] = w
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
          "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
          "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
          "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
          "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_word_embeddings,
          "max_position_embeddings": cfg.max_position_embeddings, "bos_token_id": cfg.bos_token_id,
          "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
          "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": act_order,
                                  "sym": False, "checkpoint_format": "gptq_v2"}}
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    (out / "tokenizer.json").write_text(src.tokenizer_json)
    (out / "tokenizer_config.json").write_text(json.dumps(
        {k: v for k, v in src.tokenizer_config.items() if isinstance(v, (str, int, float, bool, list, dict))}))
    return str(src.path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--out", default="/tmp/gptq-smollm2")
    ap.add_argument("--chunks", type=int, default=4)
    a = ap.parse_args()
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.verify import VerifyArgs, verify

    out = Path(a.out)
    ckpt = out / "ckpt"
    gguf = write_folder(ckpt, a.group, a.act_order)
    res = compile_model(CompileArgs(model=str(ckpt), output=out / "art", overwrite=True,
                                    runtime=RuntimeOptions(context_window=512, prefill_chunk=256)))
    print(res.summary())
    v = verify(VerifyArgs(artifact=out / "art", reference_kind="q0f32", max_chunks=a.chunks))
    print(v.table())
    result = {"source": gguf, "group": a.group, "act_order": a.act_order, "scheme": res.tensor_classes,
              "verify": v.to_json()}
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
