"""Run on a CUDA GPU machine prepared by bench/gpu_prepare.py (PYTHONPATH=.device/site:.).

In one process, each step reporting and going on when another fails (device time is scarce):
  1. correctness: tiny Llama q0f32/q0f16 logits and greedy tokens vs transformers on the same GPU; q4f16_1 vs the
     numpy model on the dequantized weights; the standalone INT4 GEMV kernels vs numpy at Llama-3-8B shapes;
  2. device copy bandwidth (the bandwidth fractions' denominator, measured in this run);
  3. per model shape (SmolLM2-135M, Llama-3.2-1B, Llama-3-8B; q4f16_1 with random weights, an explicit
     benchmark-only mode): a torch.profiler (CUPTI) trace of decode steps, kernel by kernel, and whether CUDA
     graphs replay; pp128, pp512, tg128;
  4. HF transformers fp16 (random init on the GPU) on the same shapes: pp128, pp512, tg128.
Writes $OUT/gpu.json (or ./gpu.json) and prints a table.  Usage: bench/gpu_run.py [--models a,b] [--skip-hf]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEV = REPO / ".device"
PROMPT = [1, 5, 7, 100, 42, 9, 33, 250, 17, 64, 3, 201, 88]
MODELS = {"smollm2-135m": "SmolLM2-135M shape", "llama-3.2-1b": "Llama-3.2-1B shape", "llama-3-8b": "Llama-3-8B shape"}
results: dict = {"checks": {}, "kernels": [], "profiles": {}, "bench": [], "errors": []}


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def hf_model(dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(DEV / "ckpt" / "llama"), dtype=dtype).cuda().eval()


def check_tiny() -> None:
    import torch

    from edgellm.device_runners.engine import Engine

    for scheme, dtype, tol in (("q0f32", torch.float32, 1e-4), ("q0f16", torch.float16, 2e-2)):
        eng = Engine(DEV / "art" / f"tiny-{scheme}")
        got = eng.score(PROMPT)
        with torch.no_grad():
            hf = hf_model(dtype)
            ref = hf(torch.tensor([PROMPT]).cuda()).logits[0].float().cpu().numpy()
            hf_greedy = hf.generate(torch.tensor([PROMPT]).cuda(), max_new_tokens=12, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
        ours = list(eng.generate_ids(PROMPT, 12))
        results["checks"][f"tiny {scheme} vs transformers {dtype} (cuda)"] = {
            "rel_err": rel(got, ref), "tol": tol, "ok": rel(got, ref) < tol,
            "greedy_equal": ours == hf_greedy, "ours": ours, "hf": hf_greedy}
    check_argmax(eng)
    # head_dim 64 (the CUDA kernels of the big shapes): a 150-token prompt, whole and in two chunks (the second
    # attends to the first through the cache: ragged + paged prefill merged by lse), vs transformers fp16 ...
    long = [int(x) for x in np.random.default_rng(5).integers(3, 320, 150)]
    eng = Engine(DEV / "art" / "tiny64-q0f16")
    got = eng.score(long)
    with eng.sequence() as seq:
        seq.prefill(long[:70])
        chunked = seq.prefill(long[70:])
    with torch.no_grad():
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(DEV / "ckpt" / "llama64"), dtype=torch.float16).cuda().eval()
        ref = hf(torch.tensor([long]).cuda()).logits[0].float().cpu().numpy()
        hf_greedy = hf.generate(torch.tensor([long]).cuda(), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(long):].tolist()
    ours = list(eng.generate_ids(long, 12))
    results["checks"]["tiny head_dim-64 q0f16 vs transformers fp16, 150 tokens (cuda)"] = {
        "rel_err": rel(got, ref), "chunked_last_rel_err": rel(chunked, ref[-1]), "tol": 2e-2,
        "greedy_equal": ours == hf_greedy,
        "ok": rel(got, ref) < 2e-2 and rel(chunked, ref[-1]) < 2e-2 and ours == hf_greedy}
    # ... and q4f16_1 vs the numpy model on its dequantized weights, decode steps vs prefill
    check_q4_vs_numpy("tiny head_dim-64 q4f16_1 vs numpy on dequantized weights, 150 tokens (cuda)", "tiny64-q4f16_1",
                      long, 100)
    check_q4_vs_numpy("tiny q4f16_1 vs numpy on dequantized weights (cuda)", "tiny-q4f16_1", PROMPT, 4)


def check_q4_vs_numpy(label: str, artifact: str, prompt: list[int], split: int) -> None:
    """Logits of a q4 artifact vs the numpy model on its dequantized weights; `prompt[:split]` prefilled, then the
    rest decoded one token at a time (GEMV path) vs the same positions scored in one prefill (GEMM path)."""
    from edgellm.artifact import Artifact
    from edgellm.config import ModelConfig
    from edgellm.device_runners.engine import Engine
    from edgellm.models.reference import float_weights, forward

    art = Artifact.open(DEV / "art" / artifact)
    ref = forward(ModelConfig.from_dict(art.manifest["model"]["config"]), float_weights(art), prompt)
    eng = Engine(art.root)
    got = eng.score(prompt)
    with eng.sequence() as seq:
        steps = [seq.prefill(prompt[:split])] + [seq.decode(t) for t in prompt[split:]]
    err, path = rel(got, ref), rel(np.stack(steps), got[split - 1:])
    results["checks"][label] = {"rel_err": err, "decode_vs_prefill": path, "tol": 2e-2,
                                "ok": err < 2e-2 and path < 2e-2}


def check_argmax(eng) -> None:
    """The artifact's device argmax (kernels/cuda_math: argmax_partial_gpu + argmax_final_gpu) vs numpy: random logits, ties (numpy keeps the
    first index), the maximum at either end, all -inf but one."""
    from edgellm import _tvm

    rng = np.random.default_rng(3)
    vocab = eng.art.manifest["model"]["config"]["vocab_size"]
    cases = []
    for _ in range(20):
        x = rng.standard_normal((1, 1, vocab)).astype(np.float32)
        cases.append(x)
        t = x.copy()
        i, j = sorted(rng.choice(vocab, 2, replace=False))
        t[0, 0, [i, j]] = t.max() + 1
        cases.append(t)
    for pos in (0, vocab - 1):
        x = rng.standard_normal((1, 1, vocab)).astype(np.float32)
        x[0, 0, pos] = 100
        cases.append(x)
    x = np.full((1, 1, vocab), -np.inf, np.float32)
    x[0, 0, vocab // 3] = -1e30
    cases.append(x)
    got = [int(eng._argmax(_tvm.tensor(c, eng.dev)).numpy()[0, 0]) for c in cases]
    want = [int(np.argmax(c)) for c in cases]
    results["checks"]["device argmax vs numpy (ties, ends, -inf)"] = {"cases": len(cases), "ok": got == want,
                                                                      "mismatches": sum(a != b for a, b in zip(got, want))}


def check_gemv_kernels() -> None:
    """kernels.so (gpu_prepare): the INT4 GEMVs (new = the default, te, old) and prefill GEMMs (gemm = FMA, tc,
    tc2 = the default) at Llama-3-8B shapes vs numpy (float64 on dequantized weights); fresh random inputs, output
    poisoned with NaN first; time_evaluator medians (GEMV weights under ~40 MB stay in L2 across repeats)."""
    from edgellm import _tvm
    from edgellm.quant import reference as qref
    from edgellm.quant.schemes import get_scheme

    sys.path.insert(0, str(REPO / "bench"))
    from gpu_prepare import GEMV_SHAPES

    _tvm.load_cuda_runtime()
    mod = _tvm.load_module(DEV / "kernels.so")
    dev = _tvm.device("cuda", 0)
    scheme = get_scheme("q4f16_1")
    rng = np.random.default_rng(1)
    for k, n in GEMV_SHAPES:
        qw = rng.integers(0, 2**32, size=(n, k // 8), dtype=np.uint64).astype(np.uint32)
        qs = (rng.random((n, k // 32)) * 0.02 + 0.001).astype(np.float16)
        x = rng.standard_normal((1, k)).astype(np.float16)
        w = qref.dequantize(qw, qs, k, scheme).astype(np.float64)
        ref = x.astype(np.float64) @ w.T
        args = [_tvm.tensor(a, dev) for a in (x, qw, qs)]
        nbytes = qw.nbytes + qs.nbytes + x.nbytes + 2 * n
        for variant in ("new", "te", "old"):
            name = f"{variant}_{k}_{n}"
            out = _tvm.tensor(np.full((1, n), np.nan, np.float16), dev)
            mod[name](*args, out)
            got = out.numpy().astype(np.float64)
            err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            t = mod.time_evaluator(name, dev, number=20, repeat=5)(*args, out).median
            results["kernels"].append({"kernel": name, "in": k, "out": n, "rel_err": err, "finite": bool(np.isfinite(got).all()),
                                       "us": t * 1e6, "gbs": nbytes / t / 1e9, "l2_resident": nbytes < 40e6})
        # prefill GEMM: FMA (gemm_) and tensor-core (tc_) kernels checked against numpy (float32 on the dequantized
        # weights) and timed (TFLOP/s); 100 rows = a partial row tile
        w32 = w.astype(np.float32)
        for m, check, variant in [(64, True, "gemm"), (128, False, "gemm"), (512, False, "gemm")] + [
                (mm, True, v) for v in ("tc", "tc2") for mm in (100, 128, 512)]:
            xm = rng.standard_normal((m, k)).astype(np.float16)
            xa = _tvm.tensor(xm, dev)
            out = _tvm.tensor(np.full((m, n), np.nan, np.float16), dev)
            name = f"{variant}_{k}_{n}"
            mod[name](xa, args[1], args[2], out)
            rec = {"kernel": f"{name} m={m}", "in": k, "out": n, "rows": m}
            if check:
                refm = (xm.astype(np.float32) @ w32.T).astype(np.float64)
                got = out.numpy().astype(np.float64)
                rec.update(rel_err=float(np.linalg.norm(got - refm) / np.linalg.norm(refm)),
                           finite=bool(np.isfinite(got).all()))
            t = mod.time_evaluator(name, dev, number=3, repeat=3)(xa, args[1], args[2], out).median
            rec.update(us=t * 1e6, tflops=2 * m * k * n / t / 1e12, gbs=nbytes / t / 1e9)
            results["kernels"].append(rec)


def copy_bandwidth() -> float:
    import torch

    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        b.copy_(a)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * n / float(np.median(times))  # bytes read + written


def torch_device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def profile_decode(eng, label: str, steps: int = 24, trace: Path | None = None, chain: bool = False) -> None:
    """Kernel-by-kernel GPU time of `steps` decode steps (CUPTI through torch.profiler), host time per token,
    and the CUDA runtime calls per token (cudaGraphLaunch present = the captured graph replays). chain: the steps
    as one Engine.greedy_chain (one step queued ahead where the artifact allows), else one decode_greedy each."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with eng.sequence() as seq:
        tok = int(np.argmax(seq.prefill([5])))
        for _ in range(4):  # capture happens on the first decode calls
            tok = seq.decode_greedy(tok)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            if chain:  # what bench's tg runs
                for _ in seq.greedy_chain(tok, steps):
                    pass
            else:
                for _ in range(steps):  # a greedy step: argmax on the device, 4 bytes back
                    tok = seq.decode_greedy(tok)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
    if trace is not None:  # timeline: gaps between kernels, host launch cadence
        prof.export_chrome_trace(str(trace))
    kernels, runtime = {}, {}
    for e in prof.events():
        dev_type = str(getattr(e, "device_type", ""))
        if "CUDA" in dev_type:
            d = kernels.setdefault(e.name, [0, 0.0])
            d[0] += 1
            d[1] += e.time_range.elapsed_us()
        elif e.name.startswith("cuda") or e.name.startswith("cu"):
            d = runtime.setdefault(e.name, [0, 0.0])
            d[0] += 1
            d[1] += e.time_range.elapsed_us()
    gpu_us = sum(v[1] for v in kernels.values()) / steps
    # per decode step (each ends with the token's device-to-host copy): first GPU activity to the copy's end
    dev_events = sorted((e for e in prof.events() if "CUDA" in str(getattr(e, "device_type", ""))),
                        key=lambda e: e.time_range.start)
    step_spans, first = [], None
    for e in dev_events:
        first = e.time_range.start if first is None else first
        if e.name.startswith("Memcpy DtoH"):
            step_spans.append(e.time_range.end - first)
            first = None
    span_us = float(np.median(step_spans)) if step_spans else 0.0
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]
    results["profiles"][label] = {
        "steps": steps, "wall_ms_per_token_profiled": wall / steps * 1e3, "gpu_busy_us_per_token": gpu_us,
        # median over steps of first GPU activity -> end of the logits copy: busy + gaps between kernels
        "gpu_span_us_per_token": span_us,
        "kernels_per_token": sum(v[0] for v in kernels.values()) / steps,
        "top_kernels": [{"name": k[:120], "per_token": v[0] / steps, "us_per_token": v[1] / steps} for k, v in top],
        "runtime_calls_per_token": {k: {"n": v[0] / steps, "us": v[1] / steps} for k, v in sorted(runtime.items())},
    }


