"""When the plugin submits, and the dp4a GEMV's configs, in the decode of each shape beside CUDA (issue 15), one call.

  python bench/vulkan_submit.py prepare [BUNDLE]   # here: BUNDLE/src = `git archive HEAD`, BUNDLE/art = the
                                                   # SmolLM2 / 1B / 8B shapes q4f16_1 (shapes only) for cuda-sm90,
                                                   # vulkan (h2) and vulkan dp4a (+ the 8B's dp4a VARIANTS named
                                                   # in BUILDS), packed into BUNDLE/art.tar.xz; BUNDLE/site from
                                                   # .device-vkdp/site
  python bench/vulkan_submit.py run [BUNDLE]       # there (bench/vulkan_device.sh's environment): $OUT/submit.json

Per shape (the 8B first), with the same random weights on every path: CUDA tg128; each Vulkan build's logits of a
40-token prefill and 15 decodes against CUDA's; then tg128 under each submit policy (POLICIES: the flush interval,
the first batch after a wait, spinning waits; POLICY_SET=ab the first call's eight, POLICY_SET=ahead the greedy
chain step by step against queued ahead, else old / default / f128), each with the plugin's counters per token;
one profiled pass per Vulkan build (GPU time per kernel).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
SHAPES = ("llama-3-8b", "llama-3.2-1b", "smollm2-135m")
# (label, flush_every, flush_first, spin microseconds): POLICY_SET=ab (run 9's first call) or final
POLICIES_AB = [("f64", 64, 0, 0), ("f64-first4", 64, 4, 0), ("f64-first8", 64, 8, 0), ("f64-first16", 64, 16, 0),
            ("f64-spin", 64, 0, 5000), ("f64-first4-spin", 64, 4, 5000), ("f128-first4-spin", 128, 4, 5000),
            ("f32-first4-spin", 32, 4, 5000)]
POLICIES_FINAL = [("old", 64, 0, 0), ("default", 64, 4, 5000), ("f128", 128, 4, 5000)]
# POLICY_SET=ahead: greedy_chain step by step (each token read before the next step is recorded, as before run 13)
# against one step queued ahead (the default since run 13) at three flush intervals; a fifth field False = steps
# (run 13; a sixth field: the plugin's flush interval while queued ahead, set_flush_ahead: 0 = a step at its read,
# the default since run 13)
POLICIES_AHEAD = [("steps", 64, 4, 5000, False), ("default", 64, 4, 5000), ("ahead-f64", 64, 4, 5000, True, 64)]
POLICIES = {"ab": POLICIES_AB, "ahead": POLICIES_AHEAD}.get(os.environ.get("POLICY_SET", "final"), POLICIES_FINAL)
# Vulkan builds besides h2 and dp4a, the 8B only (ALL_SHAPES=a,b: those on every shape): label -> patch of webgpu_linear while compiling (BUILDS=a,b)
VARIANTS = {"vulkan-dp4a-h2cfg": "dp4a_config = h2_config (run 9 call 1)",
            "vulkan-dp4a-st4": "int4_gemv_dp4a with stage_threads=4 everywhere (the run 8 kernel's staging)",
            "vulkan-u4": "h2 with 4 groups a lane a step at in 4096 (all of a lane's weights loaded at once)",
            "vulkan-dp4a-u4": "dp4a with 4 groups a lane a step at in 4096",
            "vulkan-ks": "h2 at cuda_gemv's xsmem configs: gate_up 8x2x4, down 8x2x2 ksplit 2, qkv (norm) 16x2x2 "
                         "ksplit 2, o 8x2x2 ksplit 2 (warps x rows x groups a step)",
            "vulkan-ks4": "h2, more rows or all loads at once: gate_up 8x4x4, down 8x4x1 ksplit 2, qkv and o 16x1x4",
            "vulkan-x32": "h2 with x staged as float32 and float32 arithmetic (xf32) at in 4096 (not down)",
            "vulkan-x32u4": "xf32 at in 4096, 4 groups a lane a step there",
            "vulkan-x32r4": "xf32 at in 4096, gate_up 8 warps x 4 rows (2 gate, 2 up: half the workgroups)",
            "vulkan-c4": "h2 with 4 accumulators a group and row (chains=4) everywhere (run 11: 271.5 vs h2 272.2)",
            "vulkan-x32c4": "xf32 with 4 chains at in 4096, h2 elsewhere (run 11: 224.0)",
            "vulkan-attn512": "TVM's own decode attention (a workgroup per KV head) built for 512 threads a "
                              "workgroup (bdz 4: 16 positions a step, the preset's 256 gives 8; run 11: 11.7 against "
                              "12.8 us a layer)",
            "vulkan-dp4a-attn512": "dp4a with vulkan-attn512's decode attention",
            "vulkan-attntvm": "TVM's own decode attention (bdy = the query group: batch x KV heads workgroups, 8 at "
                              "the 8B), the default before run 12 (278.8 tok/s there against the default's 301.5)",
            "vulkan-dp4a-attntvm": "dp4a with vulkan-attntvm's decode attention (run 12: 311.3 against 334.9)",
            "vulkan-attnq512": "the default's decode attention (a workgroup per query head) at 512 threads a "
                               "workgroup (16 positions a step; run 12: 293.2 against 301.5)",
            "vulkan-dn41": "h2 with down (in over 4096) at 8 warps x 4 rows x 1 group a lane a step, the default "
                           "before run 14 (one workgroup an SM at the 8B, 16 KiB in flight)",
            "vulkan-dp4a-dn41": "dp4a with down at 8 x 4 x 1 (before run 14)",
            "vulkan-dn42": "h2 with down (in over 4096) at 8 warps x 4 rows x 2 groups a lane a step (8 loads in "
                           "flight a lane; the default since run 14)",
            "vulkan-dp4a-qo2": "dp4a with qkv (norm) and o at 2 groups a lane a step (in 4096; the default takes 1)",
            "vulkan-dp4a-qo4": "dp4a with qkv (norm) and o at 4 groups a lane a step",
            "vulkan-dp4a-gr4": "dp4a with gate_up (norm, silu) at 8 warps x 4 rows (2 gate, 2 up) x 1 group a step",
            "vulkan-dp4a-dn4w": "dp4a with down at 4 warps x 4 rows x 2 groups a step (256 workgroups at the 8B)",
            "vulkan-gu2": "h2 with gate_up (norm, silu) at 8 warps x 2 rows x 2 groups a step at in 4096",
            "vulkan-dp4a-gp2": "dp4a with gate_up computing 2 row blocks a workgroup on one staging (896 workgroups "
                               "at the 8B instead of 1,792)",
            "vulkan-dp4a-gp4": "dp4a with gate_up computing 4 row blocks a workgroup (448 workgroups; the default "
                               "since run 16)",
            "vulkan-dp4a-gp1": "dp4a with gate_up at one row block a workgroup (before run 16)",
            "vulkan-dp4a-gp8": "dp4a with gate_up computing 8 row blocks a workgroup (224 workgroups at the 8B)",
            "vulkan-dp4a-gp3": "dp4a with gate_up computing 3 row blocks a workgroup (598 workgroups at the 8B)",
            "vulkan-dp4a-gp6": "dp4a with gate_up computing 6 row blocks a workgroup (299 workgroups at the 8B)",
            "vulkan-gp2": "h2 with gate_up computing 2 row blocks a workgroup on one staging",
            "vulkan-gp4": "h2 with gate_up computing 4 row blocks a workgroup",
            "vulkan-dp4a-qp2": "dp4a with qkv (norm) and o computing 2 row blocks a workgroup (192 / 128 "
                               "workgroups at the 8B)",
            "vulkan-dn44": "h2 with down at 8 warps x 4 rows x 4 groups a step (16 loads in flight a lane)",
            "vulkan-dp4a-dn42": "dp4a with down at 8 x 4 x 2", "vulkan-dp4a-dn44": "dp4a with down at 8 x 4 x 4",
            "vulkan-dp4a-gu2": "dp4a with gate_up (norm, silu) at 8 warps x 2 rows x 2 groups a step at in 4096 "
                               "(the default takes one group a step there)"}
# builds with --opt webgpu_subgroups=N (no patch): label -> N
# (since ee50ae9+1 the option at 32 also gives TVM's own kernels subgroups: the "-sg32" builds of run 21 predate
# that, the "-sg32t" ones have it)
SG_VARIANTS = {"vulkan-sg32": 32, "vulkan-sg8": 8, "vulkan-dp4a-sg32": 32, "vulkan-dp4a-sg8": 8,
               "vulkan-sg32t": 32, "vulkan-dp4a-sg32t": 32}
# dp4a builds with a d per group of 32 activations (--opt webgpu_dp4a_act=32, the default before 8): label -> N
ACT_VARIANTS = {"vulkan-dp4a-a32": 32, "vulkan-dp4a-sg32t-a32": 32}
SG_VARIANTS["vulkan-dp4a-sg32t-a32"] = 32
VARIANTS.update({label: f"{'dp4a' if 'dp4a' in label else 'h2'} with --opt webgpu_subgroups={n} (sums met by "
                        f"subgroup xor shuffles over {n} lanes)" for label, n in SG_VARIANTS.items()})
VARIANTS.update({label: f"{VARIANTS.get(label, 'dp4a')} and --opt webgpu_dp4a_act={n} (a d per {n} activations)"
                 for label, n in ACT_VARIANTS.items()})
# builds by kernel options alone: label -> --opt values (the defaults changed to dp4a and subgroups=auto after run 24)
OPT_VARIANTS = {"vulkan-h2off": {"webgpu_gemv": "h2", "webgpu_subgroups": "off"},  # the default before
                "vulkan-sgoff": {"webgpu_subgroups": "off"},  # dp4a without the 32-lane twin
                "vulkan-h2": {"webgpu_gemv": "h2"}}  # h2 with the twin
VARIANTS.update({label: "--opt " + " --opt ".join(f"{k}={v}" for k, v in o.items())
                 for label, o in OPT_VARIANTS.items()})
# h2_config patches of the ksplit builds: (silu, norm, in > 4096) -> (warps, rows, unroll, ksplit) at the 8B shapes
KS_CONFIGS = {"vulkan-ks": {"gate_up": (8, 2, 4, 1), "down": (8, 2, 2, 2), "qkv": (16, 2, 2, 2), "o": (8, 2, 2, 2)},
              "vulkan-ks4": {"gate_up": (8, 4, 4, 1), "down": (8, 4, 1, 2), "qkv": (16, 1, 4, 1), "o": (16, 1, 4, 1)}}
PROMPT = list(range(1, 41))


def _patched(label: str):
    """Context: webgpu_linear patched for the variant `label` (VARIANTS) while a build runs."""
    from contextlib import contextmanager
    from functools import partial

    from edgellm.kernels import webgpu_linear as wl

    if "-attn" in label:  # the decode attention's variants (`_attn_threads`); the GEMVs as the label's base
        return _attn_threads(1024 if label.endswith("512") else None, 1 if "-attnq" in label else None)
    h2, gemv = wl.h2_config, wl.int4_gemv_h2

    def u4(i, o, silu=False, bits=4, norm=False):
        w, r, u, k = h2(i, o, silu, bits, norm)
        return (w, r, 4, k) if i == 4096 and bits == 4 else (w, r, u, k)

    def r4(i, o, silu=False, bits=4, norm=False):
        return (8, 4, 1, 1) if silu and i == 4096 and bits == 4 else h2(i, o, silu, bits, norm)

    def ks(i, o, silu=False, bits=4, norm=False):
        if bits != 4 or i < 4096:
            return h2(i, o, silu, bits, norm)
        kind = "gate_up" if silu else "down" if i > 4096 else "qkv" if norm else "o"
        return KS_CONFIGS[label][kind]

    def x32(i, bits=4):
        return i == 4096 and bits == 4

    def x32c4(i, *a, **k):  # xf32 with 4 chains where x32 picks it, int4_gemv_h2 as it is elsewhere
        on = x32(i, k.get("bits", 4))
        return gemv(i, *a, **k, xf32=on, chains=4 if on else None)

    def down(u):
        def cfg(i, o, silu=False, bits=4, norm=False):
            return (8, 4, u, 1) if i > 4096 and not silu and bits == 4 else h2(i, o, silu, bits, norm)
        return cfg

    dp4a_cfg = wl.dp4a_config

    def gu2(i, o, silu=False):
        return (8, 2, 2) if silu and i == 4096 else dp4a_cfg(i, o, silu)

    def dp4a_patch(silu_cfg=None, other_u=None, down_cfg=None):
        def cfg(i, o, silu=False):
            if silu and i == 4096 and silu_cfg:
                return silu_cfg
            if not silu and i == 4096 and other_u:
                return dp4a_cfg(i, o, silu)[:2] + (other_u,)
            if not silu and i > 4096 and down_cfg:
                return down_cfg
            return dp4a_cfg(i, o, silu)
        return cfg

    def h2_gu2(i, o, silu=False, bits=4, norm=False):
        return (8, 2, 2, 1) if silu and i == 4096 and bits == 4 else h2(i, o, silu, bits, norm)

    def passes(silu_p, other_p):
        def cfg(i, o, silu, config, kernel):
            return silu_p if silu else other_p if i <= 4096 else 1
        return cfg

    name, value = {"vulkan-dp4a-gp2": ("gemv_passes", passes(2, 1)), "vulkan-dp4a-gp4": ("gemv_passes", passes(4, 1)),
                   "vulkan-dp4a-gp1": ("gemv_passes", passes(1, 1)), "vulkan-dp4a-gp8": ("gemv_passes", passes(8, 1)),
                   "vulkan-dp4a-gp3": ("gemv_passes", passes(3, 1)), "vulkan-dp4a-gp6": ("gemv_passes", passes(6, 1)),
                   "vulkan-gp2": ("gemv_passes", passes(2, 1)), "vulkan-gp4": ("gemv_passes", passes(4, 1)),
                   "vulkan-dp4a-qp2": ("gemv_passes", passes(1, 2)),
                   "vulkan-dn42": ("h2_config", down(2)), "vulkan-dn44": ("h2_config", down(4)),
                   "vulkan-dn41": ("h2_config", down(1)), "vulkan-dp4a-dn41": ("h2_config", down(1)),
                   "vulkan-dp4a-dn42": ("h2_config", down(2)), "vulkan-dp4a-dn44": ("h2_config", down(4)),
                   "vulkan-dp4a-gu2": ("dp4a_config", gu2),
                   "vulkan-dp4a-qo2": ("dp4a_config", dp4a_patch(other_u=2)),
                   "vulkan-dp4a-qo4": ("dp4a_config", dp4a_patch(other_u=4)),
                   "vulkan-dp4a-gr4": ("dp4a_config", dp4a_patch(silu_cfg=(8, 4, 1))),
                   "vulkan-dp4a-dn4w": ("dp4a_config", dp4a_patch(down_cfg=(4, 4, 2))),
                   "vulkan-gu2": ("h2_config", h2_gu2),
                   "vulkan-dp4a-h2cfg": ("dp4a_config", lambda i, o, silu=False: wl.h2_config(i, o, silu)[:3]),
                   "vulkan-dp4a-st4": ("int4_gemv_dp4a", partial(wl.int4_gemv_dp4a, stage_threads=4)),
                   "vulkan-u4": ("h2_config", u4), "vulkan-dp4a-u4": ("h2_config", u4),
                   "vulkan-ks": ("h2_config", ks), "vulkan-ks4": ("h2_config", ks),
                   "vulkan-x32": ("h2_xf32", x32), "vulkan-x32u4": ("h2_xf32", x32),
                   "vulkan-x32r4": ("h2_xf32", x32),
                   "vulkan-c4": ("int4_gemv_h2", partial(wl.int4_gemv_h2, chains=4)),
                   "vulkan-x32c4": ("int4_gemv_h2", x32c4)}[label]

    @contextmanager
    def ctx():
        saved, saved_cfg = getattr(wl, name), wl.h2_config
        setattr(wl, name, value)
        if label == "vulkan-x32u4":
            wl.h2_config = u4
        if label == "vulkan-x32r4":
            wl.h2_config = r4
        try:
            yield
        finally:
            setattr(wl, name, saved)
            wl.h2_config = saved_cfg

    return ctx()


def _attn_threads(max_threads: int | None, bdy_max: int | None):
    """Context: the decode attention with at most `bdy_max` query heads of a KV group a workgroup (the registry's
    webgpu default, kernels/webgpu_attention.py, is 1: batch x query heads workgroups, 32 at the 8B; None: TVM's
    own kernel, the whole group in one workgroup, batch x KV heads = 8), built as if the target allowed
    `max_threads` a workgroup (None: the preset's 256; TVM's own cap is 512). The other kernels see the preset's
    target. The Vulkan plugin asks the device for the adapter's limits (the H200 and lavapipe: 1024 invocations)."""
    import inspect
    from contextlib import contextmanager

    from edgellm._tvm import compiler
    from edgellm.kernels import webgpu_attention as wa

    # where the kernel is built: TVM's cache itself (bdy None: the registry swaps nothing), else the registry's swap
    owner, name = (compiler().llm_kv_cache, "_attention_decode") if bdy_max is None else (wa, "attention_decode")
    orig = getattr(owner, name)

    def wide(*args, **kwargs):
        bound = inspect.signature(orig).bind(*args, **kwargs)
        target = bound.arguments["target"]
        bound.arguments["target"] = type(target)({**dict(target.export()), "max_num_threads": max_threads})
        return orig(*bound.args, **bound.kwargs)

    @contextmanager
    def ctx():
        saved = wa.DECODE_BDY_MAX
        wa.DECODE_BDY_MAX = bdy_max
        if max_threads is not None:
            setattr(owner, name, wide)
        try:
            yield
        finally:
            wa.DECODE_BDY_MAX = saved
            setattr(owner, name, orig)

    return ctx()


