"""Per-tensor precision (DESIGN §4's source-faithful rule): the embedding / head rows in the manifest and the
compile summary, `--head` overriding them, and a mixed build (int8 layers, fp16 head) against its numpy model."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from edgellm.artifact import Artifact
from edgellm.cli import cli
from edgellm.config import ModelConfig
from edgellm.device_runners.engine import Engine
from edgellm.models.reference import float_weights, forward, int8_linear

PROMPT = [1, 5, 7, 100, 42, 9, 33, 250, 17, 64, 3, 201, 88]


def test_f32_source_keeps_an_8bit_embedding_and_untied_head(compiled):
    q = Artifact.open(compiled("llama", "q4f32_2")).manifest["quant"]
    assert q["precision"] == {"layers": "q4f32_2", "embedding": "q8f32_2", "head": "q8f32_2", "head_choice": "auto"}
    assert q["per_tensor"] == {"model.embed_tokens.weight": "q8f32_2", "lm_head.weight": "q8f32_2"}
    c = q["classes"]
    assert c["embedding"]["scheme"] == c["head"]["scheme"] == "q8f32_2" and c["layers"]["scheme"] == "q4f32_2"
    # 8 bits + an fp16 scale per 32 (the tiny model's hidden 64 needs no padding); layers 5 bits + norms
    assert c["embedding"]["bits_per_weight"] == c["head"]["bits_per_weight"] == 8.5
    assert 5.0 < c["layers"]["bits_per_weight"] < 6.0
    # activations rounded to int8 per packed word in every class's kernels: 4 bytes of the 8-bit rows, 8 nibbles
    assert (c["embedding"]["act_group"], c["head"]["act_group"], c["layers"]["act_group"]) == (4, 4, 8)
    assert {x["act_quant"] for x in c.values()} == {"int8"}
    assert sum(x["bytes"] for x in c.values()) == Artifact.open(compiled("llama", "q4f32_2")).weight_bytes


def test_head_option_overrides_and_mixed_build_matches_numpy(checkpoints, tmp_path):
    out = tmp_path / "f16head"
    r = CliRunner().invoke(cli, ["compile", str(checkpoints["llama"]), "-q", "q4f32_2", "--head", "f16",
                                 "--context-window", "64", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "precision: embedding q0f16" in " ".join(r.stderr.split())
    m = json.loads((out / "manifest.json").read_text())
    assert m["quant"]["precision"]["head_choice"] == "f16"
    assert m["quant"]["per_tensor"] == {"model.embed_tokens.weight": "q0f16", "lm_head.weight": "q0f16"}
    names = {e["name"]: e for e in Artifact.open(out).param_index()}
    assert names["lm_head.weight"]["dtype"] == "float16" and names["model.embed_tokens.weight"]["dtype"] == "float16"
    # int8-activation layers and a float fp16 head in one model: the numpy oracle takes each tensor's row
    art = Artifact.open(out)
    ref = forward(ModelConfig.from_dict(m["model"]["config"]), float_weights(art), PROMPT, linear=int8_linear(art))
    got = Engine(out).score(PROMPT)
    assert float(np.abs(got - ref).max() / np.abs(ref).max()) < 5e-2  # int8 rounding noise, as test_models_tiny
    r = CliRunner().invoke(cli, ["compile", str(checkpoints["llama"]), "--head", "q2", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "q4" in r.stderr and not (tmp_path / "x").exists()
