"""[serve]: the OpenAI-compatible server, tested against real server processes on free loopback ports.

One tiny Llama checkpoint (random weights) is compiled with max_batch 16 and a 4096-token context. Its tokenizer has
`<think>` / `</think>` as added tokens and its chat template is Qwen3-style: the generation prompt opens a think
block unless `enable_thinking` is false, which closes it in the prompt. The random model's text is noise, so the
reasoning tests compare the server's reasoning/content split against the raw completion of the same token ids
(same seed, same logit_bias), and `logit_bias` makes `</think>` likely enough to appear.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from edgellm.serve.reasoning import ReasoningParser, split_reasoning, starts_in_reasoning  # noqa: E402
from edgellm.serve.security import (AuthError, HmacVerifier, check_api_key, httpx_signer, sign,  # noqa: E402
                                    signed_headers)

THINK_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)
CONTEXT = 4096
EOS = 2
SECRET, KEY = "test-secret", "test-key"


# ---- fixtures: a thinking checkpoint, its artifact, server processes ------------------------------------------------
def _think_tokenizer(out: Path, vocab: int = 320) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 2, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog. café naïve 東京"] * 20, trainer)
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    assert tok.get_vocab_size() <= vocab
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": THINK_TEMPLATE}))


@pytest.fixture(scope="session")
def serve_artifact(tmp_path_factory, checkpoints) -> Path:
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions

    root = tmp_path_factory.mktemp("serve")
    ckpt = root / "think-llama"
    shutil.copytree(checkpoints["llama"], ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["max_position_embeddings"] = CONTEXT
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _think_tokenizer(ckpt)
    out = root / "think-llama-serve"
    compile_model(CompileArgs(model=str(ckpt), output=out, quant="q4f32_1", runtime=RuntimeOptions(CONTEXT, 64, 16, 16)))
    return out


@pytest.fixture(scope="session")
def codec(serve_artifact):
    from edgellm.device_runners.text import TextCodec

    return TextCodec(serve_artifact / "tokenizer")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProc:
    """`edgellm serve` in a subprocess on a free port, up once /health answers 200 (subclasses change `command`)."""

    def __init__(self, artifact: Path, log_path: Path, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(self.command(artifact, extra), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"server did not come up in 90 s:\n{log_path.read_text()}")

    def command(self, artifact: Path, extra: tuple[str, ...]) -> list[str]:
        return [sys.executable, "-m", "edgellm.cli", "serve", str(artifact), "--port", str(self.port), "--threads", "2",
                "--log-level", "warning", *extra]

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, val = line.rsplit(" ", 1)
                out[name] = float(val)
        return out

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def server(serve_artifact, tmp_path_factory):
    s = ServerProc(serve_artifact, tmp_path_factory.mktemp("log") / "open.log")
    yield s
    s.close()
    assert s.proc.returncode in (0, -15), s.log_path.read_text()


@pytest.fixture(scope="module")
def secure_server(serve_artifact, tmp_path_factory):
    s = ServerProc(serve_artifact, tmp_path_factory.mktemp("log") / "secure.log", "--api-key", KEY, "--hmac-secret",
                   SECRET, "--hmac-window", "60", "--max-active", "1", "--max-queue", "0", "--max-body-bytes", "4096")
    yield s
    s.close()


def _client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60, **kw)


def _chat_ids(codec, messages, **kw) -> list[int]:
    return codec.encode(codec.apply_chat_template(messages, add_generation_prompt=True, **kw), add_bos=False)


MSG = [{"role": "user", "content": "hello world"}]


# ---- units: reasoning parser, signatures ----------------------------------------------------------------------------
@pytest.mark.parametrize("text,in_reasoning,expected", [
    ("plain answer", False, ("", "plain answer")),
    ("<think>plan</think>answer", False, ("plan", "answer")),
    ("a<think>b</think>c<think>d</think>e", False, ("bd", "ace")),
    ("still thinking", True, ("still thinking", "")),
    ("why\n</think>\n\nbecause", True, ("why\n", "\n\nbecause")),
    ("x</think>y</think>z", True, ("x", "y</think>z")),  # a stray end tag in content is text
    ("ends with a partial </thi", True, ("ends with a partial </thi", "")),
    ("<think>unclosed", False, ("unclosed", "")),
    ("< think> <thinking> </", False, ("", "< think> <thinking> </")),
])
def test_reasoning_parser_any_piece_boundaries(text, in_reasoning, expected):
    assert split_reasoning(text, in_reasoning) == expected
    for cut in range(len(text) + 1):  # every two-piece split, and one character at a time
        p = ReasoningParser(in_reasoning)
        parts = [p.feed(text[:cut]), p.feed(text[cut:]), p.flush()]
        assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == expected, cut
    p = ReasoningParser(in_reasoning)
    parts = [p.feed(ch) for ch in text] + [p.flush()]
    assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == expected


def test_starts_in_reasoning_reads_the_prompt():
    assert starts_in_reasoning("user: hi\nassistant:<think>\n")
    assert not starts_in_reasoning("user: hi\nassistant:<think>\n\n</think>\n\n")
    assert not starts_in_reasoning("user: hi\nassistant:")
    assert starts_in_reasoning("<think>a</think> then <think>")


def test_hmac_verifier_window_replay_and_bad_signatures():
    v = HmacVerifier(SECRET, window_s=60)
    now = 1_700_000_000.0
    body = b'{"x": 1}'
    P, C = "/v1/completions", "/v1/chat/completions"
    h = signed_headers(SECRET, "POST", P, body, now=now)
    v.verify(h["X-Timestamp"], h["X-Signature"], "POST", P, body, now=now + 5)
    with pytest.raises(AuthError, match="replayed"):
        v.verify(h["X-Timestamp"], h["X-Signature"], "POST", P, body, now=now + 6)
    h2 = signed_headers(SECRET, "POST", P, body, now=now + 1)
    with pytest.raises(AuthError, match="invalid X-Signature"):
        v.verify(h2["X-Timestamp"], h2["X-Signature"], "POST", P, body + b" ", now=now + 1)  # body changed
    with pytest.raises(AuthError, match="invalid X-Signature"):  # the same body sent to another route
        v.verify(h2["X-Timestamp"], h2["X-Signature"], "POST", C, body, now=now + 1)
    with pytest.raises(AuthError, match="invalid X-Signature"):  # or with another method
        v.verify(h2["X-Timestamp"], h2["X-Signature"], "PUT", P, body, now=now + 1)
    with pytest.raises(AuthError, match="invalid X-Signature"):  # the separators cannot be shifted into the path
        v.verify(h2["X-Timestamp"], sign(SECRET, h2["X-Timestamp"], "POST", P + "\n", body[1:]), "POST", P,
                 body, now=now + 1)
    with pytest.raises(AuthError, match="invalid X-Signature"):
        v.verify(h2["X-Timestamp"], sign("other", h2["X-Timestamp"], "POST", P, body), "POST", P, body, now=now + 1)
    with pytest.raises(AuthError, match="window"):
        v.verify(h2["X-Timestamp"], h2["X-Signature"], "POST", P, body, now=now + 1000)
    with pytest.raises(AuthError, match="unix seconds"):
        v.verify("yesterday", h2["X-Signature"], "POST", P, body, now=now)
    with pytest.raises(AuthError, match="missing"):
        v.verify(None, None, "POST", P, body, now=now)
    v.verify(h2["X-Timestamp"], h2["X-Signature"].upper(), "POST", P, body, now=now + 2)  # hex is case-insensitive
    with pytest.raises(AuthError):
        check_api_key(KEY, "Bearer nope")
    with pytest.raises(AuthError):
        check_api_key(KEY, None)
    check_api_key(KEY, f"Bearer {KEY}")
    with pytest.raises(ValueError, match="empty"):
        HmacVerifier("")


def test_scheduler_queue_full_and_cancel_frees_pages(serve_artifact):
    """In process: one slot, no queue -> the second request is refused; a cancel frees the sequence's pages."""
    from edgellm.device_runners.batch import BatchScheduler, Finished, GenRequest, QueueFullError, Token
    from edgellm.device_runners.engine import Engine

    engine = Engine(serve_artifact, threads=2)
    sched = BatchScheduler(engine, max_active=1, max_queue=0).start()
    try:
        got = threading.Event()
        events = []

        def emit(ev):  # a slow consumer (2 ms a token), so the long request is surely still running below
            events.append(ev)
            got.set()
            time.sleep(0.002)

        long = GenRequest([5, 6, 7], 4000, logit_bias={EOS: -100.0}, emit=emit)
        sched.submit(long)
        assert got.wait(10)
        with pytest.raises(QueueFullError, match="max-queue"):
            sched.submit(GenRequest([5, 6], 4))
        assert sched.stats().kv_pages_in_use > 0
        sched.cancel(long)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not isinstance(events[-1], Finished):
            time.sleep(0.01)
        assert isinstance(events[-1], Finished) and events[-1].reason == "cancelled"
        assert isinstance(events[0], Token)
        s = sched.stats()
        assert (s.active_sequences, s.kv_pages_in_use, s.kv_pages_reserved) == (0, 0, 0)
        assert s.rejected_total == 1
    finally:
        sched.stop()


