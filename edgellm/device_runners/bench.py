"""llama-bench style benchmark records and their printers (md, json, jsonl, csv).

Tests: `pp{n}` prefills n prompt tokens into an empty sequence; `tg{n}` decodes n tokens greedily after a 1-token prompt.
Each test runs `warmup` untimed reps, then `reps` timed ones; tok/s is per rep, reported as mean and stddev.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from .engine import Engine
from .host import host_info


@dataclass
class BenchRecord:
    test: str
    n_prompt: int
    n_gen: int
    reps: int
    avg_ts: float
    stddev_ts: float
    avg_ns: int
    stddev_ns: int
    samples_ts: list[float]
    samples_ns: list[int]
    weight_bytes: int
    bandwidth_gbs: float  # weight bytes read per token x tok/s (decode), 0 for prefill
    model: str
    arch: str
    scheme: str
    params: int
    target: str
    device: str
    threads: int
    tvm_version: str
    git_sha: str | None
    peak_rss_mib: float
    timestamp: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    identity: dict | None = None  # where it was measured: fleet.identity.device_identity (host, GPU, versions, digest)


def _peak_rss_mib() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if platform.system() != "Darwin" else kb / 2**20


def _time_pp(engine: Engine, n: int, rng) -> int:
    ids = rng.integers(0, engine.vocab_size, n).tolist()
    with engine.sequence() as seq:
        t0 = time.perf_counter_ns()
        seq.prefill(ids)
        return time.perf_counter_ns() - t0


def _time_tg(engine: Engine, n: int, rng) -> int:
    vocab = engine.vocab_size
    with engine.sequence() as seq:
        tok = int(np.argmax(seq.prefill([int(rng.integers(0, vocab))])))
        t0 = time.perf_counter_ns()
        # greedy: on CUDA the argmax runs on the device and one int32 comes back per token (on the owned cache
        # with one step queued ahead: Engine.greedy_chain)
        for _ in seq.greedy_chain(tok, n):
            pass
        return time.perf_counter_ns() - t0


def run_bench(engine: Engine, n_prompt: int = 128, n_gen: int = 128, reps: int = 5, warmup: int = 1,
              device_name: str | None = None, identity_name: str | None = None) -> list[BenchRecord]:
    from ..fleet.identity import device_identity

    m = engine.info
    if not engine.fits(max(n_prompt, 1)) or not engine.fits(1 + n_gen):  # pp: the prompt; tg: 1 token + n fed
        raise ValueError(f"-p {n_prompt} / -n {n_gen} do not fit the artifact's context window {engine.context_window}")
    rng = np.random.default_rng(0)
    wb = engine.art.weight_bytes
    ident = device_identity(identity_name, engine.art.digest, device_name or _device_name(m.device))
    records = []
    for test, n, fn in (("pp", n_prompt, _time_pp), ("tg", n_gen, _time_tg)):
        if n <= 0:
            continue
        for _ in range(warmup):
            fn(engine, n, rng)
        ns = [fn(engine, n, rng) for _ in range(reps)]
        ts = [n / (x / 1e9) for x in ns]
        avg_ts = statistics.fmean(ts)
        records.append(BenchRecord(
            test=f"{test}{n}", n_prompt=n if test == "pp" else 0, n_gen=n if test == "tg" else 0, reps=reps,
            avg_ts=avg_ts, stddev_ts=statistics.stdev(ts) if reps > 1 else 0.0,
            avg_ns=int(statistics.fmean(ns)), stddev_ns=int(statistics.stdev(ns)) if reps > 1 else 0,
            samples_ts=ts, samples_ns=ns, weight_bytes=wb,
            bandwidth_gbs=wb * avg_ts / 1e9 if test == "tg" else 0.0,
            model=os.path.basename(m.source), arch=m.arch, scheme=m.scheme,
            params=int(m.raw["model"].get("params", 0)), target=m.preset,
            device=device_name or _device_name(m.device),
            threads=engine.threads, tvm_version=m.tvm_version,
            git_sha=m.raw.get("git_sha"), peak_rss_mib=_peak_rss_mib(), identity=ident,
        ))
    return records


def _device_name(kind: str) -> str:
    return host_info().cpu_model if kind == "cpu" else kind


MD_COLUMNS = ["model", "scheme", "params", "weight_bytes", "target", "threads", "test", "t/s", "GB/s"]


def format_records(records: list[BenchRecord], fmt: str) -> str:
    rows = [asdict(r) for r in records]
    if fmt == "json":
        return json.dumps(rows, indent=1)
    if fmt == "jsonl":
        return "\n".join(json.dumps(r) for r in rows)
    if fmt == "csv":
        buf = io.StringIO()
        flat = [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()} for r in rows]
        w = csv.DictWriter(buf, fieldnames=list(flat[0]) if flat else [])
        w.writeheader()
        w.writerows(flat)
        return buf.getvalue().rstrip("\n")
    if fmt == "md":
        lines = ["| " + " | ".join(MD_COLUMNS) + " |", "|" + "|".join("---:" if c in ("params", "weight_bytes", "threads", "t/s", "GB/s") else "---" for c in MD_COLUMNS) + "|"]
        for r in records:
            vals = [r.model, r.scheme, f"{r.params / 1e6:.1f}M", f"{r.weight_bytes / 2**20:.1f} MiB", r.target, str(r.threads),
                    r.test, f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}", f"{r.bandwidth_gbs:.2f}" if r.bandwidth_gbs else "-"]
            lines.append("| " + " | ".join(vals) + " |")
        return "\n".join(lines)
    raise ValueError(f"unknown format {fmt!r}; choose md, json, jsonl or csv")
