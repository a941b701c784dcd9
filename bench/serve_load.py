"""Load test for `edgellm serve`: N streaming clients for T seconds on loopback; throughput, TTFT, per-token latency.

Bounded on purpose: loopback URLs only, at most 64 clients, 600 s and --max-requests requests; every request has a
timeout. Either point it at a running server (--url) or let it start one on a free port (--artifact).

    python bench/serve_load.py --artifact /tmp/smol-serve --clients 8 --duration 30 --max-tokens 64
    python bench/serve_load.py --url http://127.0.0.1:8000 --clients 4 --duration 10 --json out.json

Metrics (per request, then p50/p99 over requests):
  ttft   time from sending the request to the first streamed text
  tpot   (last text - first text) / (completion tokens - 1): the per-token latency one user sees
  itl    gaps between consecutive streamed chunks (all requests pooled)
Throughput = completion tokens of finished requests / wall time of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from edgellm.serve.security import is_loopback

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "List three uses of a Raspberry Pi.",
    "Why is the sky blue?",
    "Give me a short recipe for pancakes.",
    "What does INT4 quantization do to a neural network?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
]


def _loopback(url: str) -> bool:
    return is_loopback(urlparse(url).hostname or "")


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[i]


async def _one(client, url: str, body: dict, timeout: float) -> dict:
    t0 = time.perf_counter()
    first = last = None
    gaps, usage, err = [], None, None

    async def stream() -> str | None:
        nonlocal first, last, usage
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return f"HTTP {r.status_code}"
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if "error" in msg:
                    return msg["error"].get("message", "stream error")
                if msg.get("usage"):
                    usage = msg["usage"]
                for c in msg.get("choices") or []:
                    d = c.get("delta") or {}
                    if d.get("content") or d.get("reasoning_content"):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        else:
                            gaps.append(now - last)
                        last = now
        return None

    try:
        err = await asyncio.wait_for(stream(), timeout)
    except asyncio.TimeoutError:
        return {"error": "timeout"}
    except Exception as exc:  # connection errors count as errors, the run goes on
        return {"error": type(exc).__name__}
    if err:
        return {"error": err}
    n = (usage or {}).get("completion_tokens", 0)
    out = {"tokens": n, "gaps": gaps, "latency": time.perf_counter() - t0}
    if first is not None:
        out["ttft"] = first - t0
        if n > 1:
            out["tpot"] = (last - first) / (n - 1)
    return out


async def run_load(url: str, clients: int, duration: float, max_tokens: int, max_requests: int,
                   request_timeout: float, temperature: float) -> dict:
    import httpx

    results: list[dict] = []
    started = 0
    t_end = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def worker(i: int, client) -> None:
        nonlocal started
        k = 0
        while time.perf_counter() < t_end and started < max_requests:
            started += 1
            body = {"model": "any", "messages": [{"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}],
                    "max_tokens": max_tokens, "temperature": temperature, "seed": i * 1000 + k, "stream": True,
                    "stream_options": {"include_usage": True}}
            results.append(await _one(client, url, body, request_timeout))
            k += 1

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=request_timeout, limits=limits) as client:
        await asyncio.gather(*(worker(i, client) for i in range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors: dict[str, int] = {}
    for r in results:
        if "error" in r:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    ttft = [r["ttft"] for r in ok if "ttft" in r]
    tpot = [r["tpot"] for r in ok if "tpot" in r]
    itl = [g for r in ok for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients, "duration_s": duration, "wall_s": round(wall, 2), "max_tokens": max_tokens,
        "requests": len(results), "ok": len(ok), "errors": errors,
        "completion_tokens": tokens, "throughput_tok_s": round(tokens / wall, 1), "requests_per_s": round(len(ok) / wall, 2),
        "ttft_p50_ms": round(_pct(ttft, 50) * 1e3, 1), "ttft_p99_ms": round(_pct(ttft, 99) * 1e3, 1),
        "tpot_p50_ms": round(_pct(tpot, 50) * 1e3, 1), "tpot_p99_ms": round(_pct(tpot, 99) * 1e3, 1),
        "itl_p50_ms": round(_pct(itl, 50) * 1e3, 1), "itl_p99_ms": round(_pct(itl, 99) * 1e3, 1),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(artifact: Path, threads: int | None, log_path: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "edgellm.cli", "serve", str(artifact), "--port", str(port), "--log-level", "warning"]
    if threads:
        cmd += ["--threads", str(threads)]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; log: {log_path}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"server did not answer /health in 120 s; log: {log_path}")


def _server_metrics(url: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    src.add_argument("--artifact", type=Path, help="start `edgellm serve ARTIFACT` on a free loopback port")
    ap.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (1-64)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds to keep starting requests (<= 600)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-requests", type=int, default=2000, help="stop after this many requests in all")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=None, help="server CPU threads (with --artifact)")
    ap.add_argument("--json", type=Path, help="also write the record here")
    a = ap.parse_args(argv)
    if not 1 <= a.clients <= 64:
        ap.error(f"--clients {a.clients}: use 1..64")
    if not 0 < a.duration <= 600:
        ap.error(f"--duration {a.duration}: use (0, 600] seconds")
    if a.url and not _loopback(a.url):
        ap.error(f"--url {a.url} is not a loopback address; this load script only targets 127.0.0.1/localhost")
    proc = None
    try:
        if a.artifact:
            log_path = Path(tempfile.gettempdir()) / "serve_load_server.log"
            print(f"server log: {log_path}", file=sys.stderr)
            proc, url = _start_server(a.artifact, a.threads, log_path)
        else:
            url = a.url.rstrip("/")
        before = _server_metrics(url)
        rec = asyncio.run(run_load(url, a.clients, a.duration, a.max_tokens, a.max_requests, a.request_timeout,
                                   a.temperature))
        after = _server_metrics(url)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(15)
    d_tok = after["edgellm_decode_tokens_total"] - before["edgellm_decode_tokens_total"]
    d_sec = after["edgellm_decode_seconds_total"] - before["edgellm_decode_seconds_total"]
    d_steps = after["edgellm_decode_steps_total"] - before["edgellm_decode_steps_total"]
    p_tok = after["edgellm_prefill_tokens_total"] - before["edgellm_prefill_tokens_total"]
    p_sec = after["edgellm_prefill_seconds_total"] - before["edgellm_prefill_seconds_total"]
    rec["server_decode_tok_s"] = round(d_tok / d_sec, 1) if d_sec else 0.0
    rec["server_prefill_tok_s"] = round(p_tok / p_sec, 1) if p_sec else 0.0
    rec["mean_decode_batch"] = round(d_tok / d_steps, 2) if d_steps else 0.0
    rec["target"] = a.artifact.name if a.artifact else url
    keys = ["clients", "requests", "ok", "completion_tokens", "throughput_tok_s", "ttft_p50_ms", "ttft_p99_ms",
            "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms", "mean_decode_batch", "server_decode_tok_s",
            "server_prefill_tok_s"]
    print("| " + " | ".join(keys) + " | errors |")
    print("|" + "---|" * (len(keys) + 1))
    print("| " + " | ".join(str(rec[k]) for k in keys) + f" | {sum(rec['errors'].values())} |")
    if rec["errors"]:
        print("errors:", rec["errors"], file=sys.stderr)
    if a.json:
        a.json.write_text(json.dumps(rec, indent=1))
    return 0 if not rec["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
