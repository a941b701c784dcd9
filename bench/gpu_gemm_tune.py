"""Tensor-core INT4 prefill GEMM variants on a CUDA GPU: build here, check and time there.

  python bench/gpu_gemm_tune.py prepare [--arch sm_90] [--no-artifacts]
      builds .device-gemm/: site/ (runtime-only TVM + tvm_ffi for the GPU's Python), gemm.so (the first tensor-core
      kernel `tc_*` as baseline and every int4_gemm_tc2 config `tc2<config>_*` at Llama-3-8B shapes, plus a ragged
      576 -> 960 with bias), and unless --no-artifacts the Llama-3-8B shape artifacts (shapes only) built with the
      first kernel (--opt cuda_gemm=mma) and the new one (mma-pipelined) for an end-to-end pp512 A/B and a prefill profile.
  PYTHONUNBUFFERED=1 PYTHONPATH=.device-gemm/site:. python3 bench/gpu_gemm_tune.py run     (on the GPU machine)
      checks every kernel against numpy (float32 matmul on the weights dequantized by quant/reference.py; outputs
      poisoned with NaN first; fresh random inputs per shape; 100, 128 and 512 rows), times them (time_evaluator
      median) at 128 and 512 rows, then pp512 of both artifacts and a CUPTI kernel table of one 512-token prefill.
      Writes $OUT/gemm.json and prints a table.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEV = REPO / ".device-gemm"
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))

# Llama-3-8B linears (in, out): qkv, o, gate_up, down, lm_head; and a ragged `out` with bias (SmolLM2-like)
SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256)]
RAGGED = (576, 960)
CHECK_ROWS = (100, 128, 512)
TIME_ROWS = (128, 512)
# int4_gemm_tc2 variants: name -> (config, small-rows config or None); "auto" = what the pipeline picks
CONFIGS = ["128x128", "128x128b2", "128x128k", "128x128kb2", "128x128w4kb2", "64x128", "64x128k"]


def variants(k: int, n: int) -> dict[str, tuple[str, str | None]]:
    from edgellm.kernels import cuda_gemm as gpu_gemm

    return {**{c: (c, None) for c in CONFIGS}, "auto": gpu_gemm.tc2_choice(k, n)}


def kernel_names(k: int, n: int) -> list[str]:
    return [f"tc_{k}_{n}"] + [f"tc2{v}_{k}_{n}" for v in variants(k, n)]


def build_gemm(arch: str) -> None:
    import tvm

    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.kernels import cuda_gemm as gpu_gemm
    from edgellm.targets import resolve

    target = resolve(f"cuda-{arch.replace('_', '')}").tvm()
    funcs = {}
    for k, n in SHAPES:
        funcs[f"tc_{k}_{n}"] = gpu_gemm.int4_gemm_tc(k, n, False, half2=True)
        for v, (c, small) in variants(k, n).items():
            funcs[f"tc2{v}_{k}_{n}"] = gpu_gemm.int4_gemm_tc2(k, n, False, c, small)
    k, n = RAGGED
    funcs[f"tc_{k}_{n}"] = gpu_gemm.int4_gemm_tc(k, n, True, half2=True)
    for v, (c, small) in variants(k, n).items():
        funcs[f"tc2{v}_{k}_{n}"] = gpu_gemm.int4_gemm_tc2(k, n, True, c, small)
    prepare_cuda_build()
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        tvm.compile(mod, target=target).export_library(str(DEV / "gemm.so"))


def build_artifacts(arch: str) -> None:
    import gpu_prepare

    gpu_prepare.build_ab_shapes(DEV, arch, "cuda_gemm", ("mma", "mma-pipelined"))


def prepare(args) -> None:
    import gpu_prepare

    gpu_prepare.new_bundle(DEV, args.python)
    build_gemm(args.arch)
    if not args.no_artifacts:
        build_artifacts(args.arch)
    gpu_prepare.check_bundle_size(DEV, 48)


# ------------------------------------------------------------------------------------------------ on the GPU
results: dict = {"kernels": [], "bench": [], "profile": {}, "errors": []}


def run_kernels() -> None:
    from edgellm import _tvm
    from edgellm.quant import reference as qref
    from edgellm.quant.schemes import get_scheme

    _tvm.load_cuda_runtime()
    mod = _tvm.load_module(DEV / "gemm.so")
    dev = _tvm.device("cuda", 0)
    scheme = get_scheme("q4f16_1")
    rng = np.random.default_rng(7)
    for k, n in SHAPES + [RAGGED]:
        bias = (k, n) == RAGGED
        qw = rng.integers(0, 2**32, size=(n, k // 8), dtype=np.uint64).astype(np.uint32)
        qs = (rng.random((n, k // 32)) * 0.02 + 0.001).astype(np.float16)
        b = rng.standard_normal(n).astype(np.float16) if bias else None
        w32 = qref.dequantize(qw, qs, k, scheme).astype(np.float32)
        wargs = [_tvm.tensor(qw, dev), _tvm.tensor(qs, dev)] + ([_tvm.tensor(b, dev)] if bias else [])
        for m in sorted(set(CHECK_ROWS) | set(TIME_ROWS)):
            xm = rng.standard_normal((m, k)).astype(np.float16)
            ref = None
            if m in CHECK_ROWS:
                ref = xm.astype(np.float32) @ w32.T + (b.astype(np.float32) if bias else 0)
            xa = _tvm.tensor(xm, dev)
            for name in kernel_names(k, n):
                rec = {"kernel": name, "in": k, "out": n, "rows": m}
                try:
                    out = _tvm.tensor(np.full((m, n), np.nan, np.float16), dev)
                    mod[name](xa, *wargs, out)
                    if ref is not None:
                        got = out.numpy().astype(np.float32)
                        rec["finite"] = bool(np.isfinite(got).all())
                        rec["rel_err"] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
                        rec["max_rel"] = float(np.abs(got - ref).max() / np.abs(ref).max())
                    if m in TIME_ROWS and not bias:
                        t = mod.time_evaluator(name, dev, number=10, repeat=5)(xa, *wargs, out).median
                        rec["us"] = t * 1e6
                        rec["tflops"] = 2 * m * k * n / t / 1e12
                except Exception:  # noqa: BLE001 (record it and go on: device time is scarce)
                    rec["error"] = traceback.format_exc()[-800:]
                results["kernels"].append(rec)
                print(f"{name:<28} m={m:<4} err {rec.get('rel_err', float('nan')):.1e} "
                      f"{rec.get('us', float('nan')):9.1f} us {rec.get('tflops', float('nan')):6.1f} TFLOP/s"
                      + (" ERROR" if "error" in rec else ""), flush=True)
        del w32


def run_models() -> None:
    import gpu_run
    import torch

    from edgellm.device_runners.bench import run_bench
    from edgellm.device_runners.engine import Engine

    for mode in ("mma", "mma-pipelined"):
        path = DEV / "art" / f"llama-3-8b-{mode}"
        if not path.exists():
            continue
        eng = Engine(path, random_weights=0)
        for n_prompt in (128, 512):
            for r in run_bench(eng, n_prompt, 0, reps=3, warmup=1, device_name=torch.cuda.get_device_name(0)):
                results["bench"].append({"artifact": path.name, "test": r.test, "avg_ts": r.avg_ts,
                                         "samples_ts": r.samples_ts})
                print(f"{path.name}: {r.test} {r.avg_ts:.0f} tok/s", flush=True)
        try:
            results["profile"][path.name] = gpu_run.prefill_kernel_table(eng, 512, top=40)
        except Exception:  # noqa: BLE001 (record it and go on)
            results["errors"].append(f"profile {path.name}: " + traceback.format_exc()[-2000:])
        del eng
        torch.cuda.empty_cache()


def run(args) -> int:
    import torch

    results["device"] = torch.cuda.get_device_name(0)
    out = Path(os.environ.get("OUT", ".")) / "gemm.json"
    steps = [("kernels", run_kernels)] + ([] if args.no_models else [("models", run_models)])
    from bench_steps import run_steps

    run_steps(steps, results, out)
    for label, p in results["profile"].items():
        print(f"{label}: prefill {p['tokens']} wall {p['wall_ms']:.1f} ms, GPU busy {p['gpu_busy_ms']:.1f} ms")
        for k in p["top_kernels"][:20]:
            print(f"   {k['us'] / 1e3:8.2f} ms {k['calls']:5d}x  {k['name'][:100]}")
    for e in results["errors"]:
        print("ERROR:", e)
    return 1 if results["errors"] else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["prepare", "run"])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--python", default="3.12")
    ap.add_argument("--no-artifacts", action="store_true")
    ap.add_argument("--no-models", action="store_true")
    args = ap.parse_args()
    if args.mode == "prepare":
        prepare(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
