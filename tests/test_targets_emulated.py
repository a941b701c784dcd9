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
