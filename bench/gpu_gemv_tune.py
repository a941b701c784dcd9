"""Compare INT4 decode-GEMV variants at Llama-3-8B shapes on a CUDA GPU, weights coming from HBM (not L2).

  python bench/gpu_gemv_tune.py prepare [--out .device-NAME]   here (nvcc, full TVM): builds the folder (default
                                               .device-gemv/) = site/ (runtime-only TVM + tvm_ffi for the GPU's
                                               Python) and gemv.so with every variant
  python bench/gpu_gemv_tune.py run [--dev .device-NAME]        there, with PYTHONPATH=.device-NAME/site:. ;
                                               JSON to $OUT/gemv.json

Variants: `before` = the registry's pick with --opt cuda_gemv=fp16x2 (x read from L2 by every warp team), `pick` =
the default pick (fp16x2-smem: x staged in shared memory), `xs_*` = the shared-memory kernel in other configurations,
`base` = the TE kernel. The Q4_0 / Q4_1 grid rows (q4f16_0 / q4f16_2) are checked and timed before / after at the
`GRID_SHAPES`.

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
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEV = REPO / ".device-gemv"
# Llama-3-8B decode GEMVs (in, out) and how many of each one decode step runs
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "lm_head": (4096, 128256)}
PER_STEP = {"qkv": 32, "o": 32, "gate_up": 32, "down": 32, "lm_head": 1}
# Llama-3.2-1B's layer GEMVs: the same variants
EXTRA_SHAPES = {"1b_qkv": (2048, 3072), "1b_o": (2048, 2048), "1b_gate_up": (2048, 16384), "1b_down": (8192, 2048)}
# correctness only, through the pipeline's pick: a bias (Qwen-style qkv) and an `out` no block tiles evenly
CHECK_ONLY = {"qkv_bias": (4096, 6144, True), "odd_out": (4096, 1000, False), "odd_small": (576, 77, True)}
# the shared-memory kernel's configurations (warps per block, rows per warp, groups per lane per step, K split over
# warps, loads fenced ahead of the arithmetic)
XS_CONFIGS = [(8, 2, 4, 2, True), (8, 2, 4, 2, True, "fs"), (8, 2, 2, 2, True), (8, 2, 2, 2, True, "fs"),
              (4, 2, 4, 1, True), (4, 2, 4, 1, True, "fs"), (8, 4, 2, 2, True, "fs"), (8, 2, 1, 4, True, "fs"),
              (8, 2, 7, 2, True, "fs"), (2, 2, 4, 1, True, "fs"), (4, 1, 4, 1, True, "fs")]
XS_LM_HEAD = [(4, 4, 2, 1, True), (4, 2, 4, 1, True, "fs"), (4, 4, 2, 1, True, "fs")]  # the head: fewer tried
# the GGUF-grid rows through the registry, before (fp16x2) and after (default), checked and timed at these shapes
GRID_ROWS, GRID_SHAPES = ("q4f16_0", "q4f16_2"), ("o", "down")
ROTATE_BYTES = 320e6


def variants(shape: str) -> list[str]:
    cfgs = XS_LM_HEAD if shape == "lm_head" else XS_CONFIGS
    return ["base", "before", "pick"] + [xs_name(*c) for c in cfgs] + ["pick_again"]  # pick twice: the spread


def xs_name(w: int, r: int, u: int, k: int, fence: bool, fs: str = "") -> str:
    return f"xs_w{w}r{r}u{u}k{k}" + ("" if fence else "nf") + fs


def prepare(dev: Path = DEV) -> None:

    sys.path.insert(0, str(REPO / "bench"))
    import tvm
    from gpu_prepare import new_bundle

    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.kernels import KernelOptions, KernelRegistry
    from edgellm.kernels import cuda_gemv as gpu_kernels
    from edgellm.kernels.schedule_gpu import schedule_gpu_int4_gemv
    from edgellm.quant.schemes import get_scheme
    from edgellm.targets import resolve

    new_bundle(dev)
    target = resolve("cuda-sm90").tvm()
    registry = KernelRegistry(target)  # what a compile with the default KernelOptions picks
    before = KernelRegistry(target, KernelOptions(cuda_gemv="fp16x2"))  # the previous default
    scheme = get_scheme("q4f16_1")
    funcs = {}
    for shape, (k, n) in {**SHAPES, **EXTRA_SHAPES}.items():
        funcs[f"base_{k}_{n}"] = schedule_gpu_int4_gemv(  # the TE kernel and schedule the pipeline used before
            gpu_kernels.int4_gemv(k, n, "float16", "float16", "float16", False), target)
        funcs[f"before_{k}_{n}"] = before.linear(1, k, n, scheme, "float16", False)
        funcs[f"pick_{k}_{n}"] = registry.linear(1, k, n, scheme, "float16", False)
        for cfg in (XS_LM_HEAD if shape == "lm_head" else XS_CONFIGS):
            funcs[f"{xs_name(*cfg)}_{k}_{n}"] = gpu_kernels.int4_gemv_h2(k, n, False, *cfg[:5], xsmem=True,
                                                                       fold_shift=len(cfg) > 5)
    for row in GRID_ROWS:
        s = get_scheme(row)
        for shape in GRID_SHAPES:
            k, n = SHAPES[shape]
            funcs[f"{row}_before_{k}_{n}"] = before.linear(1, k, n, s, "float16", False)
            funcs[f"{row}_pick_{k}_{n}"] = registry.linear(1, k, n, s, "float16", False)
    for k, n, bias in CHECK_ONLY.values():
        funcs[f"check_{k}_{n}"] = registry.linear(1, k, n, scheme, "float16", bias)
        funcs[f"check_q4f16_2_{k}_{n}"] = registry.linear(1, k, n, get_scheme("q4f16_2"), "float16", bias)
    print("picks:", {op: sorted(v) for op, v in registry.chosen.items()}, flush=True)
    prepare_cuda_build()
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    t0 = time.time()
    with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        lib = tvm.compile(mod, target=target)
    lib.export_library(str(dev / "gemv.so"))
    src = Path(tempfile.gettempdir()) / f"{dev.name}-gemv.cu"  # for nvcc -Xptxas -v here; not carried
    src.write_text(lib.mod.imports[0].inspect_source())
    print(f"CUDA source: {src}")
    total = sum(p.stat().st_size for p in dev.rglob("*") if p.is_file())
    print(f"{len(funcs)} kernels built in {time.time() - t0:.0f} s; {dev}: {total / 2**20:.1f} MiB")


def time_rotated(f, x, copies, out) -> tuple[float, str]:
    """(seconds per call, "cuda_graph" | "launch_loop"): f(x, *weights, out) with the weights of each call distinct
    (`copies`: tuples of the weight arguments after x, e.g. (q_weight, q_scale[, q_min]), cycled; enough of them to
    stay out of L2), from CUDA-graph replays timed with CUDA events (median of 15), or a plain launch loop where
    capture fails. The one timing loop of the GPU kernel benches (gpu_schemes.py and gpu_gemv_batch.py import it)."""
    import torch
    import tvm_ffi

    launches = max(200, len(copies))
    reps = (launches + len(copies) - 1) // len(copies)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        g = torch.cuda.CUDAGraph()
        with tvm_ffi.use_torch_stream(torch.cuda.graph(g)):
            for _ in range(reps):
                for ws in copies:
                    f(x, *ws, out)
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
            for ws in copies:
                f(x, *ws, out)
            torch.cuda.synchronize()
            start.record()
            for _ in range(reps):
                for ws in copies:
                    f(x, *ws, out)
            end.record()
            torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / (reps * len(copies)), "launch_loop"


def _weights(rng, scheme, k: int, n: int) -> list[np.ndarray]:
    """Random packed weights of `scheme` (q_weight, q_scale[, q_min]); mins as real Q4_1 groups have them."""
    qw = rng.integers(0, 2**32, size=(n, k // 8), dtype=np.uint64).astype(np.uint32)
    qs = (rng.random((n, k // 32)) * 0.02 + 0.001).astype(np.float16)
    if scheme.zero_point:
        return [qw, qs, (-qs.astype(np.float32) * (6 + 4 * rng.random((n, k // 32)))).astype(np.float16)]
    return [qw, qs]


def _shape_data(dev, ws: list, scheme, k: int, n: int, rng) -> dict:
    """One shape's weights on the device (enough copies that the rotation streams >= ROTATE_BYTES from HBM) and the
    float64 dequantized weights of a random subset of rows for the numpy reference."""
    from edgellm import _tvm
    from edgellm.quant import reference as qref

    rows = np.sort(rng.choice(n, min(n, 2048), replace=False))
    w = qref.dequantize(ws[0][rows], ws[1][rows], k, scheme, ws[2][rows] if scheme.zero_point else None)
    nbytes = sum(a.nbytes for a in ws) + 2 * k + 2 * n
    count = max(2, int(np.ceil(ROTATE_BYTES / nbytes)))
    return {"rows": rows, "w": w.astype(np.float64), "bytes": nbytes, "count": count,
            "copies": [tuple(_tvm.tensor(a, dev) for a in ws) for _ in range(count)]}


def _measure(mod, dev, name: str, d: dict, k: int, n: int, rng, copy_gbs: float) -> dict:
    """Check `name` against numpy float64 on fresh x (NaN-poisoned output, plain and outlier x), time it from HBM."""
    from edgellm import _tvm

    rec: dict = {}
    x = rng.standard_normal((1, k)).astype(np.float16)
    xo = x.copy()  # outliers: a few channels at +-2000, as in real down-projection inputs
    xo[0, rng.choice(k, 8, replace=False)] = rng.choice([-2000.0, 2000.0], 8)
    f, rows, copies = mod[name], d["rows"], d["copies"]
    for which, xin in (("x", x), ("x_outliers", xo)):
        ref = xin.astype(np.float64) @ d["w"].T
        out = _tvm.tensor(np.full((1, n), np.nan, np.float16), dev)
        f(_tvm.tensor(xin, dev), *copies[-1], out)
        got = out.numpy().astype(np.float64)
        rec[f"finite_{which}"] = bool(np.isfinite(got).all())  # every row written (NaN-poisoned before)
        rec[f"rel_err_{which}"] = float(np.linalg.norm(got[:, rows] - ref) / np.linalg.norm(ref))
    t, mode = time_rotated(f, _tvm.tensor(x, dev), copies, out)
    rec.update(bytes=d["bytes"], copies=d["count"], us=t * 1e6, gbs=d["bytes"] / t / 1e9, timing=mode)
    rec["copy_frac"] = rec["gbs"] / copy_gbs
    return rec


def run(dev_dir: Path = DEV) -> None:
    import torch

    from edgellm import _tvm
    from edgellm.quant.schemes import get_scheme

    t_start = time.time()
    res: dict = {"device": torch.cuda.get_device_name(0), "kernels": [], "errors": []}
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_run import (
        copy_bandwidth,  # 1 GiB device-to-device copy, read + written bytes / time
    )

    res["copy_gbs"] = copy_bandwidth() / 1e9
    print(f"{res['device']}: D2D copy {res['copy_gbs']:.0f} GB/s (read + write)", flush=True)
    _tvm.load_cuda_runtime()
    mod = _tvm.load_module(dev_dir / "gemv.so")
    dev = _tvm.device("cuda", 0)
    rng = np.random.default_rng(int(time.time()))
    check_only(mod, dev, rng, res)
    jobs = [("q4f16_1", shape, v, f"{v.removesuffix('_again')}_{k}_{n}")
            for shape, (k, n) in {**SHAPES, **EXTRA_SHAPES}.items() for v in variants(shape)]
    jobs += [(row, shape, v, f"{row}_{v}_{SHAPES[shape][0]}_{SHAPES[shape][1]}") for row in GRID_ROWS
             for shape in GRID_SHAPES for v in ("before", "pick")]
    weights: dict = {}
    for row, shape, variant, name in jobs:
        k, n = {**SHAPES, **EXTRA_SHAPES}[shape]
        scheme = get_scheme(row)
        rec: dict = {"kernel": variant, "row": row, "shape": shape, "in": k, "out": n}
        try:
            if (row, shape) not in weights:
                weights.clear()  # one shape's weights alive at a time
                weights[(row, shape)] = _shape_data(dev, _weights(rng, scheme, k, n), scheme, k, n, rng)
            rec.update(_measure(mod, dev, name, weights[(row, shape)], k, n, rng, res["copy_gbs"]))
            print(f"{row} {shape:10s} {variant:14s} {rec['us']:8.2f} us {rec['gbs']:6.0f} GB/s "
                  f"{100 * rec['copy_frac']:5.1f}%  err {rec['rel_err_x']:.1e}/{rec['rel_err_x_outliers']:.1e}"
                  + ("" if rec["finite_x"] and rec["finite_x_outliers"] else "  NOT FINITE"), flush=True)
        except Exception as exc:  # noqa: BLE001 (report and go on: device time is scarce)
            rec["error"] = f"{type(exc).__name__}: {exc}"
            res["errors"].append(f"{name}: {rec['error']}")
            print(f"{row} {shape:10s} {variant:14s} FAILED {rec['error']}", flush=True)
        res["kernels"].append(rec)
    res["wall_s"] = time.time() - t_start
    summarize(res)
    out_dir = Path(os.environ.get("OUT", "."))
    (out_dir / "gemv.json").write_text(json.dumps(res, indent=1))


def check_only(mod, dev, rng, res: dict) -> None:
    """The pipeline's pick (q4f16_1 and q4f16_2) with a bias and with an `out` that no block tiles evenly, against
    numpy float64; output NaN-poisoned first."""
    from edgellm import _tvm
    from edgellm.quant import reference as qref
    from edgellm.quant.schemes import get_scheme

    res["checks"] = {}
    for label, (k, n, bias) in CHECK_ONLY.items():
        for row, prefix in (("q4f16_1", "check"), ("q4f16_2", "check_q4f16_2")):
            scheme = get_scheme(row)
            ws = _weights(rng, scheme, k, n)
            x = rng.standard_normal((1, k)).astype(np.float16)
            b = rng.standard_normal(n).astype(np.float16)
            w = qref.dequantize(ws[0], ws[1], k, scheme, ws[2] if scheme.zero_point else None).astype(np.float64)
            ref = x.astype(np.float64) @ w.T + (b.astype(np.float64) if bias else 0)
            out = _tvm.tensor(np.full((1, n), np.nan, np.float16), dev)
            try:
                mod[f"{prefix}_{k}_{n}"](*[_tvm.tensor(a, dev) for a in [x, *ws] + ([b] if bias else [])], out)
                got = out.numpy().astype(np.float64)
                rec = {"row": row, "in": k, "out": n, "bias": bias, "finite": bool(np.isfinite(got).all()),
                       "rel_err": float(np.linalg.norm(got - ref) / np.linalg.norm(ref))}
            except Exception as exc:  # noqa: BLE001
                rec = {"row": row, "error": f"{type(exc).__name__}: {exc}"}
                res["errors"].append(f"{prefix}_{k}_{n}: {rec['error']}")
            res["checks"][f"{label}_{row}"] = rec
            print(f"check {label:10s} {row} {rec}", flush=True)


def _ok(r: dict) -> bool:
    return "us" in r and r["finite_x"] and r["finite_x_outliers"] and r["rel_err_x"] < 1e-3 \
        and r["rel_err_x_outliers"] < 2e-3


def summarize(res: dict) -> None:
    """Per shape: before, pick and the best shared-memory config; the 8B step's five GEMVs before / after."""
    ok = {(r["kernel"], r["shape"]): r for r in res["kernels"] if r.get("row") == "q4f16_1" and _ok(r)}
    bad = [f"{r['row']} {r['shape']} {r['kernel']}" for r in res["kernels"] if "us" in r and not _ok(r)]
    res["bad"] = bad
    res["table"] = {}
    print(f"\n{'shape':10s} {'MB':>6s} | {'before us':>9s} {'%copy':>5s} | {'pick us':>7s} {'%copy':>5s} | "
          f"best xs config")
    for shape, (k, n) in {**SHAPES, **EXTRA_SHAPES}.items():
        b, p = ok.get(("before", shape)), ok.get(("pick", shape))
        xs = [r for (v, sh), r in ok.items() if sh == shape and v.startswith("xs_")]
        best = min(xs, key=lambda r: r["us"], default=None)
        res["table"][shape] = {"bytes": (b or p or {}).get("bytes"), "before_us": b and b["us"],
                               "pick_us": p and p["us"], "best_xs": best and best["kernel"],
                               "best_xs_us": best and best["us"]}
        fmt = (lambda r: f"{r['us']:9.2f} {100 * r['copy_frac']:5.1f}" if r else f"{'-':>9s} {'-':>5s}")
        print(f"{shape:10s} {((b or p or {}).get('bytes') or 0) / 1e6:6.1f} | {fmt(b)} | {fmt(p)} | "
              + (f"{best['kernel']} {best['us']:.2f} us {100 * best['copy_frac']:.1f}%" if best else "-"))
    for row in GRID_ROWS:
        for shape in GRID_SHAPES:
            rs = {r["kernel"]: r for r in res["kernels"] if r.get("row") == row and r["shape"] == shape and "us" in r}
            print(f"{row} {shape:8s} " + "  ".join(f"{v} {r['us']:.2f} us err {r['rel_err_x']:.1e}/"
                                                 f"{r['rel_err_x_outliers']:.1e} ok {_ok(r)}" for v, r in rs.items()))
    step = {}
    for v in ("before", "pick", "best"):
        rs = {s: (min((r for (vv, sh), r in ok.items() if sh == s and (vv.startswith("xs_") or vv == "pick")),
                      key=lambda r: r["us"], default=None) if v == "best" else ok.get((v, s))) for s in SHAPES}
        if all(rs.values()):
            us = sum(PER_STEP[s] * rs[s]["us"] for s in SHAPES)
            byt = sum(PER_STEP[s] * rs[s]["bytes"] for s in SHAPES)
            step[v] = {"us": us, "gbs": byt / us / 1e3, "copy_frac": byt / us / 1e3 / res["copy_gbs"]}
            print(f"8B step GEMVs ({v}): {us:.0f} us, {byt / us / 1e3:.0f} GB/s = "
                  f"{100 * step[v]['copy_frac']:.1f}% of copy")
    res["step"] = step
    print(f"errors: {len(res['errors'])}, failing checks: {bad}; wall {res.get('wall_s', 0):.0f} s")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["prepare", "run"])
    ap.add_argument("--out", "--dev", dest="dev", type=Path, default=DEV, help="the bundle folder (.device-NAME)")
    a = ap.parse_args()
    prepare(a.dev) if a.cmd == "prepare" else run(a.dev)
