"""Elementwise and norm kernels for the webgpu target (`--target vulkan`), the twins of kernels/cuda_math.py where
the CUDA one relies on warp shuffles (TVM's WGSL codegen has no subgroup operations): reductions meet in a
workgroup-memory tree instead. The device argmax needs no twin: cuda_math's two-stage argmax is plain TIR (a
workgroup-memory tree) and builds for webgpu as it is.
"""

from __future__ import annotations

from .._tvm import compiler
from .cuda_math import _log2, _pow2_at_least


def add_rms_norm_webgpu(hidden: int, eps: float, dtype: str, threads: int | None = None):
    """(x [n, hidden], y [n, hidden], w [hidden]) -> s = x + y (rounded to `dtype`), rms_norm(s) * w: the function
    of cuda_math.add_rms_norm_gpu (and of `x + y` then TVM's rms_norm), one dispatch instead of two. One workgroup
    per token; a thread owns chunks of 4 elements (WGSL vectors stop at 4 lanes) kept in registers between the two
    passes; the sum of squares meets in a workgroup-memory tree (ping-pong halves: one barrier per level). H200,
    hidden 4096, in the profiled 8B-shape decode: 8.8 us a call (8.9 with two barriers per level), of which ~5.5 us
    is what any dispatch costs there (one timed pass each): one workgroup per token is latency, not bandwidth."""
    T = compiler().T
    f32 = "float32"
    vec = 4 if hidden % 4 == 0 else 1
    chunks = hidden // vec
    threads = threads or min(256, max(32, _pow2_at_least(chunks)))
    levels = _log2(threads)
    per = (chunks + threads - 1) // threads

    @T.prim_func(private=True, check_well_formed=False)
    def add_rms_norm(var_x: T.handle, var_y: T.handle, w: T.Buffer((hidden,), dtype), var_s: T.handle,
                     var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(var_x, (n, hidden), dtype)
        y = T.match_buffer(var_y, (n, hidden), dtype)
        s = T.match_buffer(var_s, (n, hidden), dtype)
        out = T.match_buffer(var_out, (n, hidden), dtype)
        bx = T.launch_thread("blockIdx.x", n)
        tx = T.launch_thread("threadIdx.x", threads)
        xv = T.alloc_buffer((vec,), dtype, scope="local")
        yv = T.alloc_buffer((vec,), dtype, scope="local")
        sv = T.alloc_buffer((vec,), dtype, scope="local")
        v = T.alloc_buffer((per * vec,), f32, scope="local")
        acc = T.alloc_buffer((1,), f32, scope="local")
        red = T.alloc_buffer((2 * threads,), f32, scope="shared")  # ping-pong: one barrier per tree level
        acc[0] = T.float32(0)
        for j in T.unroll(per):
            if j * threads + tx < chunks:
                for e in T.vectorized(vec):
                    xv[e] = x[bx, (j * threads + tx) * vec + e]
                for e in T.vectorized(vec):
                    yv[e] = y[bx, (j * threads + tx) * vec + e]
                for e in T.unroll(vec):
                    sv[e] = T.Cast(dtype, T.Cast(f32, xv[e]) + T.Cast(f32, yv[e]))
                    v[j * vec + e] = T.Cast(f32, sv[e])
                    acc[0] = acc[0] + v[j * vec + e] * v[j * vec + e]
                for e in T.vectorized(vec):
                    s[bx, (j * threads + tx) * vec + e] = sv[e]
        red[tx] = acc[0]
        T.tvm_storage_sync("shared")
        for k in T.unroll(levels):  # level k reads half k % 2 and writes the other (no branch around the barrier:
            # TVM's sync planner cannot place one inside)
            red[(k + 1) % 2 * threads + tx] = red[k % 2 * threads + tx] + T.if_then_else(
                tx < T.shift_right(threads, k + 1),
                red[k % 2 * threads + T.min(tx + T.shift_right(threads, k + 1), threads - 1)], T.float32(0))
            T.tvm_storage_sync("shared")
        acc[0] = T.rsqrt(red[levels % 2 * threads] / T.float32(hidden) + T.float32(eps))
        for j in T.unroll(per):
            if j * threads + tx < chunks:
                for e in T.vectorized(vec):
                    xv[e] = w[(j * threads + tx) * vec + e]
                for e in T.unroll(vec):
                    sv[e] = T.Cast(dtype, v[j * vec + e] * acc[0] * T.Cast(f32, xv[e]))
                for e in T.vectorized(vec):
                    out[bx, (j * threads + tx) * vec + e] = sv[e]

    return add_rms_norm
