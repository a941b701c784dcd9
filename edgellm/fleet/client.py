"""The host side: ask the tracker for a device by key, push an artifact, run bench / run there.

Waits are bounded: the tracker request (the queue) by `queue_timeout`, each RPC call by the session's own
socket; a device that dies mid-call surfaces as FleetError naming the key and what was running.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..artifact import DIGEST, MANIFEST, Artifact
from . import FleetError, parse_tracker
from .identity import normalize_arch


def _rpc():
    from tvm import rpc

    return rpc


def _bounded(fn, timeout: float, late: str):
    """fn() in a daemon thread, waited for at most `timeout` s (TVM's RPC calls block with no timeout of their own);
    its exception is returned, not raised; FleetError(`late`) when it does not answer in time."""
    result: queue.Queue = queue.Queue()

    def call():
        try:
            result.put(fn())
        except Exception as exc:  # noqa: BLE001 - handed to the caller, which names it
            result.put(exc)

    threading.Thread(target=call, daemon=True).start()
    try:
        return result.get(timeout=timeout)
    except queue.Empty:
        raise FleetError(late) from None


def tracker_summary(tracker: str, timeout: float = 10) -> dict:
    """The tracker's summary: {"queue_info": {key: {free, pending}}, "server_info": [{key, addr}]}."""
    import socket

    host, port = parse_tracker(tracker)
    try:  # a quick probe: TVM's own connect retries for a minute, logging each try
        socket.create_connection((host, port), timeout=min(timeout, 5)).close()
    except OSError as exc:
        raise FleetError(f"cannot reach the tracker at {tracker} ({exc.strerror or exc}); start it with `python -m "
                         f"tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}`") from None

    def ask():
        t = _rpc().connect_tracker(host, port)
        try:
            return t.summary()
        finally:
            t.close()

    got = _bounded(ask, timeout, f"tracker {tracker} did not answer within {timeout:.0f} s; is `python -m "
                                 "tvm.exec.rpc_tracker` running there?")
    if isinstance(got, Exception):
        raise FleetError(f"cannot reach the tracker at {tracker} ({got}); start it with `python -m "
                         f"tvm.exec.rpc_tracker --host 0.0.0.0 --port {port}`") from None
    return got


@dataclass
class DeviceRow:
    key: str
    total: int
    free: int
    pending: int
    addrs: list[str] = field(default_factory=list)

    @property
    def busy(self) -> int:
        return max(0, self.total - self.free)


def list_devices(tracker: str, timeout: float = 10) -> list[DeviceRow]:
    s = tracker_summary(tracker, timeout)
    rows: dict[str, DeviceRow] = {}
    for item in s.get("server_info", []):
        key = item["key"].split(":", 1)[1]
        row = rows.setdefault(key, DeviceRow(key, 0, 0, 0))
        row.total += 1
        row.addrs.append(":".join(map(str, item.get("addr") or [])))
    for key, q in s.get("queue_info", {}).items():
        row = rows.setdefault(key, DeviceRow(key, 0, 0, 0))
        row.free, row.pending = int(q.get("free", 0)), int(q.get("pending", 0))
    return sorted((r for r in rows.values() if r.total or r.pending), key=lambda r: r.key)


def format_devices(rows: list[DeviceRow]) -> str:
    lines = ["| key | devices | free | busy | queued requests | addresses |", "|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r.key} | {r.total} | {r.free} | {r.busy} | {r.pending} | {', '.join(r.addrs)} |" for r in rows]
    return "\n".join(lines)


def _device_error(key: str, what: str, exc: Exception) -> FleetError:
    """One line for an RPC failure: the device's own message when its function raised (TVM sends it back as
    "Error caught from RPC call:\nMESSAGE"), else 'the device went away'."""
    text = str(exc)
    marker = "Error caught from RPC call:"
    if marker in text:
        msg = " ".join(text.split(marker, 1)[1].split()) or type(exc).__name__
        return FleetError(f"device '{key}' refused {what}: {msg}")
    last = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    return FleetError(f"device '{key}' failed during {what} (it crashed, was stopped or the network dropped: "
                      f"{last}); the tracker drops a dead server, so retry once it is back (`edgellm devices`)")


class Device:
    """One tracker session with one device of `key` (held until close(): others asking for the key queue)."""

    def __init__(self, tracker: str, key: str, queue_timeout: float = 600, session_timeout: float = 0):
        host, port = parse_tracker(tracker)
        self.key = key
        keys = {r.key for r in list_devices(tracker)}
        if key not in keys:
            raise FleetError(f"no device with key {key!r} is registered at tracker {tracker} (keys: "
                             f"{', '.join(sorted(keys)) or 'none'}); start one with `edgellm device serve "
                             f"--tracker {tracker} --key {key}`")
        got = _bounded(lambda: _rpc().connect_tracker(host, port).request(key, session_timeout=session_timeout,
                                                                          max_retry=2), queue_timeout,
                       f"no '{key}' device became free within {queue_timeout:.0f} s (the tracker's queue; "
                       "`edgellm devices` shows who holds them)")
        if isinstance(got, Exception):
            raise FleetError(f"the tracker could not connect a '{key}' device: {got}") from None
        self.sess = got
        self.identity = json.loads(self.call("identity", "identity"))

    def call(self, what: str, fn: str, *args):
        try:
            return self.sess.get_function(f"edgellm.fleet.{fn}")(*args)
        except Exception as exc:  # noqa: BLE001  (tvm's RPC errors are plain TVMError/RuntimeError)
            raise _device_error(self.key, what, exc) from None

    def close(self) -> None:
        self.sess = None  # dropping the session closes the socket; the server re-registers with the tracker

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_arch(self, art: Artifact) -> None:
        """Refuse, before any upload, an artifact whose CPU code is for another architecture than the device's."""
        want = normalize_arch(art.info.host_triple)
        have = normalize_arch(self.identity.get("machine"))
        if want and have and want != have:
            raise FleetError(f"artifact {art.root} is built for {want} ({art.info.host_triple}, target "
                             f"{art.info.preset}) but device '{self.key}' ({self.identity.get('name')}) is {have}; "
                             f"send it to a device of its architecture or compile for this one")

    def push(self, art: Artifact) -> bool:
        """Upload the artifact unless the device already holds its root digest; True when files were sent."""
        self.check_arch(art)
        if self.call("artifact check", "has", art.digest) == "1":
            return False
        prefix = f"up-{art.digest[:16]}-"
        try:
            self.sess.upload(bytearray((art.root / MANIFEST).read_bytes()), f"{prefix}{MANIFEST}")
            self.sess.upload(bytearray((art.root / DIGEST).read_bytes()), f"{prefix}{DIGEST}")
            for i, rel in enumerate(sorted(art.manifest["files"])):
                self.sess.upload(bytearray(Path(art.root, rel).read_bytes()), f"{prefix}f{i}")
        except Exception as exc:  # noqa: BLE001
            raise _device_error(self.key, "the upload", exc) from None
        self.call("artifact install", "install", art.digest, prefix)
        return True

    def bench(self, art: Artifact, n_prompt: int = 128, n_gen: int = 128, reps: int = 5, warmup: int = 1,
              threads: int | None = None) -> list[dict]:
        params = {"n_prompt": n_prompt, "n_gen": n_gen, "reps": reps, "warmup": warmup, "threads": threads}
        return json.loads(self.call("bench", "bench", art.digest, json.dumps(params)))

    def run(self, art: Artifact, request: dict, poll_s: float = 0.25, timeout: float = 3600) -> Iterator[dict]:
        """Yield {"piece": text} as the device produces them, then {"stats": {...}}. Streaming is per-chunk
        polling through RPC (run_poll waits up to poll_s for the next pieces); TVM's RPC has no server push."""
        self.call("run", "run_start", art.digest, json.dumps(request))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.call("run", "run_poll", poll_s))
            for piece in msg["pieces"]:
                yield {"piece": piece}
            if "error" in msg:
                raise FleetError(f"device '{self.key}' failed during run: {msg['error']}")
            if "stats" in msg:
                yield {"stats": msg["stats"]}
            if msg["done"]:
                return
        raise FleetError(f"device '{self.key}' did not finish the generation within {timeout:.0f} s")


def remote_bench(tracker: str, key: str, artifact: str | Path, queue_timeout: float = 600, **kw) -> list[dict]:
    art = Artifact.open(artifact, verify=True)
    with Device(tracker, key, queue_timeout) as dev:
        dev.check_arch(art)
        dev.push(art)
        return dev.bench(art, **kw)
