"""The CUDA decode fusions (--opt cuda_fuse) A/B in one GPU call: checks, profiles and tg128, fused vs unfused.

  python bench/gpu_fusion.py prepare --out .device-dec      # here: nvcc builds every artifact (~45 MiB)
  # GPU machine, carry .device-dec:
  PYTHONPATH=.device-dec/site:. python3 bench/gpu_fusion.py run --dev .device-dec

The bundle holds, each built twice (cuda_fuse=off and cuda_fuse=all, same code otherwise):
  tiny64-{llama,qwen2}-q4f16_1-{mode}  head_dim-64 tiny models with weights (qwen2: q/k/v bias) whose RMSNorm
                                       weights are drawn in [0.5, 1.5] (HF initializes them to one, which would hide
                                       a norm weight read from the wrong place)
  {shape}-{mode}                       SmolLM2-135M, Llama-3.2-1B, Llama-3-8B shapes, q4f16_1, shapes only
                                       (Llama-3-8B also with cuda_fuse=silu: the epilogue alone)
Run (each step reports and goes on when another fails):
  1. tiny models: fused decode logits vs the numpy model on the dequantized weights and vs the unfused build
     (equal bit for bit expected: the fusions keep every rounding), greedy 40 tokens equal;
  2. per shape, random weights (seed 0, the same in both builds): decode logits fused vs unfused over 8 steps,
     greedy 32-token chains, a CUPTI profile of 24 decode steps (kernels per token, GPU busy, span) and tg128
     (5 reps): unfused, fused (, silu), then unfused and fused again (drift check).
Writes $OUT/fusion.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
MODES = ("off", "all")
SHAPE_NAMES = ("smollm2-135m", "llama-3.2-1b", "llama-3-8b")
TINY = ("llama", "qwen2")


def prepare(out: Path, arch: str, shapes: list[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import gpu_prepare as gp
    import tiny_models
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.kernels import KernelOptions

    gp.new_bundle(out)
    preset = f"cuda-{arch.replace('_', '')}"
    for kind in TINY:
        name = f"{kind}_d64"
        tiny_models.SPECS[name] = dict(gp.TINY64, model_type=kind)
        ckpt = tiny_models.make_checkpoint(out / "ckpt" / name, name)
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(0.5 + torch.rand(p.shape, generator=g))
        model.save_pretrained(ckpt, safe_serialization=True)
        for mode in MODES:
            compile_model(CompileArgs(model=str(ckpt), output=out / "art" / f"tiny64-{kind}-q4f16_1-{mode}",
                                      target=preset, quant="q4f16_1", runtime=RuntimeOptions(256, 256, 16, 4),
                                      kernel_options=KernelOptions(cuda_fuse=mode)))
        shutil.rmtree(ckpt)  # the artifacts carry the weights the numpy reference reads
    for shape in shapes:
        gp.build_ab_shapes(out, arch, "cuda_fuse", MODES + (("silu",) if shape == "llama-3-8b" else ()), shape)
    gp.check_bundle_size(out)


results: dict = {"checks": {}, "profiles": {}, "bench": [], "errors": []}


def _decode_logits(eng, prompt: list[int], feed: list[int]) -> np.ndarray:
    with eng.sequence() as seq:
        steps = [seq.prefill(prompt)] + [seq.decode(t) for t in feed]
    return np.stack([np.asarray(s, np.float32).reshape(-1) for s in steps])


def _greedy(eng, prompt: list[int], n: int) -> list[int]:
    return [int(t) for t in eng.generate_ids(prompt, n)]


def check_tiny(dev: Path) -> None:
    import gpu_run
    from edgellm.device_runners.engine import Engine

    gpu_run.DEV = dev
    gpu_run.results = results
    long = [int(x) for x in np.random.default_rng(5).integers(3, 320, 150)]
    for kind in TINY:
        art = f"tiny64-{kind}-q4f16_1"
        for mode in MODES:  # decode steps (the fused GEMVs) vs numpy and vs the prefill path
            gpu_run.check_q4_vs_numpy(f"{art}-{mode} vs numpy, decode 50 steps after 100 (cuda)", f"{art}-{mode}",
                                      long, 100)
        off, on = Engine(dev / "art" / f"{art}-off"), Engine(dev / "art" / f"{art}-all")
        a, b = _decode_logits(off, long[:100], long[100:]), _decode_logits(on, long[:100], long[100:])
        ga, gb = _greedy(off, long[:20], 40), _greedy(on, long[:20], 40)
        results["checks"][f"{art}: fused vs unfused decode logits (51 steps) and greedy 40"] = {
            "max_abs_diff": float(np.abs(a - b).max()), "bit_equal": bool(np.array_equal(a, b)),
            "greedy_equal": ga == gb, "ok": bool(np.abs(a - b).max() <= 1e-3 * np.abs(a).max()) and ga == gb}


def bench_shape(dev: Path, shape: str) -> None:
    import gpu_run
    from edgellm.device_runners.bench import run_bench
    from edgellm.device_runners.engine import Engine

    modes = [m for m in ("off", "all", "silu") if (dev / "art" / f"{shape}-{m}").is_dir()]
    engines = {m: Engine(dev / "art" / f"{shape}-{m}", random_weights=0) for m in modes}
    prompt = [7, 8, 9]
    ref = _greedy(engines["off"], prompt, 32)
    logits = {m: _decode_logits(e, prompt, ref[:8]) for m, e in engines.items()}
    got = _greedy(engines["all"], prompt, 32)
    a, b = logits["off"], logits["all"]
    results["checks"][f"{shape}: fused vs unfused decode logits (8 steps) and greedy 32 (random weights)"] = {
        "max_abs_diff": float(np.abs(a - b).max()), "bit_equal": bool(np.array_equal(a, b)),
        "greedy_equal": got == ref, "ok": bool(np.abs(a - b).max() <= 1e-3 * np.abs(a).max()) and got == ref}
    gpu_run.results = results
    for m, e in engines.items():
        gpu_run.profile_decode(e, f"{shape}-{m}")
    name = gpu_run.torch_device_name()
    for m in modes + modes[:2]:
        (r,) = run_bench(engines[m], 0, 128, reps=5, warmup=1, device_name=name)
        results["bench"].append({"shape": shape, "fuse": m, "test": r.test, "avg_ts": r.avg_ts,
                                 "stddev_ts": r.stddev_ts, "samples_ts": r.samples_ts})
        print(f"{shape:<14} fuse={m:<4} {r.test} {r.avg_ts:9.1f} tok/s +- {r.stddev_ts:.1f}", flush=True)


def run(dev: Path, shapes: list[str]) -> int:
    import gpu_run

    results["device"] = gpu_run.torch_device_name()
    steps = [("tiny checks", lambda: check_tiny(dev))]
    steps += [(shape, lambda s=shape: bench_shape(dev, s)) for shape in shapes]
    out = Path(os.environ.get("OUT", ".")) / "fusion.json"
    for label, step in steps:
        t0 = time.perf_counter()
        try:
            step()
        except Exception:
            results["errors"].append(f"{label}: " + traceback.format_exc()[-3000:])
        print(f"[{label}: {time.perf_counter() - t0:.1f}s]", flush=True)
        out.write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results["checks"], indent=1, default=str))
    for label, p in results["profiles"].items():
        print(f"{label}: GPU busy {p['gpu_busy_us_per_token']:.0f} us of a {p['gpu_span_us_per_token']:.0f} us span, "
              f"{p['kernels_per_token']:.0f} kernels/token, wall {p['wall_ms_per_token_profiled']:.3f} ms")
        for k in p["top_kernels"][:10]:
            print(f"    {k['us_per_token']:8.1f} us {k['per_token']:5.1f}x  {k['name'][:90]}")
    for e in results["errors"]:
        print("ERROR:", e)
    return 1 if results["errors"] else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["prepare", "run"])
    ap.add_argument("--out", default=str(REPO / ".device-dec"))
    ap.add_argument("--dev", default=str(REPO / ".device-dec"))
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--shapes", default=",".join(SHAPE_NAMES))
    args = ap.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    if args.what == "prepare":
        prepare(Path(args.out).resolve(), args.arch, shapes)
        return 0
    return run(Path(args.dev).resolve(), shapes)


if __name__ == "__main__":
    sys.exit(main())
