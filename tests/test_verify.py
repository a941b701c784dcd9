"""edgellm verify: the measures on hand-computed logits, tiny artifacts against their own source, the exit-1 bounds,
missing / changed sources, and the suite's fidelity floor for the default SmolLM2 artifact on the built-in text."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgellm.cli import cli
from edgellm.verify import (VerifyArgs, VerifyError, builtin_text, compare_logits, make_chunks, read_text, verify)

CHUNKS = 3  # tiny models: the built-in text is ~8,000 tokens of their 320-entry tokenizer; 3 chunks of 256 suffice


# ---- the measures ---------------------------------------------------------------------------------------------
def test_measures_equal_hand_computed_values():
    # position 0: p_ref = [1/4, 1/2, 1/4], p_art = [1/2, 1/4, 1/4] -> top-1 differs, KL = 1/4 ln 2, target 0:
    #             nll_art = ln 2, nll_ref = ln 4
    # position 1: both [1/6, 4/6, 1/6] (the artifact's row shifted by +5: softmax does not care) -> agree, KL 0,
    #             target 1: nll = ln 1.5 for both
    ln2, ln4 = math.log(2), math.log(4)
    ref = np.array([[0.0, ln2, 0.0], [0.0, ln4, 0.0]])
    art = np.array([[ln2, 0.0, 0.0], [5.0, ln4 + 5.0, 5.0]])
    m = compare_logits(ref, art, np.array([0, 1])).metrics()
    assert m.positions == 2
    assert m.agreement == 0.5
    assert m.mean_kl == pytest.approx(ln2 / 8, rel=1e-12)
    assert m.perplexity == pytest.approx(math.sqrt(3), rel=1e-12)  # exp((ln 2 + ln 1.5) / 2)
    assert m.ref_perplexity == pytest.approx(math.sqrt(6), rel=1e-12)  # exp((ln 4 + ln 1.5) / 2)
    assert m.ppl_increase == pytest.approx(1 / math.sqrt(2) - 1, rel=1e-12)


def test_measures_add_over_chunks_by_position():
    rng = np.random.default_rng(0)
    ref, art = rng.standard_normal((2, 10, 7)) * 3
    t = rng.integers(0, 7, 10)
    whole = compare_logits(ref, art, t).metrics()
    split = (compare_logits(ref[:3], art[:3], t[:3]) + compare_logits(ref[3:], art[3:], t[3:])).metrics()
    for name in ("positions", "agreement", "mean_kl", "perplexity", "ref_perplexity"):
        assert getattr(split, name) == pytest.approx(getattr(whole, name), rel=1e-12), name
    # KL of a distribution with itself is 0, and positive otherwise
    assert compare_logits(ref, ref, t).metrics().mean_kl == pytest.approx(0, abs=1e-15)
    assert whole.mean_kl > 0


def test_compare_logits_refuses_mismatched_shapes():
    with pytest.raises(VerifyError, match="cannot be compared"):
        compare_logits(np.zeros((3, 5)), np.zeros((3, 6)), np.zeros(3, int))


def test_chunks_fit_and_carry_bos():
    ids = list(range(10, 20))
    assert make_chunks(ids, 4) == [[10, 11, 12, 13], [14, 15, 16, 17], [18, 19]]
    assert make_chunks(ids, 4, bos=1) == [[1, 10, 11, 12], [1, 13, 14, 15], [1, 16, 17, 18], [1, 19]]
    assert make_chunks(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # a last piece of 1 token predicts nothing


def test_builtin_text_is_about_2000_smollm2_tokens(smollm2_source):
    from tokenizers import Tokenizer

    text = builtin_text()
    assert not text.startswith("#") and text.startswith("It is a truth universally acknowledged")
    n = len(Tokenizer.from_str(smollm2_source.tokenizer_json).encode(text, add_special_tokens=False).ids)
    assert 1800 <= n <= 2300
    assert read_text(None) == ("built-in", text)


def test_text_file_errors(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(VerifyError, match="not UTF-8"):
        read_text(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(VerifyError, match="is empty"):
        read_text(empty)


# ---- tiny artifacts against their own source --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(compiled):
    return {q: compiled("llama", q) for q in ("q0f32", "q4f32_2")}


def test_q0f32_against_its_source_in_transformers_is_exact(tiny):
    r = verify(VerifyArgs(tiny["q0f32"], max_chunks=CHUNKS))
    assert r.reference_kind == "transformers" and "matches the manifest" in r.source_check
    assert len(r.chunks) == CHUNKS and all(c.tokens == 256 for c in r.chunks)
    assert r.total.positions == CHUNKS * 255
    assert r.total.agreement >= 0.995
    assert r.total.mean_kl < 1e-6
    assert abs(r.total.ppl_increase) < 1e-4
    assert r.passed


def test_q4_is_worse_than_q0f32_but_above_a_floor(tiny):
    q0 = verify(VerifyArgs(tiny["q0f32"], max_chunks=CHUNKS)).total
    q4 = verify(VerifyArgs(tiny["q4f32_2"], max_chunks=CHUNKS)).total
    # the random tiny model's distributions are nearly flat (perplexity ~320 of 320 tokens), so top-1 is fragile:
    # measured 79% for q4f32_2; a packing or kernel bug drops it to chance (1 / 320)
    assert 0.5 <= q4.agreement < q0.agreement
    assert q4.mean_kl > 100 * max(q0.mean_kl, 1e-9)
    assert abs(q4.ppl_increase) > abs(q0.ppl_increase)


def test_q0f32_reference_built_on_the_fly_matches_transformers(tiny):
    hf = verify(VerifyArgs(tiny["q4f32_2"], max_chunks=CHUNKS)).total
    built = verify(VerifyArgs(tiny["q4f32_2"], reference_kind="q0f32", max_chunks=CHUNKS))
    assert built.reference_kind == "q0f32" and "compiled for this run" in built.reference
    assert built.total.ref_perplexity == pytest.approx(hf.ref_perplexity, rel=1e-4)
    assert built.total.mean_kl == pytest.approx(hf.mean_kl, rel=1e-2)
    assert abs(built.total.agreement - hf.agreement) <= 0.01


def test_reference_artifact(tiny):
    r = verify(VerifyArgs(tiny["q4f32_2"], reference=tiny["q0f32"], max_chunks=1))
    assert r.reference_kind == "artifact" and "same source sha256" in r.source_check
    assert 0.5 <= r.total.agreement < 1.0 and r.total.mean_kl > 0


def test_decode_path_scores_what_generation_computes(tiny):
    """--path decode feeds one decode step a token: the same distributions as the prefill path within float noise
    on q0f32, and its logits are the ones Sequence.decode gives step by step."""
    from edgellm.device_runners.engine import Engine

    pre = verify(VerifyArgs(tiny["q0f32"], max_chunks=1, chunk_tokens=64))
    dec = verify(VerifyArgs(tiny["q0f32"], max_chunks=1, chunk_tokens=64, path="decode"))
    assert dec.path == "decode" and pre.path == "prefill" and dec.device.startswith("cpu:0")
    assert dec.total.positions == pre.total.positions == 63
    assert dec.total.agreement >= 0.99 and dec.total.mean_kl < 1e-6
    assert dec.total.perplexity == pytest.approx(pre.total.perplexity, rel=1e-4)
    eng = Engine(tiny["q4f32_2"], threads=2)
    ids = [5, 17, 3, 250, 9, 42, 7]
    got = eng.score_decode(ids)
    with eng.sequence() as seq:
        want = [seq.prefill(ids[:1])] + [seq.decode(t) for t in ids[1:]]
    assert got.shape == (len(ids), want[0].shape[-1])
    np.testing.assert_array_equal(got, np.stack(want))
    # the prefill path runs other kernels (the GEMM, the prefill attention): close, not bit-equal
    assert np.abs(eng.score(ids) - got).max() < 0.05 * np.abs(got).max()


def test_bad_path_is_one_line():
    with pytest.raises(VerifyError, match="path 'sideways' is unknown; use one of prefill, decode"):
        VerifyArgs(Path("x"), path="sideways")


# ---- the command: table, JSON and the exit-1 bounds -------------------------------------------------------------
def _cli(*args):
    return CliRunner().invoke(cli, ["verify", *map(str, args), "--max-chunks", "1"])


def test_cli_table_and_json(tiny):
    res = _cli(tiny["q0f32"], "--min-agreement", 99, "--max-ppl-increase", 0.01)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"verify {tiny['q0f32']} (q0f32, host)")
    total = next(x for x in lines if x.split()[:1] == ["total"]).split()
    assert total[1] == "256" and total[2] == "100.0%"  # tokens fed; 255 positions scored
    res = _cli(tiny["q4f32_2"], "--format", "json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["passed"] and data["scheme"] == "q4f32_2" and data["reference_kind"] == "transformers"
    assert len(data["chunks"]) == 1 and 0 < data["total"]["agreement"] < 1


def test_cli_exit_1_names_the_measure_value_and_bound(tiny):
    res = _cli(tiny["q4f32_2"], "--min-agreement", 100)
    assert res.exit_code == 1
    err = res.stderr.strip()
    assert "Traceback" not in err and [x for x in err.splitlines() if x.startswith("Error:")] == [err.splitlines()[-1]]
    assert "top-1 agreement" in err and "is below --min-agreement 100%" in err
    assert "total" in res.stdout  # the table is still printed
    res = _cli(tiny["q4f32_2"], "--max-ppl-increase", 0)
    assert res.exit_code == 1
    assert "perplexity increase" in res.stderr and "is above --max-ppl-increase 0%" in res.stderr
    res = _cli(tiny["q4f32_2"], "--min-agreement", 150)
    assert res.exit_code == 1 and "it is a percentage, 0 to 100" in res.stderr


def test_missing_or_changed_source_is_one_clear_line(tmp_path, checkpoints, tiny):
    from edgellm.artifact import MANIFEST, write_manifest

    # the session's q0f32 build of the tiny Llama, as compiled from a copy of its checkpoint (same bytes, so the same
    # sha256): the manifest's source path names the copy, which this test then changes and removes
    src = shutil.copytree(checkpoints["llama"], tmp_path / "llama-src")
    art = shutil.copytree(tiny["q0f32"], tmp_path / "art")
    m = json.loads((art / MANIFEST).read_text())
    assert m["model"]["source"] == str(checkpoints["llama"])
    m["model"]["source"] = str(src)
    write_manifest(art, m)
    assert verify(VerifyArgs(art, max_chunks=1)).total.agreement >= 0.99
    cfg = src / "config.json"
    cfg.write_text(cfg.read_text() + "\n")
    with pytest.raises(VerifyError, match=r"llama-src has changed since compile \(sha256 .*--reference"):
        verify(VerifyArgs(art, max_chunks=1))
    shutil.rmtree(src)
    with pytest.raises(VerifyError, match=r"llama-src is missing .*--reference MODEL_OR_ARTIFACT"):
        verify(VerifyArgs(art, max_chunks=1))
    res = _cli(art)
    assert res.exit_code == 1 and "is missing" in res.stderr and "Traceback" not in res.stderr
    # a reference given explicitly is used instead (here the original folder, identical to the copy compiled)
    res = _cli(art, "--reference", checkpoints["llama"])
    assert res.exit_code == 0, res.output
    assert "given with --reference" in res.stdout


# ---- the real model: the suite's floor for the default artifact --------------------------------------------------
@pytest.mark.slow
def test_default_smollm2_artifact_agrees_95_percent_on_builtin_text(compiled, hf_smollm2, smollm2_path):
    from edgellm.targets import resolve
    from edgellm.verify import TransformersScorer

    scheme = resolve("host").default_quant
    model, _ = hf_smollm2
    # the built-in text's first four chunks of 256 (~1,000 positions; the other half added ~20 s to CI, beside the
    # SmolLM2 compile this test shares): test_smollm2.py's teacher-forced check scores the same artifact against
    # transformers on another text
    r = verify(VerifyArgs(compiled("smollm2", scheme), max_chunks=4),
               loaded_reference=TransformersScorer(smollm2_path, model=model))
    print(r.table())
    assert r.text == "built-in" and r.total.positions > 1000
    assert r.total.agreement >= 0.95, f"{scheme}: top-1 agreement {100 * r.total.agreement:.1f}% < 95%"
