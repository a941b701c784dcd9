"""Sampling, streaming detokenization and stop strings (host-side numpy / tokenizers code)."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.device_runners.sampling import Sampler, SamplingParams
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


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(repetition_penalty=0)])
def test_invalid_sampling_params(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


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
