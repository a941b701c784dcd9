"""Teacher-forced fidelity of SmolLM2 artifacts against transformers fp32 reading the same GGUF (issue 14).

    python bench/fidelity_smollm2.py ART [ART ...] [--text FILE] [--chunk 256] [--json OUT]

For each artifact: top-1 agreement of next-token predictions, mean KL(reference || artifact) in nats, and the
perplexity of the text under each, over chunks of `--chunk` tokens of bench/fidelity_text.txt (original prose, used
by no test). The reference is the embedded SmolLM2-135M-Instruct GGUF dequantized by transformers. A measurement
script for docs/quantization.md; `edgellm verify` is the command (bench/fidelity_table.py adds llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def compare(ref: np.ndarray, got: np.ndarray, ids: list[int]) -> dict:
    """ref/got logits [n, vocab] for positions 0..n-1, predicting ids[1:]."""
    lr, lg = log_softmax(ref[:-1]), log_softmax(got[:-1])
    nxt, rows = np.asarray(ids[1:]), np.arange(len(ids) - 1)
    return {"n": len(nxt), "agree": int((lr.argmax(-1) == lg.argmax(-1)).sum()),
            "kl": float((np.exp(lr) * (lr - lg)).sum(-1).sum()),
            "nll_ref": float(-lr[rows, nxt].sum()), "nll": float(-lg[rows, nxt].sum())}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifacts", nargs="+")
    ap.add_argument("--text", default=str(HERE / "fidelity_text.txt"))
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--json")
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from edgellm.artifact import Artifact
    from edgellm.device_runners.engine import Engine
    from edgellm.loaders import default_model_path

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    rows, refs = [], None
    for art in a.artifacts:
        eng = Engine(art)
        ids = eng.codec.encode(Path(a.text).read_text())
        chunks = [ids[i : i + a.chunk] for i in range(0, len(ids) - a.chunk + 1, a.chunk)]
        if refs is None:
            with torch.no_grad():
                refs = [model(torch.tensor([c])).logits[0].numpy() for c in chunks]
        tot = {"n": 0, "agree": 0, "kl": 0.0, "nll_ref": 0.0, "nll": 0.0}
        for c, ref in zip(chunks, refs):
            for k, v in compare(ref, eng.score(c), c).items():
                tot[k] += v
        n, q = tot["n"], Artifact.open(art).manifest["quant"]
        row = {"artifact": art, "scheme": q["scheme"], "precision": q.get("precision"), "tokens": n,
               "top1": tot["agree"] / n, "kl": tot["kl"] / n,
               "ppl_ref": float(np.exp(tot["nll_ref"] / n)), "ppl": float(np.exp(tot["nll"] / n))}
        row["ppl_increase"] = row["ppl"] / row["ppl_ref"] - 1
        rows.append(row)
        print(f"{art}: {n} tokens ({len(chunks)} x {a.chunk}), top-1 {row['top1']:.1%}, mean KL {row['kl']:.4f}, "
              f"ppl {row['ppl']:.2f} vs {row['ppl_ref']:.2f} ({row['ppl_increase']:+.2%})", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