def prefill_kernel_table(eng, n: int = 512, top: int = 15, ids: list[int] | None = None) -> dict:
    """GPU time per kernel of one n-token prefill into an empty sequence (CUPTI through torch.profiler), after a
    warm-up prefill: {tokens, wall_ms, gpu_busy_ms, top_kernels: [{name, calls, us, ms}] (the `top` longest)}."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    ids = ids or [(7 * i) % 1000 + 1 for i in range(n)]
    with eng.sequence() as seq:
        seq.prefill(ids)
    torch.cuda.synchronize()
    with eng.sequence() as seq:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            seq.prefill(ids)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
    kernels: dict[str, list] = {}
    for e in prof.events():
        if "CUDA" in str(getattr(e, "device_type", "")):
            d = kernels.setdefault(e.name, [0, 0.0])
            d[0] += 1
            d[1] += e.time_range.elapsed_us()
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]
    return {"tokens": len(ids), "wall_ms": wall * 1e3, "gpu_busy_ms": sum(v[1] for v in kernels.values()) / 1e3,
            "top_kernels": [{"name": k[:160], "calls": v[0], "us": v[1], "ms": v[1] / 1e3} for k, v in ranked]}


def profile_prefill(eng, label: str, n: int = 512) -> None:
    results.setdefault("prefill_profiles", {})[label] = prefill_kernel_table(eng, n)


def hf_random_llama(config_dir: Path):
    """transformers' Llama of the checkpoint folder's config.json, random init, fp16, on the GPU (cuBLAS + SDPA)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(str(config_dir))
    torch.manual_seed(0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.float16)
        try:
            return cfg, LlamaForCausalLM(cfg).eval()
        finally:
            torch.set_default_dtype(torch.float32)


