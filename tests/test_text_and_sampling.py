"""Sampling, streaming detokenization and stop strings (host-side numpy / tokenizers code)."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.device_runners.sampling import GREEDY_BELOW, Sampler, SamplingParams
from edgellm.device_runners.text import StopMatcher, StreamDecoder, TextCodec


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, -1.0, 2.9], np.float32)
    assert Sampler(SamplingParams())(logits, []) == 1


def test_top_k_1_is_greedy_at_any_temperature():
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.standard_normal(50).astype(np.float32)
        assert Sampler(SamplingParams(temperature=5.0, top_k=1, seed=1))(logits, []) == int(np.argmax(logits))


def test_seed_reproducible_and_distribution_follows_softmax():
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    draws = [Sampler(SamplingParams(temperature=1.0, seed=s))(logits, []) for s in range(3000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.04)
    a = Sampler(SamplingParams(temperature=1.0, seed=42))
    b = Sampler(SamplingParams(temperature=1.0, seed=42))
    assert [a(logits, []) for _ in range(20)] == [b(logits, []) for _ in range(20)]


def test_top_p_keeps_smallest_nucleus():
    logits = np.log(np.array([0.6, 0.25, 0.1, 0.05], np.float32))
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=0))
    assert set(s(logits, []) for _ in range(500)) == {0, 1}


def test_repetition_penalty_demotes_seen_tokens():
    logits = np.array([2.0, 1.9, -1.0], np.float32)
    assert Sampler(SamplingParams(repetition_penalty=1.5))(logits, [0]) == 1


def test_repetition_penalty_negative_logits_pushed_down():
    logits = np.array([-1.0, -1.2], np.float32)
    # seen token 0 goes from -1.0 to -1.5, below token 1
    assert Sampler(SamplingParams(repetition_penalty=1.5))(logits, [0]) == 1


@pytest.mark.parametrize("bad", [
    dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(repetition_penalty=0),
    dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature=10**400),
    dict(top_p=float("nan")), dict(top_p=1.5), dict(top_k=1.5), dict(top_k=True),
    dict(repetition_penalty=float("nan")), dict(repetition_penalty=float("inf")), dict(repetition_penalty=-1),
    dict(seed=-1), dict(seed=2**64), dict(seed=1.5), dict(seed=10**5000), dict(stop=[""]), dict(stop="x"),
])
def test_invalid_sampling_params(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**bad)


@pytest.mark.parametrize("t", [5e-324, 1e-320, 1e-300, 1e-8, GREEDY_BELOW / 2])
def test_tiny_temperatures_are_greedy(t):
    """logits / 1e-320 overflows to inf and the softmax to NaN ("Probabilities contain NaN"): greedy instead."""
    rng = np.random.default_rng(0)
    p = SamplingParams(temperature=t, seed=3)
    assert p.greedy
    for _ in range(10):
        logits = rng.standard_normal(64).astype(np.float32) * 10
        assert Sampler(p)(logits, []) == int(np.argmax(logits))


def test_sampling_is_safe_for_every_accepted_value():
    """Every combination of edge values samples a token in range with no floating-point error raised (np.errstate
    'raise' turns any NaN-producing operation into an exception), and never a token masked to -inf."""
    logits = np.array([1e30, -1e30, 3.0, -np.inf, 0.0, 2.5, np.nan, -5.0], np.float32)
    finite = {i for i, v in enumerate(logits) if np.isfinite(v)}
    for t in (GREEDY_BELOW, 1e-3, 1.0, 100.0, 1e300):
        for top_p in (1e-300, 0.5, 1.0):
            for top_k in (0, 1, 3, 100):
                for rp in (1e-300, 0.5, 1.0, 1e300):
                    p = SamplingParams(temperature=t, top_p=top_p, top_k=top_k, repetition_penalty=rp, seed=1)
                    with np.errstate(invalid="raise"):
                        tok = Sampler(p)(logits, [0, 2, 5, 99])
                    assert tok in finite, (t, top_p, top_k, rp, tok)
    assert Sampler(SamplingParams(temperature=1.0))(np.full(4, -np.inf, np.float32), []) in range(4)
    huge = np.array([3e38, 3e38, 1.0], np.float32)  # near float32 max, at the smallest sampled temperature
    assert Sampler(SamplingParams(temperature=GREEDY_BELOW, seed=0))(huge, []) in (0, 1)


def test_cli_run_with_edge_temperatures(compiled):
    """`edgellm run --temperature 1e-320` answers as greedy; `nan`, `inf` and `--seed -1` are one-line errors."""
    from click.testing import CliRunner

    from edgellm.cli import cli

    art = str(compiled("llama", "q4f32_1"))
    runner = CliRunner()
    greedy = runner.invoke(cli, ["run", art, "hello", "-n", "6", "--no-chat"])
    tiny = runner.invoke(cli, ["run", art, "hello", "-n", "6", "--no-chat", "--temperature", "1e-320", "--seed", "1"])
    assert greedy.exit_code == 0 and tiny.exit_code == 0, tiny.output
    assert tiny.stdout == greedy.stdout
    for args, words in ((["--temperature", "nan"], "temperature must be a finite number"),
                        (["--temperature", "inf"], "temperature must be a finite number"),
                        (["--top-p", "nan"], "top_p"), (["--seed", "-1"], "seed must be an integer")):
        r = runner.invoke(cli, ["run", art, "hello", "-n", "2", *args])
        assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, (args, r.output)


@pytest.fixture(scope="module")
def codec(tmp_path_factory, checkpoints):
    return TextCodec(checkpoints["llama"], add_bos=False, bos_id=1)


def test_stream_decoder_never_splits_utf8(codec):
    text = "café naïve 日本 🙂 hello"  # 日本 and 🙂 are not in the tiny vocabulary: one token per byte
    ids = codec.encode(text)
    dec = StreamDecoder(codec)
    pieces = [dec.push(t) for t in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # byte-level: 日 is 3 byte tokens; the pushes before its last byte must have been held back
    assert "" in pieces[:-1]


def test_stop_matcher_holds_back_prefixes():
    m = StopMatcher(["\nUser:", "###"])
    out = "".join(m.feed(p) for p in ["Hello", " there\nUs", "er: more"])
    assert m.stopped and out == "Hello there"
    m = StopMatcher(["###"])
    assert m.feed("a#") == "a" and m.feed("b") == "#b" and m.flush() == ""
    m = StopMatcher([])
    assert m.feed("x") == "x"


def test_chat_template_renders(codec):
    s = codec.apply_chat_template([{"role": "user", "content": "hi"}])
    assert s == "<s>user: hi\nassistant:"
