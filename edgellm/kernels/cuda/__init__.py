"""CUDA C of edgellm's hand-written device functions, shipped as package data.

Each file is one device function (and its helpers) that a TVMScript launch calls with `T.cuda.func_call(...,
source_code=...)`; TVM pastes the text verbatim into the generated CUDA module, so a file must be a self-contained
fragment guarded by its own #ifndef. `int4_gemm_mma_pipelined.cu`: the INT4 prefill GEMM on tensor cores with a
cp.async multi-stage pipeline (kernels/cuda_gemm.py). `int4_gemm_wgmma.cu`: the same GEMM on Hopper's wgmma (sm_90a;
weights decoded into wgmma's A registers, needs the first file's helpers). `attention_prefill_ragged.cu`: FlashAttention-2 on
mma.sync for ragged prefill (kernels/cuda_attention.py).
"""

from __future__ import annotations

from importlib import resources


def cuda_source(name: str) -> str:
    """The text of kernels/cuda/NAME, after a newline (it separates the fragment from the code TVM emits before)."""
    return "\n" + resources.files(__package__).joinpath(name).read_text()