def read_bytes_per_token(eng) -> int:
    """Weight bytes one decode step reads: every parameter, except an untied embedding table (one row is read)."""
    tied = eng.art.manifest["model"]["config"].get("tie_word_embeddings", False)
    return sum(e["nbytes"] for e in eng.art.param_index()
               if tied or not e["name"].startswith("model.embed_tokens."))


def bench_records(eng, label: str, engine: str, bw: float, runs) -> None:
    """llama-bench-style records of `eng` (run_bench at each (n_prompt, n_gen) of `runs`, 3 reps after a warm-up)
    into results["bench"], tg records with the weight bytes a token, GB/s and the fraction of `bw` (bytes/s)."""
    from edgellm.device_runners.bench import run_bench

    dev, read = torch_device_name(), read_bytes_per_token(eng)
    for n_prompt, n_gen in runs:
        for r in run_bench(eng, n_prompt, n_gen, reps=3, warmup=1, device_name=dev):
            tg = r.test.startswith("tg")
            results["bench"].append({
                "model": label, "test": r.test, "engine": engine, "scheme": r.scheme, "avg_ts": r.avg_ts,
                "stddev_ts": r.stddev_ts, "weight_bytes": r.weight_bytes, "read_bytes_per_token": read,
                "achieved_gbs": read * r.avg_ts / 1e9 if tg else None,
                "bandwidth_fraction": (read * r.avg_ts / bw) if tg else None,
                "copy_bandwidth_gbs": bw / 1e9, "device": dev, "samples_ts": r.samples_ts})


