"""Where a decode step's time goes on the CPU: every VM call of `decode` timed through the VM's instrument hook.

    python bench/cpu_profile.py ARTIFACT [--threads 2] [--context 128] [--steps 64] [--json out.json]

Prefills `--context` tokens, then times `--steps` decode steps twice: once plain (the real step time) and once with
the instrument hook, which records wall time between the hook's before/after calls per callee (kernel, KV-cache
builtin, ...). The hook itself costs a few microseconds per call; the table reports it as the gap between the
instrumented and the plain step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path


def profile(artifact: str, threads: int, context: int, steps: int) -> dict:
    from edgellm.device_runners.engine import Engine

    eng = Engine(artifact, threads=threads)
    toks = [(i * 7919) % 40000 + 100 for i in range(context + 4 + 2 * steps)]
    per_call: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    started: dict[str, float] = {}

    def instrument(func, name, before_run, ret_val, *args):
        now = time.perf_counter()
        if before_run:
            started[name] = now
        else:
            per_call[name] += now - started.pop(name, now)
            counts[name] += 1
        return 0

    with eng.sequence() as seq:
        seq.prefill(toks[:context])
        for t in toks[context:context + 4]:  # warm-up
            seq.decode(t)
        t0 = time.perf_counter()
        for t in toks[context + 4:context + 4 + steps]:
            seq.decode(t)
        plain = (time.perf_counter() - t0) / steps
        eng.vm.set_instrument(instrument)
        t0 = time.perf_counter()
        for t in toks[context + 4 + steps:context + 4 + 2 * steps]:
            seq.decode(t)
        instrumented = (time.perf_counter() - t0) / steps
    rows = sorted(({"callee": k, "calls_per_step": counts[k] / steps, "ms_per_step": v / steps * 1e3}
                   for k, v in per_call.items()), key=lambda r: -r["ms_per_step"])
    return {"artifact": artifact, "threads": threads, "context": context, "steps": steps,
            "step_ms": plain * 1e3, "instrumented_step_ms": instrumented * 1e3, "callees": rows}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    r = profile(a.artifact, a.threads, a.context, a.steps)
    covered = sum(x["ms_per_step"] for x in r["callees"])
    print(f"decode step at context {a.context}, {a.threads} threads: {r['step_ms']:.2f} ms "
          f"({1e3 / r['step_ms']:.1f} tok/s); instrumented {r['instrumented_step_ms']:.2f} ms")
    print("| callee | calls/step | ms/step | share of the plain step |\n|---|---:|---:|---:|")
    for x in r["callees"][:15]:
        print(f"| {x['callee']} | {x['calls_per_step']:.0f} | {x['ms_per_step']:.3f} | "
              f"{x['ms_per_step'] / r['step_ms']:.0%} |")
    print(f"| (all callees) | | {covered:.3f} | |")
    if a.json:
        a.json.write_text(json.dumps(r, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