def prepare(bundle: Path) -> None:
    bundle = bundle.resolve()
    if not (bundle / "site").exists():
        bundle.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-al", str(REPO / ".device-vkdp/site"), str(bundle / "site")], check=True)
    src = bundle / "src"
    if not src.exists():
        src.mkdir()
        tar = subprocess.run(["git", "archive", "HEAD", "edgellm", "bench", "tests/tiny_models.py", "pyproject.toml"],
                             cwd=REPO, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=tar, check=True)
    # build from the archived tree (no one's uncommitted work)
    subprocess.run([sys.executable, str(src / "bench/vulkan_submit.py"), "_build", str(bundle)], cwd=src,
                   env={**os.environ, "PYTHONPATH": str(src)}, check=True)
    subprocess.run(["tar", "-cJf", str(bundle / "art.tar.xz"), "-C", str(bundle), "art"], check=True)
    print(subprocess.run(["du", "-sh", str(bundle / "art.tar.xz"), str(bundle / "site"), str(src)],
                         capture_output=True, text=True).stdout)


def _build(bundle: Path) -> None:
    import gpu_prepare

    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.kernels import KernelOptions

    gpu_prepare.OUT = bundle
    art = bundle / "art"
    art.mkdir(exist_ok=True)
    variants = [v for v in os.environ.get("BUILDS", "vulkan-dp4a-st4").split(",") if v]
    for name in os.environ.get("SHAPES", ",".join(SHAPES)).split(","):
        for label, preset, opts in [("cuda", "cuda-sm90", {}), ("vulkan", "vulkan", {}),
                                    ("vulkan-dp4a", "vulkan", {"webgpu_gemv": "dp4a"})] + [
                                        (v, "vulkan", {**({"webgpu_gemv": "dp4a"} if "dp4a" in v else {}),
                                                       **({"webgpu_subgroups": str(SG_VARIANTS[v])}
                                                          if v in SG_VARIANTS else {}),
                                                       **({"webgpu_dp4a_act": str(ACT_VARIANTS[v])}
                                                          if v in ACT_VARIANTS else {}),
                                                       **OPT_VARIANTS.get(v, {})})
                                        for v in variants]:
            if label in VARIANTS and name != "llama-3-8b" and label not in os.environ.get("ALL_SHAPES", "").split(","):
                continue
            out = art / f"{name}-{label}"
            if out.exists():
                continue
            t = time.time()
            args = CompileArgs(model=str(gpu_prepare.shape_folder(name)), output=out, target=preset, quant="q4f16_1",
                               runtime=RuntimeOptions(1024, 512, 16, 1), shapes_only=True,
                               kernel_options=KernelOptions(**opts))
            if label in VARIANTS and label not in SG_VARIANTS and label not in ACT_VARIANTS \
                    and label not in OPT_VARIANTS:
                with _patched(label):
                    compile_model(args)
            else:
                compile_model(args)
            print(f"{name} {label}: {time.time() - t:.0f}s", flush=True)


