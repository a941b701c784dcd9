"""The batched INT4 decode GEMV (kernels/cuda_gemv_batch.py) on a CUDA GPU: checked against numpy, timed from HBM
against the tensor-core GEMM the symbolic-rows linear used before, at Llama-3-8B shapes for 1..16 rows.

  python bench/gpu_gemv_batch.py prepare --out .device-h7 [--arch sm_90]
        here (nvcc, full TVM): DIR/gemv_batch.so only (no TVM runtime: carry one, e.g. the lead's .device/site)
  PYTHONPATH=.device/site:. python3 bench/gpu_gemv_batch.py run --dev .device-h7
        there: prints a table, writes $OUT/gemv_batch.json (or ./gemv_batch.json); about 20-30 s on an H200

Kernels in the .so (q4f16_1 unless named, fp16 x / out; each callable as (x [m, in], q_weight, q_scale,
[q_min], [bias], out [m, out]) for any m):
  small_IN_OUT   what a compile now picks for the symbolic-rows linear (--opt cuda_gemm_small=gemv, the default):
                 m <= 16 the batched GEMV (buckets 2/4 fp16x2 SIMT, 8/16 tensor cores), more rows the tc2 GEMM
  simt_IN_OUT    --opt cuda_gemm_small=gemv-simt: every bucket in fp16x2 SIMT (timed at 8 and 16 rows)
  gemm_IN_OUT    the same with cuda_gemm_small=gemm: the tc2 GEMM for every m (what batch_decode ran before)
  gemv_IN_OUT    the decode GEMV (rows = 1, static): the one-row reference speed
  chk_ROW_IN_OUT_b  correctness only: each 4-bit grid (q4f16_1 / q4f16_0 / q4f16_2) at shapes with a partial
                 1024-wide chunk of `in`, an `out` no block tiles evenly, and a bias
`run`: per kernel and row count, the output NaN-poisoned, fresh random x and weights, compared with numpy float64 on
the dequantized weights (a random subset of output features; every output must be finite); timing: CUDA-graph
replays of launches cycling over weight copies of >= 200 MB in all (each call reads its weights from HBM, the
H200's L2 is 50 MB), CUDA events. GB/s counts weights + scales + x + out bytes per call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from gpu_gemv_tune import time_rotated  # noqa: E402  (the one timing loop of the GPU kernel benches)

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
ROWS = (1, 2, 4, 8, 16)
# correctness only: (row, in, out, bias), m in CHECK_ROWS (17 and 40: past the buckets, the GEMM inside `small_`)
CHECKS = [("q4f16_1", 1088, 77, True), ("q4f16_0", 1088, 77, True), ("q4f16_2", 1088, 77, True),
          ("q4f16_1", 4096, 1000, False), ("q4f16_2", 576, 960, False)]
CHECK_ROWS = (1, 2, 3, 5, 8, 13, 16, 17, 40)
ROTATE_BYTES = 200e6
TOL = 2e-3  # relative error (norm) vs float64; the fp16 output rounding alone is ~1.5e-4


def _names(k: int, n: int) -> dict[str, str]:
    return {v: f"{v}_{k}_{n}" for v in ("small", "simt", "gemm", "gemv")}


def chk_name(row: str, k: int, n: int, bias: bool) -> str:
    return f"chk_{row}_{k}_{n}" + ("_b" if bias else "")


def prepare(out: Path, arch: str) -> None:
    import tvm

    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.kernels import KernelOptions, KernelRegistry
    from edgellm.quant.schemes import get_scheme
    from edgellm.targets import resolve

    target = resolve(f"cuda-{arch.replace('_', '')}").tvm()
    small, gemm = KernelRegistry(target), KernelRegistry(target, KernelOptions(cuda_gemm_small="gemm"))
    simt = KernelRegistry(target, KernelOptions(cuda_gemm_small="gemv-simt"))
    q4 = get_scheme("q4f16_1")
    funcs = {}
    for k, n in SHAPES.values():
        names = _names(k, n)
        funcs[names["small"]] = small.linear(None, k, n, q4, "float16", False)
        funcs[names["gemm"]] = gemm.linear(None, k, n, q4, "float16", False)
        funcs[names["simt"]] = simt.linear(None, k, n, q4, "float16", False)
        try:  # the one-row decode GEMV as a reference speed; the batched kernel's check does not need it
            funcs[names["gemv"]] = small.linear(1, k, n, q4, "float16", False)
        except Exception as exc:  # noqa: BLE001 (say so and build the rest)
            print(f"decode GEMV {k}->{n} not built ({type(exc).__name__}: {str(exc)[:200]}); run skips it")
        assert "gemv_batch" in str(funcs[names["small"]].attrs["edgellm.gemm"])
        assert "gemv_batch" not in str(funcs[names["gemm"]].attrs["edgellm.gemm"])
    for row, k, n, bias in CHECKS:
        funcs[chk_name(row, k, n, bias)] = small.linear(None, k, n, get_scheme(row), "float16", bias)
    print("kernels picked:", json.dumps(small.manifest_entry()["chosen"]), flush=True)
    prepare_cuda_build()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        tvm.compile(mod, target=target).export_library(str(out / "gemv_batch.so"))
    size = (out / "gemv_batch.so").stat().st_size
    print(f"{len(funcs)} kernels built in {time.time() - t0:.0f} s: {out / 'gemv_batch.so'} {size / 2**20:.1f} MiB")
    if size > 5 * 2**20:
        raise SystemExit(f"gemv_batch.so is {size / 2**20:.1f} MiB, over the 5 MiB this bundle may carry")


def _weights(rng, scheme, k: int, n: int):
    qw = rng.integers(0, 2**32, size=(n, k // 8), dtype=np.uint64).astype(np.uint32)
    qs = (rng.random((n, k // 32)) * 0.02 + 0.001).astype(np.float16)
    qm = (-rng.random((n, k // 32)) * 0.1).astype(np.float16) if scheme.zero_point else None
    return qw, qs, qm


def _dequantized(scheme, k: int, w, feats) -> np.ndarray:
    from edgellm.quant import reference as qref

    qw, qs, qm = w
    return qref.dequantize(qw[feats], qs[feats], k, scheme, None if qm is None else qm[feats]).astype(np.float64)


def _check(f, dev, rng, scheme, k: int, n: int, m: int, w, bias=None, feats=None, wd=None) -> dict:
    """Run f on fresh random x [m, k] (+ outlier channels at +-2000 in one row) into a NaN-poisoned out; relative
    error (norm) per row against float64 on the dequantized weights `wd` of features `feats` (all by default)."""
    from edgellm import _tvm

    qw, qs, qm = w
    feats = np.arange(n) if feats is None else feats
    x = rng.standard_normal((m, k)).astype(np.float16)
    x[m - 1, rng.choice(k, 8, replace=False)] = rng.choice([-2000.0, 2000.0], 8)
    wd = _dequantized(scheme, k, w, feats) if wd is None else wd
    ref = x.astype(np.float64) @ wd.T + (0 if bias is None else bias[feats].astype(np.float64))
    args = [_tvm.tensor(a, dev) for a in (x, qw, qs) + (() if qm is None else (qm,)) + (() if bias is None
                                                                                          else (bias,))]
    out = _tvm.tensor(np.full((m, n), np.nan, np.float16), dev)
    f(*args, out)
    got = out.numpy().astype(np.float64)
    errs = np.linalg.norm(got[:, feats] - ref, axis=1) / np.linalg.norm(ref, axis=1)
    return {"rel_err": float(errs.max()), "finite": bool(np.isfinite(got).all()),
            "ok": bool(np.isfinite(got).all() and errs.max() < TOL)}


def run(dev_dir: Path) -> None:
    import torch

    from edgellm import _tvm
    from edgellm.quant.schemes import get_scheme

    t_start = time.time()
    res: dict = {"device": torch.cuda.get_device_name(0), "checks": [], "kernels": [], "errors": []}
    _tvm.load_cuda_runtime()
    mod = _tvm.load_module(dev_dir / "gemv_batch.so")
    dev = _tvm.device("cuda", 0)
    rng = np.random.default_rng(int(time.time()))
    for row, k, n, bias in CHECKS:  # every grid, partial chunk, ragged `out`, bias; m past the buckets too
        scheme = get_scheme(row)
        w = _weights(rng, scheme, k, n)
        b = (rng.standard_normal(n) * 0.5).astype(np.float16) if bias else None
        name = chk_name(row, k, n, bias)
        wd = _dequantized(scheme, k, w, np.arange(n))
        for m in CHECK_ROWS:
            rec = {"kernel": name, "row": row, "in": k, "out": n, "bias": bias, "m": m}
            try:
                rec.update(_check(mod[name], dev, rng, scheme, k, n, m, w, b, wd=wd))
            except Exception as exc:  # noqa: BLE001 (report and go on: device time is scarce)
                rec.update(ok=False, error=f"{type(exc).__name__}: {exc}")
                res["errors"].append(f"{name} m={m}: {rec['error']}")
            res["checks"].append(rec)
    bad = [c for c in res["checks"] if not c["ok"]]
    print(f"grid checks: {len(res['checks']) - len(bad)} of {len(res['checks'])} ok"
          + "".join(f"\n  FAIL {c['kernel']} m={c['m']}: {c.get('error') or c}" for c in bad), flush=True)
    q4 = get_scheme("q4f16_1")
    for shape, (k, n) in SHAPES.items():
        w = _weights(rng, q4, k, n)
        feats = np.sort(rng.choice(n, min(n, 1024), replace=False))
        wd = _dequantized(q4, k, w, feats)
        wbytes = w[0].nbytes + w[1].nbytes
        copies = [(_tvm.tensor(w[0], dev), _tvm.tensor(w[1], dev))
                  for _ in range(max(2, int(np.ceil(ROTATE_BYTES / wbytes))))]
        names = _names(k, n)
        for m in ROWS:
            for variant in ("gemv", "small", "gemm") if m == 1 else ("small", "simt", "gemm") if m >= 8 else (
                    "small", "gemm"):
                name = names[variant]
                if variant == "gemv" and not mod.implements_function(name):
                    continue
                rec = {"kernel": variant, "shape": shape, "in": k, "out": n, "m": m, "copies": len(copies)}
                try:
                    f = mod[name]
                    rec.update(_check(f, dev, rng, q4, k, n, m, w, feats=feats, wd=wd))
                    x = _tvm.tensor(rng.standard_normal((m, k)).astype(np.float16), dev)
                    out = _tvm.tensor(np.zeros((m, n), np.float16), dev)
                    t = time_rotated(f, x, copies, out)[0]
                    rec.update(us=t * 1e6, gbs=(wbytes + 2 * m * (k + n)) / t / 1e9)
                except Exception as exc:  # noqa: BLE001
                    rec.update(ok=False, error=f"{type(exc).__name__}: {exc}")
                    res["errors"].append(f"{name} m={m}: {rec['error']}")
                res["kernels"].append(rec)
                print(f"{shape:8s} m={m:2d} {variant:6s} " + (
                    f"{rec['us']:8.1f} us {rec['gbs']:6.0f} GB/s  err {rec['rel_err']:.1e}"
                    + ("" if rec["ok"] else "  NOT OK") if "us" in rec else f"FAILED {rec.get('error')}"), flush=True)
        del copies
    summarize(res)
    res["wall_s"] = time.time() - t_start
    out_dir = Path(os.environ.get("OUT", "."))
    (out_dir / "gemv_batch.json").write_text(json.dumps(res, indent=1))
    print(f"wrote {out_dir / 'gemv_batch.json'} ({res['wall_s']:.0f} s)")


def summarize(res: dict) -> None:
    """Per m: the four linears of one Llama-3-8B layer x 32 (the step's linears without the head), small vs gemm."""
    by = {(r["shape"], r["m"], r["kernel"]): r.get("us") for r in res["kernels"]}
    print("\nLlama-3-8B linears per decode step (32 layers x qkv + o + gate_up + down), ms; aggregate tok/s bound")
    print("  m   batched GEMV (default)   all-SIMT   tc2 GEMM   speedup over the GEMM")
    res["step_ms"] = {}
    for m in ROWS:
        tot = {v: (32 * sum(by[(s, m, v)] for s in SHAPES) / 1e3 if all(by.get((s, m, v)) for s in SHAPES) else None)
               for v in ("small", "simt", "gemm")}
        res["step_ms"][m] = tot
        if tot["small"] and tot["gemm"]:
            simt = f"{tot['simt']:8.2f}" if tot["simt"] else "       -"
            print(f"{m:3d}   {tot['small']:8.2f}                {simt}   {tot['gemm']:8.2f}   "
                  f"{tot['gemm'] / tot['small']:5.2f}x   ({m / tot['small'] * 1e3:,.0f} tok/s from the linears alone)")
    if all(by.get((s, 1, "gemv")) for s in SHAPES):
        print(f"  decode GEMV (m=1): {32 * sum(by[(s, 1, 'gemv')] for s in SHAPES) / 1e3:.2f} ms")
    print("all checks ok" if all(c["ok"] for c in res["checks"] + res["kernels"]) else
          f"NOT ALL OK; errors: {res['errors']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True, help="bundle folder (ignored names: .device-*/)")
    p.add_argument("--arch", default="sm_90")
    r = sub.add_parser("run")
    r.add_argument("--dev", required=True, help="the folder prepare wrote")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(Path(args.out).resolve(), args.arch)
    else:
        run(Path(args.dev).resolve())


if __name__ == "__main__":
    main()
