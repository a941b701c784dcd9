"""The wgmma prefill GEMM end to end on an H200 (issue 16 item 3), one device call.

  python bench/gpu_wgmma/e2e.py prepare [--out .device-pre]
      the bundle: site/ (runtime-only TVM), the tiny correctness artifacts and the Llama-3-8B shape (defaults: the
      wgmma GEMM on cuda-sm90) as bench/gpu_prepare.py builds them, the 8B shape once per --opt cuda_gemm value
      (mma-pipelined = tc2, wgmma) for the A/B, and the standalone harness (bench/gpu_wgmma/harness.cu, sm_90a).
  there, in one call:
      bash bench/gpu_wgmma/run.sh .device-pre/wgmma/harness 20        # kernel checks + timings + cuBLAS
      PYTHONPATH=.device-pre/site:. python3 bench/gpu_run.py --dev .device-pre --models "" --skip-checks --skip-hf
                                                                       # tiny models vs transformers / numpy
      PYTHONPATH=.device-pre/site:. python3 bench/gpu_wgmma/e2e.py run --dev .device-pre
      (pp128 / pp512 of both 8B artifacts, a prefill kernel table of each, transformers fp16 pp128 / pp512)
Writes $OUT/e2e.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
MODES = ("mma-pipelined", "wgmma")
results: dict = {"bench": [], "profiles": {}, "errors": []}


def prepare(out: Path) -> None:
    import gpu_prepare

    gpu_prepare.OUT = out
    gpu_prepare.new_bundle(out)
    gpu_prepare.build_artifacts("sm_90", ["llama-3-8b"])
    gpu_prepare.build_ab_shapes(out, "sm_90", "cuda_gemm", MODES)
    (out / "wgmma").mkdir()
    subprocess.run(["nvcc", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-o",
                    str(out / "wgmma" / "harness"), str(REPO / "bench" / "gpu_wgmma" / "harness.cu")], check=True)
    gpu_prepare.check_bundle_size(out)


def run_models(dev: Path) -> None:
    import gpu_run
    import torch

    from edgellm.device_runners.bench import run_bench
    from edgellm.device_runners.engine import Engine

    name = torch.cuda.get_device_name(0)
    for mode in MODES:
        path = dev / "art" / f"llama-3-8b-{mode}"
        eng = Engine(path, random_weights=0)
        chosen = sorted(eng.art.manifest["kernels"]["chosen"].get("linear", []))
        for n_prompt in (128, 512):
            for r in run_bench(eng, n_prompt, 0, reps=5, warmup=1, device_name=name):
                results["bench"].append({"engine": f"edgellm cuda_gemm={mode}", "test": r.test, "avg_ts": r.avg_ts,
                                         "stddev_ts": r.stddev_ts, "samples_ts": r.samples_ts, "linear": chosen})
                print(f"llama-3-8b cuda_gemm={mode}: {r.test} {r.avg_ts:,.0f} tok/s", flush=True)
        try:
            results["profiles"][mode] = gpu_run.prefill_kernel_table(eng, 512, top=16)
        except Exception:  # noqa: BLE001 (record it and go on: device time is scarce)
            results["errors"].append(f"profile {mode}: " + traceback.format_exc()[-2000:])
        del eng
        torch.cuda.empty_cache()


def run_hf(dev: Path) -> None:
    """transformers fp16 (random init on the GPU, cuBLAS + SDPA) pp128 / pp512 of the same shape, as gpu_run."""
    import gpu_run
    import torch

    cfg, m = gpu_run.hf_random_llama(dev / "ckpt" / "llama-3-8b")

    def pp(n):
        ids = torch.randint(0, cfg.vocab_size, (1, n), device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        m(ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t)

    with torch.no_grad():
        for n in (128, 512):
            pp(n)
            ts = [pp(n) for _ in range(5)]
            results["bench"].append({"engine": "transformers fp16", "test": f"pp{n}", "avg_ts": float(np.mean(ts)),
                                     "stddev_ts": float(np.std(ts, ddof=1)), "samples_ts": ts})
            print(f"llama-3-8b transformers fp16: pp{n} {np.mean(ts):,.0f} tok/s", flush=True)


def run(dev: Path) -> int:
    import torch

    results["device"] = torch.cuda.get_device_name(0)
    out = Path(os.environ.get("OUT", ".")) / "e2e.json"
    from bench_steps import run_steps

    run_steps((("models", lambda: run_models(dev)), ("transformers", lambda: run_hf(dev))), results, out)
    for label, p in results["profiles"].items():
        print(f"prefill 512, cuda_gemm={label}: GPU busy {p['gpu_busy_ms']:.2f} ms")
        for k in p["top_kernels"][:6]:
            print(f"    {k['us'] / 1e3:7.2f} ms {k['calls']:4d}x  {k['name'][:100]}")
    for e in results["errors"]:
        print("ERROR", e[-600:])
    return 1 if results["errors"] else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=("prepare", "run"))
    ap.add_argument("--out", default=str(REPO / ".device-pre"))
    ap.add_argument("--dev", default=str(REPO / ".device-pre"))
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(Path(args.out).resolve())
        return 0
    return run(Path(args.dev).resolve())


if __name__ == "__main__":
    sys.exit(main())
