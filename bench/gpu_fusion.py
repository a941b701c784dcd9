"""The CUDA decode fusions (--opt cuda_fuse) A/B in one GPU call: checks, profiles and tg128, fused vs unfused.

  python bench/gpu_fusion.py prepare --out .device-dec      # here: nvcc builds every artifact (~50 MiB)
  # (docs/benchmarks/h200-fusion.md's runs: 1 as above; 2 --no-tiny --sets A,B --kernels; 3 --sets Q --modes
  # off,auto; 4 (then --sets R,RQ: the residual epilogue, now what `all` adds) --modes off,auto,all)
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
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
MODES = ("off", "all")
SHAPE_NAMES = ("smollm2-135m", "llama-3.2-1b", "llama-3-8b")
TINY = ("llama", "qwen2")


# standalone sweep: (in, out) of each decode GEMV that takes a fused norm, and which kinds of kernel to time
SWEEP = {"8b_gate_up": (4096, 28672), "8b_qkv": (4096, 6144), "1b_gate_up": (2048, 16384), "1b_qkv": (2048, 3072),
         "smol_gate_up": (576, 3072), "smol_qkv": (576, 960)}
ROTATE_BYTES = 320e6  # weights streamed per timed replay round: L2 (50 MB) cannot hold them


def sweep_configs(in_f: int, out_f: int) -> list[tuple[int, int, int, int, bool]]:
    """The unfused pick and the same arithmetic (same ksplit: the same sums) in bigger blocks: fewer blocks stage
    x (and with the norm: x, delta and the norm weight) from L2."""
    w, r, u, k, fold = cuda_gemv_config(in_f, out_f)
    cfgs = [(w, r, u, k, fold)] + [(ww, r, u, k, fold) for ww in (8, 16, 32) if ww != w]
    cfgs += [(ww, 4, max(1, u // 2), k, fold) for ww in (8, 16)]
    return cfgs


def cuda_gemv_config(in_f, out_f):
    from edgellm.kernels.cuda_gemv import xs_gemv_config

    return xs_gemv_config(in_f, out_f)


def kernel_kinds(label: str) -> tuple[str, ...]:
    return ("plain", "silu", "normsilu") if label.endswith("gate_up") else ("plain", "norm")


def cfg_name(label: str, kind: str, cfg) -> str:
    return f"g{label}_{kind}_w{cfg[0]}r{cfg[1]}u{cfg[2]}k{cfg[3]}"


def prepare_kernels(out: Path) -> None:
    """fusion_kernels.so: every SWEEP shape x kind x config, and the unfused add_rms_norm / silu_mul kernels."""
    import tvm

    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.kernels import cuda_gemv
    from edgellm.kernels.cuda_math import add_rms_norm_gpu, silu_mul_gpu
    from edgellm.targets import resolve

    funcs = {}
    for label, (k, n) in SWEEP.items():
        funcs[f"arn_{label}"] = add_rms_norm_gpu(k, 1e-5, "float16")
        if label.endswith("gate_up"):
            funcs[f"sm_{label}"] = silu_mul_gpu(n // 2, "float16")
        for kind in kernel_kinds(label):
            for cfg in sweep_configs(k, n):
                funcs[cfg_name(label, kind, cfg)] = cuda_gemv.int4_gemv_h2(
                    k, n, False, *cfg[:4], xsmem=True, fold_shift=cfg[4], norm_eps=1e-5 if "norm" in kind else None,
                    silu="silu" in kind)
    target = resolve("cuda-sm90").tvm()
    prepare_cuda_build()
    t0 = time.time()
    with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        lib = tvm.compile(tvm.IRModule({nm: f.with_attr("global_symbol", nm) for nm, f in funcs.items()}),
                          target=target)
    lib.export_library(str(out / "fusion_kernels.so"))
    print(f"{len(funcs)} kernels in {time.time() - t0:.0f} s", flush=True)


# variants tried whole-model, each built with cuda_fuse=all and one thing replaced: A / B the fused GEMV configs
# (cuda_gemv.fused_gemv_config: the unfused pick's arithmetic, same ksplit, in blocks of 16 warps or 8 warps of 4
# rows; run 2), Q the norm into qkv only (gate_up keeps add_rms_norm and takes silu in its epilogue; run 3; since
# then also without the residual add in o / down, which only `all` makes)
CONFIG_SETS = {"A": lambda w, r, u, k, f: (16, r, u, k, f), "B": lambda w, r, u, k, f: (8, 4, max(1, u // 2), k, f)}


def build_config_sets(out: Path, arch: str, shape: str, sets: list[str]) -> None:
    import gpu_prepare as gp
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.kernels import KernelOptions, cuda_gemv

    gp.OUT, saved = out, gp.OUT
    try:
        folder = gp.shape_folder(shape)
    finally:
        gp.OUT = saved
    from edgellm.kernels import KernelRegistry

    original, fused = cuda_gemv.fused_gemv_config, KernelRegistry.fused_gemv

    def qkv_only(self, in_f, out_f, scheme, dtype, bias, norm_eps, silu):  # the model then asks for silu alone
        return None if silu and norm_eps is not None else fused(self, in_f, out_f, scheme, dtype, bias, norm_eps,
                                                                 silu)

    for name in sets:
        fuse = "all"
        if name == "Q":
            KernelRegistry.fused_gemv = qkv_only
        else:
            cuda_gemv.fused_gemv_config = lambda i, o, norm, f=CONFIG_SETS[name]: f(*cuda_gemv.xs_gemv_config(i, o))
        try:
            compile_model(CompileArgs(model=str(folder), output=out / "art" / f"{shape}-all{name}",
                                      target=f"cuda-{arch.replace('_', '')}", quant="q4f16_1",
                                      runtime=RuntimeOptions(1024, 512, 16, 1), shapes_only=True,
                                      kernel_options=KernelOptions(cuda_fuse=fuse)))
        finally:
            cuda_gemv.fused_gemv_config, KernelRegistry.fused_gemv = original, fused


def prepare(out: Path, arch: str, shapes: list[str], tiny: bool = True, sets: tuple[str, ...] = (),
            kernels: bool = False, modes: tuple[str, ...] = MODES) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import gpu_prepare as gp
    import tiny_models
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.kernels import KernelOptions

    gp.new_bundle(out)
    preset = f"cuda-{arch.replace('_', '')}"
    for kind in TINY if tiny else ():
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
        gp.build_ab_shapes(out, arch, "cuda_fuse", modes + (("silu",) if shape == "llama-3-8b" else ()), shape)
        build_config_sets(out, arch, shape, [x for x in sets if shape == "llama-3-8b" or x == "A"])
    if kernels:
        prepare_kernels(out)
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
        modes = [m for m in MODES if (dev / "art" / f"{art}-{m}").is_dir()]
        for mode in modes:  # decode steps (the fused GEMVs) vs numpy and vs the prefill path
            gpu_run.check_q4_vs_numpy(f"{art}-{mode} vs numpy, decode 50 steps after 100 (cuda)", f"{art}-{mode}",
                                      long, 100)
        off = Engine(dev / "art" / f"{art}-off")
        a, ga = _decode_logits(off, long[:100], long[100:]), _greedy(off, long[:20], 40)
        for mode in modes[1:]:
            on = Engine(dev / "art" / f"{art}-{mode}")
            b, gb = _decode_logits(on, long[:100], long[100:]), _greedy(on, long[:20], 40)
            results["checks"][f"{art}-{mode}: fused vs unfused decode logits (51 steps) and greedy 40"] = {
                "max_abs_diff": float(np.abs(a - b).max()), "bit_equal": bool(np.array_equal(a, b)),
                "greedy_equal": ga == gb, "ok": bool(np.abs(a - b).max() <= 1e-3 * np.abs(a).max()) and ga == gb}


def bench_shape(dev: Path, shape: str) -> None:
    import gpu_run
    from edgellm.device_runners.bench import run_bench
    from edgellm.device_runners.engine import Engine

    modes = [m for m in ("off", "auto", "all", "silu", "allA", "allB", "allQ", "allR", "allRQ")
             if (dev / "art" / f"{shape}-{m}").is_dir()]
    engines = {m: Engine(dev / "art" / f"{shape}-{m}", random_weights=0) for m in modes}
    prompt = [7, 8, 9]
    ref = _greedy(engines["off"], prompt, 32)
    logits = {m: _decode_logits(e, prompt, ref[:8]) for m, e in engines.items() if m in modes[:2]}
    got = _greedy(engines[modes[1]], prompt, 32)
    a, b = logits["off"], logits[modes[1]]
    results["checks"][f"{shape}: fused vs unfused decode logits (8 steps) and greedy 32 (random weights)"] = {
        "max_abs_diff": float(np.abs(a - b).max()), "bit_equal": bool(np.array_equal(a, b)),
        "greedy_equal": got == ref, "ok": bool(np.abs(a - b).max() <= 1e-3 * np.abs(a).max()) and got == ref}
    gpu_run.results = results
    for m, e in engines.items():
        if m != "off":
            c = _decode_logits(e, prompt, ref[:8])
            results["checks"][f"{shape}-{m}: decode logits bit-equal to unfused"] = {
                "ok": bool(np.array_equal(a, c)), "max_abs_diff": float(np.abs(a - c).max())}
        gpu_run.profile_decode(e, f"{shape}-{m}")
    name = gpu_run.torch_device_name()
    for m in modes + modes[:2]:
        (r,) = run_bench(engines[m], 0, 128, reps=5, warmup=1, device_name=name)
        results["bench"].append({"shape": shape, "fuse": m, "test": r.test, "avg_ts": r.avg_ts,
                                 "stddev_ts": r.stddev_ts, "samples_ts": r.samples_ts})
        print(f"{shape:<14} fuse={m:<4} {r.test} {r.avg_ts:9.1f} tok/s +- {r.stddev_ts:.1f}", flush=True)


def sweep(dev: Path) -> None:
    """Each SWEEP kernel: outputs bit-equal to the unfused chain (add_rms_norm_gpu, the unfused pick, silu_mul_gpu)
    on the same inputs, and its time per call with the weights rotated from HBM (gpu_gemv_tune.time_rotated);
    also the unfused chain itself timed the same way (its launches in one graph: the kernel boundaries count)."""
    import torch

    from edgellm import _tvm
    from gpu_gemv_tune import time_rotated

    _tvm.load_cuda_runtime()
    mod = _tvm.load_module(dev / "fusion_kernels.so")
    d = _tvm.device("cuda", 0)
    rng = np.random.default_rng(2)
    res = results.setdefault("sweep", {})
    for label, (k, n) in SWEEP.items():
        gu = label.endswith("gate_up")
        nbytes = n * k // 2 + n * k // 16
        count = max(2, int(np.ceil(ROTATE_BYTES / nbytes)))
        qw = rng.integers(0, 2**32, size=(n, k // 8), dtype=np.uint64).astype(np.uint32)
        qs = (rng.random((n, k // 32)) * 0.004 + 0.001).astype(np.float16)
        copies = [(_tvm.tensor(qw, d), _tvm.tensor(qs, d)) for _ in range(count)]
        x = (rng.standard_normal((1, k)) * 2).astype(np.float16)
        x[0, rng.choice(k, 4, replace=False)] = [900, -1200, 300, -40]
        delta = rng.standard_normal((1, k)).astype(np.float16)
        nw = (0.5 + rng.random(k)).astype(np.float16)
        tx, tdl, tnw = (_tvm.tensor(a, d) for a in (x, delta, nw))
        s_ref, h_ref = _tvm.tensor(np.zeros((1, k), np.float16), d), _tvm.tensor(np.zeros((1, k), np.float16), d)
        mod[f"arn_{label}"](tx, tdl, tnw, s_ref, h_ref)
        base = cfg_name(label, "plain", sweep_configs(k, n)[0])
        y_ref = _tvm.tensor(np.zeros((1, n), np.float16), d)
        mod[base](h_ref, *copies[0], y_ref)
        a_ref = _tvm.tensor(np.zeros((1, n // 2), np.float16), d)
        if gu:
            mod[f"sm_{label}"](y_ref, a_ref)
        refs = {"plain": y_ref.numpy(), "silu": a_ref.numpy(), "s": s_ref.numpy()}
        y, a, s_out = (_tvm.tensor(np.zeros(sh, np.float16), d) for sh in ((1, n), (1, n // 2), (1, k)))
        arn, plain, sm = mod[f"arn_{label}"], mod[base], mod[f"sm_{label}"] if gu else None

        def chain(xx, qw_, qs_, out):  # the unfused step: add_rms_norm, GEMV, [silu_mul]
            arn(xx, tdl, tnw, s_out, h_ref)
            plain(h_ref, qw_, qs_, y)
            if gu:
                sm(y, out)

        t, _ = time_rotated(chain, tx, copies, a if gu else y)
        res[f"{label}_unfused_chain"] = {"us": t * 1e6}
        for kind in kernel_kinds(label):
            for cfg in sweep_configs(k, n):
                name = cfg_name(label, kind, cfg)
                f = mod[name]
                o = _tvm.tensor(np.full((1, n // 2 if "silu" in kind else n), np.nan, np.float16), d)
                if "norm" in kind:
                    s_out2 = _tvm.tensor(np.full((1, k), np.nan, np.float16), d)
                    f(tx, tdl, tnw, *copies[0], o, s_out2)
                    ok_s = bool(np.array_equal(s_out2.numpy(), refs["s"]))

                    def call(xx, qw_, qs_, out, f=f, s2=s_out2):
                        f(xx, tdl, tnw, qw_, qs_, out, s2)
                else:
                    f(h_ref, *copies[0], o)
                    ok_s = True
                    call = f
                want = refs["silu" if "silu" in kind else "plain"]
                eq = bool(np.array_equal(o.numpy().view(np.uint16), want.view(np.uint16)))
                t, mode = time_rotated(call, tx if "norm" in kind else h_ref, copies, o)
                res[name] = {"us": t * 1e6, "bit_equal": eq and ok_s, "timing": mode,
                             "gbs": nbytes / t / 1e9}
                print(f"{name:<40} {t * 1e6:8.2f} us  equal {eq and ok_s}", flush=True)
        print(f"{label}: unfused chain {res[f'{label}_unfused_chain']['us']:.2f} us", flush=True)
        del copies
        torch.cuda.synchronize()


def run(dev: Path, shapes: list[str]) -> int:
    import gpu_run

    results["device"] = gpu_run.torch_device_name()
    steps = [("tiny checks", lambda: check_tiny(dev))] if (dev / "art" / f"tiny64-{TINY[0]}-q4f16_1-off").is_dir() else []
    if (dev / "fusion_kernels.so").is_file():
        steps.append(("kernel sweep", lambda: sweep(dev)))
    steps += [(shape, lambda s=shape: bench_shape(dev, s)) for shape in shapes]
    out = Path(os.environ.get("OUT", ".")) / "fusion.json"
    from bench_steps import print_summary, run_steps

    run_steps(steps, results, out)
    return print_summary(results, top=10)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["prepare", "run"])
    ap.add_argument("--out", default=str(REPO / ".device-dec"))
    ap.add_argument("--dev", default=str(REPO / ".device-dec"))
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--shapes", default=",".join(SHAPE_NAMES))
    ap.add_argument("--no-tiny", action="store_true", help="prepare: skip the tiny models (and the 8B silu build)")
    ap.add_argument("--sets", default="", help="prepare: CONFIG_SETS to build whole-model (e.g. A,B)")
    ap.add_argument("--kernels", action="store_true", help="prepare: the standalone sweep's fusion_kernels.so")
    ap.add_argument("--modes", default=",".join(MODES), help="prepare: cuda_fuse values built per shape")
    args = ap.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    if args.what == "prepare":
        prepare(Path(args.out).resolve(), args.arch, shapes, not args.no_tiny,
                tuple(x for x in args.sets.split(",") if x), args.kernels, tuple(args.modes.split(",")))
        return 0
    return run(Path(args.dev).resolve(), shapes)


if __name__ == "__main__":
    sys.exit(main())