def _run_all(sched, reqs, timeout=30.0) -> list[list[int]]:
    from edgellm.device_runners.batch import Failed, Finished, Token

    outs = [[] for _ in reqs]
    done = threading.Semaphore(0)

    def emit_for(i, prev):
        def emit(ev):
            prev(ev)
            if isinstance(ev, Token):
                outs[i].append(ev.token_id)
            elif isinstance(ev, (Finished, Failed)):
                done.release()
        return emit

    for i, r in enumerate(reqs):
        r.emit = emit_for(i, r.emit)
        sched.submit(r)
    for _ in reqs:
        assert done.acquire(timeout=timeout)
    return outs


def test_batch_decode_and_per_sequence_decode_agree(serve_artifact):
    """The same 6 concurrent greedy requests, decoded always batched and never batched, give the same tokens."""
    from edgellm.device_runners.batch import BatchScheduler, GenRequest
    from edgellm.device_runners.engine import Engine

    engine = Engine(serve_artifact, threads=2)
    results = []
    for batch_min, max_active in ((1, None), (99, None), (1, 2)):  # last: 2 slots, so 4 requests wait their turn
        sched = BatchScheduler(engine, max_active=max_active, batch_min=batch_min).start()
        try:
            reqs = [GenRequest([5 + i, 6, 7 + 2 * i] * (1 + i), 20, logit_bias={EOS: -100.0}) for i in range(6)]
            results.append(_run_all(sched, reqs))
            s = sched.stats()
            assert (s.batch_decode_calls_total > 0) == (batch_min == 1) and s.kv_pages_in_use == 0
            assert s.finished["length"] == 6
        finally:
            sched.stop()
    assert results[0] == results[1] == results[2] and all(len(o) == 20 for o in results[0])


