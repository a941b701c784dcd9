"""Fidelity of the integer-dot decode GEMV (--opt webgpu_gemv=dp4a) against the fp16x2 one (h2) on real weights,
on whatever Vulkan adapter wgpu finds (lavapipe here): the tiny Llama of tests/tiny_models.py and SmolLM2-135M
(its GGUF, built q4f16_1 so both GEMVs apply), each built twice for `--target vulkan`.

  python bench/vulkan_dp4a_fidelity.py [OUT.json]

Per model: the decode steps' logits (a prefill of the prompt's first tokens, then one decode per next token, teacher
forced) of each build against the float reference (the prefill of the whole prompt on the host build of the same
scheme: the GEMM path, no GEMV), as max |diff| / max |ref| and top-1 agreement; and SmolLM2's greedy answer to the
test question from each build.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
QUESTION = "What is the capital of France?"


def main(out_json: str | None) -> None:
    from tiny_models import make_checkpoint

    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.device_runners.engine import Engine
    from edgellm.kernels import KernelOptions

    tmp = Path(tempfile.mkdtemp())
    results: dict = {}
    models = {"tiny-llama": (str(make_checkpoint(tmp / "llama", "llama")), 256),
              "smollm2-135m": (None, 512)}
    for name, (src, ctx) in models.items():
        rt = RuntimeOptions(context_window=ctx, prefill_chunk=64)
        arts = {}
        for target, gemv in (("llvm", "auto"), ("vulkan", "h2"), ("vulkan", "dp4a")):
            out = tmp / f"{name}-{target}-{gemv}"
            compile_model(CompileArgs(model=src, output=out, target=target if target != "llvm" else "host",
                                      quant="q4f16_1", runtime=rt, kernel_options=KernelOptions(webgpu_gemv=gemv)))
            arts[(target, gemv)] = out
        host = Engine(arts[("llvm", "auto")])
        prompt = list(host.prompt_ids(QUESTION))[:40] if src is None else [1, 5, 7, 100, 42, 9, 33, 250, 17, 64, 3]
        ref = host.score(prompt)  # [len, vocab]: the prefill (GEMM) logits at every position
        row = {}
        for key in (("vulkan", "h2"), ("vulkan", "dp4a")):
            t = time.time()
            eng = Engine(arts[key])
            with eng.sequence() as seq:
                got = [seq.prefill(prompt[:4])] + [seq.decode(tok) for tok in prompt[4:]]
            got = np.stack(got)
            r = ref[3:]
            row[key[1]] = {"rel_err": float(np.abs(got - r).max() / np.abs(r).max()),
                           "top1_agreement": float(np.mean(got.argmax(-1) == r.argmax(-1))),
                           "steps": len(got), "seconds": time.time() - t}
            if name == "smollm2-135m":
                row[key[1]]["answer"] = "".join(eng.generate(QUESTION, 12)).strip()
            print(name, key[1], row[key[1]], flush=True)
        results[name] = row
    if out_json:
        Path(out_json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