results: dict = {"adapter": None, "bench": [], "checks": {}, "counters": {}, "profiles": {}, "errors": []}


def _steps(eng, toks):
    with eng.sequence() as seq:
        return np.stack([seq.prefill(PROMPT)] + [seq.decode(t) for t in toks])


def _tg(eng, reps: int, dev: str):
    from edgellm.device_runners.bench import run_bench

    return run_bench(eng, 0, int(os.environ.get("TG", "128")), reps=reps, warmup=1, device_name=dev)[0]


def run(bundle: Path, shapes, reps: int) -> None:
    from edgellm import _tvm
    from edgellm.device_runners.engine import Engine
    from edgellm.runtime.webgpu_plugin import adapters, load_plugin
    from vulkan_host_cost import measure

    out = Path(os.environ.get("OUT", ".")) / "submit.json"
    t0 = time.time()
    load_plugin()
    results["adapter"] = adapters()[0]
    g = _tvm.get_global_func
    art = bundle / "art"
    for name in shapes:
        ref, toks = None, None
        labels = sorted(p.name[len(name) + 1:] for p in art.glob(f"{name}-*"))
        if "cuda" not in labels:  # a shape the prepare did not build (SHAPES there)
            continue
        labels.remove("cuda")
        # AGAIN=a,b: those builds timed a second time at the end (path "<label>-again"): a variant timed after the
        # default gains ~1% from its place alone (runs 17-20), so a change under ~2% needs both orders
        again = [a for a in os.environ.get("AGAIN", "").split(",") if a in labels]
        for label in ["cuda"] + labels + [a + "-again" for a in again]:
            try:
                eng = Engine(art / f"{name}-{label.removesuffix('-again')}", verify=False, random_weights=0)
                if toks is None:
                    with eng.sequence() as s:
                        toks = [int(np.argmax(s.prefill(PROMPT)))]
                        for _ in range(14):
                            toks.append(int(np.argmax(s.decode(toks[-1]))))
                logits = _steps(eng, toks)
                if label == "cuda":
                    ref = logits
                    r = _tg(eng, reps, "cuda")
                    results["bench"].append({"model": name, "path": "cuda", "policy": "", "tg128": r.avg_ts,
                                             "samples": r.samples_ts, "git_sha": r.git_sha})
                    print(f"{name:14s} cuda {r.avg_ts:8.1f} tok/s", flush=True)
                elif ref is not None:
                    rel = float(np.abs(logits - ref).max() / np.abs(ref).max())
                    top1 = float(np.mean(np.argmax(logits, -1) == np.argmax(ref, -1)))
                    results["checks"][f"{name} {label}"] = {"rel_err": rel, "top1": top1,
                                                            "finite": bool(np.isfinite(logits).all())}
                    print(f"{name} {label} vs cuda: rel {rel:.2e} top1 {top1}", flush=True)
                if label != "cuda":
                    for pol, every, first, spin, *more in POLICIES:
                        if name != "llama-3-8b" and pol not in ("f64", "f64-first4", "f64-first4-spin",
                                                                "f64-first8", "old", "default", "f128", "steps"):
                            continue
                        if (label.removesuffix("-again") in VARIANTS or label.endswith("-again")
                                or os.environ.get("ONLY_DEFAULT")) and pol != "default":
                            continue
                        g("edgellm.webgpu.set_flush_every")(0, every)
                        g("edgellm.webgpu.set_flush_first")(0, first)
                        g("edgellm.webgpu.set_spin_wait")(0, spin)
                        eng.decode_ahead = more[0] if more else True
                        g("edgellm.webgpu.set_flush_ahead")(0, more[1] if len(more) > 1 else 0)
                        r = _tg(eng, reps, eng.device_info.describe())
                        c = measure(eng, int(os.environ.get("MT", "32")), False, chain=eng.decode_ahead)
                        eng.decode_ahead = True
                        results["bench"].append({"model": name, "path": label, "policy": pol, "tg128": r.avg_ts,
                                                 "samples": r.samples_ts, "git_sha": r.git_sha,
                                                 "lib": getattr(eng, "lib", None)})
                        results["counters"][f"{name} {label} {pol}"] = c
                        us = c["us_per_token"]
                        print(f"{name:14s} {label:18s} {pol:17s} {r.avg_ts:8.1f} tok/s  wall {us['wall']:.0f} "
                              f"wait {us['wait_ns']:.0f} rec {us['record_ns']:.0f} sub {us['submit_ns']:.0f} us/tok "
                              f"submits {c['per_token']['submits']:.1f} {getattr(eng, 'lib', '')}", flush=True)
                    g("edgellm.webgpu.set_flush_every")(0, 64)  # the plugin's defaults
                    g("edgellm.webgpu.set_flush_first")(0, 4)
                    g("edgellm.webgpu.set_spin_wait")(0, 5000)
                    g("edgellm.webgpu.set_flush_ahead")(0, 0)
                    if name == "llama-3-8b" and not label.endswith("-again"):
                        p = measure(eng, 16, True)
                        results["profiles"][f"{name} {label}"] = p
                        print(f"  profiled {p['gpu_us_per_token']:.0f} us/token", flush=True)
                        for k, v in list(p["kernels"].items())[:10]:
                            print(f"   {v['us_per_token']:8.1f} us/token {v['per_token']:5.1f}x {k}", flush=True)
                del eng
                gc.collect()
            except Exception:
                results["errors"].append(f"{name} {label}: " + traceback.format_exc()[-2000:])
                print(results["errors"][-1], flush=True)
            out.write_text(json.dumps(results, indent=1))
    results["seconds"] = time.time() - t0
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "run"
    b = Path(sys.argv[2] if len(sys.argv) > 2 else ".device-vk2")
    shapes = tuple(os.environ["SHAPES"].split(",")) if os.environ.get("SHAPES") else SHAPES
    if cmd == "prepare":
        prepare(b)
    elif cmd == "_build":
        _build(b)
    elif cmd == "run":
        run(b.resolve(), shapes, int(os.environ.get("REPS", "2")))