def test_requests_wait_for_kv_pages(serve_artifact):
    """With pages for only two requests (of the 16 slots), the others wait, and every one finishes correctly."""
    from edgellm.device_runners.batch import BatchScheduler, GenRequest

    from edgellm.device_runners.engine import Engine

    engine = Engine(serve_artifact, threads=2)
    sched = BatchScheduler(engine, batch_min=1)
    need = sched.pages_needed(3, 40)
    sched.total_pages = 2 * need  # as if the cache were small: the reservation, not the slot count, limits
    with pytest.raises(ValueError, match="KV pages"):
        sched.submit(GenRequest([5, 6, 7], 16 * 3 * need))
    sched.start()
    peak = []
    try:
        reqs = [GenRequest([5 + i, 6, 7], 40, logit_bias={EOS: -100.0}) for i in range(5)]
        for r in reqs:
            r.emit = lambda ev, r=r: peak.append(sched.stats().active_sequences)
        alone = BatchScheduler(engine, batch_min=1).start()
        try:
            want = _run_all(alone, [GenRequest(list(r.ids), 40, logit_bias={EOS: -100.0}) for r in reqs])
        finally:
            alone.stop()
        got = _run_all(sched, reqs)
    finally:
        sched.stop()
    assert got == want
    assert max(peak) == 2 and sched.stats().kv_pages_reserved == 0


