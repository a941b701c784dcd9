"""The Engine's step API (add_sequence / prefill / decode / decode_greedy / remove_sequence), its one context-window
rule (Engine.fits), and the two callers that must agree through it: Engine.generate_ids and the BatchScheduler.

One tiny Llama (q4f32_1, random weights) compiled with a 64-token context, 16-token prefill chunks and 4 sequence
slots; EOS is switched off on the engine so every generation runs to its limit.
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from edgellm.device_runners.engine import Engine, FinishReason, PromptError, PromptTooLongError

CONTEXT, CHUNK, PAGE = 64, 16, 16
A = [1, 5, 7, 100, 42, 9, 33, 250, 17, 64, 3, 201, 88, 5, 6, 7, 8, 9, 10, 11]  # 20 tokens: two prefill chunks
B = [2, 40, 41, 42, 43, 120, 7]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, checkpoints) -> Path:
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions

    out = tmp_path_factory.mktemp("steps") / "llama-steps"
    compile_model(CompileArgs(model=str(checkpoints["llama"]), output=out, quant="q4f32_1",
                              runtime=RuntimeOptions(CONTEXT, CHUNK, PAGE, 4)))
    return out


@pytest.fixture(scope="module")
def engine(artifact) -> Engine:
    e = Engine(artifact, threads=2)
    e.eos_ids = set()  # random weights: no generation may end early on an EOS it happened to pick
    return e


def _alone(engine: Engine, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy tokens and the logits behind them, one sequence through the step API."""
    seq = engine.add_sequence()
    try:
        logits = [engine.prefill(seq, prompt)]
        toks = [int(logits[-1].argmax())]
        for _ in range(n - 1):
            logits.append(engine.decode([seq], [toks[-1]])[0])
            toks.append(int(logits[-1].argmax()))
        return toks, logits
    finally:
        engine.remove_sequence(seq)


@pytest.mark.parametrize("batched", [True, False])
def test_two_interleaved_sequences_equal_each_alone(engine, batched):
    """A prefilled chunk by chunk between B's steps, both decoded together: each gets the tokens (and, to float
    noise, the logits) it gets alone."""
    n = 12
    want_a, logits_a = _alone(engine, A, n)
    want_b, logits_b = _alone(engine, B, n)
    a, b = engine.add_sequence(), engine.add_sequence()
    try:
        lb = engine.prefill(b, B)
        engine.prefill(a, A[:CHUNK])  # one chunk, then B decodes before A's second chunk
        got_b = [int(lb.argmax())]
        got_b.append(engine.decode_greedy([b], [got_b[-1]])[0])
        la = engine.prefill(a, A[CHUNK:])
        got_a = [int(la.argmax())]
        np.testing.assert_allclose(la, logits_a[0], rtol=0, atol=1e-4 * np.abs(logits_a[0]).max())
        for step in range(n - 2):
            both = engine.decode([a, b], [got_a[-1], got_b[-1]], batched=batched)
            assert both.shape == (2, logits_a[0].shape[0])
            tol = 1e-3 * np.abs(logits_a[step + 1]).max()
            np.testing.assert_allclose(both[0], logits_a[step + 1], rtol=0, atol=tol)
            got_a.append(int(both[0].argmax()))
            got_b.append(int(both[1].argmax()))
        got_a += engine.decode_greedy([a], [got_a[-1]], batched=batched)
        assert engine.sequence_length(a) == len(A) + n - 1 and engine.sequence_length(b) == len(B) + n - 1
    finally:
        engine.remove_sequence(a)
        engine.remove_sequence(b)
    assert got_a == want_a and got_b == want_b


def test_decode_greedy_is_the_argmax_of_decode(engine):
    toks, _ = _alone(engine, B, 6)
    seq = engine.add_sequence()
    try:
        got = [int(engine.prefill(seq, B).argmax())]
        for _ in range(5):
            got += engine.decode_greedy([seq], [got[-1]])
    finally:
        engine.remove_sequence(seq)
    assert got == toks
    assert list(engine.generate_ids(B, 6)) == toks
    assert engine.last_stats.finish_reason == FinishReason.LENGTH == "length"


def test_context_rule_at_its_boundary(engine):
    ctx = engine.context_window
    assert ctx == CONTEXT
    assert engine.fits(ctx - 1) and not engine.fits(ctx) and not engine.fits(0)
    assert engine.fits(ctx, room=0) and not engine.fits(ctx + 1, room=0)
    assert engine.max_new_tokens(ctx - 1) == 1 and engine.max_new_tokens(ctx + 5) == 0
    engine.check_prompt(ctx - 1)
    with pytest.raises(PromptTooLongError, match=f"prompt has {ctx} tokens .* context window is {ctx}"):
        engine.check_prompt(ctx)
    with pytest.raises(PromptError, match="empty"):
        engine.check_prompt(0)
    # a prompt one short of the window generates exactly max_new_tokens and ends with "context"
    prompt = [(7 * i) % 200 + 3 for i in range(ctx - 3)]
    toks = list(engine.generate_ids(prompt, 100))
    assert len(toks) == engine.max_new_tokens(len(prompt)) == 3
    assert engine.last_stats.finish_reason == FinishReason.CONTEXT
    with pytest.raises(PromptTooLongError):
        list(engine.generate_ids(list(range(1, ctx + 1)), 4))
    # the step API enforces the same rule: a full sequence takes no more tokens
    seq = engine.add_sequence()
    try:
        engine.prefill(seq, prompt + [5, 6])  # ctx - 1 tokens
        with pytest.raises(PromptTooLongError, match=f"context window is {ctx}"):
            engine.decode([seq], [1])
        with pytest.raises(PromptTooLongError):
            engine.prefill(seq, [1])
        assert engine.sequence_length(seq) == ctx - 1  # nothing was appended by the refused calls
    finally:
        engine.remove_sequence(seq)
    assert engine.score(list(range(1, ctx + 1))).shape[0] == ctx  # scoring fills the whole window (room=0)


