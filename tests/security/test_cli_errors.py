"""User errors end in one line naming the problem and the fix (exit 1, or Click's usage exit 2), never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgellm.cli import cli


@pytest.fixture
def runner():
    return CliRunner()


def _one_line_error(r, code=1):
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and "Traceback" not in r.stderr
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("Error")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_config_without_hidden_size(runner, checkpoints, tmp_path):
    ck = _copy(checkpoints["llama"], tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    del cfg["hidden_size"]
    (ck / "config.json").write_text(json.dumps(cfg))
    line = _one_line_error(runner.invoke(cli, ["compile", str(ck), "-o", str(tmp_path / "o")]))
    assert "hidden_size" in line and "config.json" in line


def test_config_not_json(runner, checkpoints, tmp_path):
    ck = _copy(checkpoints["llama"], tmp_path / "ck")
    (ck / "config.json").write_text("{not json")
    line = _one_line_error(runner.invoke(cli, ["compile", str(ck), "-o", str(tmp_path / "o")]))
    assert "config.json is not valid JSON" in line


def test_corrupt_safetensors_header(runner, checkpoints, tmp_path):
    ck = _copy(checkpoints["llama"], tmp_path / "ck")
    st = next(ck.glob("*.safetensors"))
    data = bytearray(st.read_bytes())
    data[8:16] = b"{{{{{{{{"  # the JSON header starts after its 8-byte length
    st.write_bytes(bytes(data))
    line = _one_line_error(runner.invoke(cli, ["compile", str(ck), "-o", str(tmp_path / "o")]))
    assert st.name in line and "safetensors" in line


def test_garbage_tokenizer_fails_the_compile_not_the_run(runner, checkpoints, tmp_path):
    ck = _copy(checkpoints["llama"], tmp_path / "ck")
    (ck / "tokenizer.json").write_text('{"model": "garbage"}')
    line = _one_line_error(runner.invoke(cli, ["compile", str(ck), "-o", str(tmp_path / "o")]))
    assert "tokenizer.json" in line and "does not load" in line
    assert not (tmp_path / "o").exists()


def test_broken_chat_template_fails_the_compile(runner, checkpoints, tmp_path):
    ck = _copy(checkpoints["llama"], tmp_path / "ck")
    tc = json.loads((ck / "tokenizer_config.json").read_text())
    tc["chat_template"] = "{% for m in messages %}{{ m.content }"
    (ck / "tokenizer_config.json").write_text(json.dumps(tc))
    line = _one_line_error(runner.invoke(cli, ["compile", str(ck), "-o", str(tmp_path / "o")]))
    assert "chat template" in line


def test_non_utf8_prompt(runner, compiled):
    line = _one_line_error(runner.invoke(cli, ["run", str(compiled("llama", "q0f32")), "caf\udce9"]))
    assert "not valid UTF-8" in line


def test_bogus_triple_is_refused_before_llvm(tmp_path, checkpoints):
    """It segfaulted inside LLVM: run in a subprocess so a regression fails the test, not the test run."""
    target = '{"kind":"llvm","mtriple":"bogus-triple-none"}'
    p = subprocess.run([sys.executable, "-m", "edgellm.cli", "compile", str(checkpoints["llama"]), "--target", target,
                        "-o", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "names no architecture" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "edgellm.cli", "compile", str(checkpoints["llama"]), "--target",
                        '{"kind":"llvm","mtriple":"aarch64-linux-gnu","mcpu":"cortex-z99"}', "-o", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "cortex-z99" in p.stderr


def test_zero_new_tokens_generates_none(runner, compiled):
    r = runner.invoke(cli, ["run", str(compiled("llama", "q0f32")), "hi", "-n", "0", "--no-chat"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "" and "decode: 0 tokens" in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["run", "{art}", "hi", "--threads", "0"], "--threads 0"),
    (["run", "{art}", "hi", "--threads", "-1"], "--threads -1"),
    (["run", "{art}", "hi", "-n", "-2"], "--max-tokens -2"),
    (["bench", "{art}", "-p", "-5"], "--n-prompt -5"),
    (["bench", "{art}", "-n", "-3"], "--n-gen -3"),
    (["bench", "{art}", "--warmup", "-1"], "--warmup -1"),
    (["bench", "{art}", "--reps", "0"], "--reps 0"),
    (["bench", "{art}", "-p", "0", "-n", "0"], "nothing to measure"),
    (["run", "{art}", "hi", "--temperature", "nan"], "temperature"),
])
def test_nonsense_counts_refused(runner, compiled, args, needle):
    art = str(compiled("llama", "q0f32"))
    line = _one_line_error(runner.invoke(cli, [a.replace("{art}", art) for a in args]))
    assert needle in line


def test_compile_refuses_page_size_the_cpu_kernels_lack(runner, checkpoints, tmp_path):
    line = _one_line_error(runner.invoke(cli, ["compile", str(checkpoints["llama"]), "--page-size", "32", "-o",
                                               str(tmp_path / "o")]))
    assert "page" in line and "16" in line
