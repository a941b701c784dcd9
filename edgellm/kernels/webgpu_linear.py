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
              warps: int | None = None, rows: int | None = None, lanes: int | None = None,
              unroll: bool | None = None):
    """Decode GEMV for packed INT4 weights (the tensor expression of kernels/cuda_gemv.int4_gemv: one float32 dot
    per group of 32, the scale once per group, nibbles to floats by the exponent trick), scheduled for WGSL: lane l
    of a row team owns whole groups; per step it loads the group's 4 packed words as one `vec4<u32>` (16 bytes) and
    its 32 activations as 8 `vec4`s (WGSL vectors stop at 4 lanes), shared by the lane's `rows` rows; the lanes'
    partial sums meet in a workgroup-memory tree (no subgroup operations: TVM's webgpu target has none)."""
    from . import cuda_gemv

    func = cuda_gemv.int4_gemv(in_f, out_f, x_dtype, scale_dtype, out_dtype, bias)
    return _schedule_int4_gemv(func, target, warps, rows, lanes, unroll)


def _schedule_int4_gemv(func, target, warps, rows, lanes=None, unroll=None):
    """schedule_gpu_int4_gemv with WebGPU's choices: 4 warps of rows where they divide `out`, 4-wide x loads."""
    from .schedule_gpu import schedule_gpu_int4_gemv

    out_f = int(func.params[-1].shape[1])
    if warps is None:
        warps = 4 if out_f % 4 == 0 else 1
    if rows is None:
        rows = 2 if out_f % (warps * 2) == 0 and out_f // (warps * 2) >= 256 else 1
    return schedule_gpu_int4_gemv(func, target, warps, rows, x_vector=4, unroll_steps=bool(unroll),
                                  lanes=lanes or 32)