def test_engine_side_failures_stay_with_their_request(serve_artifact):
    """A request that fails on the engine thread, at admission or while sampling, is answered alone (Failed) and
    its sequence and pages are freed; a request decoding beside it gives the tokens it gives alone; /health turns
    503 when the page accounting is off. (Such requests can only be made by editing parameters after validation:
    the server refuses them up front; tests/security/test_server_abuse.py.)"""
    from fastapi.testclient import TestClient

    from edgellm.device_runners.batch import BatchScheduler, Failed, Finished, GenRequest
    from edgellm.device_runners.engine import Engine
    from edgellm.device_runners.sampling import SamplingParams
    from edgellm.serve.app import ServeArgs, Server

    engine = Engine(serve_artifact, threads=2)
    sched = BatchScheduler(engine, batch_min=1).start()
    try:
        want = _run_all(sched, [GenRequest([5, 6, 7], 60, logit_bias={EOS: -100.0})])[0]
        bad_seed = SamplingParams(temperature=1.0)
        bad_seed.seed = -1  # what `"seed": -1` used to reach the engine as
        with pytest.raises(ValueError, match="seed"):  # now refused on the caller's thread
            sched.submit(GenRequest([5, 6], 4, bad_seed))
        at_sampling = SamplingParams(temperature=1.0)
        got = threading.Event()
        events: dict[str, list] = {"long": [], "admission": [], "sampling": []}

        def emit_long(ev):
            events["long"].append(ev)
            got.set()

        long = GenRequest([5, 6, 7], 60, logit_bias={EOS: -100.0}, emit=emit_long)
        sched.submit(long)
        assert got.wait(10)
        add_sequence = engine.add_sequence

        def fail_once():  # a fault at admission, after the request left the queue (where seed=-1 used to fail)
            engine.add_sequence = add_sequence
            raise RuntimeError("injected: no sequence")

        engine.add_sequence = fail_once
        sched.submit(GenRequest([8, 9], 8, emit=events["admission"].append))
        with sched._cond:  # the worker cannot admit it before the field is set
            sched.submit(GenRequest([8, 9, 10], 8, at_sampling, emit=events["sampling"].append))
            at_sampling.top_k = "x"  # set after submit's checks: fails at its first sampled token, after prefill
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (events["long"] and isinstance(events["long"][-1], Finished)):
            time.sleep(0.01)
        assert [type(e) for e in events["admission"]] == [Failed] and "injected" in str(events["admission"][0].error)
        assert [type(e) for e in events["sampling"]] == [Failed] and "sampling failed" in str(events["sampling"][0].error)
        assert isinstance(events["long"][-1], Finished) and events["long"][-1].reason == "length"
        assert [e.token_id for e in events["long"][:-1]] == want
        s = sched.stats()
        assert (s.active_sequences, s.kv_pages_reserved, s.kv_pages_in_use, s.leak) == (0, 0, 0, None)
        assert s.finished["error"] == 2
        assert not engine._shapes  # ShapeTuples cached per sequence go with it (they grew per served request)
        assert _run_all(sched, [GenRequest([5, 6, 7], 60, logit_bias={EOS: -100.0})])[0] == want
        sched._reserved += 3  # a leak as the seed=-1 bug left one
        assert "3 KV pages reserved" in sched.stats().leak
    finally:
        sched.stop()

    server = Server(ServeArgs(serve_artifact, batch_min=1), engine=engine)
    with TestClient(server.app) as client:
        h = client.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["kv_pages_reserved"] == 0
        server.scheduler._reserved += 3
        h = client.get("/health")
        assert h.status_code == 503 and h.json()["status"] == "error" and "reserved" in h.json()["problem"]
        server.scheduler._reserved -= 3


