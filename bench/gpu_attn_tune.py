"""Ragged prefill attention on a CUDA GPU: ours (kernels/cuda_attention.py, mma.sync) against TVM's
`_attention_prefill_ragged`, both checked against numpy and timed. Build here, check and time there.

  python bench/gpu_attn_tune.py prepare [--arch sm_90]
      builds .device-attn/: site/ (runtime-only TVM + tvm_ffi for the GPU's Python) and attn.so with `ours_<cfg>`
      and `tvm_<cfg>` for every head configuration in CONFIGS.
  PYTHONUNBUFFERED=1 PYTHONPATH=.device-attn/site:. python3 bench/gpu_attn_tune.py run     (on the GPU machine)
      checks both kernels against a float64 numpy reference (output, and lse in TVM's log2 convention) on outputs
      poisoned with NaN, for ragged batches, causal and not; times them (time_evaluator median) at the BENCH shapes.
      Then end to end (artifacts built by `prepare`, our kernel swapped in): a tiny fp16 Llama with head_dim 64 and
      group size 3 against transformers on the GPU (one prefill; and a chunked prefill, whose second chunk merges
      this kernel's output with the paged-prefill kernel's through lse), and Llama-3-8B-shape pp512 / pp128 built
      with ours and with TVM's kernel (--opt cuda_attention=tvm).
      Writes $OUT/attn.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEV = REPO / ".device-attn"
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
# tiny Llama for the end-to-end check: head_dim 64 (our kernel applies), 6 q heads over 2 kv heads
TINY = {"model_type": "llama", "hidden_size": 384, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 6, "num_key_value_heads": 2, "tie_word_embeddings": False}
ATTN = ("mma", "tvm")  # --opt cuda_attention= of the two Llama-3-8B-shape builds: ours, TVM's kernel
PROMPT = [int(x) for x in np.random.default_rng(5).integers(3, 320, 150)]

# name: (kv heads, q heads, head_dim)
CONFIGS = {"llama8b": (8, 32, 128), "smollm2": (3, 9, 64), "llama1b": (8, 32, 64), "g3d128": (2, 6, 128)}
# (q lengths, kv lengths) per sequence; kv None = the same as q (how the runtime calls the ragged kernel)
CHECKS = [([512], None), ([100, 37, 1], None), ([129, 64], None), ([1, 65, 17], [1, 80, 40])]
BENCH = [("llama8b", [512]), ("llama8b", [128]), ("llama8b", [128] * 4), ("smollm2", [512]), ("smollm2", [128]),
         ("llama1b", [512])]


def build(arch: str) -> None:
    import tvm

    from edgellm._tvm import compiler
    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.kernels.cuda_attention import attention_prefill_ragged_cuda
    from edgellm.targets import resolve

    target = resolve(f"cuda-{arch.replace('_', '')}").tvm()
    funcs = {}
    with target:
        for name, (kv, h, d) in CONFIGS.items():
            funcs[f"ours_{name}"] = attention_prefill_ragged_cuda(kv, h, d, "float16")
            funcs[f"tvm_{name}"] = compiler().llm_kv_cache._attention_prefill_ragged(kv, h, d, d, "float16", {}, target)
    prepare_cuda_build()
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        tvm.compile(mod, target=target).export_library(str(DEV / "attn.so"))


def build_artifacts(arch: str) -> None:
    import gpu_prepare
    import tiny_models

    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions

    preset = f"cuda-{arch.replace('_', '')}"
    tiny_models.SPECS["llama_d64"] = TINY
    ckpt = tiny_models.make_checkpoint(DEV / "ckpt" / "tiny", "llama_d64")
    compile_model(CompileArgs(model=str(ckpt), output=DEV / "art" / "tiny-q0f16", target=preset, quant="q0f16",
                              runtime=RuntimeOptions(256, 256, 16, 4)))
    gpu_prepare.build_ab_shapes(DEV, arch, "cuda_attention", ATTN)  # ours, and TVM's kernel for the A/B


def prepare(args) -> None:
    import gpu_prepare

    gpu_prepare.new_bundle(DEV, args.python)
    build(args.arch)
    if not args.no_artifacts:
        build_artifacts(args.arch)
    gpu_prepare.check_bundle_size(DEV, 48)


# ------------------------------------------------------------------------------------------------ on the GPU
results: dict = {"checks": [], "bench": [], "bench_models": [], "errors": []}


def reference(q, k, v, qlens, kvlens, causal, sm_scale, g):
    """float64 attention per sequence and q head; lse = log2(sum exp(score)) (TVM's log2-domain convention)."""
    total, h, d = q.shape
    out = np.zeros((total, h, d)), np.zeros((total, h))
    qo = ko = 0
    for nq, nk in zip(qlens, kvlens):
        for hh in range(h):
            qs = q[qo:qo + nq, hh].astype(np.float64)
            ks = k[ko:ko + nk, hh // g].astype(np.float64)
            vs = v[ko:ko + nk, hh // g].astype(np.float64)
            s = qs @ ks.T * sm_scale
            if causal:
                s = np.where(np.arange(nk)[None, :] < np.arange(nq)[:, None] + 1 + nk - nq, s, -np.inf)
            mx = s.max(axis=1, keepdims=True)
            p = np.exp(s - mx)
            den = p.sum(axis=1, keepdims=True)
            out[0][qo:qo + nq, hh] = p @ vs / den
            out[1][qo:qo + nq, hh] = (mx[:, 0] + np.log(den[:, 0])) / np.log(2)
        qo += nq
        ko += nk
    return out


def flops(qlens, kvlens, h, d, causal) -> float:
    pairs = sum((sum(min(nk, t + 1 + nk - nq) for t in range(nq)) if causal else nq * nk)
                for nq, nk in zip(qlens, kvlens))
    return 4.0 * pairs * h * d


def make_args(rng, qlens, kvlens, kv, h, d, dev, tvm):
    tq, tk = sum(qlens), sum(kvlens)
    q = rng.standard_normal((tq, h, d)).astype(np.float16)
    k = rng.standard_normal((tk, kv, d)).astype(np.float16)
    v = rng.standard_normal((tk, kv, d)).astype(np.float16)
    qi = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    ki = np.concatenate([[0], np.cumsum(kvlens)]).astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in qlens]).astype(np.int32)
    host = (q, k, v)
    dv = [tvm.tensor(x, dev) for x in (q, qi, k, v, ki, pos, np.zeros(len(qlens), np.int32))]
    return host, dv


def run_all() -> None:
    from edgellm import _tvm as tvm

    tvm.load_cuda_runtime()
    mod = tvm.load_module(DEV / "attn.so")
    dev = tvm.device("cuda", 0)
    rng = np.random.default_rng(3)
    for cfg, (kv, h, d) in CONFIGS.items():
        g, sm = h // kv, 1.0 / np.sqrt(d)
        for qlens, kvlens in CHECKS:
            kvlens = kvlens or qlens
            (q, k, v), dv = make_args(rng, qlens, kvlens, kv, h, d, dev, tvm)
            for causal in (1, 0):
                ro, rl = reference(q, k, v, qlens, kvlens, causal, sm, g)
                for impl in ("ours", "tvm"):
                    o = tvm.tensor(np.full(q.shape, np.nan, np.float16), dev)
                    lse = tvm.tensor(np.full(q.shape[:2], np.nan, np.float32), dev)
                    mod[f"{impl}_{cfg}"](*dv[:7], o, lse, causal, 0, 1.0, 10000.0, float(sm))
                    on, ln = o.numpy().astype(np.float64), lse.numpy().astype(np.float64)
                    rec = {"cfg": cfg, "impl": impl, "qlens": qlens, "kvlens": kvlens, "causal": causal,
                               "out_err": float(np.nanmax(np.abs(on - ro))) if not np.isnan(on).all() else None,
                               "lse_err": float(np.nanmax(np.abs(ln - rl))) if not np.isnan(ln).all() else None,
                               "nan_out": int(np.isnan(on).sum()), "nan_lse": int(np.isnan(ln).sum())}
                    rec["ok"] = (rec["nan_out"] == 0 and rec["nan_lse"] == 0 and rec["out_err"] < 2e-2
                                 and rec["lse_err"] < 2e-2)
                    results["checks"].append(rec)
                    print(f"{cfg:8s} {impl:4s} q{qlens} kv{kvlens} causal {causal}: out {rec['out_err']} "
                          f"lse {rec['lse_err']} nan {rec['nan_out']}/{rec['nan_lse']} {'ok' if rec['ok'] else 'FAIL'}")
    for cfg, qlens in BENCH:
        kv, h, d = CONFIGS[cfg]
        (q, _, _), dv = make_args(rng, qlens, qlens, kv, h, d, dev, tvm)
        o = tvm.tensor(np.zeros(q.shape, np.float16), dev)
        lse = tvm.tensor(np.zeros(q.shape[:2], np.float32), dev)
        fl = flops(qlens, qlens, h, d, True)
        row = {"cfg": cfg, "qlens": qlens, "causal": 1, "gflop": fl / 1e9}
        for impl in ("ours", "tvm"):
            t = mod.time_evaluator(f"{impl}_{cfg}", dev, number=20, repeat=5)(
                *dv[:7], o, lse, 1, 0, 1.0, 10000.0, float(1 / np.sqrt(d))).median
            row[f"{impl}_us"] = t * 1e6
            row[f"{impl}_tflops"] = fl / t / 1e12
        row["speedup"] = row["tvm_us"] / row["ours_us"]
        results["bench"].append(row)
        print(f"{cfg:8s} q{qlens}: ours {row['ours_us']:8.1f} us ({row['ours_tflops']:6.1f} TF/s)  "
              f"tvm {row['tvm_us']:8.1f} us ({row['tvm_tflops']:6.1f} TF/s)  x{row['speedup']:.1f}")


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def run_models() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from edgellm.device_runners.bench import run_bench
    from edgellm.device_runners.engine import Engine

    eng = Engine(DEV / "art" / "tiny-q0f16")
    got = eng.score(PROMPT)
    with eng.sequence() as seq:  # chunk 2 attends to chunk 1 through the cache: ragged + paged prefill, merged by lse
        seq.prefill(PROMPT[:70])
        chunked = seq.prefill(PROMPT[70:])
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(str(DEV / "ckpt" / "tiny"), dtype=torch.float16).cuda().eval()
        ref = hf(torch.tensor([PROMPT]).cuda()).logits[0].float().cpu().numpy()
    rec = {"rel_err": rel(got, ref), "chunked_last_rel_err": rel(chunked, ref[-1]), "tol": 2e-2}
    rec["ok"] = rec["rel_err"] < 2e-2 and rec["chunked_last_rel_err"] < 2e-2
    results["model_checks"] = rec
    print("tiny fp16 d64 G3 vs transformers:", rec)
    del eng
    dev = torch.cuda.get_device_name(0)
    for attn in ATTN:
        eng = Engine(DEV / "art" / f"llama-3-8b-{attn}", random_weights=0)
        for n_prompt in (128, 512):
            for r in run_bench(eng, n_prompt, 0, reps=3, warmup=1, device_name=dev):
                results["bench_models"].append({"model": "Llama-3-8B shape", "attention": attn, "test": r.test,
                                                "avg_ts": r.avg_ts, "stddev_ts": r.stddev_ts,
                                                "samples_ts": r.samples_ts})
                print(f"Llama-3-8B shape, {attn} prefill attention, {r.test}: {r.avg_ts:.0f} tok/s")
        del eng
        gc.collect()
        torch.cuda.empty_cache()


def run(args) -> int:
    import torch

    results["device"] = torch.cuda.get_device_name(0)
    out = Path(os.environ.get("OUT", ".")) / "attn.json"
    from bench_steps import run_steps

    run_steps((("kernels", run_all), ("models", run_models)), results, out)
    bad = [c for c in results["checks"] if not c["ok"]]
    for e in results["errors"]:
        print("ERROR:", e)
    print(f"{len(results['checks']) - len(bad)}/{len(results['checks'])} checks ok")
    if not results.get("model_checks", {}).get("ok", False):
        bad.append("model_checks")
    return 1 if results["errors"] or bad else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["prepare", "run"])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--python", default="3.12")
    ap.add_argument("--no-artifacts", action="store_true", help="kernels only (no end-to-end step)")
    args = ap.parse_args()
    if args.mode == "prepare":
        prepare(args)
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
