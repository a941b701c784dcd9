"""Run on a CUDA GPU machine prepared by bench/gpu_prepare.py (PYTHONPATH=.device/site:.).

Checks correctness against transformers on the same GPU and the numpy reference, then benchmarks the SmolLM2
shape with random weights, measures the device copy bandwidth in the same run, and times HF transformers fp16
decode on the same shape. Writes $OUT/gpu.json (or ./gpu.json) and prints a table.
"""

from __future__ import annotations

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
results: dict = {"checks": {}, "bench": [], "errors": []}


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def hf_model(dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(DEV / "ckpt" / "llama"), dtype=dtype).cuda().eval()


def check_tiny() -> None:
    import torch

    from edgellm.artifact import Artifact
    from edgellm.config import ModelConfig
    from edgellm.device_runners.engine import Engine
    from edgellm.models.reference import float_weights, forward

    for scheme, dtype, tol in (("q0f32", torch.float32, 1e-4), ("q0f16", torch.float16, 2e-2)):
        eng = Engine(DEV / "art" / f"tiny-{scheme}")
        got = eng.score(PROMPT)
        with torch.no_grad():
            ref = hf_model(dtype)(torch.tensor([PROMPT]).cuda()).logits[0].float().cpu().numpy()
            hf_greedy = hf_model(dtype).generate(torch.tensor([PROMPT]).cuda(), max_new_tokens=12, do_sample=False,
                                                 eos_token_id=None, pad_token_id=0)[0, len(PROMPT):].tolist()
        ours = list(eng.generate_ids(PROMPT, 12))
        results["checks"][f"tiny {scheme} vs transformers {dtype} (cuda)"] = {
            "rel_err": rel(got, ref), "tol": tol, "ok": rel(got, ref) < tol,
            "greedy_equal": ours == hf_greedy, "ours": ours, "hf": hf_greedy}
    art = Artifact.open(DEV / "art" / "tiny-q4f16_1")
    ref = forward(ModelConfig.from_dict(art.manifest["model"]["config"]), float_weights(art), PROMPT)
    eng = Engine(art.root)
    got = eng.score(PROMPT)
    with eng.sequence() as seq:
        steps = [seq.prefill(PROMPT[:4])] + [seq.decode(t) for t in PROMPT[4:]]
    results["checks"]["tiny q4f16_1 vs numpy on dequantized weights (cuda)"] = {
        "rel_err": rel(got, ref), "decode_vs_prefill": rel(np.stack(steps), got[3:]), "tol": 2e-2,
        "ok": rel(got, ref) < 2e-2 and rel(np.stack(steps), got[3:]) < 2e-2}


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
    return 2 * n / float(np.median(times))  # bytes read + written


def bench_smollm2(bw: float) -> None:
    from edgellm.device_runners.bench import run_bench
    from edgellm.device_runners.engine import Engine

    eng = Engine(DEV / "art" / "smollm2-q4f16_1", random_weights=0)
    for n_prompt, n_gen in ((128, 128), (512, 0)):
        for r in run_bench(eng, n_prompt, n_gen, reps=3, warmup=1, device_name=torch_device_name()):
            rec = {"model": "SmolLM2-135M shape", "test": r.test, "avg_ts": r.avg_ts, "stddev_ts": r.stddev_ts,
                   "weight_bytes": r.weight_bytes, "achieved_gbs": r.bandwidth_gbs,
                   "bandwidth_fraction": (r.weight_bytes * r.avg_ts / bw) if r.test.startswith("tg") else None,
                   "copy_bandwidth_gbs": bw / 1e9, "scheme": r.scheme, "engine": "edgellm"}
            results["bench"].append(rec)


def torch_device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)


def bench_hf_fp16() -> None:
    """transformers fp16 decode on the SmolLM2 shape (random weights), same GPU, same run."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)
    m = LlamaForCausalLM(cfg).to(torch.float16).cuda().eval()
    ids = torch.randint(0, 49152, (1, 1)).cuda()
    with torch.no_grad():
        m.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
        torch.cuda.synchronize()
        t = time.perf_counter()
        m.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
    results["bench"].append({"model": "SmolLM2-135M shape", "test": "tg128", "avg_ts": 128 / dt,
                             "engine": "transformers fp16 (generate)"})


def main() -> int:

    results["device"] = torch_device_name()
    for step in (check_tiny, lambda: bench_smollm2(results.setdefault("copy_bw", copy_bandwidth())), bench_hf_fp16):
        try:
            step()
        except Exception:  # report and continue with the next step: device time is scarce
            results["errors"].append(traceback.format_exc()[-3000:])
    out = Path(os.environ.get("OUT", ".")) / "gpu.json"
    out.write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results["checks"], indent=1, default=str))
    print(f"device: {results['device']}, copy bandwidth {results.get('copy_bw', 0) / 1e9:.0f} GB/s")
    for r in results["bench"]:
        frac = r.get("bandwidth_fraction")
        print(f"{r['engine']:<32} {r['test']:<7} {r['avg_ts']:10.1f} tok/s" + (f"  {frac:.1%} of copy bw" if frac else ""))
    for e in results["errors"]:
        print("ERROR:", e)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