def bench_head_q4(name: str, bw: float) -> None:
    """pp128 / tg128 of the shape's `--head q4` build (gpu_prepare.py: NAME-q4f16_1-hq4), engine "edgellm --head q4":
    the embedding / head in q4f16_1 like the layers, the bytes a token of llama.cpp's pure Q4_0 GGUFs."""
    from edgellm.device_runners.engine import Engine

    eng = Engine(DEV / "art" / f"{name}-q4f16_1-hq4", random_weights=0)
    bench_records(eng, MODELS[name], "edgellm --head q4", bw, ((128, 128),))
    del eng
    gc.collect()


def bench_model(name: str, bw: float) -> None:
    from edgellm.device_runners.engine import Engine

    label = MODELS[name]
    t0 = time.perf_counter()
    eng = Engine(DEV / "art" / f"{name}-q4f16_1", random_weights=0)
    results.setdefault("load_seconds", {})[label] = time.perf_counter() - t0
    try:
        trace = Path(os.environ["OUT"]) / f"trace-{name}.json" if name == "llama-3-8b" and "OUT" in os.environ else None
        profile_decode(eng, label, trace=trace)
        profile_prefill(eng, label)
    except Exception:
        results["errors"].append(f"profile {label}: " + traceback.format_exc()[-2000:])
    with eng.sequence() as a, eng.sequence() as b:  # the device-argmax greedy chain vs the host argmax of logits
        ta = tb = int(np.argmax(a.prefill([7, 8, 9])))
        b.prefill([7, 8, 9])
        chain_a, chain_b = [], []
        for _ in range(8):
            ta, tb = a.decode_greedy(ta), int(np.argmax(b.decode(tb)))
            chain_a.append(ta)
            chain_b.append(tb)
    results["checks"][f"{label}: greedy on the device == argmax of the logits on the host (8 steps)"] = {
        "ok": chain_a == chain_b, "device": chain_a, "host": chain_b}
    bench_records(eng, label, "edgellm", bw, ((128, 128), (512, 0)))
    if eng.runtime.max_batch > 1:
        try:
            results.setdefault("batched", []).extend(bench_batched(eng, label))
        except Exception:
            results["errors"].append(f"batched {label}: " + traceback.format_exc()[-2000:])
    del eng
    gc.collect()