def test_remove_sequence_frees_its_pages(engine):
    total = engine.total_pages
    assert engine.free_pages() == total and engine.pages_in_use() == 0
    a, b = engine.add_sequence(), engine.add_sequence()
    engine.prefill(a, A + B + A)  # 47 tokens: 3 pages
    engine.prefill(b, B)  # 7 tokens: 1 page
    assert engine.pages_in_use() == math.ceil(47 / PAGE) + 1
    engine.remove_sequence(a)
    assert engine.pages_in_use() == 1
    with pytest.raises(ValueError, match=f"sequence {a} is not in the KV cache"):
        engine.decode([a], [1])
    engine.remove_sequence(b)
    assert engine.free_pages() == total and not engine._shapes
    with engine.sequence() as seq:
        seq.prefill(A)
        assert seq.length == len(A) and engine.pages_in_use() == 2
    assert engine.pages_in_use() == 0


def test_decode_argument_errors(engine):
    with engine.sequence() as seq:
        seq.prefill([1])
        with pytest.raises(ValueError, match="one token per sequence"):
            engine.decode([seq.id], [1, 2])


def test_scheduler_and_generate_ids_agree_on_tokens_and_finish_reason(engine):
    """The same greedy prompts through the batch scheduler (batched and not) and through generate_ids: the same
    tokens, and the same reason at the context end (a reason the OpenAI formatting reports as "length")."""
    from edgellm.device_runners.batch import BatchScheduler, Finished, GenRequest
    from edgellm.serve.openai_format import openai_finish_reason

    prompts = [A, B, [(7 * i) % 200 + 3 for i in range(CONTEXT - 6)]]
    want = [list(engine.generate_ids(p, 10)) for p in prompts]
    reasons = []
    for p in prompts:
        list(engine.generate_ids(p, 10))
        reasons.append(engine.last_stats.finish_reason)
    assert reasons == ["length", "length", "context"] and len(want[2]) == 6
    for batch_min in (1, 99):
        sched = BatchScheduler(engine, batch_min=batch_min).start()
        try:
            done = threading.Semaphore(0)
            events: list[list] = [[] for _ in prompts]
            for i, p in enumerate(prompts):
                def emit(ev, i=i):
                    events[i].append(ev)
                    if isinstance(ev, Finished):
                        done.release()
                sched.submit(GenRequest(list(p), 10, emit=emit))
            for _ in prompts:
                assert done.acquire(timeout=60)
            s = sched.stats()
        finally:
            sched.stop()
        assert [[e.token_id for e in ev[:-1]] for ev in events] == want
        assert [ev[-1].reason for ev in events] == reasons
        assert (s.batch_decode_calls_total > 0) == (batch_min == 1)
        assert (s.kv_pages_in_use, s.kv_pages_reserved, dict(s.finished)) == (0, 0, {"length": 2, "context": 1})
    assert [openai_finish_reason(r) for r in reasons] == ["length", "length", "length"]
    assert openai_finish_reason(FinishReason.STOP) == "stop"


def test_scheduler_reserves_pages_by_the_context_rule(engine):
    from edgellm.device_runners.batch import BatchScheduler, GenRequest

    sched = BatchScheduler(engine, batch_min=1)
    assert sched.pages_needed(10, 5) == 1 and sched.pages_needed(10, 7) == 2
    assert sched.pages_needed(CONTEXT - 2, 1000) == math.ceil(CONTEXT / PAGE)  # capped by max_new_tokens
    with pytest.raises(PromptTooLongError):
        sched.check(GenRequest(list(range(1, CONTEXT + 1)), 1))


def test_scheduler_and_server_touch_no_private_engine_member():
    """batch.py and serve/ drive the Engine through its public API only."""
    root = Path(__file__).resolve().parents[1] / "edgellm"
    private = re.compile(r"\b(?:engine|e|eng|self\.engine)\._[a-z]")
    hits = [f"{p.relative_to(root)}:{n}: {line.strip()}"
            for p in [root / "device_runners" / "batch.py", *sorted((root / "serve").glob("*.py"))]
            for n, line in enumerate(p.read_text().splitlines(), 1) if private.search(line)]
    assert hits == []


@pytest.mark.parametrize("bad", [-1, "vocab", 2.0, True, "7"])
def test_token_ids_outside_the_vocabulary_are_refused_before_anything_runs(engine, bad):
    """prefill, decode, greedy_chain and score refuse an id outside [0, vocab_size) (or not an integer) in one line
    naming it, before any kernel indexes the embedding with it; the sequence is left as it was."""
    bad = engine.vocab_size if bad == "vocab" else bad
    seq = engine.add_sequence()
    try:
        engine.prefill(seq, [1, 2])
        calls = [lambda: engine.prefill(seq, [3, bad]), lambda: engine.decode([seq], [bad]),
                 lambda: engine.decode_greedy([seq], [bad]), lambda: next(engine.greedy_chain(seq, bad, 3)),
                 lambda: engine.score([1, bad])]
        for call in calls:
            with pytest.raises(ValueError, match=r"token id .* is not in this model's vocabulary \[0, \d+\)") as e:
                call()
            assert "\n" not in str(e.value)
            assert engine.sequence_length(seq) == 2
        assert len(list(engine.greedy_chain(seq, engine.vocab_size - 1, 3))) == 3  # the last id is fine
    finally:
        engine.remove_sequence(seq)

