"""[hardening] The server under hostile but well-formed-enough input: one server process per module on the tiny
Llama artifact (conftest `compiled`), with short head/body/keep-alive timeouts so the slow-client cases are cheap.

Every case asserts what the client gets (status, param, message) and that the server is healthy afterwards: /health
ok, no KV pages reserved or in use, and a later request answered normally.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest
from test_serve import ServerProc  # pytest puts tests/ on sys.path

httpx = pytest.importorskip("httpx")

EOS = 2
VOCAB = 320  # tests/tiny_models.py
TIMEOUT_S = 1.0  # the server's head, body and keep-alive timeouts in this module


class Server(ServerProc):
    """`serve()` in a subprocess with ServeArgs the CLI does not expose (the short timeouts)."""

    CODE = ("import sys; from edgellm.serve import ServeArgs, serve; serve(ServeArgs(sys.argv[1], port=int(sys.argv[2]), "
            "threads=1, batch_min=1, max_queue=8, log_level='warning', head_timeout={t}, body_timeout={t}, "
            "keep_alive_timeout={t}))")

    def command(self, artifact: Path, extra: tuple[str, ...]) -> list[str]:
        return [sys.executable, "-c", self.CODE.format(t=TIMEOUT_S), str(artifact), str(self.port)]

    def health(self, settle: bool = True) -> dict:
        """/health once no sequence is active (a finished request's pages are freed a moment after its answer)."""
        deadline = time.monotonic() + 10
        while True:
            h = httpx.get(self.url + "/health", timeout=10)
            body = h.json()
            if not settle or (body["active"] == 0 and body["queued"] == 0) or time.monotonic() > deadline:
                return {**body, "http_status": h.status_code}
            time.sleep(0.05)

    def assert_clean(self) -> None:
        h = self.health()
        assert h["http_status"] == 200 and h["status"] == "ok", h
        assert (h["active"], h["kv_pages_reserved"], h["kv_pages_reserved_active"], h["kv_pages_in_use"]) == \
            (0, 0, 0, 0), h
        m = self.metrics()  # what an operator's Prometheus sees says the same
        assert (m["edgellm_active_sequences"], m["edgellm_kv_pages_reserved"], m["edgellm_kv_pages_reserved_active"],
                m["edgellm_kv_pages_in_use"]) == (0, 0, 0, 0), m
        r = httpx.post(self.url + "/v1/completions", json={"prompt": "hello world", "max_tokens": 3,
                                                            "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


@pytest.fixture(scope="module")
def artifact(compiled) -> Path:
    return compiled("llama", "q4f32_1")


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    s = Server(artifact, tmp_path_factory.mktemp("log") / "abuse.log")
    yield s
    s.close()
    log = s.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]  # no request reached an unhandled error


# ---- raw HTTP/1.1 on one socket (to see keep-alive and timeouts as a client does) ---------------------------------
def _request(method: str, path: str, body: bytes = b"", extra: str = "") -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response head (got {buf[:200]!r})")
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    n = int(headers["content-length"])
    while len(rest) < n:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed mid-body")
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:n]


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server closes the connection (EOF or reset); the socket's own timeout bounds the wait."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# ---- the cases ---------------------------------------------------------------------------------------------------
POISON = [  # (extra request fields, the param the 400 must name)
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"logit_bias": {str(VOCAB): 5}}, "logit_bias"),
    ({"logit_bias": {"-1": 5}}, "logit_bias"),
    ({"logit_bias": {"1e3": 5}}, "logit_bias"),
    ({"logit_bias": {"5": float("nan")}}, None),  # json.dumps writes NaN: refused as not JSON
    ({"prompt": [5, VOCAB]}, "prompt"),
    ({"prompt": [5, -1]}, "prompt"),
    ({"prompt": [10**30]}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"),
]