def int4_gemv_coalesced(in_f: int, out_f: int, x_dtype: str, scale_dtype: str, out_dtype: str, bias: bool,
                        warps: int | None = None, rows: int | None = None, unroll: int = 4):
    """Decode GEMV for packed INT4 weights, written for WGSL (pre-scheduled TIR; the function of
    cuda_gemv.int4_gemv: arguments x, q_weight, q_scale, [bias], out; nibble - 7 by the exponent trick, float32
    sums, one scale per group of 32).

    Lane l of a warp takes packed word l of each 32-word step of a row: a warp's weight load reads 128 contiguous
    bytes, and its activation loads read the 8 matching activations per lane, 512 contiguous bytes (fp16). The
    group schedule above (a lane owns a whole group of 32) made each lane read 32 activations 64 bytes apart from its
    neighbours': 16 cache lines per load instruction, 32 scalar loads per step (WGSL has no wider loads of an f16
    array), and it ran at 0.4 TB/s on an H200 (docs/benchmarks/vulkan-h200.md). `rows` rows per warp share each
    activation load; `unroll` steps are unrolled so their loads are in flight together; the 32 lane sums of each row
    meet in a workgroup-memory tree at the end."""
    from .._tvm import compiler
    from .cuda_gemv import GROUP, MAGIC, PER_WORD, QMAX

    T = compiler().T
    f32 = "float32"
    if in_f % GROUP:
        raise ValueError(f"int4_gemv_coalesced needs `in` a multiple of {GROUP}, got {in_f}")
    words = in_f // PER_WORD
    lanes = 32
    if warps is None:
        warps = 4
    if rows is None:  # H200, Llama-3-8B shapes alone (bench/vulkan_kernels.py): 4 rows from 6144 outputs (gate_up
        # 46.3 -> 42.4 us, qkv 15.8 -> 14.8), 2 below (o 12.9 vs 13.6, down 29.1 vs 30.4); 1 row was 25-60% slower
        least = {4: 384, 2: 512}  # blocks the grid keeps at least
        rows = next((r for r in (4, 2) if out_f % (warps * r) == 0 and out_f // (warps * r) >= least[r]), 1)
    per_block = warps * rows
    blocks = (out_f + per_block - 1) // per_block
    steps = (words + lanes - 1) // lanes
    unroll = max(1, min(unroll, steps))
    outer = (steps + unroll - 1) // unroll
    groups = in_f // GROUP
    offset = float(2**23 + QMAX)

    @T.macro
    def body(x, qw, qs, b, out):
        bx = T.launch_thread("blockIdx.x", blocks)
        ty = T.launch_thread("threadIdx.y", warps)
        tx = T.launch_thread("threadIdx.x", lanes)
        acc = T.alloc_buffer((rows,), f32, scope="local")
        xf = T.alloc_buffer((PER_WORD,), f32, scope="local")
        wv = T.alloc_buffer((1,), "uint32", scope="local")
        red = T.alloc_buffer((warps * rows * lanes,), f32, scope="shared")
        t = T.alloc_buffer((rows,), f32, scope="local")
        for r in T.unroll(rows):
            acc[r] = T.float32(0)
        for so in T.serial(outer):
            for su in T.unroll(unroll):
                kw = T.meta_var((so * unroll + su) * lanes + tx)
                if kw < words:
                    for e in T.unroll(PER_WORD):
                        xf[e] = T.Cast(f32, x[0, kw * PER_WORD + e])
                    for r in T.unroll(rows):
                        n = T.meta_var(bx * per_block + ty * rows + r)
                        if n < out_f:
                            wv[0] = qw[n, kw]
                            t[r] = T.float32(0)
                            for e in T.unroll(PER_WORD):
                                t[r] = t[r] + xf[e] * (T.reinterpret(
                                    f32, ((wv[0] >> T.uint32(4 * e)) & T.uint32(15)) | T.uint32(MAGIC))
                                    - T.float32(offset))
                            acc[r] = acc[r] + t[r] * T.Cast(f32, qs[n, kw // (GROUP // PER_WORD)])
        for r in T.unroll(rows):
            red[(ty * rows + r) * lanes + tx] = acc[r]
        T.tvm_storage_sync("shared")
        for k in T.unroll(5):  # 32 -> 1, no branch around the barriers (TVM's sync planner cannot place them inside)
            for r in T.unroll(rows):
                t[r] = red[(ty * rows + r) * lanes + tx] + T.if_then_else(
                    tx < T.shift_right(16, k), red[(ty * rows + r) * lanes + T.min(tx + T.shift_right(16, k), 31)],
                    T.float32(0))
            T.tvm_storage_sync("shared")
            for r in T.unroll(rows):
                red[(ty * rows + r) * lanes + tx] = t[r]
            T.tvm_storage_sync("shared")
        if tx < rows:
            n = T.meta_var(bx * per_block + ty * rows + tx)
            if n < out_f:
                if bias:
                    out[0, n] = T.Cast(out_dtype, red[(ty * rows + tx) * lanes] + T.Cast(f32, b[n]))
                else:
                    out[0, n] = T.Cast(out_dtype, red[(ty * rows + tx) * lanes])

    attrs = {"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8, "edgellm.kernel": "gemv"}
    if bias:
        @T.prim_func(private=True, check_well_formed=False)
        def gemv(x: T.Buffer((1, in_f), x_dtype), q_weight: T.Buffer((out_f, words), "uint32"),
                 q_scale: T.Buffer((out_f, groups), scale_dtype), b: T.Buffer((out_f,), out_dtype),
                 out: T.Buffer((1, out_f), out_dtype)):
            T.func_attr(attrs)
            body(x, q_weight, q_scale, b, out)
    else:
        @T.prim_func(private=True, check_well_formed=False)
        def gemv(x: T.Buffer((1, in_f), x_dtype), q_weight: T.Buffer((out_f, words), "uint32"),
                 q_scale: T.Buffer((out_f, groups), scale_dtype), out: T.Buffer((1, out_f), out_dtype)):
            T.func_attr(attrs)
            body(x, q_weight, q_scale, None, out)
    return gemv