# ---- the open server ------------------------------------------------------------------------------------------------
def test_models_health_metrics(server, serve_artifact):
    client = _client(server)
    models = client.models.list().data
    assert [m.id for m in models] == [serve_artifact.name]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    m = server.metrics()
    for name in ("edgellm_prefill_tokens_per_second", "edgellm_decode_tokens_per_second", "edgellm_queue_length",
                 "edgellm_kv_pages_in_use", "edgellm_kv_pages_total"):
        assert name in m
    assert m["edgellm_kv_pages_total"] >= 16 * CONTEXT // 16


def test_openai_client_stream_and_not(server, codec):
    client = _client(server)
    kw = dict(model="any", messages=MSG, max_tokens=12, temperature=0, extra_body={"enable_thinking": False})
    full = client.chat.completions.create(**kw)
    msg = full.choices[0].message
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == msg.content and msg.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    n_prompt = len(_chat_ids(codec, MSG, enable_thinking=False))
    assert full.usage.prompt_tokens == n_prompt
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert full.usage.total_tokens == n_prompt + full.usage.completion_tokens
    if full.choices[0].finish_reason == "length":
        assert full.usage.completion_tokens == 12


def test_completions_stop_max_tokens_seed_top_p(server):
    client = _client(server)
    base = dict(model="any", prompt="the quick brown fox", max_tokens=20, logit_bias={str(EOS): -100})
    greedy = client.completions.create(**base, temperature=0)
    text = greedy.choices[0].text
    assert greedy.usage.completion_tokens == 20 and greedy.choices[0].finish_reason == "length"
    short = client.completions.create(**{**base, "max_tokens": 3}, temperature=0)
    assert short.usage.completion_tokens == 3 and text.startswith(short.choices[0].text)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    stopped = client.completions.create(**base, temperature=0, stop=[stop])
    assert stopped.choices[0].text == text[: text.find(stop)] and stopped.choices[0].finish_reason == "stop"
    a = client.completions.create(**base, temperature=1.0, seed=7)
    b = client.completions.create(**base, temperature=1.0, seed=7)
    others = {client.completions.create(**base, temperature=1.0, seed=s).choices[0].text for s in (8, 9, 10)}
    assert a.choices[0].text == b.choices[0].text
    assert others != {a.choices[0].text}
    nucleus = client.completions.create(**base, temperature=1.0, top_p=1e-6, seed=3)  # keeps only the top token
    assert nucleus.choices[0].text == text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**base, temperature=0, stream=True))
    assert streamed == text


def test_16_concurrent_streams_equal_single_requests(server, serve_artifact, codec):
    prompts = [[{"role": "user", "content": f"the lazy dog {i} " * (1 + i % 4)}] for i in range(16)]
    kw = dict(model="any", max_tokens=24, temperature=0, logit_bias={str(EOS): -100},
              extra_body={"enable_thinking": False})
    client = _client(server)
    single = [client.chat.completions.create(messages=p, **kw).choices[0].message.content for p in prompts]

    def stream(p):
        c = _client(server)
        return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(messages=p, stream=True, **kw))

    before = server.metrics()["edgellm_decode_steps_total"]
    with concurrent.futures.ThreadPoolExecutor(16) as ex:
        together = list(ex.map(stream, prompts, timeout=120))
    assert together == single
    steps = server.metrics()["edgellm_decode_steps_total"] - before
    assert steps < 16 * 23  # decode steps were shared across sequences (batched), not one per token per request

    # and both equal the engine decoding each prompt alone (single-sequence `decode`, no server)
    from edgellm.device_runners.engine import Engine

    engine = Engine(serve_artifact, threads=2)
    for p, got in zip(prompts[:4], together[:4]):
        out = []
        with engine.sequence() as seq:
            logits = seq.prefill(_chat_ids(codec, p, enable_thinking=False))
            for _ in range(24):
                logits[EOS] -= 100.0  # the requests' logit_bias
                out.append(int(logits.argmax()))
                logits = seq.decode(out[-1])
        assert codec.decode(out) == got


