"""Artifact layout: shard size limit, index offsets, atomic writes, manifest hashes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgellm.artifact import FORMAT_VERSION, Artifact, ArtifactError, atomic_dir, file_table, write_manifest, write_params


def test_shards_respect_limit_and_index_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    named = [(f"t{i}", rng.standard_normal((i + 1, 100)).astype(np.float32)) for i in range(20)]
    index = write_params(tmp_path, named, shard_bytes=4000)
    shards = sorted((tmp_path / "params").glob("shard_*.bin"))
    assert len(shards) > 1 and all(p.stat().st_size <= 4000 for p in shards)
    for rel in ("lib/model.so", "tokenizer/tokenizer.json"):  # stand-ins: this test reads only the params
        (tmp_path / rel).parent.mkdir()
        (tmp_path / rel).write_bytes(b"stand-in")
    manifest = {"format_version": FORMAT_VERSION, "edgellm_version": "test", "tvm_version": "0.27.0.post1",
                "lib": "lib/model.so", "files": file_table(tmp_path), "functions": ["prefill"], "weight_bytes": 0,
                "model": {"arch": "llama", "config": {}}, "quant": {"scheme": "q0f32"},
                "target": {"preset": "host", "kind": "llvm", "device": "cpu", "export": "so"},
                "runtime": {"context_window": 64, "prefill_chunk": 64, "page_size": 16, "max_batch": 1},
                "tokenizer": {"eos_token_ids": [2]}}
    write_manifest(tmp_path, manifest)
    art = Artifact.open(tmp_path)
    for (name, arr), (entry, got) in zip(named, art.iter_params()):
        assert entry["name"] == name
        np.testing.assert_array_equal(got, arr)
    assert art.weight_bytes == sum(a.nbytes for _, a in named) == sum(e["nbytes"] for e in index)


def test_atomic_dir_removes_everything_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("boom")
    assert not final.exists() and list(tmp_path.iterdir()) == []


def test_manifest_lists_every_file_with_sha256(compiled):
    art = Artifact.open(compiled("llama", "q4f32_1"))
    on_disk = {p.relative_to(art.root).as_posix() for p in art.root.rglob("*") if p.is_file()} - {"manifest.json", "manifest.json.sha256"}
    assert set(art.manifest["files"]) == on_disk
    assert all(len(v["sha256"]) == 64 for v in art.manifest["files"].values())
    m = art.manifest
    assert m["tvm_version"] == "0.27.0.post1" and m["model"]["arch"] == "llama"
    assert m["model"]["source_sha256"] and m["runtime"]["page_size"] == 16


def test_missing_file_named(compiled, tmp_path):
    import shutil

    art = tmp_path / "a"
    shutil.copytree(compiled("llama", "q4f32_1"), art)
    (art / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer/tokenizer.json is missing"):
        Artifact.open(art)


def test_random_weights_mode_runs_without_shards_and_is_explicit(compiled, tmp_path):
    import shutil

    from edgellm.device_runners.engine import Engine

    art = tmp_path / "noweights"
    shutil.copytree(compiled("llama", "q4f32_1"), art)
    for shard in (art / "params").glob("shard_*.bin"):
        shard.unlink()
    with pytest.raises(ArtifactError, match="params/shard_000.bin is missing"):
        Engine(art)  # the default never invents weights
    eng = Engine(art, random_weights=3)
    index = Artifact.open(art, skip_params=True).param_index()
    assert [tuple(p.shape) for p in eng.params] == [tuple(e["shape"]) for e in index]
    toks = list(eng.generate_ids([1, 2, 3], 4))
    assert len(toks) == 4 and toks == list(Engine(art, random_weights=3).generate_ids([1, 2, 3], 4))


def test_score_accepts_one_token_and_the_whole_window(compiled):
    from edgellm.device_runners.engine import Engine, PromptError, PromptTooLongError

    eng = Engine(compiled("llama", "q0f32"))  # context window 256
    assert eng.score([1]).shape[0] == 1
    assert eng.score(list(range(1, 257))).shape[0] == 256
    with pytest.raises(PromptTooLongError):
        eng.score(list(range(1, 258)))
    with pytest.raises(PromptError, match="empty"):
        eng.score([])
