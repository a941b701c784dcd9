"""The device side: `edgellm device serve` = TVM's RPC server registered with the tracker, plus edgellm's runner as
RPC functions. Runtime library only (TVM_USE_RUNTIME_LIB=1 is set before TVM is imported).

TVM's server forks one process per session (multiprocessing, fork), so the functions registered here exist in
every session, and the Engine a session loads dies with it. The tracker hands a server to one session at a time:
a second request for the same key waits in the tracker's queue.

RPC functions (all arguments and results are strings; errors raise and reach the host as the RPC error's text):
  edgellm.fleet.identity()                   -> JSON device identity (fleet.identity.device_identity)
  edgellm.fleet.has(digest)                  -> "1" when the cache holds that artifact, verified at install
  edgellm.fleet.install(digest, prefix)      -> installs the files uploaded (TVM upload) as PREFIX + manifest.json,
                                                PREFIX + manifest.json.sha256, PREFIX + "f{i}" (i: index in the
                                                manifest's sorted file table); each checked against the manifest's
                                                sha256 before the artifact is renamed into CACHE/<digest>
  edgellm.fleet.bench(digest, params_json)   -> JSON list of BenchRecord dicts, timed on the device
  edgellm.fleet.run_start(digest, req_json)  -> starts a generation in a thread of the session
  edgellm.fleet.run_poll(wait_s)             -> JSON {"pieces": [...], "done": bool, "stats"?: {...}, "error"?: str}
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import shutil
import threading
from dataclasses import asdict
from pathlib import Path

from ..artifact import DIGEST, MANIFEST, Artifact, ArtifactError, atomic_dir, confined, sha256_of
from . import FleetError, parse_tracker

DEFAULT_CACHE = Path.home() / ".cache" / "edgellm" / "fleet"
_DIGEST_CHARS = set("0123456789abcdef")


def _check_digest(digest: str) -> str:
    if len(digest) != 64 or not set(digest) <= _DIGEST_CHARS:
        raise FleetError(f"artifact digest {digest!r} is not a sha256 (64 hex digits)")
    return digest


class DeviceState:
    """What the registered functions share inside one device process (and its forked sessions)."""

    def __init__(self, cache: Path, name: str | None, threads: int | None):
        self.cache, self.name, self.threads = Path(cache), name, threads
        self._engine = None
        self._run: dict | None = None

    def artifact_dir(self, digest: str) -> Path:
        return self.cache / _check_digest(digest)

    def has(self, digest: str) -> bool:
        return (self.artifact_dir(digest) / ".edgellm-installed").is_file()

    def identity(self) -> dict:
        from .identity import device_identity

        return device_identity(self.name)

    def install(self, digest: str, workdir: Path, prefix: str) -> str:
        """Check the uploaded files against the manifest (the manifest against `digest`) and rename them into the
        cache; nothing lands in the cache unless every file passed."""
        final = self.artifact_dir(digest)
        if self.has(digest):
            return "present"
        if not prefix or not all(c.isalnum() or c in "._-" for c in prefix) or prefix.startswith("."):
            raise FleetError(f"upload prefix {prefix!r} is not a plain file-name prefix")
        data = (workdir / f"{prefix}{MANIFEST}").read_bytes()
        got = hashlib.sha256(data).hexdigest()
        if got != digest:
            raise ArtifactError(f"uploaded {MANIFEST} has sha256 {got}, not the announced root digest {digest}; "
                                "refusing it (altered in transit or on the host)")
        files = json.loads(data).get("files") or {}
        self.cache.mkdir(parents=True, exist_ok=True)
        if final.exists():  # an earlier install that did not finish: never trusted, replaced
            shutil.rmtree(final)
        with atomic_dir(final) as tmp:
            shutil.copyfile(workdir / f"{prefix}{MANIFEST}", tmp / MANIFEST)
            shutil.copyfile(workdir / f"{prefix}{DIGEST}", tmp / DIGEST)
            for i, rel in enumerate(sorted(files)):
                src = workdir / f"{prefix}f{i}"
                meta = files[rel]
                if not src.is_file():
                    raise ArtifactError(f"artifact file {rel} was not uploaded; refusing an incomplete artifact")
                if src.stat().st_size != meta.get("bytes") or sha256_of(src) != meta.get("sha256"):
                    raise ArtifactError(f"uploaded artifact file {rel} fails its sha256 check against the manifest "
                                        "(tampered or corrupted); refusing it before anything is loaded")
                dst = confined(tmp, rel, "file")
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
            Artifact.open(tmp, verify=True, expect_digest=digest)  # the same checks the Engine makes, once more
            (tmp / ".edgellm-installed").write_text(digest + "\n")
        return "installed"

    def engine(self, digest: str, threads: int | None = None):
        from ..device_runners.engine import Engine

        if not self.has(digest):
            raise FleetError(f"artifact {digest[:12]} is not installed on this device; upload it first")
        if self._engine is None or self._engine.art.digest != digest:
            self._engine = Engine(self.artifact_dir(digest), threads=threads or self.threads, expect_digest=digest)
        return self._engine

    def bench(self, digest: str, params: dict) -> list[dict]:
        from ..device_runners.bench import run_bench

        eng = self.engine(digest, params.get("threads"))
        recs = run_bench(eng, int(params.get("n_prompt", 128)), int(params.get("n_gen", 128)),
                         int(params.get("reps", 5)), int(params.get("warmup", 1)), identity_name=self.name)
        return [asdict(r) for r in recs]

    def run_start(self, digest: str, req: dict) -> None:
        from ..device_runners.sampling import SamplingParams

        if self._run is not None and not self._run["done"].is_set():
            raise FleetError("a generation is already running in this session; poll it to the end first")
        eng = self.engine(digest, req.get("threads"))
        sampling = SamplingParams(**req.get("sampling", {}))
        q: queue.Queue = queue.Queue()
        done = threading.Event()

        def work():
            try:
                for piece in eng.generate(req["prompt"], int(req["max_new_tokens"]), sampling,
                                          chat=req.get("chat", True)):
                    q.put(("piece", piece))
                s = eng.last_stats
                q.put(("stats", {"prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens,
                                 "prefill_tps": s.prefill_tps, "decode_tps": s.decode_tps,
                                 "finish_reason": s.finish_reason}))
            except Exception as exc:  # noqa: BLE001  (reported to the host by run_poll)
                q.put(("error", f"{type(exc).__name__}: {exc}"))
            finally:
                done.set()
                q.put(("end", None))

        self._run = {"queue": q, "done": done, "ended": False}
        threading.Thread(target=work, daemon=True).start()

    def run_poll(self, wait_s: float) -> dict:
        if self._run is None:
            raise FleetError("no generation is running in this session; call edgellm.fleet.run_start first")
        out: dict = {"pieces": [], "done": False}
        q = self._run["queue"]
        try:
            items = [q.get(timeout=max(0.0, wait_s))]
        except queue.Empty:
            return out
        while True:
            try:
                items.append(q.get_nowait())
            except queue.Empty:
                break
        for kind, value in items:
            if kind == "piece":
                out["pieces"].append(value)
            elif kind == "end":
                out["done"] = True
            else:
                out[kind] = value
        return out


def register(state: DeviceState) -> None:
    """Register the edgellm.fleet.* functions in this process (before TVM's server forks its sessions)."""
    import tvm_ffi

    def workdir() -> Path:
        return Path(tvm_ffi.get_global_func("tvm.rpc.server.workpath")("."))

    funcs = {
        "identity": lambda: json.dumps(state.identity()),
        "has": lambda digest: "1" if state.has(str(digest)) else "0",
        "install": lambda digest, prefix: state.install(str(digest), workdir(), str(prefix)),
        "bench": lambda digest, params: json.dumps(state.bench(str(digest), json.loads(str(params)))),
        "run_start": lambda digest, req: state.run_start(str(digest), json.loads(str(req))) or "started",
        "run_poll": lambda wait_s: json.dumps(state.run_poll(float(wait_s))),
    }
    for name, fn in funcs.items():
        tvm_ffi.register_global_func(f"edgellm.fleet.{name}", fn, override=True)


def serve(tracker: str, key: str, name: str | None = None, host: str = "0.0.0.0", port: int = 9090,
          port_end: int | None = None, advertise: str | None = None, cache: Path | None = None,
          threads: int | None = None, silent: bool = False) -> None:
    """Run the device server until killed: TVM's RPC server on host:[port, port_end), registered with `tracker`
    under `key`; `advertise` is the address the tracker hands to hosts (default: what the tracker sees)."""
    import multiprocessing

    addr = parse_tracker(tracker)
    port_end = port_end or port + 100
    if port_end <= port:
        raise FleetError(f"--port-end {port_end} must be above --port {port}")
    if not key or any(c in key for c in ": \t"):
        raise FleetError(f"--key {key!r} must be a non-empty word without ':' or spaces (e.g. rpi5, orin, host)")
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # a device runs the runtime library, never the compiler
    if name:
        os.environ["EDGELLM_DEVICE_NAME"] = name
    from tvm.rpc import server as rpc_server

    multiprocessing.set_start_method("fork", force=True)  # sessions must inherit the registered functions
    register(DeviceState(cache or DEFAULT_CACHE, name, threads))
    if silent:
        rpc_server.logger.setLevel("ERROR")
    import sys
    import threading

    def one_line(args):  # TVM's listen loop ends by raising (a lost tracker): one line, not a traceback
        print(f"edgellm device server: {type(args.exc_value).__name__}: {args.exc_value}", file=sys.stderr)

    threading.excepthook = one_line
    state = rpc_server.PopenRPCServerState(host, port, port_end, tracker_addr=addr, key=key,
                                           custom_addr=advertise, silent=silent)
    print(f"edgellm device server: key {key} on {host}:{state.port}, tracker {addr[0]}:{addr[1]}", flush=True)
    state.thread.join()  # returns only when TVM's listen loop gave up (its tracker reconnects stop after 60 s)
    raise FleetError(f"the device server stopped: tracker {tracker} was unreachable for over a minute; start it "
                     "again once the tracker is back (systemd's Restart=always does, see docs/fleet.md)")


def serve_emulated(core: str, tracker: str, key: str, name: str | None = None, host: str = "0.0.0.0",
                   port: int = 9090, port_end: int | None = None, advertise: str | None = None,
                   cache: Path | None = None, threads: int | None = None) -> int:
    """Run the device server as an emulated aarch64 board: the arm64 root's python3 under qemu-aarch64-static as
    `core` (QEMU_CPU), with a copy of this edgellm package; returns its exit status."""
    import signal
    import subprocess
    import tempfile

    from ..device_runners.emulate import arm64_root, python_command

    parse_tracker(tracker)
    root = arm64_root()
    argv = ["-m", "edgellm.fleet.device", "--tracker", tracker, "--key", key, "--host", host, "--port", str(port),
            "--port-end", str(port_end or port + 100),
            "--cache", str(Path(cache or DEFAULT_CACHE).resolve() / "emulated")]
    argv += [f"--{k}={v}" for k, v in (("name", name), ("advertise", advertise), ("threads", threads)) if v]
    with tempfile.TemporaryDirectory(prefix="edgellm-src-") as tmp:
        shutil.copytree(Path(__file__).resolve().parents[1], Path(tmp) / "edgellm",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.dylib"))
        cmd, env = python_command(root, core, argv, [Path(tmp)], threads or 2)
        env["EDGELLM_EMULATED"] = core
        proc = subprocess.Popen(cmd, env=env)
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
        try:
            return proc.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)
            if proc.poll() is None:
                proc.kill()


def main(argv: list[str] | None = None) -> int:
    """`python -m edgellm.fleet.device --tracker HOST:PORT --key KEY ...`: the server without Click, for a device
    Python that has only the runtime (numpy, tokenizers, TVM): the emulated Pi's root uses it."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="python -m edgellm.fleet.device")
    p.add_argument("--tracker", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--name")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9090)
    p.add_argument("--port-end", type=int)
    p.add_argument("--advertise")
    p.add_argument("--cache", type=Path)
    p.add_argument("--threads", type=int)
    a = p.parse_args(argv)
    try:
        serve(a.tracker, a.key, a.name, a.host, a.port, a.port_end, a.advertise, a.cache, a.threads)
    except (FleetError, ArtifactError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
