"""The Raspberry Pi artifacts of the target matrix (tests/test_targets.py) run under qemu-aarch64-static and agree
with the host build; the device-side entry point qemu runs; `edgellm run --emulate`'s errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgellm.artifact import Artifact
from edgellm.cli import cli
from edgellm.compile import CompileArgs, compile_model
from edgellm.config import RuntimeOptions
from pi_emulation import arm64_root  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def rpi4_fp16_fallback(checkpoints, tmp_path_factory) -> tuple[Path, str]:
    """(artifact, warnings logged by the compile): the tiny Qwen2 compiled for rpi4 with --quant q4f16_1 (context 128,
    prefill chunk 32); the fallback test reads it and the Pi 4's q4f32_1 run under qemu runs it."""
    import io
    import logging

    out = tmp_path_factory.mktemp("rpi4-fallback") / "r4"
    log, handler = logging.getLogger("edgellm"), logging.StreamHandler(io.StringIO())
    handler.setLevel(logging.WARNING)
    log.addHandler(handler)
    try:
        compile_model(CompileArgs(model=str(checkpoints["qwen2"]), output=out, target="rpi4", quant="q4f16_1",
                                  runtime=RuntimeOptions(128, 32)))
    finally:
        log.removeHandler(handler)
    return out, handler.stream.getvalue()


def test_fp16_scheme_on_fp16_less_target_falls_back(rpi4_fp16_fallback):
    art, logged = rpi4_fp16_fallback
    assert Artifact.open(art).manifest["quant"]["scheme"] == "q4f32_1"
    assert "fp16 off" in logged and "q4f32_1" in logged


def test_cross_artifact_refused_on_host_with_fix(matrix):
    from edgellm.artifact import ArtifactError
    from edgellm.device_runners.engine import Engine

    with pytest.raises(ArtifactError, match="--emulate"):
        Engine(matrix("rpi5"))
    with pytest.raises(ArtifactError, match="static linking"):
        Engine(matrix("android"))


# ---- Raspberry Pi under emulation -------------------------------------------------------------------------------

# q4f32_2 on both boards: its kernels differ by ISA (sdot on the Pi 5's Cortex-A76, the portable integer path on
# the Pi 4). q4f32_1's kernels are the same code on both (only -mcpu differs), so one board covers them (CI time).
# The tiny Qwen2's builds are shared: q4f32_2 is the Pi presets' default (the matrix's builds) and rpi4's q4f32_1 is the
# fp16 fallback's build above.
IDS = [1, 5, 7, 100, 42, 9, 33]


@pytest.fixture(scope="module")
def pi_run(arm64_root, matrix, rpi4_fp16_fallback, tmp_path_factory):  # noqa: F811
    """pi_run(board, scheme) -> (artifact, greedy tokens of IDS, logits of IDS) from the Pi build under qemu, once
    each: both requests in one emulated process (its start alone is ~10 s of qemu)."""
    from edgellm.device_runners.emulate import run_remote

    root = tmp_path_factory.mktemp("pi-run")
    cache: dict[tuple[str, str], tuple[Path, list[int], np.ndarray]] = {}

    def get(board: str, scheme: str):
        if (board, scheme) not in cache:
            art = rpi4_fp16_fallback[0] if scheme == "q4f32_1" else matrix(board)
            out = root / f"{board}-{scheme}.npy"
            res = run_remote(art, [{"op": "generate_ids", "ids": IDS, "max_new_tokens": 8},
                                   {"op": "score", "ids": IDS, "out": str(out)}])
            assert res[1] == {"saved": str(out)}
            cache[(board, scheme)] = art, res[0]["tokens"], np.load(out)
        return cache[(board, scheme)]

    return get


@pytest.mark.parametrize("board,scheme", [("rpi4", "q4f32_1"), ("rpi4", "q4f32_2"), ("rpi5", "q4f32_2")])
def test_pi_build_matches_host_under_qemu(board, scheme, pi_run, compiled):
    """A Pi build under qemu generates the host build's tokens and scores within tolerance."""
    from edgellm.device_runners.engine import Engine

    art, tokens, got = pi_run(board, scheme)
    m = Artifact.open(art).manifest
    assert m["target"]["preset"] == board and m["quant"]["scheme"] == scheme
    host = Engine(compiled("qwen2", scheme))
    assert tokens == list(host.generate_ids(IDS, 8))
    ref = host.score(IDS)
    # int8 activations: the two ISAs sum floats in a different order, which can flip an int8 rounding (see
    # docs/quantization.md); the integer paths themselves are exact
    tol = 5e-2 if scheme == "q4f32_2" else 1e-4
    assert np.abs(got - ref).max() < tol * np.abs(ref).max()


