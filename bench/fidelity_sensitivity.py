"""Where int8 activations cost agreement: the numpy model of a q4f32_2 artifact with each linear's activation rounding
chosen per tensor, against transformers fp32 on the same GGUF (issue 14).

    python bench/fidelity_sensitivity.py [ART] [--text FILE] [--exp classes|layers|fixes|NAME ...]

The int8 kernels compute exactly the dot product of the dequantized weights with the dequantized activations
(quant.reference.linear_int8: llama.cpp's min term), so the numpy model here rounds x the way each candidate kernel
would (`fake_quant`) and multiplies by the dequantized weights in fp32: one BLAS call per linear, seconds per text.
Reference logits are cached in bench/.cache/sensitivity-ref-*.npy.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / ".cache"
sys.path.insert(0, str(REPO))


def q8_groups(x: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 per group of g (d = max|x|/127): (xq as float32, d per element)."""
    m, k = x.shape
    xg = x.reshape(m, k // g, g)
    amax = np.abs(xg).max(axis=2, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint(xg * inv)
    return q, amax / np.float32(127)


def fake_quant(x: np.ndarray, mode: str) -> np.ndarray:
    """x [m, k] as the kernel would see it after rounding. Modes: fp32 | int8g32 | int8g16 | int8g64 |
    split (two int8: hi = rint(x/d), lo = rint((x - d*hi) / (d/127)), i.e. ~int16) | int16g32 |
    out{N} (int8 g32 with the N largest-|x| channels of each row kept in fp32)."""
    x = x.astype(np.float32)
    if mode == "fp32":
        return x
    m, k = x.shape
    if mode.startswith("int8g"):
        g = int(mode[5:])
        q, d = q8_groups(x, g)
        return (q * d).reshape(m, k)
    if mode == "split":
        q, d = q8_groups(x, 32)
        hi = (q * d).reshape(m, k)
        r = (x - hi).reshape(m, k // 32, 32)
        d2 = d / np.float32(127)  # the residual is within d/2: |lo| <= 64
        lo = np.rint(r / np.where(d2 > 0, d2, 1)) * d2
        return hi + lo.reshape(m, k)
    if mode == "split127":  # the residual's own amax/127 scale
        q, d = q8_groups(x, 32)
        hi = (q * d).reshape(m, k)
        q2, d2 = q8_groups(x - hi, 32)
        return hi + (q2 * d2).reshape(m, k)
    if mode == "int16g32":
        xg = x.reshape(m, k // 32, 32)
        amax = np.abs(xg).max(axis=2, keepdims=True)
        d = amax / np.float32(32767)
        return (np.rint(xg / np.where(d > 0, d, 1)) * d).reshape(m, k)
    if mode.startswith("out"):
        n = int(mode[3:])
        idx = np.argsort(-np.abs(x), axis=1)[:, :n]
        keep = np.zeros_like(x, dtype=bool)
        np.put_along_axis(keep, idx, True, axis=1)
        q, d = q8_groups(np.where(keep, 0, x), 32)
        return np.where(keep, x, (q * d).reshape(m, k))
    raise ValueError(mode)


CLASSES = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
           "down": "mlp.down_proj", "head": "embed_tokens"}


def cls_of(name: str) -> str:
    return next(c for c, s in CLASSES.items() if s in name)


def layer_of(name: str) -> int:
    return int(name.split(".")[2]) if ".layers." in name else -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("art", nargs="?", type=Path, default=CACHE / "verify-smollm2-host-q4f32_2")
    ap.add_argument("--text", type=Path, default=None)
    ap.add_argument("--exp", action="append", default=None,
                    help="classes | layers | fixes | a rule 'default=int8g32,down=split,...' (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from edgellm.config import ModelConfig
    from edgellm.models.reference import float_weights, forward
    from edgellm.verify import EngineScorer, Sums, TransformersScorer, compare_logits, make_chunks, read_text

    text_name, text = read_text(a.text)
    eng = EngineScorer(a.art, a.threads)
    ids = eng.encode(text)
    chunks = make_chunks(ids, 256, eng.bos)
    art = eng.engine.art
    del eng
    key = hashlib.sha256(repr(chunks).encode()).hexdigest()[:12]
    refp = CACHE / f"sensitivity-ref-{key}.npz"
    if refp.exists():
        ref = list(np.load(refp).values())
    else:
        from edgellm.loaders import default_model_path

        hf = TransformersScorer(default_model_path(), a.threads)
        ref = [hf.logits(c) for c in chunks]
        np.savez(refp, *ref)
        del hf
    vocab = ref[0].shape[1]
    cfg = ModelConfig.from_dict(art.manifest["model"]["config"])
    w = float_weights(art)

    def run(rule) -> dict:
        def mm(x, name):
            return fake_quant(x, rule(name)) @ w[name].T

        tot = Sums()
        for c, r in zip(chunks, ref):
            lg = forward(cfg, w, c, mm)[:, :vocab]
            tot = tot + compare_logits(r[:-1], lg[:-1], np.asarray(c[1:]))
        return tot.metrics().__dict__

    def report(label, rule):
        t = time.perf_counter()
        m = run(rule)
        print(f"{label:40s} top-1 {100 * m['agreement']:5.1f}%  KL {m['mean_kl']:.4f}  "
              f"ppl {100 * m['ppl_increase']:+.2f}%"
              f"  ({time.perf_counter() - t:.0f} s)", flush=True)

    print(f"{text_name}: {len(ids)} tokens, {len(chunks)} chunks", flush=True)
    for exp in a.exp or ["classes"]:
        if exp == "classes":
            report("all int8g32", lambda n: "int8g32")
            report("all fp32", lambda n: "fp32")
            for c in CLASSES:
                report(f"{c} fp32, rest int8", lambda n, c=c: "fp32" if cls_of(n) == c else "int8g32")
            for c in CLASSES:
                report(f"only {c} int8", lambda n, c=c: "int8g32" if cls_of(n) == c else "fp32")
        elif exp == "layers":
            L = cfg.num_hidden_layers
            for lo in range(0, L, 5):
                report(f"layers {lo}-{lo + 4} fp32",
                       lambda n, lo=lo: "fp32" if lo <= layer_of(n) < lo + 5 else "int8g32")
        elif exp == "fixes":
            for mode in ("int8g16", "split", "split127", "int16g32", "out4", "out8"):
                report(f"all {mode}", lambda n, mode=mode: mode)
        else:
            parts = dict(p.split("=") for p in exp.split(","))
            report(exp, lambda n, parts=parts: parts.get(cls_of(n), parts.get("default", "int8g32")))


if __name__ == "__main__":
    sys.exit(main())
