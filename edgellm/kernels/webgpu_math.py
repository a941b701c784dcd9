"""Norm kernels for the webgpu target (`--target vulkan`): kernels/cuda_math.py's, with the choices WGSL needs (reductions
meet in a workgroup-memory tree: subgroup shuffles are right only on some adapters, and only the decode GEMVs take
them, with --opt webgpu_subgroups; vectors stop at 4 lanes).
The device argmax needs no twin: cuda_math's two-stage argmax is plain TIR (a workgroup-memory tree) and builds for
webgpu as it is.
"""

from __future__ import annotations

from .cuda_math import add_rms_norm_gpu


def add_rms_norm_webgpu(hidden: int, eps: float, dtype: str, threads: int | None = None):
    """(x [n, hidden], y [n, hidden], w [hidden]) -> s = x + y (rounded to `dtype`), rms_norm(s) * w: the function
    of cuda_math.add_rms_norm_gpu (and of `x + y` then TVM's rms_norm), one dispatch instead of two. One workgroup
    per token; a thread owns chunks of 4 elements (WGSL vectors stop at 4 lanes) kept in registers between the two
    passes; the sum of squares meets in a workgroup-memory tree (ping-pong halves: one barrier per level). H200,
    hidden 4096, in the profiled 8B-shape decode: 8.8 us a call (8.9 with two barriers per level), of which ~5.5 us
    is what any dispatch costs there (one timed pass each): one workgroup per token is latency, not bandwidth."""
    return add_rms_norm_gpu(hidden, eps, dtype, threads, lanes=4, max_threads=256, reduce="tree")
