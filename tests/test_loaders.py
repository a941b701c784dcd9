"""Checkpoint readers: sharded safetensors, GGUF of every supported type, explicit name maps, refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from gguf_writer import write_gguf
from safetensors.numpy import load_file

from edgellm.loaders import SourceError, open_model
from edgellm.quant.convert import WeightMapError

TOL = {"F32": 0, "F16": 1e-3, "BF16": 1e-2, "Q8_0": 2e-2, "Q4_0": 0.25, "Q4_1": 0.25}


def test_sharded_safetensors_equal_single_file(checkpoints, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoints["llama"]), dtype=torch.float32)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    shutil.copy(checkpoints["llama"] / "tokenizer.json", sharded)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a, b = open_model(checkpoints["llama"]), open_model(sharded)
    assert set(a.tensors) == set(b.tensors)
    for name in a.tensors:
        np.testing.assert_array_equal(a.tensors[name].load(), b.tensors[name].load())


@pytest.mark.parametrize("qtype", list(TOL))
def test_gguf_every_type_dequantizes_and_unpermutes(qtype, checkpoints, tmp_path):
    ckpt = checkpoints["llama"]
    path = write_gguf(ckpt, tmp_path / f"tiny-{qtype}.gguf", qtype)
    src = open_model(path)
    ref = load_file(str(ckpt / "model.safetensors"))
    assert src.kind == "gguf" and src.config.num_key_value_heads == 2 and not src.config.tie_word_embeddings
    assert set(src.tensors) == set(ref)
    for name, t in src.tensors.items():
        got = t.load()
        assert got.shape == ref[name].shape, name
        scale = np.abs(ref[name]).max()
        assert np.abs(got - ref[name]).max() <= TOL[qtype] * scale + 1e-7, name  # Q/K rows back in HF order
    assert src.chat_template and "assistant" in src.chat_template


def test_gguf_f32_compiles_to_same_logits_as_hf_folder(checkpoints, compiled, tmp_path):
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.device_runners.engine import Engine

    path = write_gguf(checkpoints["llama"], tmp_path / "tiny.gguf", "F32")
    out = tmp_path / "art"
    compile_model(CompileArgs(model=str(path), output=out, quant="q0f32", runtime=RuntimeOptions(256, 128)))
    ids = [1, 5, 7, 100, 42, 9]
    np.testing.assert_allclose(Engine(out).score(ids), Engine(compiled("llama", "q0f32")).score(ids), rtol=0, atol=1e-5)
    # tokenizer rebuilt from GGUF metadata encodes like the original tokenizer.json
    a, b = Engine(out).codec, Engine(compiled("llama", "q0f32")).codec
    for text in ["hello world, the quick brown fox", "café 日本"]:
        assert a.encode(text) == b.encode(text)


def test_pickle_checkpoint_refused(checkpoints, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(checkpoints["llama"] / "config.json", d)
    shutil.copy(checkpoints["llama"] / "tokenizer.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(SourceError, match="never unpickles"):
        open_model(d)
    with pytest.raises(SourceError, match="neither a checkpoint folder"):
        open_model(d / "pytorch_model.bin")


def _compile(ckpt, out):
    from edgellm.compile import CompileArgs, compile_model

    return compile_model(CompileArgs(model=str(ckpt), output=out, quant="q0f32"))


def _edit_safetensors(src_dir, dst_dir, edit):
    from safetensors.numpy import save_file

    shutil.copytree(src_dir, dst_dir)
    t = load_file(str(dst_dir / "model.safetensors"))
    edit(t)
    save_file(t, str(dst_dir / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_named(checkpoints, tmp_path):
    _edit_safetensors(checkpoints["llama"], tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightMapError, match="Parameter not found in source: model.layers.1.mlp.up_proj.weight"):
        _compile(tmp_path / "m", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unmapped_tensor_named(checkpoints, tmp_path):
    def add(t):
        t["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)

    _edit_safetensors(checkpoints["llama"], tmp_path / "u", add)
    with pytest.raises(WeightMapError, match="model.layers.0.mlp.extra.weight"):
        _compile(tmp_path / "u", tmp_path / "out")


def test_misshaped_tensor_named(checkpoints, tmp_path):
    def shrink(t):
        t["model.layers.0.self_attn.o_proj.weight"] = t["model.layers.0.self_attn.o_proj.weight"][:, :32].copy()

    _edit_safetensors(checkpoints["llama"], tmp_path / "s", shrink)
    with pytest.raises(WeightMapError, match="o_proj"):
        _compile(tmp_path / "s", tmp_path / "out")


def test_missing_tokenizer_and_config(checkpoints, tmp_path):
    d = tmp_path / "notok"
    shutil.copytree(checkpoints["llama"], d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(SourceError, match="tokenizer.json"):
        open_model(d)
    (d / "config.json").unlink()
    with pytest.raises(SourceError, match="config.json"):
        open_model(d)
    cfg = json.loads((checkpoints["llama"] / "config.json").read_text())
    assert cfg["model_type"] == "llama"