def test_sdot_build_equals_portable_build_bit_for_bit(pi_run):
    """The Pi 5 (sdot) and Pi 4 (portable shifts and multiplies) builds of the default scheme give the same logits
    to the last bit: their integer dot products are exact and everything else is the same float code, so any
    difference is a fault of one path (or of qemu's SDOT). (The same check ran on the real SmolLM2 in
    tests/test_pi_fidelity.py until CI time moved it here: the paths' exactness does not depend on the shapes, and
    tests/test_cpu_kernels.py runs each path against numpy under qemu.)"""
    _, tok5, pi5 = pi_run("rpi5", "q4f32_2")
    _, tok4, pi4 = pi_run("rpi4", "q4f32_2")
    assert tok5 == tok4
    np.testing.assert_array_equal(pi5, pi4)


def test_remote_runs_a_list_of_requests_on_one_engine(compiled, tmp_path, capsys, monkeypatch):
    """The device-side entry point (what qemu runs): a JSON list runs each request in order with the artifact loaded
    once; a request without a known op is refused before anything loads."""
    import json

    from edgellm.device_runners import engine, remote
    from edgellm.device_runners.engine import Engine

    art, ids, out = compiled("qwen2", "q4f32_1"), [1, 5, 7, 100], tmp_path / "l.npy"
    host = Engine(art)
    loads = []
    monkeypatch.setattr(engine.Engine, "__init__", lambda self, *a, _init=engine.Engine.__init__, **k: (
        loads.append(a), _init(self, *a, **k))[1])
    assert remote.main([str(art), json.dumps([{"op": "generate_ids", "ids": ids, "max_new_tokens": 4},
                                              {"op": "score", "ids": ids, "out": str(out)}])]) == 0
    lines = [json.loads(x.removeprefix(remote.PREFIX)) for x in capsys.readouterr().out.splitlines()]
    assert lines == [{"tokens": list(host.generate_ids(ids, 4)), "finish_reason": "length"}, {"saved": str(out)}]
    np.testing.assert_array_equal(np.load(out), host.score(ids))
    assert len(loads) == 1
    for bad in ([{"op": "score", "ids": ids, "out": str(out)}, {"op": "nope"}], {"ids": ids}, [3]):
        with pytest.raises(SystemExit, match="unknown request .* one of generate_ids, score, run"):
            remote.main([str(art), json.dumps(bad)])
    with pytest.raises(SystemExit, match="no request"):
        remote.main([str(art), "[]"])
    assert len(loads) == 1


def test_emulated_python_keeps_its_bytecode(monkeypatch):
    """The arm64 python under qemu writes the .pyc of what it imports into edgellm's arm64 root, whatever the caller's
    PYTHONDONTWRITEBYTECODE (compiling TVM's modules under qemu was 6 s of every emulated start)."""
    from edgellm.device_runners.emulate import python_command

    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    cmd, env = python_command(Path("/arm64"), "cortex-a76", ["-c", "pass"], [Path("/src")], threads=3)
    assert cmd[:4] == ["qemu-aarch64-static", "-L", "/arm64", "/arm64/usr/bin/python3"]
    assert "PYTHONDONTWRITEBYTECODE" not in env and env["QEMU_CPU"] == "cortex-a76" and env["TVM_NUM_THREADS"] == "3"
    assert env["PYTHONPATH"] == "/arm64/opt/edgellm-site:/src"


def test_cli_run_emulate(arm64_root, matrix):
    r = CliRunner().invoke(cli, ["run", str(matrix("rpi5")), "hello world", "--no-chat", "-n", "4", "--emulate"])
    assert r.exit_code == 0, r.output + r.stderr
    assert "decode: 4 tokens" in r.stderr and "emulated" in r.stderr


def test_cli_emulate_without_arm64_root_names_the_script(matrix, monkeypatch, tmp_path):
    """No arm64 root (or no qemu): one line naming scripts/arm64-rootfs.sh, exit 1, no traceback."""
    monkeypatch.setenv("EDGELLM_ARM64_ROOT", str(tmp_path / "no-root"))
    r = CliRunner().invoke(cli, ["run", str(matrix("rpi5")), "hi", "--no-chat", "-n", "1", "--emulate"])
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "scripts/arm64-rootfs.sh" in r.stderr
    assert str(tmp_path / "no-root") in r.stderr or "qemu-aarch64-static" in r.stderr


def test_cli_emulate_refuses_an_x86_artifact_for_its_architecture(matrix, monkeypatch, tmp_path):
    """--emulate on a host (x86-64) build names the architecture and the fix, before looking for the arm64 root."""
    monkeypatch.setenv("EDGELLM_ARM64_ROOT", str(tmp_path / "no-root"))
    r = CliRunner().invoke(cli, ["run", str(matrix("host")), "hi", "--no-chat", "-n", "1", "--emulate"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "x86_64" in r.stderr and "aarch64" in r.stderr and "without --emulate" in r.stderr
    assert "root filesystem" not in r.stderr


# The real SmolLM2 on the Pi 5 core under qemu: tests/test_pi_fidelity.py