def bench_batched(eng, label: str, sizes=(1, 8, 32), steps: int = 32, prompt: int = 32) -> list[dict]:
    """Aggregate greedy decode tok/s with `b` sequences in flight (serve's case; issue 16 item 4): each sequence
    prefills its own `prompt` tokens, then every step decodes one token for all of them (`batch_decode` for b > 1,
    the device argmax), `steps` timed steps after 3 warm-up ones. Sizes over the artifact's max_batch are skipped."""
    recs = []
    for b in sizes:
        if b > eng.runtime.max_batch:
            continue
        seqs = []
        try:
            rng = np.random.default_rng(b)
            seqs = [eng.add_sequence() for _ in range(b)]
            toks = [int(np.argmax(eng.prefill(s, rng.integers(3, 300, prompt).tolist()))) for s in seqs]
            for _ in range(3):
                toks = eng.decode_greedy(seqs, toks, batched=b > 1)
            t0 = time.perf_counter()
            for _ in range(steps):
                toks = eng.decode_greedy(seqs, toks, batched=b > 1)
            dt = time.perf_counter() - t0
            recs.append({"model": label, "sequences": b, "aggregate_ts": b * steps / dt, "step_ms": dt / steps * 1e3,
                         "per_sequence_ts": steps / dt, "context": prompt + 3 + steps})
        finally:
            for s in seqs:
                eng.remove_sequence(s)
    return recs


