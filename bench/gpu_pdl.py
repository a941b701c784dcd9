"""Programmatic dependent launch (--opt cuda_pdl) A/B in one GPU call: checks, profiles, tg128 and pp512.

  python bench/gpu_pdl.py prepare --out .device-pdl     # here: nvcc builds every artifact (~55 MiB with the runtime)
  # GPU machine, carry .device-pdl:
  PYTHONPATH=.device-pdl/site:. python3 bench/gpu_pdl.py run --dev .device-pdl

The bundle holds, per variant (VARIANTS: kernel options; the same code otherwise):
  tiny64-llama-q4f16_1-{variant}   the head_dim-64 tiny Llama with weights (norm weights drawn in [0.5, 1.5])
  {shape}-{variant}                SmolLM2-135M, Llama-3.2-1B, Llama-3-8B shapes, q4f16_1, shapes only
Run (each step reports and goes on when another fails):
  1. tiny model: each variant's prefill + 50 decode steps vs the numpy model on the dequantized weights, and its
     logits vs the `off` build's (PDL changes no arithmetic: bit-equal expected for `on`), greedy 40 equal;
  2. per shape, random weights (seed 0, the same in every build): decode logits vs `off` over 8 steps, greedy
     32-token chains, a CUPTI profile of 24 decode steps (kernels per token, GPU busy, span), then tg128 (5 reps)
     and pp512 (3 reps) of every variant, and `off` and `on` again (drift check).
Writes $OUT/pdl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
SHAPE_NAMES = ("smollm2-135m", "llama-3.2-1b", "llama-3-8b")
# variant -> kernel options; `off` first (the reference of every comparison)
VARIANTS = {
    "off": {"cuda_pdl": "off"},
    "on": {"cuda_pdl": "on"},
    "owned": {"cuda_pdl": "on", "cuda_kv": "owned"},  # edgellm's KV cache: one CUDA graph per decode step
    "all": {"cuda_pdl": "on", "cuda_fuse": "all"},  # the residual add in o / down too: fewer kernels
}
SHAPE_VARIANTS = {"smollm2-135m": ("off", "on", "owned"), "llama-3.2-1b": ("off", "on", "owned"),
                  "llama-3-8b": ("off", "on", "owned", "all")}
TINY_VARIANTS = ("off", "on", "owned")


def prepare(out: Path, arch: str, shapes: list[str], tiny: bool = True) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import gpu_prepare as gp
    import tiny_models
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.kernels import KernelOptions

    gp.new_bundle(out)
    preset = f"cuda-{arch.replace('_', '')}"
    if tiny:
        tiny_models.SPECS["llama_d64"] = dict(gp.TINY64)
        ckpt = tiny_models.make_checkpoint(out / "ckpt" / "llama_d64", "llama_d64")
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(0.5 + torch.rand(p.shape, generator=g))
        model.save_pretrained(ckpt, safe_serialization=True)
        for v in TINY_VARIANTS:
            compile_model(CompileArgs(model=str(ckpt), output=out / "art" / f"tiny64-llama-q4f16_1-{v}", target=preset,
                                      quant="q4f16_1", runtime=RuntimeOptions(256, 256, 16, 4),
                                      kernel_options=KernelOptions(**VARIANTS[v])))
        shutil.rmtree(ckpt)  # the artifacts carry the weights the numpy reference reads
    saved, gp.OUT = gp.OUT, out  # shape_folder writes under OUT/ckpt
    try:
        for shape in shapes:
            folder = gp.shape_folder(shape)
            for v in SHAPE_VARIANTS[shape]:
                compile_model(CompileArgs(model=str(folder), output=out / "art" / f"{shape}-{v}", target=preset,
                                          quant="q4f16_1", runtime=RuntimeOptions(1024, 512, 16, 1),
                                          shapes_only=True, kernel_options=KernelOptions(**VARIANTS[v])))
    finally:
        gp.OUT = saved
    gp.check_bundle_size(out)


results: dict = {"variants": VARIANTS, "checks": {}, "profiles": {}, "bench": [], "errors": []}


def _decode_logits(eng, prompt: list[int], feed: list[int]) -> np.ndarray:
    with eng.sequence() as seq:
        steps = [seq.prefill(prompt)] + [seq.decode(t) for t in feed]
    return np.stack([np.asarray(s, np.float32).reshape(-1) for s in steps])


def _greedy(eng, prompt: list[int], n: int) -> list[int]:
    return [int(t) for t in eng.generate_ids(prompt, n)]


def _compare(label: str, a: np.ndarray, b: np.ndarray, ga: list[int], gb: list[int], exact: bool) -> None:
    diff = float(np.abs(a - b).max())
    close = diff <= 1e-3 * float(np.abs(a).max())
    results["checks"][label] = {"max_abs_diff": diff, "bit_equal": bool(np.array_equal(a, b)),
                                "greedy_equal": ga == gb, "ok": (bool(np.array_equal(a, b)) if exact else close)
                                and ga == gb}


def check_tiny(dev: Path) -> None:
    import gpu_run
    from edgellm.device_runners.engine import Engine

    gpu_run.DEV = dev
    gpu_run.results = results
    long = [int(x) for x in np.random.default_rng(5).integers(3, 320, 150)]
    art = "tiny64-llama-q4f16_1"
    variants = [v for v in TINY_VARIANTS if (dev / "art" / f"{art}-{v}").is_dir()]
    for v in variants:
        gpu_run.check_q4_vs_numpy(f"{art}-{v} vs numpy, decode 50 steps after 100", f"{art}-{v}", long, 100)
    off = Engine(dev / "art" / f"{art}-off")
    a, ga = _decode_logits(off, long[:100], long[100:]), _greedy(off, long[:20], 40)
    for v in variants[1:]:
        e = Engine(dev / "art" / f"{art}-{v}")
        _compare(f"{art}-{v} vs off: decode logits (51 steps), greedy 40", a,
                 _decode_logits(e, long[:100], long[100:]), ga, _greedy(e, long[:20], 40),
                 exact=VARIANTS[v].keys() == {"cuda_pdl"})


def bench_shape(dev: Path, shape: str, bw: float) -> None:
    import gpu_run
    from edgellm.device_runners.bench import run_bench
    from edgellm.device_runners.engine import Engine

    variants = [v for v in SHAPE_VARIANTS[shape] if (dev / "art" / f"{shape}-{v}").is_dir()]
    engines = {v: Engine(dev / "art" / f"{shape}-{v}", random_weights=0) for v in variants}
    prompt = [7, 8, 9]
    ref = _greedy(engines["off"], prompt, 32)
    a = _decode_logits(engines["off"], prompt, ref[:8])
    gpu_run.results = results
    for v, e in engines.items():
        if v != "off":
            _compare(f"{shape}-{v} vs off: decode logits (8 steps), greedy 32 (random weights)", a,
                     _decode_logits(e, prompt, ref[:8]), ref, _greedy(e, prompt, 32),
                     exact=VARIANTS[v].keys() == {"cuda_pdl"})
        gpu_run.profile_decode(e, f"{shape}-{v}")
    name = gpu_run.torch_device_name()
    read = gpu_run.read_bytes_per_token(engines["off"])
    for v in variants + ["off", "on"]:
        for r in run_bench(engines[v], 0, 128, reps=5, warmup=1, device_name=name):
            results["bench"].append({"shape": shape, "variant": v, "test": r.test, "avg_ts": r.avg_ts,
                                     "stddev_ts": r.stddev_ts, "samples_ts": r.samples_ts,
                                     "bandwidth_fraction": read * r.avg_ts / bw, "copy_bandwidth_gbs": bw / 1e9})
            print(f"{shape:<14} {v:<6} {r.test} {r.avg_ts:9.1f} tok/s +- {r.stddev_ts:.1f}", flush=True)
    for v in variants:
        for r in run_bench(engines[v], 512, 0, reps=3, warmup=1, device_name=name):
            results["bench"].append({"shape": shape, "variant": v, "test": r.test, "avg_ts": r.avg_ts,
                                     "stddev_ts": r.stddev_ts, "samples_ts": r.samples_ts})
            print(f"{shape:<14} {v:<6} {r.test} {r.avg_ts:9.1f} tok/s +- {r.stddev_ts:.1f}", flush=True)


def run(dev: Path, shapes: list[str]) -> int:
    import gpu_run
    from bench_steps import run_steps

    results["device"] = gpu_run.torch_device_name()
    results["copy_bandwidth_gbs"] = gpu_run.copy_bandwidth() / 1e9
    bw = results["copy_bandwidth_gbs"] * 1e9
    steps = [("tiny checks", lambda: check_tiny(dev))] if (dev / "art" / "tiny64-llama-q4f16_1-off").is_dir() else []
    steps += [(shape, lambda s=shape: bench_shape(dev, s, bw)) for shape in shapes]
    run_steps(steps, results, Path(os.environ.get("OUT", ".")) / "pdl.json")
    print(json.dumps(results["checks"], indent=1, default=str))
    for label, p in results["profiles"].items():
        print(f"{label}: GPU busy {p['gpu_busy_us_per_token']:.0f} us of a {p['gpu_span_us_per_token']:.0f} us span, "
              f"{p['kernels_per_token']:.0f} kernels/token, wall {p['wall_ms_per_token_profiled']:.3f} ms")
        for k in p["top_kernels"][:8]:
            print(f"    {k['us_per_token']:8.1f} us {k['per_token']:5.1f}x  {k['name'][:90]}")
    for e in results["errors"]:
        print("ERROR:", e)
    return 1 if results["errors"] else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["prepare", "run"])
    ap.add_argument("--out", default=str(REPO / ".device-pdl"))
    ap.add_argument("--dev", default=str(REPO / ".device-pdl"))
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--shapes", default=",".join(SHAPE_NAMES))
    ap.add_argument("--no-tiny", action="store_true", help="prepare: skip the tiny model")
    args = ap.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    if args.what == "prepare":
        prepare(Path(args.out).resolve(), args.arch, shapes, not args.no_tiny)
        return 0
    return run(Path(args.dev).resolve(), shapes)


if __name__ == "__main__":
    sys.exit(main())