def test_bad_requests_are_400_with_a_message(server):
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, content=b'{"messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(url, json={"messages": [{"role": "user", "content": "hello " * 6000}], "max_tokens": 4})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and f"context window is {CONTEXT}" in err["message"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hello " * 6000})
    assert r.status_code == 400 and "context window" in r.json()["error"]["message"]
    for body, param in [({"messages": "hi"}, "messages"), ({"messages": MSG, "n": 2}, "n"),
                        ({"messages": MSG, "temperature": 9}, "temperature"),
                        ({"messages": MSG, "max_tokens": 0}, "max_tokens"), ([1, 2], None)]:
        r = httpx.post(url, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, body
    r = httpx.post(url, content=b"x" * (2 << 20))
    assert r.status_code == 413
    assert httpx.get(server.url + "/health").status_code == 200  # still up


def test_disconnect_mid_stream_frees_pages(server):
    before = server.metrics()
    body = {"model": "any", "messages": MSG, "max_tokens": CONTEXT, "temperature": 0, "stream": True,
            "logit_bias": {str(EOS): -100}}
    with httpx.Client(timeout=30) as c, c.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        data = [line for line in (next(lines) for _ in range(10)) if line.startswith("data:")]
        assert len(data) >= 3
        during = server.metrics()
        assert during["edgellm_active_sequences"] == 1 and during["edgellm_kv_pages_in_use"] > 0
    # leaving the block closed the connection mid-stream
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = server.metrics()
        if after["edgellm_kv_pages_in_use"] == 0:
            break
        time.sleep(0.05)
    assert after["edgellm_active_sequences"] == 0 and after["edgellm_kv_pages_in_use"] == 0
    key = 'edgellm_requests_finished_total{reason="cancelled"}'
    assert after[key] == before[key] + 1
    gen = after["edgellm_decode_tokens_total"] - before["edgellm_decode_tokens_total"]
    assert gen < CONTEXT - 100  # stopped long before max_tokens


def test_disconnect_while_waiting_for_a_full_answer_frees_the_sequence(server):
    key = 'edgellm_requests_finished_total{reason="cancelled"}'
    before = server.metrics()
    body = {"model": "any", "messages": MSG, "max_tokens": CONTEXT, "temperature": 0, "logit_bias": {str(EOS): -100}}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up (and closes the connection) after 0.5 s
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = server.metrics()
        if after[key] > before[key] and after["edgellm_kv_pages_in_use"] == 0:
            break
        time.sleep(0.05)
    assert after[key] == before[key] + 1 and after["edgellm_active_sequences"] == 0
    assert after["edgellm_decode_tokens_total"] - before["edgellm_decode_tokens_total"] < CONTEXT - 100


def _think_bias(codec) -> dict[str, float]:
    return {str(codec.tok.token_to_id("</think>")): 6.0, str(codec.tok.token_to_id("<think>")): -100.0,
            str(EOS): -100.0}


def test_reasoning_content_matches_the_raw_completion(server, codec):
    """enable_thinking: the prompt opens <think>; reasoning = raw text before the first </think>, content after."""
    client = _client(server)
    ids = _chat_ids(codec, MSG, enable_thinking=True)
    assert codec.decode(ids).endswith("<think>\n")
    common = dict(model="any", max_tokens=40, temperature=1.0, logit_bias=_think_bias(codec))
    for seed in range(20):  # find a seed whose output closes the block (bounded)
        raw = client.completions.create(prompt=ids, seed=seed, **common).choices[0].text
        if 0 < raw.find("</think>") < len(raw) - len("</think>"):
            break
    else:
        pytest.fail("no seed in 0..19 produced '</think>' mid-output; raise its logit_bias")
    i = raw.find("</think>")
    want_reasoning, want_content = raw[:i], raw[i + len("</think>"):]
    extra = {"enable_thinking": True, "return_reasoning": True}
    full = client.chat.completions.create(messages=MSG, seed=seed, extra_body=extra, **common).choices[0].message
    assert (full.model_extra.get("reasoning_content"), full.content) == (want_reasoning, want_content)
    chunks = list(client.chat.completions.create(messages=MSG, seed=seed, extra_body=extra, stream=True, **common))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_r = "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas)
    streamed_c = "".join(d.content or "" for d in deltas)
    assert (streamed_r, streamed_c) == (want_reasoning, want_content)
    hidden = client.chat.completions.create(messages=MSG, seed=seed, extra_body={**extra, "return_reasoning": False},
                                            **common).choices[0].message
    assert hidden.content == want_content and "reasoning_content" not in (hidden.model_extra or {})


def test_thinking_disabled_gives_content_only(server, codec):
    client = _client(server)
    ids = _chat_ids(codec, MSG, enable_thinking=False)
    bias = {str(codec.tok.token_to_id("<think>")): -100}
    raw = client.completions.create(model="any", prompt=ids, max_tokens=16, temperature=0,
                                    logit_bias=bias).choices[0].text
    msg = client.chat.completions.create(model="any", messages=MSG, max_tokens=16, temperature=0, logit_bias=bias,
                                         extra_body={"enable_thinking": False, "return_reasoning": True}).choices[0].message
    assert raw and msg.content == raw
    assert not (msg.model_extra or {}).get("reasoning_content")


def test_langchain_chatopenai_streaming(server, codec):
    lc = pytest.importorskip("langchain_openai")
    extra = {"enable_thinking": True, "return_reasoning": True}
    common = dict(max_tokens=30, temperature=1.0, logit_bias=_think_bias(codec))
    client = _client(server)
    for seed in range(20):  # a seed whose answer has both reasoning and content (bounded)
        full = client.chat.completions.create(model="any", messages=MSG, seed=seed, extra_body=extra,
                                              **common).choices[0].message
        if full.content and full.model_extra.get("reasoning_content"):
            break
    else:
        pytest.fail("no seed in 0..19 gave both reasoning and content")
    # as a LangChain user writes it
    llm = lc.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="smollm2", streaming=True,
                        extra_body=extra, seed=seed, max_retries=0, **common)
    pieces = [chunk.content for chunk in llm.stream("hello world")]
    reply = llm.invoke("hello world")
    # ChatOpenAI keeps `content` (it does not extract reasoning_content); it matches the openai client's content
    assert len(pieces) > 1
    assert "".join(pieces) == reply.content == full.content


