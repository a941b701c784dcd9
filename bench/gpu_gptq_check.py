"""CUDA numerics of the GPTQ / AWQ import rows (issue 14 item 4), in two steps.

Here (no GPU needed; nvcc builds the fatbins):
    python bench/gpu_gptq_check.py prepare [--arch sm_90] [--out .device-gptq]
writes the bundle: site/ (runtime-only TVM + tvm_ffi, as bench/gpu_prepare.py) and art/ with tiny Llama
checkpoints written by tests/test_gptq_awq.py's packers (GPTQ g128 v1, GPTQ g32 act-order v2, AWQ g128) compiled
for CUDA with no --quant (rows q4f16_g128 / q4f16_g32_ao, fp16 activations, the generic TE linear).

and the Llama-3.2-1B shape compiled shapes-only with q4f16_g128 and q4f16_1 (random weights on the GPU, a
benchmark-only mode) for a decode / prefill speed comparison.

On the GPU machine (one call, well under a minute after start-up):
    PYTHONPATH=.device-gptq/site:. python3 bench/gpu_gptq_check.py run --dev .device-gptq
checks per artifact: its packed params dequantize bit for bit to the source's (q - z) * s (saved beside it), the
CUDA logits (prefill) against the numpy fp32 model on those weights (tolerance 2e-2 of the largest logit, the
q4f16_1 tolerance of bench/gpu_run.py: fp16 activations), and decode (GEMV) against prefill (GEMM) position by
position; then tg128 / pp512 tokens/s of the two 1B-shape builds. Writes $OUT/gptq_check.json (or ./gptq_check.json) and prints one line per check; exit 1 if one fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PROMPT = [1, 5, 7, 100, 42, 9, 33, 250, 17, 64, 3, 201, 88]
SPEED_SHAPE = "llama-3.2-1b"
SPEED_SCHEMES = ("q4f16_g128", "q4f16_1")
VARIANTS = {"gptq_g128": dict(method="gptq", group=128),
            "gptq_g32_act_v2": dict(method="gptq", group=32, act_order=True, v1=False, sym=False),
            "awq_g128": dict(method="awq", group=128, sym=False, v1=False)}


def prepare(out: Path, arch: str, python: str) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_prepare import check_bundle_size, new_bundle
    from test_gptq_awq import write_checkpoint

    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions

    new_bundle(out, python)
    for name, kwargs in VARIANTS.items():
        ckpt = out / "ckpt" / name
        deq = write_checkpoint(ckpt, **kwargs)
        art = out / "art" / name
        compile_model(CompileArgs(model=str(ckpt), output=art, target=f"cuda-sm{arch[3:]}",
                                  runtime=RuntimeOptions(context_window=64, prefill_chunk=32)))
        np.savez(art / "source_dequantized.npz", **deq)
    # speed: the Llama-3.2-1B shape, shapes only (random weights on the GPU), the import row against q4f16_1
    import gpu_prepare

    gpu_prepare.OUT = out
    shape = gpu_prepare.shape_folder(SPEED_SHAPE)
    for scheme in SPEED_SCHEMES:
        compile_model(CompileArgs(model=str(shape), output=out / "art" / f"{SPEED_SHAPE}-{scheme}",
                                  target=f"cuda-sm{arch[3:]}", quant=scheme, shapes_only=True,
                                  runtime=RuntimeOptions(1024, 512, 16, 1)))
    import shutil

    shutil.rmtree(out / "ckpt")
    check_bundle_size(out)


def run(dev: Path) -> int:
    from edgellm.artifact import Artifact
    from edgellm.config import ModelConfig
    from edgellm.device_runners.engine import Engine
    from edgellm.models.reference import float_weights, forward

    results: dict = {}
    for name in VARIANTS:
        try:
            art = Artifact.open(dev / "art" / name)
            fw = float_weights(art)
            src = np.load(dev / "art" / name / "source_dequantized.npz")
            exact = True
            for i in range(art.manifest["model"]["config"]["num_hidden_layers"]):
                p = f"model.layers.{i}"
                pairs = {f"{p}.self_attn.qkv_proj.weight": [f"{p}.self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj")],
                         f"{p}.self_attn.o_proj.weight": [f"{p}.self_attn.o_proj.weight"],
                         f"{p}.mlp.gate_up_proj.weight": [f"{p}.mlp.{n}.weight" for n in ("gate_proj", "up_proj")],
                         f"{p}.mlp.down_proj.weight": [f"{p}.mlp.down_proj.weight"]}
                for ours, theirs in pairs.items():
                    exact &= bool(np.array_equal(fw[ours], np.concatenate([src[t] for t in theirs])))
            ref = forward(ModelConfig.from_dict(art.manifest["model"]["config"]), fw, PROMPT)
            eng = Engine(art.root)
            got = eng.score(PROMPT)
            with eng.sequence() as seq:
                steps = np.stack([seq.prefill(PROMPT[:4])] + [seq.decode(t) for t in PROMPT[4:]])
            err = float(np.abs(got - ref).max() / np.abs(ref).max())
            path = float(np.abs(steps - got[3:]).max() / np.abs(got).max())
            top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
            results[name] = {"scheme": art.manifest["quant"]["scheme"], "params_bit_exact": exact, "rel_err": err,
                             "decode_vs_prefill": path, "top1_vs_numpy": top1, "tol": 2e-2,
                             "ok": exact and err < 2e-2 and path < 2e-2}
        except Exception:  # report and go on: device time is scarce
            results[name] = {"ok": False, "error": traceback.format_exc()}
        print(name, json.dumps(results[name]))
    from edgellm.device_runners.bench import run_bench

    for scheme in SPEED_SCHEMES:  # tg128 / pp512 on random weights (an explicit benchmark-only mode)
        label = f"{SPEED_SHAPE}-{scheme}"
        try:
            eng = Engine(dev / "art" / label, random_weights=0)
            rows = [r for n_prompt, n_gen in ((128, 128), (512, 0)) for r in run_bench(eng, n_prompt, n_gen, reps=3)]
            results[label] = {"ok": True, "tokens_per_s": {r.test: r.avg_ts for r in rows},
                              "weight_bytes": rows[0].weight_bytes}
            del eng
        except Exception:
            results[label] = {"ok": False, "error": traceback.format_exc()}
        print(label, json.dumps(results[label]))
    out = Path(os.environ.get("OUT", "."))
    (out / "gptq_check.json").write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results.values()) else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--arch", default="sm_90")
    p.add_argument("--python", default="3.12")
    p.add_argument("--out", default=str(REPO / ".device-gptq"))
    r = sub.add_parser("run")
    r.add_argument("--dev", default=str(REPO / ".device-gptq"))
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(Path(a.out), a.arch, a.python)
    else:
        sys.exit(run(Path(a.dev)))


if __name__ == "__main__":
    main()
