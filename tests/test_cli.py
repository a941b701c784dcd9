"""The CLI through CliRunner: happy paths and bad input (exit codes, messages, no partial artifacts)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgellm.cli import cli


@pytest.fixture
def runner():
    return CliRunner()


def _no_partials(parent):
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


def test_targets_lists_host(runner):
    r = runner.invoke(cli, ["targets", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [x["name"] for x in rows][0] == "host"
    r = runner.invoke(cli, ["targets"])
    assert r.exit_code == 0 and "this machine" in r.stdout and "aarch64-linux-gnu" in r.stdout


def test_compile_run_bench(runner, checkpoints, tmp_path):
    out = tmp_path / "art"
    r = runner.invoke(cli, ["compile", str(checkpoints["llama"]), "--quant", "q4f32_1", "-o", str(out),
                            "--context-window", "128", "--prefill-chunk", "32"])
    assert r.exit_code == 0, r.output + r.stderr
    assert "bits/weight" in r.stderr and "build" in r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["quant"]["scheme"] == "q4f32_1" and m["runtime"]["context_window"] == 128
    assert m["target"]["preset"] == "host" and m["target"]["tvm_target"]["kind"] == "llvm"
    assert set(m["files"]) >= {"lib/model.so", "params/index.json", "params/shard_000.bin", "tokenizer/tokenizer.json"}

    r = runner.invoke(cli, ["run", str(out), "hello world", "--no-chat", "-n", "5"])
    assert r.exit_code == 0, r.output + r.stderr
    assert "decode: 5 tokens" in r.stderr and "tok/s" in r.stderr and "finish: length" in r.stderr
    r2 = runner.invoke(cli, ["run", str(out), "hello world", "--no-chat", "-n", "5"])
    assert r2.stdout == r.stdout  # greedy is deterministic
    r = runner.invoke(cli, ["run", str(out), "hello", "-n", "3", "--temperature", "0.9", "--top-p", "0.9",
                            "--top-k", "20", "--repetition-penalty", "1.1", "--seed", "7"])
    assert r.exit_code == 0, r.output + r.stderr

    r = runner.invoke(cli, ["bench", str(out), "-p", "16", "-n", "8", "--reps", "2", "--format", "json"])
    assert r.exit_code == 0, r.output + r.stderr
    recs = json.loads(r.stdout)
    assert [x["test"] for x in recs] == ["pp16", "tg8"]
    tg = recs[1]
    assert tg["reps"] == 2 and len(tg["samples_ts"]) == 2 and tg["avg_ts"] > 0
    assert tg["weight_bytes"] == sum(p["bytes"] for f, p in m["files"].items() if f.startswith("params/shard"))
    assert tg["bandwidth_gbs"] == pytest.approx(tg["weight_bytes"] * tg["avg_ts"] / 1e9)
    for fmt, needle in (("md", "| tg8 |"), ("csv", "test,"), ("jsonl", '"test": "pp16"')):
        r = runner.invoke(cli, ["bench", str(out), "-p", "16", "-n", "8", "--reps", "1", "--format", fmt])
        assert r.exit_code == 0 and needle in r.stdout, r.output


def test_compile_missing_path(runner, tmp_path):
    r = runner.invoke(cli, ["compile", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and "does not exist" in r.stderr
    assert not (tmp_path / "out").exists()


def _with_config(src, dst, **changes):
    """A copy of checkpoint `src` at `dst` whose config.json has `changes` applied."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_compile_unsupported_architecture(runner, checkpoints, tmp_path):
    bad = _with_config(checkpoints["llama"], tmp_path / "mamba", model_type="mamba")
    r = runner.invoke(cli, ["compile", str(bad), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1
    assert "unsupported architecture" in r.stderr and "'mamba'" in r.stderr
    assert not (tmp_path / "out").exists() and not _no_partials(tmp_path)


def test_compile_unknown_target_and_scheme(runner, checkpoints, tmp_path):
    r = runner.invoke(cli, ["compile", str(checkpoints["llama"]), "--target", "hots", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "unknown target 'hots'" in r.stderr and "Did you mean host" in r.stderr
    r = runner.invoke(cli, ["compile", str(checkpoints["llama"]), "--quant", "q3f8", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "q3f8" in r.stderr and "q4f32_1" in r.stderr
    assert not (tmp_path / "o").exists()


def test_compile_failure_leaves_no_partial_artifact(runner, checkpoints, tmp_path):
    bad = _with_config(checkpoints["llama"], tmp_path / "misshaped", intermediate_size=96)  # weights say 160
    r = runner.invoke(cli, ["compile", str(bad), "-o", str(tmp_path / "out")])
    assert r.exit_code == 1
    assert "shape mismatch" in r.stderr and "mlp.gate_proj.weight" in r.stderr
    assert not (tmp_path / "out").exists() and not _no_partials(tmp_path)


def test_compile_refuses_existing_output(runner, checkpoints, compiled):
    art = compiled("llama", "q0f32")
    r = runner.invoke(cli, ["compile", str(checkpoints["llama"]), "-o", str(art)])
    assert r.exit_code == 1 and "already exists" in r.stderr and "--overwrite" in r.stderr


def test_run_refuses_flipped_byte(runner, compiled, tmp_path):
    import shutil

    art = tmp_path / "tampered"
    shutil.copytree(compiled("llama", "q4f32_1"), art)
    shard = art / "params" / "shard_000.bin"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    r = runner.invoke(cli, ["run", str(art), "hello"])
    assert r.exit_code == 1
    assert "params/shard_000.bin" in r.stderr and "sha256" in r.stderr
    assert r.stdout == ""


def test_run_truncated_shard_named(runner, compiled, tmp_path):
    import shutil

    art = tmp_path / "truncated"
    shutil.copytree(compiled("llama", "q4f32_1"), art)
    lib = art / "lib" / "model.so"
    lib.write_bytes(lib.read_bytes()[:-10])
    r = runner.invoke(cli, ["bench", str(art)])
    assert r.exit_code == 1 and "lib/model.so" in r.stderr and "truncated" in r.stderr


def test_run_prompt_longer_than_context(runner, compiled):
    art = compiled("llama", "q0f32")  # context window 256
    r = runner.invoke(cli, ["run", str(art), "hello world " * 300, "--no-chat"])
    assert r.exit_code == 1
    assert "context window is 256" in r.stderr and "tokens" in r.stderr


def test_run_not_an_artifact(runner, tmp_path):
    r = runner.invoke(cli, ["run", str(tmp_path)])
    assert r.exit_code == 1 and "manifest.json" in r.stderr


def test_bad_sampling_value(runner, compiled):
    r = runner.invoke(cli, ["run", str(compiled("llama", "q0f32")), "hi", "--top-p", "1.5"])
    assert r.exit_code == 1 and "top_p" in r.stderr


def test_run_empty_raw_prompt(runner, compiled):
    r = runner.invoke(cli, ["run", str(compiled("llama", "q0f32")), "", "--no-chat"])
    assert r.exit_code == 1 and "prompt is empty" in r.stderr
