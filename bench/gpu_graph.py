"""The owned KV cache and one-graph decode on a CUDA GPU (issue 16 items 1 and 4): build here, check and time there.

  python bench/gpu_graph.py prepare --out .device-h4        # here (no GPU): runtime-only TVM + artifacts
  PYTHONPATH=.device-h4/site:. python3 bench/gpu_graph.py run --dev .device-h4   # on the GPU machine

Artifacts (sm_90): the head_dim-64 tiny Llama (q0f16 and q4f16_1) with `--opt cuda_kv=owned` and, for the greedy
chains, q4f16_1 with TVM's cache; the SmolLM2-135M, Llama-3.2-1B and Llama-3-8B shapes (shapes only) with the owned
cache and with TVM's. The run checks the owned path against transformers fp16 (150 tokens, whole and chunked),
against the TVM-cache build (logits and 40-step greedy chains, two interleaved sequences, remove/re-add,
batch_decode vs decode), then per shape profiles decode (graph launches and kernels per token) and times
pp128/pp512/tg128 on both caches, plus batched decode aggregate tok/s at 1, 8 and 32 sequences.
Writes $OUT/graph.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
SHAPES = ("smollm2-135m", "llama-3.2-1b", "llama-3-8b")
results: dict = {"checks": {}, "profiles": {}, "bench": [], "batched": [], "errors": []}


def prepare(out: Path, shapes: list[str], tvm_shapes: bool) -> None:
    import gpu_prepare as gp
    import tiny_models
    from tiny_models import make_checkpoint

    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.kernels import KernelOptions

    gp.OUT = out
    gp.new_bundle(out)
    owned, tvm = KernelOptions(cuda_kv="owned"), KernelOptions(cuda_kv="tvm")
    tiny_models.SPECS["llama_d64"] = gp.TINY64
    ckpt = make_checkpoint(out / "ckpt" / "llama64", "llama_d64")
    for scheme, opts, tag in (("q0f16", owned, "owned"), ("q4f16_1", owned, "owned"), ("q4f16_1", tvm, "tvm")):
        compile_model(CompileArgs(model=str(ckpt), output=out / "art" / f"tiny64-{scheme}-{tag}", target="cuda-sm90",
                                  quant=scheme, runtime=RuntimeOptions(256, 64, 16, 4), kernel_options=opts))
    for name in shapes:
        folder = gp.shape_folder(name)
        for opts, tag in ((owned, "owned"), (tvm, "tvm")) if tvm_shapes else ((owned, "owned"),):
            compile_model(CompileArgs(model=str(folder), output=out / "art" / f"{name}-{tag}", target="cuda-sm90",
                                      quant="q4f16_1", runtime=RuntimeOptions(1024, 512, 16, 32), shapes_only=True,
                                      kernel_options=opts))
    gp.check_bundle_size(out)


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def check(name: str, ok: bool, **info) -> None:
    results["checks"][name] = {"ok": bool(ok), **info}
    print(("PASS " if ok else "FAIL ") + name + " " + json.dumps(info, default=str)[:300], flush=True)


def check_tiny(dev: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from edgellm.device_runners.engine import Engine

    rng = np.random.default_rng(5)
    long = [int(x) for x in rng.integers(3, 320, 150)]
    eng = Engine(dev / "art" / "tiny64-q0f16-owned")
    assert eng.owned_kv
    got = eng.score(long)  # prefill_logits in chunks of 64: 3 chunks, the 2nd and 3rd over the paged history
    with eng.sequence() as seq:
        whole = seq.prefill(long)
    with eng.sequence() as seq:
        seq.prefill(long[:70])
        chunked = seq.prefill(long[70:])
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(str(dev / "ckpt" / "llama64"), dtype=torch.float16).cuda().eval()
        ref = hf(torch.tensor([long]).cuda()).logits[0].float().cpu().numpy()
        hf_greedy = hf.generate(torch.tensor([long[:20]]).cuda(), max_new_tokens=150, do_sample=False,
                                eos_token_id=None, pad_token_id=0)[0, 20:].tolist()
    ours = list(eng.generate_ids(long[:20], 150))
    check("owned q0f16 score (3 chunks of 64) vs transformers fp16, 150 tokens", rel(got, ref) < 2e-2,
          rel_err=rel(got, ref))
    check("owned q0f16 prefill whole (3 chunks) vs transformers fp16, last logits", rel(whole, ref[-1]) < 2e-2,
          rel_err=rel(whole, ref[-1]))
    check("owned q0f16 prefill 70 + 80 tokens vs transformers fp16, last logits", rel(chunked, ref[-1]) < 2e-2,
          rel_err=rel(chunked, ref[-1]))
    same = sum(a == b for a, b in zip(ours, hf_greedy))
    first_diff = next((i for i, (a, b) in enumerate(zip(ours, hf_greedy)) if a != b), None)
    check("owned q0f16 greedy 150 tokens (one-graph decode) vs transformers fp16", first_diff is None or first_diff >= 40,
          equal=same, first_diff=first_diff)
    # the decode graph's logits vs transformers at every step of a 60-token teacher-forced continuation
    with eng.sequence() as seq:
        seq.prefill(long[:90])
        steps = np.stack([seq.decode(t) for t in long[90:149]])
    check("owned q0f16 decode logits (graph replays, positions 90..148) vs transformers fp16", rel(steps, ref[90:149]) < 2e-2,
          rel_err=rel(steps, ref[90:149]))
    del eng
    owned = Engine(dev / "art" / "tiny64-q4f16_1-owned")
    tvm = Engine(dev / "art" / "tiny64-q4f16_1-tvm")
    a, b = owned.score(long), tvm.score(long)
    check("owned vs TVM cache, q4f16_1, score 150 tokens", rel(a, b) < 2e-2, rel_err=rel(a, b))
    ca, cb = list(owned.generate_ids(long[:30], 60)), list(tvm.generate_ids(long[:30], 60))
    check("owned vs TVM cache, q4f16_1, greedy 60 tokens", ca == cb, owned=ca[:12], tvm=cb[:12])
    # two interleaved sequences, remove, re-add, batch_decode vs decode
    s1, s2 = owned.add_sequence(), owned.add_sequence()
    t1, t2 = int(np.argmax(owned.prefill(s1, long[:40]))), int(np.argmax(owned.prefill(s2, long[40:75])))
    solo = Engine(dev / "art" / "tiny64-q4f16_1-owned")
    with solo.sequence() as q1:
        u = int(np.argmax(q1.prefill(long[:40])))
        ref1 = [u]
        for _ in range(20):
            u = q1.decode_greedy(u)
            ref1.append(u)
    got1 = [t1]
    for i in range(20):
        x, y = owned.decode_greedy([s1, s2], [t1, t2], batched=False) if i % 2 else \
            owned.decode_greedy([s1, s2], [t1, t2], batched=True)
        t1, t2 = x, y
        got1.append(t1)
    check("two sequences interleaved (decode and batch_decode alternating) == one sequence alone", got1 == ref1,
          got=got1[:10], ref=ref1[:10])
    used = owned.pages_in_use()
    owned.remove_sequence(s2)
    freed = used - owned.pages_in_use()
    s3 = owned.add_sequence()
    t3 = int(np.argmax(owned.prefill(s3, long[:40])))
    chain3 = [t3] + [t3 := owned.decode_greedy([s3], [t3])[0] for _ in range(20)]
    check("remove frees the sequence's pages; a re-added sequence reuses them and decodes as before",
          freed == -(-(35 + 20) // 16) and chain3 == ref1, freed=freed, chain=chain3[:8])
    owned.remove_sequence(s1)
    owned.remove_sequence(s3)
    check("no pages in use after removing every sequence", owned.pages_in_use() == 0, in_use=owned.pages_in_use())


def profile_and_bench(dev: Path, name: str, tag: str, bw: float) -> None:
    import gpu_run

    from edgellm.device_runners.bench import run_bench
    from edgellm.device_runners.engine import Engine

    label = f"{name} {tag}"
    eng = Engine(dev / "art" / f"{name}-{tag}", random_weights=0)
    gpu_run.results = {"profiles": {}, "checks": {}}
    try:
        gpu_run.profile_decode(eng, label)
        results["profiles"][label] = gpu_run.results["profiles"][label]
    except Exception:
        results["errors"].append(f"profile {label}: " + traceback.format_exc()[-1500:])
    read = gpu_run.read_bytes_per_token(eng)
    dev_name = gpu_run.torch_device_name()
    for n_prompt, n_gen in ((128, 128), (512, 0)):
        for r in run_bench(eng, n_prompt, n_gen, reps=3, warmup=1, device_name=dev_name):
            tg = r.test.startswith("tg")
            results["bench"].append({
                "model": name, "kv": tag, "test": r.test, "avg_ts": r.avg_ts, "stddev_ts": r.stddev_ts,
                "read_bytes_per_token": read, "bandwidth_fraction": read * r.avg_ts / bw if tg else None,
                "samples_ts": r.samples_ts})
    if name != "smollm2-135m":
        try:
            for r in gpu_run.bench_batched(eng, label):
                results["batched"].append({**r, "model": name, "kv": tag})
        except Exception:
            results["errors"].append(f"batched {label}: " + traceback.format_exc()[-1500:])
    del eng
    gc.collect()


def run(dev: Path, shapes: list[str], tvm_shapes: bool) -> int:
    import gpu_run

    gpu_run.DEV = dev
    results["device"] = gpu_run.torch_device_name()
    out = Path(os.environ.get("OUT", ".")) / "graph.json"
    steps = [("tiny checks", lambda: check_tiny(dev)),
             ("copy bandwidth", lambda: results.setdefault("copy_bw", gpu_run.copy_bandwidth()))]
    for name in shapes:
        for tag in ("owned", "tvm") if tvm_shapes else ("owned",):
            steps.append((f"{name} {tag}", lambda name=name, tag=tag: profile_and_bench(dev, name, tag,
                                                                                        results["copy_bw"])))
    from bench_steps import run_steps

    run_steps(steps, results, out)
    print(f"device: {results['device']}, copy bandwidth {results.get('copy_bw', 0) / 1e9:.0f} GB/s")
    for label, p in results["profiles"].items():
        print(f"{label}: {p['wall_ms_per_token_profiled']:.3f} ms/token, GPU busy {p['gpu_busy_us_per_token']:.0f} us "
              f"of {p['gpu_span_us_per_token']:.0f} us, {p['kernels_per_token']:.0f} kernels/token; "
              + ", ".join(f"{k} {v['n']:.0f}" for k, v in p["runtime_calls_per_token"].items()))
        for k in p["top_kernels"][:6]:
            print(f"    {k['us_per_token']:8.1f} us {k['per_token']:5.1f}x  {k['name'][:90]}")
    for r in results["bench"]:
        frac = r.get("bandwidth_fraction")
        print(f"{r['model']:<14} {r['kv']:<6} {r['test']:<6} {r['avg_ts']:10.1f} tok/s" + (f"  {frac:.1%} of copy bw" if frac else ""))
    for r in results["batched"]:
        print(f"{r['model']:<14} {r['kv']:<6} b={r['sequences']:<3} {r['aggregate_ts']:9.1f} tok/s aggregate "
              f"({r['step_ms']:.2f} ms/step)")
    for e in results["errors"]:
        print("ERROR:", e)
    return 1 if results["errors"] or not all(c["ok"] for c in results["checks"].values()) else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("prepare", "run"))
    ap.add_argument("--out", default=str(REPO / ".device-h4"))
    ap.add_argument("--dev", default=str(REPO / ".device-h4"))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--no-tvm-shapes", action="store_true", help="build/time the shapes with the owned cache only")
    args = ap.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    if args.mode == "prepare":
        prepare(Path(args.out).resolve(), shapes, not args.no_tvm_shapes)
        return 0
    return run(Path(args.dev).resolve(), shapes, not args.no_tvm_shapes)


if __name__ == "__main__":
    sys.exit(main())
