"""Batched decode (`batch_decode`: on the owned cache a chain of CUDA graphs per batch size) against one-at-a-time
decode, 8 sequences of different prompt lengths, 12 steps, random weights, on the GPU machine:

  python bench/gpu_pdl.py prepare --out .device-pdl --no-tiny     # here (max_batch 32 builds)
  PYTHONPATH=.device-pdl/site:. python3 bench/gpu_batch_check.py --dev .device-pdl   # there; $OUT/batchcheck.json

docs/benchmarks/h200-pdl-batched-check.json is one such run (the owned builds of the three shapes)."""
import sys, json, os
from pathlib import Path
import numpy as np
sys.path.insert(0, "bench"); sys.path.insert(0, "tests")
from edgellm.device_runners.engine import Engine
import argparse
ap = argparse.ArgumentParser()
ap.add_argument("--dev", default=".device-pdl")
ap.add_argument("--variant", default="owned")
args = ap.parse_args()
dev = Path(args.dev)
out = {}
for shape in ("llama-3.2-1b", "llama-3-8b", "smollm2-135m"):
    art = dev / "art" / f"{shape}-{args.variant}"
    if not art.is_dir():
        continue
    e = Engine(art, random_weights=0)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 300, n).tolist() for n in (5, 17, 33, 3, 40, 9, 21, 2)]
    res = {}
    for mode in ("single", "batched"):
        seqs = [e.add_sequence() for _ in prompts]
        toks = [int(np.argmax(e.prefill(s, p))) for s, p in zip(seqs, prompts)]
        feed = [[(t + 7 * k) % 300 + 3 for t in toks] for k in range(12)]
        steps = [e.decode(seqs, f, batched=(mode == "batched")) for f in feed]
        res[mode] = np.stack(steps)
        for s in seqs:
            e.remove_sequence(s)
    a, b = res["single"], res["batched"]
    rel = float(np.abs(a - b).max() / np.abs(a).max())
    top = float((a.argmax(-1) == b.argmax(-1)).mean())
    out[shape] = {"max_abs": float(np.abs(a - b).max()), "rel_to_max": rel, "top1_agree": top, "steps": 12, "sequences": 8}
    print(shape, out[shape], flush=True)
    del e
json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "batchcheck.json"), "w"), indent=1)
