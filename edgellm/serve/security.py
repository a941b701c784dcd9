"""Request authentication: bearer API key and HMAC-SHA256 signatures with a time window and replay rejection.

Signature contract (what a client computes):
    X-Timestamp: unix seconds (integer or decimal), within +-window of the server's clock
    X-Signature: hex(HMAC-SHA256(secret, X-Timestamp + "\n" + METHOD + "\n" + PATH + "\n" + raw request body))
        METHOD upper case ("POST"); PATH the request target as sent, query included ("/v1/chat/completions");
        the body is b"" for a GET. Newlines cannot occur in the first three, so the message is unambiguous, and a
        signature made for one route cannot be replayed on another.
A signature is accepted once; a second request carrying it inside the window is a replay and is refused.
All comparisons are constant-time (`hmac.compare_digest`).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import threading
import time


class AuthError(Exception):
    """HTTP 401; the message says which header is wrong and how to fix it."""


def _message(timestamp: str, method: str, path: str | bytes, body: bytes) -> bytes:
    path = path.encode("latin-1") if isinstance(path, str) else path
    return b"\n".join([timestamp.encode("ascii", "replace"), method.upper().encode("ascii", "replace"), path, body])


def sign(secret: str | bytes, timestamp: str, method: str, path: str | bytes, body: bytes) -> str:
    """The X-Signature a client sends for `method path` with `body` at `timestamp` (the string in X-Timestamp)."""
    key = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(key, _message(timestamp, method, path, body), hashlib.sha256).hexdigest()


def signed_headers(secret: str | bytes, method: str, path: str | bytes, body: bytes,
                   now: float | None = None) -> dict[str, str]:
    """X-Timestamp (milliseconds, so two identical bodies a moment apart sign differently) and X-Signature."""
    ts = f"{time.time() if now is None else now:.3f}"
    return {"X-Timestamp": ts, "X-Signature": sign(secret, ts, method, path, body)}


def httpx_signer(secret: str | bytes):
    """An httpx request event hook that signs every request it sees (the exact bytes, method and path sent):
    `httpx.Client(event_hooks={"request": [httpx_signer(SECRET)]})`, e.g. as the openai client's http_client."""

    def hook(request) -> None:
        request.headers.update(signed_headers(secret, request.method, request.url.raw_path, request.read()))

    return hook


def check_api_key(expected: str, authorization: str | None) -> None:
    if not authorization:
        raise AuthError("missing Authorization header; send 'Authorization: Bearer <api key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("Authorization header must be 'Bearer <api key>'")
    if not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise AuthError("invalid API key")


class HmacVerifier:
    """Checks X-Timestamp / X-Signature and remembers accepted signatures for the window (replay cache)."""

    def __init__(self, secret: str, window_s: float = 300.0, max_remembered: int = 1_000_000):
        if not secret:
            raise ValueError("the HMAC secret is empty; pass a non-empty --hmac-secret")
        if window_s <= 0:
            raise ValueError(f"the HMAC window must be > 0 seconds, got {window_s}")
        self.key, self.window, self.max_remembered = secret.encode(), window_s, max_remembered
        self._seen: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._lock = threading.Lock()

    def verify(self, timestamp: str | None, signature: str | None, method: str, path: str | bytes, body: bytes,
               now: float | None = None) -> None:
        now = time.time() if now is None else now
        if not timestamp or not signature:
            raise AuthError("missing X-Timestamp or X-Signature header; sign each request with hex(HMAC-SHA256("
                            "secret, timestamp + '\\n' + METHOD + '\\n' + path + '\\n' + body))")
        try:
            ts = float(timestamp)
        except ValueError:
            raise AuthError(f"X-Timestamp {timestamp[:40]!r} is not unix seconds") from None
        if not abs(now - ts) <= self.window:  # also refuses nan/inf
            raise AuthError(f"X-Timestamp is {now - ts:+.0f} s from the server clock; the window is "
                            f"+-{self.window:g} s (check the client clock)")
        expected = hmac.new(self.key, _message(timestamp, method, path, body), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected.encode(), signature.strip().lower().encode("ascii", "replace")):
            raise AuthError("invalid X-Signature for this timestamp, method, path and body")
        with self._lock:
            self._expire(now)
            if expected in self._seen:
                raise AuthError("replayed request: this signature was already used; sign each request anew")
            if len(self._seen) >= self.max_remembered:
                raise AuthError("too many signed requests inside the replay window; retry shortly")
            self._seen[expected] = ts

    def _expire(self, now: float) -> None:
        # entries are kept until their own timestamp leaves the window; insertion order is nearly time order, so
        # sweep the front and stop at the first live one
        while self._seen:
            sig, ts = next(iter(self._seen.items()))
            if ts >= now - self.window:
                break
            self._seen.popitem(last=False)


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
