"""Vulkan (--target vulkan, WGSL on wgpu-native) beside edgellm's CUDA path on one NVIDIA GPU, in one run.

  python bench/vulkan_gpu.py prepare     # here: .device-vk/ = runtime-only TVM + tvm_ffi + wgpu (site/, from
                                         # bench/gpu_prepare.py's recipe, see docs/vulkan.md) and the artifacts:
                                         # tiny Llama q0f32 / q4f16_1 for vulkan and cuda-sm90 (with weights), and
                                         # the SmolLM2-135M / Llama-3.2-1B / Llama-3-8B shapes q4f16_1, shapes only
  python bench/vulkan_gpu.py run         # there (PYTHONPATH=.device-vk/site:., VK_ICD_FILENAMES to NVIDIA's ICD):
                                         # correctness Vulkan vs CUDA, then pp128 / pp512 / tg128 of each shape on
                                         # both paths; $OUT/vulkan.json
  python bench/vulkan_gpu.py plot FILE   # docs/benchmarks/vulkan-h200.png from the JSON

Correctness: the same artifact source built for both targets, the same inputs, logits compared over a prefill and
16 decode steps; the shapes with the same random weights (Engine(random_weights=0) draws them from the params
index, identical for both builds of one scheme), so the big shapes are checked too.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEV = (REPO / os.environ["VK_DEV"]) if os.environ.get("VK_DEV") else REPO / ".device-vk"  # the bundle folder
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))
SHAPES = ("smollm2-135m", "llama-3.2-1b", "llama-3-8b")
TARGETS = {"vulkan": "vulkan", "cuda": "cuda-sm90"}
PROMPT = [1, 5, 7, 100, 42, 9, 33, 250, 17, 64, 3, 201, 88]
# which A/Bs of the 8B shape to build and run: OPT (= OPT=simple, the generic schedule) or OPT=VALUE
AB = [a if "=" in a else f"{a}=simple" for a in os.environ.get("AB", "webgpu_gemv=coalesced").split(",") if a]
# more Vulkan paths, each a build of every model with kernel options, checked and timed beside the default:
# VK_PATHS="dp4a:webgpu_gemv=dp4a" -> label "vulkan-dp4a" (options joined by "+")
VK_PATHS = {f"vulkan-{p.split(':')[0]}": dict(o.split("=") for o in p.split(":", 1)[1].split("+"))
            for p in os.environ.get("VK_PATHS", "").split(",") if p}


def prepare(shapes=SHAPES) -> None:
    import gpu_prepare
    from tiny_models import make_checkpoint

    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions

    gpu_prepare.OUT = DEV  # shape_folder writes DEV/ckpt
    art = DEV / "art"
    art.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(DEV / "ckpt" / "llama", "llama")
    only = os.environ.get("PREP_TARGETS")  # e.g. "vulkan": rebuild one side only
    for label, preset in TARGETS.items():
        if only and label not in only.split(","):
            continue
        for scheme in os.environ.get("TINY_SCHEMES", "q0f32,q4f16_1").split(","):  # a bundle near 64 MiB: fewer
            out = art / f"tiny-{scheme}-{label}"
            if not out.exists():
                compile_model(CompileArgs(model=str(ckpt), output=out, target=preset, quant=scheme,
                                          runtime=RuntimeOptions(256, 128, 16, 2)))
        for name in shapes:
            out = art / f"{name}-{label}"
            if not out.exists():
                t = time.time()
                compile_model(CompileArgs(model=str(gpu_prepare.shape_folder(name)), output=out, target=preset,
                                          quant="q4f16_1", runtime=RuntimeOptions(1024, 512, 16, 1), shapes_only=True))
                print(f"{name} {label}: {time.time() - t:.0f}s", flush=True)
    from edgellm.kernels import KernelOptions  # the A/Bs: the 8B shape with the generic GEMM / GEMV

    for label, opts in VK_PATHS.items():  # the other Vulkan paths: the tiny q4 model and every shape
        if only and label not in only.split(","):
            continue
        for name, src, rt, kw in [("tiny-q4f16_1", ckpt, RuntimeOptions(256, 128, 16, 2), {})] + [
                (n, gpu_prepare.shape_folder(n), RuntimeOptions(1024, 512, 16, 1), {"shapes_only": True})
                for n in shapes]:
            out = art / f"{name}-{label}"
            if not out.exists():
                t = time.time()
                compile_model(CompileArgs(model=str(src), output=out, target="vulkan", quant="q4f16_1", runtime=rt,
                                          kernel_options=KernelOptions(**opts), **kw))
                print(f"{name} {label}: {time.time() - t:.0f}s", flush=True)

    for opt, value in (a.split("=") for a in AB):
        out = art / f"llama-3-8b-vulkan-{opt}-{value}"
        if "llama-3-8b" in shapes and not out.exists():
            compile_model(CompileArgs(model=str(gpu_prepare.shape_folder("llama-3-8b")), output=out, target="vulkan",
                                      quant="q4f16_1", runtime=RuntimeOptions(1024, 512, 16, 1), shapes_only=True,
                                      kernel_options=KernelOptions(**{opt: value})))
    gpu_prepare.check_bundle_size(DEV)


results: dict = {"checks": {}, "bench": [], "errors": [], "adapter": None}


def _steps(eng, prompt, tokens):
    with eng.sequence() as seq:
        return np.stack([seq.prefill(prompt)] + [seq.decode(t) for t in tokens])


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def check(name: str, kwargs: dict, tol: float, prompt=PROMPT, label: str = "vulkan") -> None:
    from edgellm.device_runners.engine import Engine

    try:
        cu = Engine(DEV / "art" / f"{name}-cuda", verify=False, **kwargs)
        toks = [int(np.argmax(cu.score(prompt)[-1]))]
        with cu.sequence() as s:  # the CUDA build's greedy tokens drive both
            s.prefill(prompt)
            for _ in range(15):
                toks.append(s.decode_greedy(toks[-1]))
        ref = _steps(cu, prompt, toks)
        del cu
        gc.collect()
        vk = Engine(DEV / "art" / f"{name}-{label}", verify=False, **kwargs)
        got = _steps(vk, prompt, toks)
        top1 = float(np.mean(np.argmax(got, -1) == np.argmax(ref, -1)))
        key = f"{name}: {label} vs cuda, prefill {len(prompt)} + 16 decodes"
        results["checks"][key] = {"rel_err": _rel(got, ref), "tol": tol, "ok": _rel(got, ref) < tol,
                                  "top1_agreement": top1, "finite": bool(np.isfinite(got).all())}
        print(name, label, results["checks"][key], flush=True)
        del vk
        gc.collect()
    except Exception:
        results["errors"].append(f"check {name}: " + traceback.format_exc()[-2000:])
        print(results["errors"][-1], flush=True)


def bench(name: str, reps: int, tol: float = 5e-2) -> None:
    """Per path (CUDA first): one Engine with the same random weights; logits of a 40-token prefill and 16 greedy
    decode steps (CUDA's tokens drive both), then pp128, tg128, pp512."""
    from edgellm.device_runners.bench import run_bench
    from edgellm.device_runners.engine import Engine

    prompt, logits, toks = list(range(1, 41)), {}, None
    for label in ("cuda", "vulkan", *VK_PATHS):
        try:
            t0 = time.perf_counter()
            eng = Engine(DEV / "art" / f"{name}-{label}", verify=False, random_weights=0)
            load = time.perf_counter() - t0
            if toks is None:
                with eng.sequence() as s:
                    toks = [int(np.argmax(s.prefill(prompt)))]
                    for _ in range(15):
                        toks.append(int(np.argmax(s.decode(toks[-1]))))
            logits[label] = _steps(eng, prompt, toks)
            dev = eng.device_info.describe() if label.startswith("vulkan") else _cuda_name()
            tests = ((128, 128), (512, 0)) if label in ("cuda", "vulkan") else ((0, 128),)  # VK_PATHS: decode
            for n_prompt, n_gen in tests:
                for r in run_bench(eng, n_prompt, n_gen, reps=reps, warmup=1, device_name=dev):
                    results["bench"].append({
                        "model": name, "path": label, "test": r.test, "avg_ts": r.avg_ts, "stddev_ts": r.stddev_ts,
                        "samples_ts": r.samples_ts, "scheme": r.scheme, "weight_bytes": r.weight_bytes, "device": dev,
                        "load_seconds": load, "git_sha": r.git_sha, "timestamp": r.timestamp})
                    print(f"{name:14s} {label:6s} {r.test:6s} {r.avg_ts:9.1f} tok/s +- {r.stddev_ts:.1f}", flush=True)
            if label.startswith("vulkan"):  # the plugin's counters per decode token, one profiled pass
                from vulkan_host_cost import measure

                pkey = name if label == "vulkan" else f"{name} {label}"
                results.setdefault("decode_profile", {})[pkey] = {"counters": measure(eng, 32, False),
                                                                  "profile": measure(eng, 16, True)}
                prof = results["decode_profile"][pkey]["profile"]
                print(f"{name} {label} decode: {prof['gpu_us_per_token']:.0f} us/token on the GPU (profiled), "
                      f"{results['decode_profile'][pkey]['counters']['us_per_token']['wall']:.0f} us/token wall",
                      flush=True)
                for k, v in list(prof["kernels"].items())[:8]:
                    print(f"   {v['us_per_token']:8.1f} us/token {v['per_token']:5.1f}x {k}", flush=True)
            del eng
            gc.collect()
        except Exception:
            results["errors"].append(f"bench {name} {label}: " + traceback.format_exc()[-2000:])
            print(results["errors"][-1], flush=True)
    for label in [k for k in logits if k != "cuda" and "cuda" in logits]:
        got, ref = logits[label], logits["cuda"]
        key = f"{name} (random weights): {label} vs cuda, prefill {len(prompt)} + 15 decodes"
        results["checks"][key] = {"rel_err": _rel(got, ref), "tol": tol, "ok": _rel(got, ref) < tol,
                                  "top1_agreement": float(np.mean(np.argmax(got, -1) == np.argmax(ref, -1))),
                                  "finite": bool(np.isfinite(got).all())}
        print(key, results["checks"][key], flush=True)


def ab_simple(opt: str, tests, reps: int, value: str = "simple") -> None:
    """The 8B shape built with `--opt OPT=VALUE` (simple: the generic GPU schedule): the A/B of a webgpu kernel."""
    from edgellm.device_runners.bench import run_bench
    from edgellm.device_runners.engine import Engine

    try:
        eng = Engine(DEV / "art" / f"llama-3-8b-vulkan-{opt}-{value}", verify=False, random_weights=0)
        for n_prompt, n_gen in tests:
            for r in run_bench(eng, n_prompt, n_gen, reps=reps, warmup=1, device_name=eng.device_info.describe()):
                results["bench"].append({"model": "llama-3-8b", "path": f"vulkan {opt}={value}", "test": r.test,
                                         "avg_ts": r.avg_ts, "stddev_ts": r.stddev_ts, "samples_ts": r.samples_ts,
                                         "scheme": r.scheme, "device": r.device})
                print(f"llama-3-8b     {opt}={value} {r.test:6s} {r.avg_ts:9.1f} tok/s", flush=True)
    except Exception:
        results["errors"].append(f"ab {opt}: " + traceback.format_exc()[-2000:])


def _cuda_name() -> str:
    import subprocess

    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip().splitlines()
    return f"cuda:0 {out[0].split(',')[0]} (driver {out[0].split(',')[1].strip()})" if out else "cuda:0"


def run(shapes=SHAPES, reps: int = 3) -> None:
    out = Path(os.environ.get("OUT", ".")) / "vulkan.json"
    t0 = time.time()
    from edgellm.runtime.webgpu_plugin import adapters, load_plugin

    load_plugin()
    results["adapter"] = adapters()[0]
    results["plugin_ready_seconds"] = time.time() - t0
    print("adapter", json.dumps(results["adapter"]), flush=True)
    if os.environ.get("CHECKS", "1") != "0":  # CHECKS=0: the shapes only (their random-weight check stays)
        if (DEV / "art" / "tiny-q0f32-vulkan").exists():
            check("tiny-q0f32", {}, 1e-4)
        check("tiny-q4f16_1", {}, 2e-2)
        for label in VK_PATHS:
            check("tiny-q4f16_1", {}, 2e-2, label=label)
    out.write_text(json.dumps(results, indent=1))
    for name in shapes:
        bench(name, reps)
        out.write_text(json.dumps(results, indent=1))
    for opt, value in (a.split("=") for a in AB):
        tests = ((128, 0), (512, 0)) if opt == "webgpu_gemm" else ((0, 128),)
        if (DEV / "art" / f"llama-3-8b-vulkan-{opt}-{value}").exists():
            ab_simple(opt, tests, reps, value)
            out.write_text(json.dumps(results, indent=1))
    results["seconds"] = time.time() - t0
    out.write_text(json.dumps(results, indent=1))


def plot(path: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(path).read_text())
    tests = ["pp128", "pp512", "tg128"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, test in zip(axes, tests):
        names = [n for n in SHAPES if any(r["model"] == n and r["test"] == test for r in data["bench"])]
        x = np.arange(len(names))
        # cuda, vulkan, then the VK_PATHS builds (e.g. vulkan-dp4a) where the run timed this test
        labels = ["cuda", "vulkan"] + sorted({r["path"] for r in data["bench"] if r["test"] == test}
                                              - {"cuda", "vulkan"})
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            vals = [next((r["avg_ts"] for r in data["bench"] if r["model"] == n and r["path"] == label
                          and r["test"] == test), 0) for n in names]
            bars = ax.bar(x + (i - (len(labels) - 1) / 2) * width, vals, width, label=f"edgellm {label}")
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(x, names, fontsize=8)
        ax.set_title(test)
        ax.set_ylabel("tokens/s")
    axes[-1].legend(fontsize=8)
    name = (data.get("adapter") or {}).get("name", "GPU")
    fig.suptitle(f"edgellm q4f16_1 on {name}: CUDA vs Vulkan (WGSL via wgpu-native), same run, random weights")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "run"
    shapes = tuple(os.environ["SHAPES"].split(",")) if os.environ.get("SHAPES") else SHAPES
    if cmd == "prepare":
        prepare(shapes)
    elif cmd == "run":
        run(shapes, reps=int(os.environ.get("REPS", "3")))
    elif cmd == "plot":
        plot(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else str(REPO / "docs/benchmarks/vulkan-h200.png"))
