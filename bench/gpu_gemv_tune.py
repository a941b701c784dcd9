"""Compare INT4 decode-GEMV variants at Llama-3-8B shapes on a CUDA GPU, weights coming from HBM (not L2).

  python bench/gpu_gemv_tune.py prepare        here (nvcc, full TVM): builds .device-gemv/ = site/ (runtime-only TVM
                                               + tvm_ffi for the GPU's Python) and gemv.so with every variant
  python bench/gpu_gemv_tune.py run            there, with PYTHONPATH=.device-gemv/site:. ; JSON to $OUT/gemv.json

`run` measures the device copy bandwidth (1 GiB D2D copy, read + write bytes / time), then per shape and variant:
  * correctness: output poisoned with NaN, fresh random inputs, compared with numpy float64 on the dequantized
    weights (quant/reference.py) over a random subset of rows (every row must be finite); also with an x that holds
    outliers (|x| up to 2000, as in real down-projection inputs) for the fp16-accumulating kernels;
  * time: the kernel cycles over enough distinct weight copies (>= 320 MB in all, the H100's L2 is 50 MB) that every
    call streams its weights from HBM; the launches are captured in one CUDA graph (as the decode pipeline runs)
    and replays are timed with CUDA events. GB/s counts the bytes a call reads and writes (weights, scales, x, out).
Headline: one Llama-3-8B decode step's GEMVs, 32 x (qkv + o + gate_up + down) + lm_head.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEV = REPO / ".device-gemv"
# Llama-3-8B decode GEMVs (in, out) and how many of each one decode step runs
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "lm_head": (4096, 128256)}
PER_STEP = {"qkv": 32, "o": 32, "gate_up": 32, "down": 32, "lm_head": 1}
# other models' decode GEMVs (SmolLM2-135M, Llama-3.2-1B): the pipeline's pick against the TE kernel only
EXTRA_SHAPES = {"smol_qkv": (576, 960), "smol_gate_up": (576, 3072), "smol_down": (1536, 576),
                "smol_lm_head": (576, 49152), "1b_qkv": (2048, 3072), "1b_o": (2048, 2048),
                "1b_gate_up": (2048, 16384), "1b_down": (8192, 2048), "1b_lm_head": (2048, 128256)}
EXTRA_H2 = [(4, 2, 2, 1, True), (4, 2, 2, 1, False), (4, 2, 1, 1, False)]  # tried beside the pick there
# correctness only, through the pipeline's pick: a bias (Qwen-style qkv) and an `out` no block tiles evenly
CHECK_ONLY = {"qkv_bias": (4096, 6144, True), "odd_out": (4096, 1000, False), "odd_small": (576, 77, True)}
# fp16x2 kernel configurations (warps per block, rows per warp, groups per lane per step, K split over warps,
# loads fenced ahead of the arithmetic); runs 1-3 tried 22 (docs/benchmarks/h100-gemv-runs.json), these were the
# best; each with and without the load fence
H2_CONFIGS = [(8, 2, 4, 2, True), (8, 2, 2, 2, True), (8, 2, 2, 2, False), (4, 4, 2, 1, True), (4, 4, 2, 1, False),
              (8, 4, 2, 2, True), (8, 4, 2, 2, False), (4, 2, 2, 1, True), (4, 2, 2, 1, False), (4, 2, 2, 2, True),
              (4, 2, 2, 2, False)]
ROTATE_BYTES = 320e6


def variants() -> list[str]:
    return ["base"] + [h2_name(*c) for c in H2_CONFIGS] + ["pick"]


def h2_name(w: int, r: int, u: int, k: int, fence: bool) -> str:
    return f"h2w{w}r{r}u{u}k{k}" + ("" if fence else "nf")


def prepare() -> None:

    sys.path.insert(0, str(REPO / "bench"))
    import tvm
    from gpu_prepare import new_bundle

    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.kernels import KernelRegistry
    from edgellm.kernels import cuda_gemv as gpu_kernels
    from edgellm.kernels.schedule_gpu import schedule_gpu_int4_gemv
    from edgellm.quant.schemes import get_scheme
    from edgellm.targets import resolve

    new_bundle(DEV)
    target = resolve("cuda-sm90").tvm()
    scheme = get_scheme("q4f16_1")
    registry = KernelRegistry(target)  # what a compile with the default KernelOptions picks
    funcs = {}
    for k, n in SHAPES.values():
        funcs[f"base_{k}_{n}"] = schedule_gpu_int4_gemv(  # the TE kernel and schedule the pipeline used before
            gpu_kernels.int4_gemv(k, n, "float16", "float16", "float16", False), target)
        for w, r, u, ks, fence in H2_CONFIGS:
            funcs[f"{h2_name(w, r, u, ks, fence)}_{k}_{n}"] = gpu_kernels.int4_gemv_h2(k, n, False, w, r, u, ks, fence)
        # what a compile picks for a q4f16_1 `linear` gemv of this shape (default KernelOptions)
        funcs[f"pick_{k}_{n}"] = registry.linear(1, k, n, scheme, "float16", False)
    for k, n in EXTRA_SHAPES.values():
        funcs[f"base_{k}_{n}"] = schedule_gpu_int4_gemv(
            gpu_kernels.int4_gemv(k, n, "float16", "float16", "float16", False), target)
        funcs[f"pick_{k}_{n}"] = registry.linear(1, k, n, scheme, "float16", False)
        for cfg in EXTRA_H2:
            funcs[f"{h2_name(*cfg)}_{k}_{n}"] = gpu_kernels.int4_gemv_h2(k, n, False, *cfg)
    for k, n, bias in CHECK_ONLY.values():
        funcs[f"check_{k}_{n}"] = registry.linear(1, k, n, scheme, "float16", bias)
    prepare_cuda_build()
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    t0 = time.time()
    with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        tvm.compile(mod, target=target).export_library(str(DEV / "gemv.so"))
    total = sum(p.stat().st_size for p in DEV.rglob("*") if p.is_file())
    print(f"{len(funcs)} kernels built in {time.time() - t0:.0f} s; {DEV}: {total / 2**20:.1f} MiB")


def time_rotated(f, x, copies, out) -> tuple[float, str]:
    """Seconds per call with the weights of each call distinct (copies cycled), from CUDA-graph replays."""
    import torch
    import tvm_ffi

    launches = max(200, len(copies))
    reps = (launches + len(copies) - 1) // len(copies)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        g = torch.cuda.CUDAGraph()
        with tvm_ffi.use_torch_stream(torch.cuda.graph(g)):
            for _ in range(reps):
                for qw, qs in copies:
                    f(x, qw, qs, out)
        torch.cuda.synchronize()
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(15):
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return float(np.median(times)) / (reps * len(copies)), "cuda_graph"
    except Exception as exc:  # noqa: BLE001 (fall back to a plain launch loop, and say so in the record)
        print(f"  graph capture failed ({type(exc).__name__}: {exc}); timing a launch loop", flush=True)
        with tvm_ffi.use_torch_stream():
            for qw, qs in copies:
                f(x, qw, qs, out)
            torch.cuda.synchronize()
            start.record()
            for _ in range(reps):
                for qw, qs in copies:
                    f(x, qw, qs, out)
            end.record()
            torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / (reps * len(copies)), "launch_loop"


def run() -> None:
    import torch

    from edgellm import _tvm
    from edgellm.quant import reference as qref
    from edgellm.quant.schemes import get_scheme

    res: dict = {"device": torch.cuda.get_device_name(0), "kernels": [], "errors": []}
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_run import (
        copy_bandwidth,  # 1 GiB device-to-device copy, read + written bytes / time
    )

    res["copy_gbs"] = copy_bandwidth() / 1e9
    print(f"{res['device']}: D2D copy {res['copy_gbs']:.0f} GB/s (read + write)", flush=True)
    _tvm.load_cuda_runtime()
    mod = _tvm.load_module(DEV / "gemv.so")
    dev = _tvm.device("cuda", 0)
    scheme = get_scheme("q4f16_1")
    rng = np.random.default_rng(int(time.time()))
    check_only(mod, dev, scheme, rng, res)
    for shape, (k, n) in {**SHAPES, **EXTRA_SHAPES}.items():
        qw = rng.integers(0, 2**32, size=(n, k // 8), dtype=np.uint64).astype(np.uint32)
        qs = (rng.random((n, k // 32)) * 0.02 + 0.001).astype(np.float16)
        x = rng.standard_normal((1, k)).astype(np.float16)
        xo = x.copy()  # outliers: a few channels at +-2000, as in real down-projection inputs
        xo[0, rng.choice(k, 8, replace=False)] = rng.choice([-2000.0, 2000.0], 8)
        rows = np.sort(rng.choice(n, min(n, 4096), replace=False))
        w = qref.dequantize(qw[rows], qs[rows], k, scheme).astype(np.float64)
        refs = {"x": x.astype(np.float64) @ w.T, "x_outliers": xo.astype(np.float64) @ w.T}
        nbytes = qw.nbytes + qs.nbytes + x.nbytes + 2 * n
        count = max(2, int(np.ceil(ROTATE_BYTES / nbytes)))
        copies = [(_tvm.tensor(qw, dev), _tvm.tensor(qs, dev)) for _ in range(count)]
        xt = {"x": _tvm.tensor(x, dev), "x_outliers": _tvm.tensor(xo, dev)}
        for variant in variants() if shape in SHAPES else ["base", "pick"] + [h2_name(*c) for c in EXTRA_H2]:
            name = f"{variant}_{k}_{n}"
            rec: dict = {"kernel": variant, "shape": shape, "in": k, "out": n, "bytes": nbytes, "copies": count}
            try:
                f = mod[name]
                for which, xin in xt.items():
                    out = _tvm.tensor(np.full((1, n), np.nan, np.float16), dev)
                    f(xin, copies[0][0], copies[0][1], out)
                    got = out.numpy().astype(np.float64)
                    rec[f"finite_{which}"] = bool(np.isfinite(got).all())
                    rec[f"rel_err_{which}"] = float(np.linalg.norm(got[:, rows] - refs[which])
                                                    / np.linalg.norm(refs[which]))
                t, mode = time_rotated(f, xt["x"], copies, out)
                rec.update(us=t * 1e6, gbs=nbytes / t / 1e9, timing=mode)
                rec["copy_frac"] = rec["gbs"] / res["copy_gbs"]
                print(f"{shape:8s} {variant:12s} {rec['us']:8.2f} us {rec['gbs']:7.0f} GB/s "
                      f"({100 * rec['copy_frac']:4.1f}% of copy)  rel_err {rec['rel_err_x']:.2e} "
                      f"outliers {rec['rel_err_x_outliers']:.2e}  finite {rec['finite_x'] and rec['finite_x_outliers']}"
                      f"  [{mode}]", flush=True)
            except Exception as exc:  # noqa: BLE001 (report and go on: device time is scarce)
                rec["error"] = f"{type(exc).__name__}: {exc}"
                res["errors"].append(f"{name}: {rec['error']}")
                print(f"{shape:8s} {variant:12s} FAILED {rec['error']}", flush=True)
            res["kernels"].append(rec)
        del copies
    summarize(res)
    out_dir = Path(os.environ.get("OUT", "."))
    (out_dir / "gemv.json").write_text(json.dumps(res, indent=1))


def check_only(mod, dev, scheme, rng, res: dict) -> None:
    """The pipeline's pick with a bias and with an `out` that no block tiles evenly, against numpy float64."""
    from edgellm import _tvm
    from edgellm.quant import reference as qref

    res["checks"] = {}
    for label, (k, n, bias) in CHECK_ONLY.items():
        qw = rng.integers(0, 2**32, size=(n, k // 8), dtype=np.uint64).astype(np.uint32)
        qs = (rng.random((n, k // 32)) * 0.02 + 0.001).astype(np.float16)
        x = rng.standard_normal((1, k)).astype(np.float16)
        b = rng.standard_normal(n).astype(np.float16)
        ref = x.astype(np.float64) @ qref.dequantize(qw, qs, k, scheme).astype(np.float64).T
        ref = ref + (b.astype(np.float64) if bias else 0)
        out = _tvm.tensor(np.full((1, n), np.nan, np.float16), dev)
        try:
            mod[f"check_{k}_{n}"](*[_tvm.tensor(a, dev) for a in [x, qw, qs] + ([b] if bias else [])], out)
            got = out.numpy().astype(np.float64)
            rec = {"in": k, "out": n, "bias": bias, "finite": bool(np.isfinite(got).all()),
                   "rel_err": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))}
        except Exception as exc:  # noqa: BLE001
            rec = {"error": f"{type(exc).__name__}: {exc}"}
        res["checks"][label] = rec
        print(f"check {label:10s} {rec}", flush=True)


def summarize(res: dict) -> None:
    """8B decode step GEMV total per variant, and per-shape best (correct kernels only)."""
    ok = {(r["kernel"], r["shape"]): r for r in res["kernels"] if "us" in r and r["finite_x"] and r["rel_err_x"] < 1e-3}
    weights = sum(PER_STEP[s] * (k * n // 2 + k // 32 * n * 2) for s, (k, n) in SHAPES.items())
    res["step"] = {}
    for variant in variants():
        if all((variant, s) in ok for s in SHAPES):
            us = sum(PER_STEP[s] * ok[(variant, s)]["us"] for s in SHAPES)
            res["step"][variant] = {"us": us, "weight_gbs": weights / us / 1e3}
    best = {s: min((r for (v, sh), r in ok.items() if sh == s and v.startswith("h2")), key=lambda r: r["us"],
                   default=None) for s in SHAPES}
    if all(best.values()):
        us = sum(PER_STEP[s] * best[s]["us"] for s in SHAPES)
        res["step"]["h2_best_per_shape"] = {"us": us, "weight_gbs": weights / us / 1e3,
                                            "configs": {s: best[s]["kernel"] for s in SHAPES}}
    print("\n8B decode step, GEMVs only (32 x (qkv + o + gate_up + down) + lm_head):")
    for v, s in sorted(res["step"].items(), key=lambda kv: kv[1]["us"]):
        print(f"  {v:18s} {s['us'] / 1e3:7.3f} ms  {s['weight_gbs']:6.0f} GB/s of weights  {s.get('configs', '')}")


if __name__ == "__main__":
    {"prepare": prepare, "run": run}[sys.argv[1]]()