# ---- the secured server (API key + HMAC, one slot, no queue) --------------------------------------------------------
def _signed(body: bytes, path: str = "/v1/chat/completions", method: str = "POST", **extra) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
            **signed_headers(SECRET, method, path, body), **extra}


def test_api_key_and_signatures(secure_server):
    url = secure_server.url + "/v1/completions"
    body = json.dumps({"prompt": "hello", "max_tokens": 2, "temperature": 0}).encode()
    assert httpx.post(url, content=body, headers={"Content-Type": "application/json"}).status_code == 401
    h = _signed(body, "/v1/completions")
    r = httpx.post(url, content=body, headers={**h, "Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    missing = {k: v for k, v in h.items() if k != "X-Signature"}
    assert httpx.post(url, content=body, headers=missing).status_code == 401
    bad = httpx.post(url, content=body, headers={**h, "X-Signature": sign("wrong", h["X-Timestamp"], "POST",
                                                                          "/v1/completions", body)})
    assert bad.status_code == 401 and "X-Signature" in bad.json()["error"]["message"]
    tampered = httpx.post(url, content=body.replace(b"2", b"3"), headers=h)
    assert tampered.status_code == 401
    chat = httpx.post(secure_server.url + "/v1/chat/completions", content=body, headers=h)
    assert chat.status_code == 401 and "path" in chat.json()["error"]["message"]  # signed for another route
    ok = httpx.post(url, content=body, headers=h)
    assert ok.status_code == 200, ok.text
    replay = httpx.post(url, content=body, headers=h)
    assert replay.status_code == 401 and "replayed" in replay.json()["error"]["message"]
    stale = _signed(body, "/v1/completions")
    stale.update(signed_headers(SECRET, "POST", "/v1/completions", body, now=time.time() - 3600))
    assert httpx.post(url, content=body, headers=stale).status_code == 401
    get = httpx.get(secure_server.url + "/v1/models", headers=_signed(b"", "/v1/models", "GET"))
    assert get.status_code == 200
    big = json.dumps({"prompt": "x" * 5000}).encode()
    assert httpx.post(url, content=big, headers=_signed(big, "/v1/completions")).status_code == 413


def test_openai_client_signing_hook(secure_server):
    """How a client signs: an httpx event hook over the exact method, path and bytes the openai client sends."""
    client = openai.OpenAI(base_url=secure_server.url + "/v1", api_key=KEY, max_retries=0,
                           http_client=httpx.Client(event_hooks={"request": [httpx_signer(SECRET)]}))
    r = client.chat.completions.create(model="any", messages=MSG, max_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3
    stream = client.chat.completions.create(model="any", messages=MSG, max_tokens=3, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == r.choices[0].message.content


def test_full_server_answers_503_with_retry_after(secure_server):
    url = secure_server.url + "/v1/chat/completions"
    long = json.dumps({"messages": MSG, "max_tokens": CONTEXT, "stream": True, "temperature": 0,
                       "logit_bias": {str(EOS): -100}}).encode()
    with httpx.Client(timeout=30) as c, c.stream("POST", url, content=long, headers=_signed(long)) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # keep the iterator: dropping it closes the connection (a disconnect)
        next(lines)
        body = json.dumps({"messages": MSG, "max_tokens": 2}).encode()
        busy = httpx.post(url, content=body, headers=_signed(body))
        assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
        assert "max-queue" in busy.json()["error"]["message"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and secure_server.metrics()["edgellm_active_sequences"]:
        time.sleep(0.05)
    body = json.dumps({"messages": MSG, "max_tokens": 2}).encode()
    assert httpx.post(url, content=body, headers=_signed(body)).status_code == 200


def test_cli_serve_refuses_bad_options(serve_artifact):
    from click.testing import CliRunner

    from edgellm.cli import cli

    r = CliRunner().invoke(cli, ["serve", str(serve_artifact), "--port", "70000"])
    assert r.exit_code == 1 and "--port 70000 is not a TCP port" in r.output
    r = CliRunner().invoke(cli, ["serve", str(serve_artifact), "--batch-min", "0"])
    assert r.exit_code == 1 and "--batch-min must be >= 1" in r.output
    r = CliRunner().invoke(cli, ["serve", str(serve_artifact), "--api-key", ""])
    assert r.exit_code == 1 and "--api-key is empty" in r.output
    r = CliRunner().invoke(cli, ["serve", str(serve_artifact), "--hmac-secret", ""])
    assert r.exit_code == 1 and "--hmac-secret is empty" in r.output
    for flag, value, message in [("--max-active", "0", "--max-active must be >= 1"),
                                 ("--max-queue", "-1", "--max-queue must be >= 0"),
                                 ("--queue-timeout", "-5", "--queue-timeout must be"),
                                 ("--queue-timeout", "nan", "--queue-timeout must be"),
                                 ("--batch-min", "-2", "--batch-min must be >= 1"),
                                 ("--max-body-bytes", "-1", "--max-body-bytes -1 is too small"),
                                 ("--hmac-window", "-1", "--hmac-window must be"),
                                 ("--threads", "0", "--threads must be >= 1")]:
        r = CliRunner().invoke(cli, ["serve", str(serve_artifact), flag, value])
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, (flag, value, r.output)

