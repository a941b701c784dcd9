"""TVM's decode attention for the webgpu target (`--target vulkan`) with one query head a workgroup (issue 15).

TVM's `_attention_decode` (tvm/relax/frontend/nn/llm/_decode_kernels.py) puts a KV head's whole query group in one
workgroup (`bdy = GROUP_SIZE`), so its grid is batch x KV heads: 8 workgroups at Llama-3-8B on an H200 with 132 SMs.
With `bdy` capped at 1 the grid is batch x query heads (32 at the 8B) and the threads the group's heads took go to KV
positions (8 a step at the preset's 256 threads). H200 run 12 (docs/benchmarks/vulkan-h200.md), 8B shapes q4f16_1,
tg128 in one process beside CUDA 525.4 tok/s: the decode attention ~411 -> ~325 us a token, h2 278.8 -> 301.5 tok/s,
dp4a 311.3 -> 334.9; logits within 8.28e-4 of CUDA's, top-1 equal. 512 threads a workgroup was not faster (293.2)
and WebGPU's default limit is 256, so the preset keeps 256.

The kernel is TVM's own, not a fork kept here: a copy of the pinned TVM's module source with its one `bdy` line
replaced, loaded as a module of TVM's llm package (for its relative imports) from a real file (TVMScript parses the
kernel's source), once per process.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import tempfile
from pathlib import Path
from types import ModuleType

from .._tvm import PINNED_TVM, compiler

# the measured default (run 12); bench/vulkan_submit.py sets None to build TVM's own kernel for an A/B
DECODE_BDY_MAX: int | None = 1
_BDY_LINE = "    bdy = GROUP_SIZE\n"


def patch_decode_source(src: str, bdy_max: int) -> str:
    """TVM's _decode_kernels.py source `src` with `bdy = GROUP_SIZE` (the query heads of a KV group that share a
    workgroup) replaced by `bdy = min(GROUP_SIZE, bdy_max)`. The rest of `_attention_decode` already handles a bdy
    below the group (`gdz = GROUP_SIZE // bdy` workgroups a KV head; the loop that halves bdy to fit the thread
    limit does the same). Checks that the line occurs exactly once, so that another TVM's source is refused rather
    than patched somewhere else."""
    if bdy_max < 1:
        raise ValueError(f"bdy_max {bdy_max}: the query heads a workgroup must be at least 1")
    n = src.count(_BDY_LINE)
    if n != 1:
        raise RuntimeError(f"TVM's _attention_decode has {n} `bdy = GROUP_SIZE` lines, not 1: this patch is written "
                           f"for apache-tvm=={PINNED_TVM}; update edgellm/kernels/webgpu_attention.py for this TVM")
    return src.replace(_BDY_LINE, f"    bdy = min(GROUP_SIZE, {int(bdy_max)})\n")


@functools.cache
def decode_kernels_module(bdy_max: int) -> ModuleType:
    """TVM's _decode_kernels module with `patch_decode_source(bdy_max)` applied, loaded once per process."""
    orig = compiler().llm_kv_cache._attention_decode
    src = Path(inspect.getsourcefile(orig)).read_text()
    tmp = tempfile.TemporaryDirectory(prefix="edgellm-tvm-decode-")  # kept with the module: TVMScript rereads it
    path = Path(tmp.name) / f"_decode_kernels_edgellm_q{bdy_max}.py"
    path.write_text(patch_decode_source(src, bdy_max))
    spec = importlib.util.spec_from_file_location(f"{orig.__module__}_edgellm_q{bdy_max}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._edgellm_tmp = tmp
    return mod


def fits(heads: int, kv_heads: int, head_dim: int, target, bdy_max: int = 1) -> bool:
    """Whether the capped kernel builds for `target` and differs from TVM's: a query group over `bdy_max`, and a
    workgroup within WebGPU's 64 threads in z. TVM's sizes: bdx = head_dim / 4 lanes (4 values each) x bdy heads
    x bdz KV positions filling min(the target's threads, 512); a head_dim under 16 at the preset's 256 threads would
    need bdz over 64 (TVM's check_thread_limits refuses it), where TVM's kernel with the whole group may still fit."""
    group, threads = heads // kv_heads, min(int(target.attrs["max_num_threads"]), 512)
    bdx, bdy = head_dim // 4, min(group, bdy_max)
    while bdx * bdy > threads and bdy > 1:
        bdy //= 2
    return group > bdy_max and bdx > 0 and max(threads, bdx * bdy) // (bdx * bdy) <= 64


def attention_decode(kv_heads: int, heads: int, head_dim: int, dtype: str, sliding_window: bool,
                     rope_scaling: dict | None, target, bdy_max: int = 1):
    """TVM's `_attention_decode` (same arguments; `rope_scaling` as TIRPagedKVCache prepared it) with at most
    `bdy_max` query heads a workgroup: the PrimFunc to put in place of `tir_attention_decode[_sliding_window]`."""
    return decode_kernels_module(bdy_max)._attention_decode(kv_heads, heads, head_dim, dtype, sliding_window,
                                                            rope_scaling, target)
