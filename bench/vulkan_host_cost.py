"""Host-side cost of a decode token through the WebGPU plugin (issue 15): what the plugin does per token, counted.

  python bench/vulkan_host_cost.py [ARTIFACT ...]     # default: builds SmolLM2 q4f16_1 for vulkan under /tmp

Per greedy decode token (after a warm-up): dispatches, submits, command encoders, compute passes, bind groups created
and reused, device-to-host reads, host-to-device writes, syncs, and the host time inside the plugin (recording,
submitting, waiting for the queue) beside the token's wall time. EDGELLM_WEBGPU_FLUSH=N sets how many dispatches
are recorded before a submit (the plugin's default 64; 0 = only when the host reads). With EDGELLM_WEBGPU_PROFILE=1
(or --profile) every dispatch is timed on the GPU (timestamp queries) and the per-kernel table is printed. On
lavapipe the shader time is the CPU's and not meaningful; the counts and the recording time are.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_smollm2(out: Path) -> Path:
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions

    if not (out / "manifest.json").exists():
        compile_model(CompileArgs(model=None, output=out, target="vulkan", quant="q4f16_1",
                                  runtime=RuntimeOptions(context_window=1024, prefill_chunk=128, max_batch=1)))
    return out


def stats(reset: bool = False) -> dict:
    from edgellm import _tvm

    return json.loads(str(_tvm.get_global_func("edgellm.webgpu.stats")(0, int(reset))))


def measure(eng, tokens: int, profile: bool, flush: int | None = None, chain: bool = False) -> dict:
    """Counters per greedy decode token of the open Engine `eng` (device 0), after 3 warm-up tokens. chain: the
    tokens as one Engine.greedy_chain (one step queued ahead), else one decode_greedy each."""
    from edgellm import _tvm

    g = _tvm.get_global_func
    if flush is not None:
        g("edgellm.webgpu.set_flush_every")(0, flush)
    prompt = [1, 5, 7, 100, 42, 9, 33, 250]
    with eng.sequence() as seq:
        tok = int(seq.prefill(prompt).argmax())
        for _ in range(3):  # warm-up: pipelines, bind groups, workspaces
            tok = seq.decode_greedy(tok)
        if profile:
            g("edgellm.webgpu.set_profile")(0, 1)
        stats(reset=True)
        t0 = time.perf_counter()
        if chain:
            for tok in seq.greedy_chain(tok, tokens):
                pass
        else:
            for _ in range(tokens):
                tok = seq.decode_greedy(tok)
        wall = time.perf_counter() - t0
        s = stats(reset=True)
        if profile:
            g("edgellm.webgpu.set_profile")(0, 0)
    per = {k: s[k] / tokens for k in ("dispatches", "submits", "encoders", "passes", "bind_groups_created",
                                      "bind_group_hits", "reads", "writes", "device_copies", "syncs")}
    us = {k: s[k] / tokens / 1e3 for k in ("record_ns", "submit_ns", "wait_ns")}
    out = {"artifact": str(eng.art.root if hasattr(eng.art, "root") else ""), "device": eng.device_info.describe(),
           "tokens": tokens, "chain": chain, "device_argmax": eng.has_device_argmax, "flush_every": s["flush_every"],
           "profile": profile, "per_token": per,
           "us_per_token": {**us, "wall": wall / tokens * 1e6,
                            "host_outside_wait": wall / tokens * 1e6 - us["wait_ns"]},
           "record_us_per_dispatch": s["record_ns"] / max(1, s["dispatches"]) / 1e3}
    if profile:
        kernels = sorted(s["kernels"].items(), key=lambda kv: -kv[1][1])
        out["gpu_us_per_token"] = sum(v[1] for _, v in kernels) / tokens / 1e3
        out["kernels"] = {k: {"per_token": v[0] / tokens, "us_per_token": v[1] / tokens / 1e3} for k, v in kernels}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="*")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--profile", action="store_true", help="also one profiled pass (GPU time per kernel)")
    ap.add_argument("--flush", default="", help="comma-separated dispatches-per-submit values to compare")
    ap.add_argument("--random-weights", type=int, default=None)
    ap.add_argument("--json", default=None, help="append the records to this JSON list")
    args = ap.parse_args()
    from edgellm.device_runners.engine import Engine
    from edgellm.runtime.webgpu_plugin import load_plugin

    load_plugin()
    arts = [Path(a) for a in args.artifacts] or [build_smollm2(Path("/tmp/h5-smollm2-vulkan"))]
    records = []
    for art in arts:
        eng = Engine(art, verify=False, random_weights=args.random_weights)
        flushes = [int(x) for x in args.flush.split(",") if x] or [None]
        runs = [(f, False) for f in flushes] + ([(flushes[-1], True)] if args.profile else [])
        for flush, prof in runs:
            r = measure(eng, args.tokens, prof, flush)
            r["artifact"] = str(art)
            records.append(r)
            brief = {k: r[k] for k in ("flush_every", "profile")}
            print(json.dumps({"artifact": art.name, **brief, "per_token": r["per_token"],
                              "us_per_token": r["us_per_token"], "gpu_us_per_token": r.get("gpu_us_per_token")}))
            if prof:
                for k, v in list(r["kernels"].items())[:25]:
                    print(f"  {v['us_per_token']:10.1f} us/token  {v['per_token']:6.1f}x  {k}")
            sys.stdout.flush()
            if args.json:
                Path(args.json).write_text(json.dumps(records, indent=1))
        del eng


if __name__ == "__main__":
    main()
