"""Linear kernels for the webgpu target (`--target vulkan`: WGSL on wgpu-native).

Prefill GEMM: the tiled schedule of schedule_gpu.py (a block computes a (16 tm) x 64 output tile, tm x 4 outputs per
thread in registers; per K step of 32 the activation tile and the INT4 weight tile, decoded once by the whole block,
sit in workgroup memory). WGSL has every piece it needs: `var<workgroup>` arrays, `workgroupBarrier()`, 32-bit
indices (the webgpu build narrows all indices to i32). The generic schedule it replaces computes one output per
thread straight from storage buffers and re-decodes every weight once per row tile.

Measured on lavapipe (this machine, SmolLM2's 576 -> 1536 with 64 rows, q4f32_1): 1242 -> 297 ms (tm 4), 430 ms
(tm 2); the GPU numbers are in docs/benchmarks/vulkan-h200.md. Workgroup memory: (16 tm + 64) x 33 words, so tm 4
needs 16.5 KiB (over WebGPU's default 16 KiB, inside every desktop GPU's and lavapipe's 32 KiB), tm 2 12.4 KiB: the
tile follows the target's `max_shared_memory_per_block`.
"""

from __future__ import annotations

from .schedule_gpu import schedule_gpu_linear, schedule_gpu_tiled_gemm

BK, BN = 32, 64  # K step, output features per block (16 threads x 4)


def shared_bytes(tm: int) -> int:
    return (16 * tm + BN) * (BK + 1) * 4


def tile_rows(target) -> int:
    """Outputs per thread along the rows: 4 where the tile fits the target's workgroup memory, else 2."""
    limit = int(target.attrs.get("max_shared_memory_per_block", 16384))
    return 4 if shared_bytes(4) <= limit else 2


def tiled_supports(padded_in: int, out_f: int) -> bool:
    return padded_in % BK == 0 and out_f % BN == 0


def gemm(func, target):
    """The tiled prefill GEMM for `func` (kernels/te_linear.linear with symbolic rows), or the generic schedule
    where the shape does not tile."""
    return schedule_gpu_tiled_gemm(func, target, tm=tile_rows(target)) or schedule_gpu_linear(func, target, gemv=False)


def int4_gemv(in_f: int, out_f: int, x_dtype: str, scale_dtype: str, out_dtype: str, bias: bool, target,
              warps: int | None = None, rows: int | None = None):
    """Decode GEMV for packed INT4 weights (the tensor expression of kernels/cuda_gemv.int4_gemv: one float32 dot
    per group of 32, the scale once per group, nibbles to floats by the exponent trick), scheduled for WGSL: lane l
    of a row team owns whole groups; per step it loads the group's 4 packed words as one `vec4<u32>` (16 bytes) and
    its 32 activations as 8 `vec4`s (WGSL vectors stop at 4 lanes), shared by the lane's `rows` rows; the lanes'
    partial sums meet in a workgroup-memory tree (no subgroup operations: TVM's webgpu target has none)."""
    from . import cuda_gemv

    func = cuda_gemv.int4_gemv(in_f, out_f, x_dtype, scale_dtype, out_dtype, bias)
    return _schedule_int4_gemv(func, target, warps, rows)


def _schedule_int4_gemv(func, target, warps, rows):
    """schedule_gpu_int4_gemv with WebGPU's choices: 4 warps of rows where they divide `out`, 4-wide x loads."""
    from .schedule_gpu import schedule_gpu_int4_gemv

    out_f = int(func.params[-1].shape[1])
    if warps is None:
        warps = 4 if out_f % 4 == 0 else 1
    if rows is None:
        rows = 2 if out_f % (warps * 2) == 0 and out_f // (warps * 2) >= 256 else 1
    return schedule_gpu_int4_gemv(func, target, warps, rows, x_vector=4, unroll_steps=False)