def test_poison_requests_leave_a_concurrent_stream_and_the_pages_intact(server):
    """The requests that used to fail on the engine thread (seed -1, ...) are 400 up front; a stream running
    meanwhile gives exactly the text it gives alone; nothing stays reserved; later requests work."""
    url = server.url + "/v1/completions"
    body = {"prompt": "the quick brown fox", "max_tokens": 200, "temperature": 0, "logit_bias": {str(EOS): -100}}
    alone = httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"]
    answers = []
    with httpx.Client(timeout=60) as c, c.stream("POST", url, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        pieces = [next(line for line in lines if line.startswith("data:"))]
        for fields, param in POISON:
            answers.append((fields, param, httpx.post(url, content=json.dumps({**body, **fields}), timeout=30)))
        pieces += [line for line in lines if line.startswith("data:")]
    for fields, param, a in answers:
        assert a.status_code == 400, (fields, a.text)
        err = a.json()["error"]
        assert err["param"] == param and err["message"], (fields, err)
    assert pieces[-1] == "data: [DONE]"
    chunks = [json.loads(p[len("data: "):]) for p in pieces[:-1]]
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == alone
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    server.assert_clean()


def test_tiny_temperatures_are_greedy(server):
    url = server.url + "/v1/completions"
    body = {"prompt": "the lazy dog", "max_tokens": 12, "logit_bias": {str(EOS): -100}}
    greedy = httpx.post(url, json={**body, "temperature": 0}, timeout=60).json()["choices"][0]["text"]
    for t in (1e-320, 5e-324, 1e-7):
        r = httpx.post(url, json={**body, "temperature": t, "seed": 1}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, (t, r.text)
    server.assert_clean()


BAD_JSON = [  # (body, words the message must hold)
    (b'{"prompt": "hi \\ud800", "max_tokens": 2}', "surrogate"),
    (b'{"messages": [{"role": "user", "content": "hi \\udfff there"}]}', "surrogate"),
    (b'{"prompt": "hi", "\\ud800": 1}', "surrogate"),
    (b'{"prompt": "hi", "max_tokens": 2, "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nests deeper"),
    (b'{"prompt": "hi", "chat": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}", "nests deeper"),
    (b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "not usable JSON"),
    (b'{"prompt": "hi", "seed": ' + b"9" * 4000 + b"}", "seed"),
    (b'{"prompt": "hi", "temperature": NaN}', "not JSON"),
    (b'{"prompt": "hi", "temperature": -Infinity}', "not JSON"),
    (b'{"prompt": "hi", "temperature": 1e400}', "temperature"),
    (b'{"prompt": "hi", "max_tokens": 2', "not valid JSON"),
    (b'\xff\xfe{"prompt": "hi"}', "not valid JSON"),
]


def test_bad_json_is_400_and_the_connection_stays_usable(server):
    """Each body on ONE keep-alive connection: 400 naming the problem, then a normal request on the same socket."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        for body, words in BAD_JSON:
            path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
            status, headers, payload = _read_response_after(sock, _request("POST", path, body))
            assert status == 400, (body[:60], payload[:300])
            assert words in json.loads(payload)["error"]["message"], (body[:60], payload[:300])
            assert headers.get("connection", "keep-alive") != "close"
        ok = json.dumps({"prompt": "hello", "max_tokens": 2, "temperature": 0}).encode()
        status, _, payload = _read_response_after(sock, _request("POST", "/v1/completions", ok))
        assert status == 200 and json.loads(payload)["usage"]["completion_tokens"] >= 1
    server.assert_clean()


def _read_response_after(sock, data: bytes):
    sock.sendall(data)
    return _read_response(sock)


def test_slow_clients_are_timed_out(server):
    # half a request head: closed after the head timeout, no response
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        assert _closed_by_server(sock)
    # a head and half the body it announces: 408 naming the timeout, then closed
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(_request("POST", "/v1/completions", b'{"prompt": "hello", "max_tokens": 2}')[:-10])
        status, headers, payload = _read_response(sock)
        assert status == 408 and headers["connection"] == "close"
        assert "did not arrive within" in json.loads(payload)["error"]["message"]
        assert _closed_by_server(sock)
    # a connection opened and never used, and one left idle after an answer: both closed
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        assert _closed_by_server(sock)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        status, _, _ = _read_response_after(sock, _request("GET", "/health"))
        assert status == 200
        assert _closed_by_server(sock)
    server.assert_clean()


def test_token_limit_comes_from_the_stored_tensors(artifact):
    """A manifest claiming a larger vocabulary does not widen what clients may send: the stored embedding and
    output-head rows bound it."""
    from edgellm.artifact import Artifact, Manifest
    from edgellm.device_runners.engine import _token_limit

    art = Artifact.open(artifact, verify=False)
    index = art.param_index()
    m = json.loads((artifact / "manifest.json").read_text())
    assert _token_limit(Manifest.read(m), index) == VOCAB
    m["model"]["config"]["vocab_size"] = 10 * VOCAB
    assert _token_limit(Manifest.read(m), index) == VOCAB
    m["model"]["config"]["vocab_size"] = VOCAB - 20
    assert _token_limit(Manifest.read(m), index) == VOCAB - 20


# ---- bounded fuzz: generated bodies against both generation routes ------------------------------------------------
def _fuzz_strategies():
    from hypothesis import strategies as st

    leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                     st.text(max_size=12))
    anything = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3)
                            | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
    small_int = st.integers(-3, 6)
    text = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=30)  # lone surrogates too
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]) | anything},
                                    optional={"content": text | anything | st.lists(
                                        st.fixed_dictionaries({"type": st.just("text") | text, "text": text}),
                                        max_size=2), "name": text})
    common = {
        "max_tokens": small_int | anything,
        "max_completion_tokens": small_int,
        "temperature": st.floats(-1, 3) | st.sampled_from([0, 1e-320, 5e-324, 1e-6, 2]) | anything,
        "top_p": st.floats(-0.5, 1.5) | st.sampled_from([1e-300, 1]) | anything,
        "seed": st.integers(-(2**65), 2**65) | anything,
        "stop": text | st.lists(text, max_size=3) | anything,
        "logit_bias": st.dictionaries(st.integers(-3, VOCAB + 3).map(str) | st.text(max_size=4),
                                      st.floats(-150, 150) | anything, max_size=3) | anything,
        "n": small_int | anything,
        "stream": st.booleans() | anything,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans() | anything}) | anything,
        "model": text,
        "echo": st.booleans(),
    }
    chat_fields = {**common, "messages": st.lists(message, max_size=3) | anything,
                   "enable_thinking": st.booleans() | anything, "return_reasoning": st.booleans() | anything,
                   "chat_template_kwargs": anything}
    completion_fields = {**common, "prompt": text | st.lists(st.integers(-3, VOCAB + 3), max_size=6)
                         | st.lists(text, max_size=2) | anything}

    def overrides(fields):  # 0-2 fields with edge, wrong-typed or random values
        pair = st.sampled_from(sorted(fields)).flatmap(lambda k: st.tuples(st.just(k), fields[k]))
        return st.lists(pair, max_size=2).map(dict)

    valid_text = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=30)
    chat_base = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant"]), "content": valid_text}), min_size=1, max_size=2),
        "max_tokens": st.integers(1, 8)})
    completion_base = st.fixed_dictionaries({"prompt": valid_text | st.lists(st.integers(0, VOCAB - 1), min_size=1,
                                                                                max_size=6),
                                             "max_tokens": st.integers(1, 8)})
    # a valid request with a few fields changed, or every field drawn at random
    chat = st.tuples(chat_base, overrides(chat_fields)).map(lambda t: {**t[0], **t[1]}) \
        | st.fixed_dictionaries({}, optional=chat_fields)
    completion = st.tuples(completion_base, overrides(completion_fields)).map(lambda t: {**t[0], **t[1]}) \
        | st.fixed_dictionaries({}, optional=completion_fields)
    return chat, completion, st.binary(max_size=200)


def test_fuzz_the_generation_routes(server):
    """Generated bodies (typed fields with edge values, wrong types, odd Unicode, raw bytes): never a 5xx, every
    error in OpenAI's shape, and afterwards a healthy server with no pages reserved."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    chat, completion, raw = _fuzz_strategies()
    routes = {"/v1/chat/completions": chat, "/v1/completions": completion}
    seen: dict[int, int] = {}
    with httpx.Client(base_url=server.url, timeout=60) as client:

        @settings(max_examples=400, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.sampled_from(sorted(routes)).flatmap(lambda r: st.tuples(st.just(r), routes[r] | raw)))
        def check(case):
            path, body = case
            content = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8", "surrogatepass")
            if not isinstance(body, bytes) and isinstance(body.get("max_tokens"), int):
                body["max_tokens"] = min(body["max_tokens"], 8)  # bounded work per example
                content = json.dumps(body).encode("utf-8", "surrogatepass")
            r = client.post(path, content=content, headers={"Content-Type": "application/json"})
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (path, content[:300], r.text[:300])
            if r.status_code != 200:
                err = r.json()["error"]
                assert isinstance(err["message"], str) and err["message"], r.text
            elif r.headers["content-type"].startswith("text/event-stream"):
                assert "data: [DONE]" in r.text or '"error"' in r.text

        check()
    print("fuzz statuses:", seen)
    assert seen.get(200, 0) >= 20 and seen.get(400, 0) >= 100, seen  # the fuzz reached both paths
    server.assert_clean()
