"""A/B of the int8 activation group (scheme field act_group) on the CPU kernels: each SmolLM2 linear shape of a decode
step timed with the row as it is (d per packed word) and with act_group=0 (d per weight group of 32, the previous
kernels), interleaved in one process so that a loaded machine slows both alike.

    python bench/cpu_act_group_ab.py --threads 2 [--quant q4f32_2] [--rounds 30] [--rows 1]

Prints per shape the best-of-rounds time of each variant and the ratio, and the decode-weighted total (each shape
times its calls per token, the head once).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = [("qkv_proj", 576, 960, 30), ("o_proj", 576, 576, 30), ("gate_up_proj", 576, 3072, 30),
          ("down_proj", 1536, 576, 30), ("lm_head (8-bit)", 576, 49152, 1)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quant", default="q4f32_2")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--rows", type=int, default=1, help="rows of x (1: decode GEMV; more: a GEMM)")
    a = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(a.threads)
    import numpy as np
    import tvm

    from edgellm.kernels import KernelRegistry
    from edgellm.quant import SCHEMES
    from edgellm.quant import reference as ref
    from edgellm.targets import resolve

    target, dev = resolve("host").tvm(), tvm.cpu()
    layer = SCHEMES[a.quant]
    head = layer.partner("q8")
    rng = np.random.default_rng(0)
    fns = []
    for name, in_f, out_f, count in SHAPES:
        row = head if name.startswith("lm_head") else layer
        pair = []
        for s in (row, replace(row, act_group=0)):
            rows = max(a.rows, 1)
            f = KernelRegistry(target).linear(None if a.rows > 1 else 1, in_f, out_f, s, s.act_dtype, False)
            fn = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target)["main"]
            w = rng.standard_normal((out_f, in_f)).astype(np.float32)
            x = rng.standard_normal((rows, in_f)).astype(np.float32)
            args = [tvm.runtime.tensor(v, dev) for v in [x, *ref.quantize(w, s)]]
            args.append(tvm.runtime.empty((rows, out_f), "float32", dev))
            pair.append((fn, args))
        fns.append((name, count, pair, row.act_group_size))
    best = {(n, i): float("inf") for n, *_ in fns for i in range(2)}
    for _ in range(a.rounds):
        for name, count, pair, _ag in fns:
            for i, (fn, args) in enumerate(pair):
                reps = 200 if count > 1 else 20
                fn(*args)
                t = time.perf_counter()
                for _ in range(reps):
                    fn(*args)
                best[(name, i)] = min(best[(name, i)], (time.perf_counter() - t) / reps)
    print(f"{a.quant}, {a.threads} threads, rows {a.rows}, best of {a.rounds} rounds (us per call)")
    print("| linear | calls/token | d per word | d per 32 | ratio |")
    print("|---|---:|---:|---:|---:|")
    tot = [0.0, 0.0]
    for name, count, _pair, ag in fns:
        new, old = best[(name, 0)], best[(name, 1)]
        tot[0] += count * new
        tot[1] += count * old
        print(f"| {name} (d per {ag}) | {count} | {1e6 * new:.1f} | {1e6 * old:.1f} | {new / old:.3f} |")
    print(f"| total per token (weighted by calls) | | {1e3 * tot[0]:.3f} ms | {1e3 * tot[1]:.3f} ms "
          f"| {tot[0] / tot[1]:.3f} |")


if __name__ == "__main__":
    main()