def bench_hf(name: str, bw: float) -> None:
    """transformers fp16, random init on the GPU, same shapes: pp as one forward, tg as a greedy loop with the
    KV cache (argmax on the GPU), 1 warmup + 3 reps each."""
    import torch
    from transformers import DynamicCache

    label = MODELS[name]
    cfg, m = hf_random_llama(DEV / "ckpt" / name)
    wbytes = sum(p.numel() * p.element_size() for p in m.parameters())  # a tied head is listed once
    read = wbytes - (0 if cfg.tie_word_embeddings else m.get_input_embeddings().weight.numel() * 2)
    vocab = cfg.vocab_size

    def pp(n):
        ids = torch.randint(0, vocab, (1, n), device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        m(ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t)

    def tg(n):
        cache = DynamicCache()
        out = m(torch.randint(0, vocab, (1, 1), device="cuda"), past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            out = m(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        return n / (time.perf_counter() - t)

    with torch.no_grad():
        for test, fn, n in (("pp128", pp, 128), ("pp512", pp, 512), ("tg128", tg, 128)):
            fn(n)
            ts = [fn(n) for _ in range(3)]
            avg = float(np.mean(ts))
            results["bench"].append({
                "model": label, "test": test, "engine": "transformers fp16", "scheme": "fp16", "avg_ts": avg,
                "stddev_ts": float(np.std(ts, ddof=1)), "weight_bytes": wbytes, "read_bytes_per_token": read,
                "achieved_gbs": read * avg / 1e9 if test.startswith("tg") else None,
                "bandwidth_fraction": read * avg / bw if test.startswith("tg") else None,
                "copy_bandwidth_gbs": bw / 1e9, "device": torch_device_name(), "samples_ts": ts})
    del m
    gc.collect()
    torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-checks", action="store_true", help="skip the standalone kernel checks (kernels.so)")
    ap.add_argument("--dev", default=str(REPO / ".device"), help="the bundle folder gpu_prepare.py --out wrote (default .device/)")
    args = ap.parse_args()
    global DEV
    DEV = Path(args.dev).resolve()
    results["device"] = torch_device_name()
    steps = [("check_tiny", check_tiny)] + ([] if args.skip_checks else [("gemv kernels", check_gemv_kernels)])
    steps.append(("copy bandwidth", lambda: results.setdefault("copy_bw", copy_bandwidth())))
    models = [m for m in args.models.split(",") if m]
    for name in models:
        steps.append((f"edgellm {name}", lambda name=name: bench_model(name, results["copy_bw"])))
        if (DEV / "art" / f"{name}-q4f16_1-hq4").is_dir():
            steps.append((f"edgellm {name} --head q4", lambda name=name: bench_head_q4(name, results["copy_bw"])))
    if not args.skip_hf:
        for name in models:
            steps.append((f"hf {name}", lambda name=name: bench_hf(name, results["copy_bw"])))
    out = Path(os.environ.get("OUT", ".")) / "gpu.json"
    from bench_steps import run_steps

    run_steps(steps, results, out)
    print(json.dumps(results["checks"], indent=1, default=str))
    print(f"device: {results['device']}, copy bandwidth {results.get('copy_bw', 0) / 1e9:.0f} GB/s")
    for k in results["kernels"]:
        print(f"{k['kernel']:<22} err {k.get('rel_err', float('nan')):.1e} {k['us']:9.1f} us {k['gbs']:7.0f} GB/s"
              + (f" {k['tflops']:6.1f} TFLOP/s" if "tflops" in k else ""))
    for label, p in results["profiles"].items():
        print(f"{label}: {p['wall_ms_per_token_profiled']:.3f} ms/token wall (profiled), GPU busy "
              f"{p['gpu_busy_us_per_token']:.0f} us of a {p['gpu_span_us_per_token']:.0f} us span, "
              f"{p['kernels_per_token']:.0f} kernels/token; runtime calls: "
              + ", ".join(f"{k} {v['n']:.0f}" for k, v in p["runtime_calls_per_token"].items()))
        for k in p["top_kernels"][:8]:
            print(f"    {k['us_per_token']:8.1f} us {k['per_token']:5.1f}x  {k['name'][:90]}")
    for label, p in results.get("prefill_profiles", {}).items():
        print(f"{label}: prefill {p['tokens']} tokens {p['wall_ms']:.2f} ms wall (profiled), GPU busy "
              f"{p['gpu_busy_ms']:.2f} ms")
        for k in p["top_kernels"][:8]:
            print(f"    {k['ms']:8.2f} ms {k['calls']:4d}x  {k['name'][:90]}")
    for r in results["bench"]:
        frac = r.get("bandwidth_fraction")
        print(f"{r['model']:<20} {r['engine']:<18} {r['test']:<6} {r['avg_ts']:10.1f} tok/s"
              + (f"  {r['achieved_gbs']:.0f} GB/s, {frac:.1%} of copy bw" if frac else ""))
    for r in results.get("batched", []):
        print(f"{r['model']:<20} batched x{r['sequences']:<3} {r['aggregate_ts']:10.1f} tok/s aggregate, "
              f"{r['step_ms']:.2f} ms/step")
    for e in results["errors"]:
        print("ERROR:", e)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
