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
    partial sums meet in a workgroup-memory tree (no subgroup operations: see int4_gemv_h2's `sg`)."""
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


# ---------------------------------------------------------------------------------------------------------------
# Decode GEMV in fp16x2 arithmetic for WGSL (`shader-f16`), the WGSL counterpart of cuda_gemv.int4_gemv_h2:
#
# * `((w >> 4s) & 0x000F000F) | 0x50005000` as `vec2<f16>` is `32 + nib/32` for nibbles s and s+4 of the word
#   (fp16's ulp at 32 is 1/32); minus the pair `32 + 7/32` it is `(nib - 7) / 32` exactly, and one vec2<f16> FMA
#   meets the activation pair (x[8q+s], x[8q+s+4]): two weights an instruction, about 2 instructions a weight
#   against ~5 in the float32 decode of int4_gemv_coalesced (shift, and, or-to-float, subtract, FMA).
# * Lane l owns group g = 32 i + l (4 packed words, loaded as one vec4<u32>: a warp's load reads 512 contiguous
#   bytes of a row); per group two vec2<f16> accumulators (even and odd words: 8 products a half, each |.| <=
#   |x| / 4, no overflow while |x| < 16384) go to float32 and meet the scale (times 32) in one FMA.
# * x is staged once per workgroup in workgroup memory as fp16 pairs pre-permuted for the nibble order, laid out
#   [word q of the group][group][4 pairs] so a lane reads its group's 4 vec4<u32> and the warp's reads are
#   contiguous (no bank conflicts): in_f * 2 bytes (8 KiB at 4096, 28 KiB at 14336). A thread stages one packed
#   word's 8 activations from two 8-byte loads; the first step's weights are loaded before the staging and each
#   next step's before this step's arithmetic (double-buffered in registers).
# * the lanes' partial sums meet after one barrier: lane r of a warp adds row r's 32 values from workgroup memory
#   (the tree of int4_gemv_coalesced took 11 barriers).
# * u32 -> vec2<f16> is `vec2<f16>(unpack2x16float(w))`, not `bitcast<vec2<f16>>(w)`: wgpu 0.32's naga has no
#   size-changing bitcast (gfx-rs/wgpu#8896; it types `bitcast<vec2<f16>>(u32)` as f32). The f16 -> f32 -> f16
#   round trip is exact (H200: faster than the float32 twin at every 8B shape, gate_up 30.0 vs 39.9 us).
# The weight and activation buffers' names end in `_vec4`: every access to them is an aligned 4-lane vector load,
# which the plugin turns into one load of an `array<vec4<T>>` binding (runtime/webgpu/module.cc, docs/tvm-notes.md:
# TVM declares every buffer as an array of its scalar type, so a vector load is four scalar loads; 2.7-3x slower).
# `h2=False` is the same schedule with float32 arithmetic (the exponent trick of int4_gemv_coalesced); the
# registry does not pick it, the tests run it to check the layout on adapters without shader-f16.
# ---------------------------------------------------------------------------------------------------------------
H2_BASE = 0x50005000  # fp16 32.0 in both halves


SUBGROUP_LANES = (0, 4, 8, 16, 32)  # the `sg` values of the fp16x2 and integer-dot GEMVs (0: no subgroup operations)


def _check_sg(sg: int, what: str) -> None:
    if sg not in SUBGROUP_LANES:
        raise ValueError(f"{what}: sg {sg} is not one of {SUBGROUP_LANES} (lanes a warp's xor shuffles may span)")


def _xor_steps(sg: int) -> int:
    """Shuffle steps of a butterfly over `sg` lanes (masks sg/2, ..., 1)."""
    return sg.bit_length() - 1 if sg else 0


def _shfl_xor(T, value, k, sg: int, dtype: str = "float32"):
    """Step k of the butterfly over `sg` lanes: the value of the lane whose index differs in bit (sg/2) >> k
    (WGSL's subgroupShuffleXor; right only where those lanes share a subgroup: edgellm.webgpu.subgroup_lanes)."""
    return T.call_pure_extern(dtype, "subgroupShuffleXor", value,
                              T.shift_right(T.uint32(sg // 2), T.Cast("uint32", k)))


def _store_rows(R: int, R2: int, W: int, n_out: int, silu: bool, bias: bool, out_dtype: str, KS: int = 1,
                sg: int = 0):
    """The end of the fp16x2 and integer-dot decode GEMVs (a TVMScript macro): the row sums of a warp's 32 lanes,
    lane r < R2 of a team's first warp adding row r's (`KS` warps a team share its rows, each a slice of `in`),
    then the output: silu(gate) * up with silu_mul_gpu's arithmetic on the output-rounded gate and up sums
    (`silu`: rows R2.. are the up rows), + bias, or as it is.

    sg 0: each lane's `R` sums to workgroup memory, one barrier, the leader lane adds its row's 32 KS values in
    order. sg > 0 (the adapter's subgroups span runs of `sg` consecutive lanes): a butterfly of xor shuffles sums
    each run of sg lanes in registers first; at sg 32 with one warp a team every lane then holds its warp's row
    sums and no workgroup memory or barrier is used, below that the runs' 32 / sg sums meet in workgroup memory."""
    from .._tvm import compiler

    c = compiler()
    T, f32 = c.T, "float32"
    _check_sg(sg, "_store_rows")
    WT = W // KS  # row teams a workgroup
    NS = 32 // sg if sg else 32  # sums a warp leaves per row in workgroup memory
    direct = not _rows_in_shared(sg, KS)  # no workgroup memory: lane r takes row r's sum from its registers
    steps = _xor_steps(sg)

    def leader(ty, tx):  # lanes that write an output: lane r < R2 of each team's first warp
        return tx < R2 if KS == 1 else c.tirx.all(tx < R2, ty % KS == 0)

    def index(bx, ty, tx):  # that lane's output row
        return (bx * W + ty) * R2 + tx if KS == 1 else (bx * WT + ty // KS) * R2 + tx

    def pick(acc, tx, first):  # acc[first + tx] with tx < R2, without indexing registers by a lane id
        v = acc[first]
        for r in range(1, R2):
            v = T.if_then_else(tx == r, acc[first + r], v)
        return v

    @T.macro
    def row_sum(red, acc, dst, ty, tx, first):  # dst[0] = the sum of row first + tx over the team
        if direct:  # reads acc[first..first + R2) only
            dst[0] = pick(acc, tx, first)
        else:
            dst[0] = T.float32(0)
            for kk in T.unroll(KS):  # the team's warps in order, each its NS sums in order
                for k in T.unroll(NS):
                    dst[0] = dst[0] + red[((ty + kk) * R + tx + first) * NS + k]

    @T.macro
    def store_rows(red, acc, tt, out, b, bx, ty, tx):
        if sg > 0:
            for r in T.unroll(R):
                for k in T.unroll(steps):
                    acc[r] = acc[r] + _shfl_xor(T, acc[r], k, sg)
        if not direct:
            if sg > 0:
                if tx % sg == 0:
                    for r in T.unroll(R):
                        red[(ty * R + r) * NS + tx // sg] = acc[r]
            else:
                for r in T.unroll(R):
                    red[(ty * R + r) * 32 + tx] = acc[r]
            T.tvm_storage_sync("shared")
        if leader(ty, tx):
            i = T.meta_var(index(bx, ty, tx))
            if i < n_out:
                row_sum(red, acc, tt, ty, tx, 0)
                if silu:
                    row_sum(red, acc, acc, ty, tx, R2)  # the up row's sum into acc[0] (gate's is in tt)
                    tt[0] = T.Cast(f32, T.Cast(out_dtype, tt[0]))
                    out[0, i] = T.Cast(out_dtype, tt[0] / (T.float32(1) + T.exp(-tt[0]))
                                       * T.Cast(f32, T.Cast(out_dtype, acc[0])))
                elif bias:
                    out[0, i] = T.Cast(out_dtype, tt[0] + T.Cast(f32, b[i]))
                else:
                    out[0, i] = T.Cast(out_dtype, tt[0])

    return store_rows


def _rows_in_shared(sg: int, KS: int = 1) -> bool:
    """Whether _store_rows passes its sums through workgroup memory (a next pass must then wait on a barrier)."""
    return not (sg == 32 and KS == 1)


def _norm_scale(stage: int, W: int, G: int, in_f: int, norm_eps: float | None, x_dtype: str, sg: int = 0):
    """The first half of the decode GEMVs' norm prologue (a TVMScript macro): each thread's staged words of
    s = x + delta (rounded to the activation type) into sv, workgroup 0 writes s (the residual stream) to xsum, the
    sum of squares per warp then across warps, and tt[0] = rsqrt(mean + eps): add_rms_norm_gpu's arithmetic.
    sg > 0: each run of sg lanes sums its squares by xor shuffles, the runs' W x 32 / sg sums meet in workgroup
    memory after one barrier (two without subgroups)."""
    from .._tvm import compiler

    T, f32 = compiler().T, "float32"
    _check_sg(sg, "_norm_scale")
    NS = 32 // sg if sg else 0
    steps = _xor_steps(sg)

    @T.macro
    def norm_scale(x, dl, xsum, xa, da, sv, tt, red, red2, bx, ty, tx):
        tt[0] = T.float32(0)
        for i in T.unroll(stage):
            e = T.meta_var((i * W + ty) * 32 + tx)  # = 4 g + q: a warp reads 512 contiguous bytes of fp16 x
            if e < G * 4:
                for h in T.unroll(2):
                    xa[h] = x[0, T.Ramp(e * 8 + 4 * h, 1, 4)]
                    da[h] = dl[0, T.Ramp(e * 8 + 4 * h, 1, 4)]
                    for k in T.unroll(4):
                        sv[i * 8 + h * 4 + k] = T.Cast(f32, T.Cast(x_dtype, T.Cast(f32, T.Shuffle([xa[h]], [k]))
                                                                   + T.Cast(f32, T.Shuffle([da[h]], [k]))))
                        tt[0] = tt[0] + sv[i * 8 + h * 4 + k] * sv[i * 8 + h * 4 + k]
                        if bx == 0:
                            xsum[0, e * 8 + h * 4 + k] = T.Cast(x_dtype, sv[i * 8 + h * 4 + k])
        if sg > 0:
            for k in T.unroll(steps):
                tt[0] = tt[0] + _shfl_xor(T, tt[0], k, sg)
            if tx % sg == 0:
                red[ty * NS + tx // sg] = tt[0]
            T.tvm_storage_sync("shared")
            tt[0] = T.float32(0)
            for k in T.unroll(W * NS):
                tt[0] = tt[0] + red[k]
        else:
            red[ty * 32 + tx] = tt[0]  # the sum of squares: per warp, then across warps
            T.tvm_storage_sync("shared")
            if tx == 0:
                tt[0] = T.float32(0)
                for k in T.unroll(32):
                    tt[0] = tt[0] + red[ty * 32 + k]
                red2[ty] = tt[0]
            T.tvm_storage_sync("shared")
            tt[0] = T.float32(0)
            for k in T.unroll(W):
                tt[0] = tt[0] + red2[k]
        tt[0] = T.rsqrt(tt[0] / T.float32(in_f) + T.float32(norm_eps))

    return norm_scale


def _gemv_func(body, in_f: int, out_f: int, words: int, G: int, n_out: int, x_dtype: str, scale_dtype: str,
               out_dtype: str, norm: bool, bias: bool):
    """The PrimFunc of a pre-scheduled WGSL decode GEMV around its TVMScript macro `body(x, delta, norm weight,
    q_weight, q_scale, bias, out, x + delta)`: arguments x, [delta, norm weight], q_weight, q_scale, [bias], out,
    [x + delta] (the registry's `fused_gemv` contract). Buffers named `*_vec4` are read in aligned 4-lane vectors
    (the plugin's RewriteVec4Loads)."""
    from .._tvm import compiler

    T = compiler().T
    attrs = {"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8, "edgellm.kernel": "gemv"}
    xd, od, sd = x_dtype, out_dtype, scale_dtype
    if norm and bias:
        @T.prim_func(private=True, check_well_formed=False)
        def gemv(x_vec4: T.Buffer((1, in_f), xd), delta_vec4: T.Buffer((1, in_f), xd),
                 norm_w_vec4: T.Buffer((in_f,), xd), q_weight_vec4: T.Buffer((out_f, words), "uint32"),
                 q_scale: T.Buffer((out_f, G), sd), b: T.Buffer((out_f,), od), out: T.Buffer((1, n_out), od),
                 xsum: T.Buffer((1, in_f), xd)):
            T.func_attr(attrs)
            body(x_vec4, delta_vec4, norm_w_vec4, q_weight_vec4, q_scale, b, out, xsum)
    elif norm:
        @T.prim_func(private=True, check_well_formed=False)
        def gemv(x_vec4: T.Buffer((1, in_f), xd), delta_vec4: T.Buffer((1, in_f), xd),
                 norm_w_vec4: T.Buffer((in_f,), xd), q_weight_vec4: T.Buffer((out_f, words), "uint32"),
                 q_scale: T.Buffer((out_f, G), sd), out: T.Buffer((1, n_out), od), xsum: T.Buffer((1, in_f), xd)):
            T.func_attr(attrs)
            body(x_vec4, delta_vec4, norm_w_vec4, q_weight_vec4, q_scale, None, out, xsum)
    elif bias:
        @T.prim_func(private=True, check_well_formed=False)
        def gemv(x_vec4: T.Buffer((1, in_f), xd), q_weight_vec4: T.Buffer((out_f, words), "uint32"),
                 q_scale: T.Buffer((out_f, G), sd), b: T.Buffer((out_f,), od), out: T.Buffer((1, n_out), od)):
            T.func_attr(attrs)
            body(x_vec4, None, None, q_weight_vec4, q_scale, b, out, None)
    else:
        @T.prim_func(private=True, check_well_formed=False)
        def gemv(x_vec4: T.Buffer((1, in_f), xd), q_weight_vec4: T.Buffer((out_f, words), "uint32"),
                 q_scale: T.Buffer((out_f, G), sd), out: T.Buffer((1, n_out), od)):
            T.func_attr(attrs)
            body(x_vec4, None, None, q_weight_vec4, q_scale, None, out, None)
    return gemv


def h2_config(in_f: int, out_f: int, silu: bool = False, bits: int = 4,
              norm: bool = False) -> tuple[int, int, int, int]:
    """(warps, rows, unroll, ksplit) of int4_gemv_h2 for a shape. H200, Llama-3-8B shapes alone, weights rotated through
    HBM (bench/vulkan_kernels.py, run 5 in docs/benchmarks/vulkan-h200.md): `in` 4096 (4 steps a lane): 16 warps of
    one row (o 9.9 us, gate_up 29.9, qkv 11.7; 8 x 2 rows: 12.7 / 30.0 / 11.7); a longer `in` needs 4 loads in flight
    a lane: down (14336) 23.2 us with 8 x 4 rows x 1 group, 23.9 with 8 x 2 x 2, but 76 with 8 x 2 x 1 and 122 with
    4 x 2 x 1. Small grids (SmolLM2, under ~264 workgroups): 4 warps of one row. The 8-bit head (4096 -> 128256):
    4 warps of 4 rows, 390 us (8 x 2: 414, 8 x 1: 436; the generic schedule it replaces: 1,000).
    Run 10 (in the 8B decode, profiled, us a call): qkv (norm) and o with all 4 of a lane's groups loaded in one
    step, 13.6 / 10.1 against 14.0 / 10.7 with 4 steps of one; gate_up with 4 rows (2 gate, 2 up) and 4 groups a step
    lost (44.0 against 37.1), and so did `ksplit` 2 at down (8 x 2 x 2 groups: 29.6 against 25.8; 8 x 4 x 1: 26.7),
    at o (8 x 2 x 2: 10.6) and at qkv (16 x 2 x 2: 14.7).
    Run 14 (tg128 with the step queued ahead, where the GPU is the limit): down at 8 x 4 x 2 (8 loads in flight a
    lane; 128 workgroups at the 8B, one an SM) 341.0 tok/s against 329.7 at 8 x 4 x 1 (h2), 400.9 against 390.8
    (dp4a); 8 x 4 x 4 339.4 / 399.1. The profile (each dispatch alone) had down unchanged (26.3 / 26.2 us) or
    slower (31.1 at 8 x 4 x 4): timed alone a kernel pays its ramp and tail, which the stream overlaps."""
    if bits == 8 and out_f // 16 >= 264:
        return 4, 4, 1, 1
    if silu:  # a warp's rows pair gate row i with up row inter + i
        return (8 if out_f // 2 // 8 >= 264 else 4), 2, (2 if in_f > 4096 else 1), 1
    if in_f > 4096:
        return (8, 4, 2, 1) if out_f // 32 >= 128 else (8, 2, 2, 1)
    if out_f // 16 >= 256:
        return 16, 1, (4 if in_f >= 4096 else 1), 1
    return 4, 1, 1, 1


def h2_xf32(in_f: int, bits: int = 4) -> bool:
    """Whether int4_gemv_h2 stages x as float32 (its `xf32`) by default: no. H200, run 10 (the 8B decode, profiled,
    us a call): gate_up (norm, silu) 55.2 against h2's 36.9, qkv (norm) 18.3 against 13.9, o 12.0 against 10.6;
    tg128 223.9 against 273.4 tok/s. Not the dependent chain: run 11's 4 chains a group and row ran as one (gate_up
    alone 39.3 against 38.8 us, in the decode 55.9). Left suspect: the 32 scalar workgroup loads a group."""
    return False


def h2_shared_bytes(in_f: int, out_f: int) -> int:
    """Workgroup memory of int4_gemv_h2: the staged x and the lanes' partial sums (h2_config's configs have at most
    32 rows a workgroup: 4 KiB)."""
    return in_f * 2 + 32 * 32 * 4


def h2_supports(in_f: int, out_f: int, x_dtype: str, scale_dtype: str, out_dtype: str, target=None) -> bool:
    """fp16 activations, scales and output, whole groups, and x within the target's workgroup memory."""
    limit = int(target.attrs.get("max_shared_memory_per_block", 16384)) if target is not None else 16384
    return in_f % 32 == 0 and x_dtype == scale_dtype == out_dtype == "float16" \
        and h2_shared_bytes(in_f, out_f) <= limit


def int4_gemv_h2(in_f: int, out_f: int, bias: bool, warps: int | None = None, rows: int | None = None,
                 unroll: int | None = None, h2: bool = True, x_dtype: str = "float16", out_dtype: str = "float16",
                 norm_eps: float | None = None, silu: bool = False, bits: int = 4, ksplit: int | None = None,
                 xf32: bool | None = None, chains: int | None = None, passes: int | None = None, sg: int = 0):
    """Decode GEMV for packed INT4 weights on the q4f16_1 grid (nibble - 7, an fp16 scale per group of 32),
    pre-scheduled TIR for WGSL (see the comment above); arguments x, q_weight, q_scale, [bias], out as
    cuda_gemv.int4_gemv.

    The decode fusions of the registry's `fused_gemv` (the contract of cuda_gemv.int4_gemv_h2's): `norm_eps`: the
    arguments are x, delta, norm weight, q_weight, q_scale, [bias], then the outputs out and x + delta; the staging
    computes s = x + delta (rounded to fp16) and rms_norm(s) * w with add_rms_norm_gpu's arithmetic (the sum of
    squares meets in a different order: the last bit of the norm's scale may differ), and workgroup 0 writes s.
    `silu`: out_f is gate_up's (2 inter); warp rows r < rows/2 are gate rows i, the others up rows inter + i, and
    the output is silu(gate) * up [1, inter] with silu_mul_gpu's arithmetic on the fp16-rounded sums.

    `bits=8`: the 8-bit rows (q8f16_1: byte - 128, 4 a word; the head): a group is two vec4<u32> loads, and
    `((w >> 8s) & 0x00FF00FF) | 0x40004000` is `2 + byte/512` for bytes s and s+2 (fp16's ulp at 2 is 1/512), minus
    `2 + 128/512`: (byte - 128) / 512 exactly; the pairs meet (x[4q+s], x[4q+s+2]) and the scale times 512.

    `ksplit` (cuda_gemv.int4_gemv_h2's): the workgroup's warps form warps / ksplit row teams of `ksplit` warps that
    share the team's `rows` rows, warp k of a team taking groups (it U + u) 32 ksplit + 32 k + lane: more loads in
    flight a row and fewer serial steps (the 8B's down: 14 steps of one group a lane with 1); the team's first warp
    adds its warps' partial sums in order.

    `xf32` (4-bit rows only): no fp16 arithmetic and no f16 <-> f32 conversion in the loop. x is staged as float32
    ([word q][half][group][4]: a lane's 8 vec4<f32> reads are contiguous across the warp) with each word's sum of
    its 8 values; a nibble becomes the float `1 + nib/16` by one shift and one and-or into the mantissa
    (`(w shifted) & 0x00780000 | 0x3F800000`), one float32 FMA a weight, and the group's sum is
    `sum(x (1 + nib/16)) - 1.4375 sum(x)` = `sum(x (nib - 7)) / 16`, times the scale x 16 (the cancellation costs
    ~5 of float32's 24 bits, ~1e-6 relative: the fp16x2 sums round to 11). Needs in_f * 4 bytes of workgroup memory
    (16 KiB at 4096; not the 8B's down).

    `chains`: independent accumulators a group and row: h2 2 (even and odd words, 8 fp16x2 FMAs each) or 4 (one a
    word, 4 each: each fp16 sum rounds over fewer products); xf32 1 (32 float32 FMAs in one chain) or 4 (one a word).
    H200 run 11, 4 chains: h2 0.1-0.6 us a call slower at every GEMV of the 8B decode (tg128 271.5 against 272.2),
    xf32 unchanged; so both defaults stay (None).

    `sg` (0, 4, 8, 16 or 32): lanes of a warp whose sums may meet by subgroup xor shuffles (_store_rows,
    _norm_scale); 0 uses workgroup memory only. Right only on an adapter whose subgroups span runs of at least `sg`
    consecutive lanes (the plugin's edgellm.webgpu.subgroup_lanes; `--opt webgpu_subgroups`)."""
    from .._tvm import compiler

    T = compiler().T
    f32, u32 = "float32", "uint32"
    if in_f % 32:
        raise ValueError(f"int4_gemv_h2 needs `in` a multiple of 32, got {in_f}")
    norm = norm_eps is not None
    dw, dr, du, dk = h2_config(in_f, out_f, silu, bits, norm)
    W, R, U = warps or dw, rows or dr, unroll or du
    KS = ksplit or (dk if warps is None else 1)
    if W % KS:
        raise ValueError(f"int4_gemv_h2: warps ({W}) must be a multiple of ksplit ({KS})")
    WT = W // KS  # row teams a workgroup
    P = passes or gemv_passes(in_f, out_f, silu, (W, R, U), "h2")
    if P < 1:
        raise ValueError(f"int4_gemv_h2: passes {passes} (1 or more)")
    if bits not in (4, 8) or (bits == 8 and (norm or silu)):
        raise ValueError(f"int4_gemv_h2: bits 4 (with any fusion) or 8 (none), got {bits}")
    xf32 = h2_xf32(in_f, bits) and h2 if xf32 is None else xf32
    if xf32 and (bits != 4 or not h2):
        raise ValueError(f"int4_gemv_h2: xf32 needs 4-bit rows and h2=True (bits {bits}, h2 {h2})")
    CH = chains or (1 if xf32 else 2)
    if CH not in ((1, 4) if xf32 else (2, 4)):
        raise ValueError(f"int4_gemv_h2: chains {CH} (h2: 2 or 4; xf32: 1 or 4)")
    if silu and (R % 2 or out_f % 2 or bias):
        raise ValueError(f"int4_gemv_h2 with silu needs an even row count and out, no bias (rows {R}, out {out_f})")
    G = in_f // 32
    VW = bits // 4  # vec4<u32> loads per group and row
    words = in_f * bits // 32
    inter = out_f // 2
    R2 = R // 2 if silu else R  # output rows a warp
    n_out = inter if silu else out_f
    store_rows = _store_rows(R, R2, W, n_out, silu, bias, out_dtype, KS, sg)
    blocks = (n_out + WT * R2 * P - 1) // (WT * R2 * P)
    steps = (G + 32 * U * KS - 1) // (32 * U * KS)
    stage = (G * 4 + W * 32 - 1) // (W * 32)  # staging rounds: a thread stages one packed word's 8 activations
    norm_scale = _norm_scale(stage, W, G, in_f, norm_eps, x_dtype, sg)
    # the pair 32 + 7/32 as a vec2<f16> literal: naga's constant folding of unpack2x16float(0x50075007u) loses
    # the high half (lavapipe: the high lane was not subtracted)
    if bits == 4:
        base, sub, mask, mult = T.uint32(H2_BASE), T.Broadcast(T.float16(32 + 7 / 32), 2), 0x000F000F, 32
    else:
        base, sub, mask, mult = T.uint32(0x40004000), T.Broadcast(T.float16(2 + 128 / 512), 2), 0x00FF00FF, 512
    offset = float(2**23 + (7 if bits == 4 else 128))

    def src(j):  # pair j of a staged chunk of 8 activations: ((half, lane) of the low one, of the high one)
        return ((0, j), (1, j)) if bits == 4 else ((j // 2, j % 2), (j // 2, j % 2 + 2))

    def weight(j, c):  # pair j of chunk c: (word of the group's vec4s: index, lane), shift
        if bits == 4:
            return 0, c, 4 * j
        k = 2 * c + j // 2
        return k // 4, k % 4, 8 * (j % 2)

    def as_h2(v):  # u32 -> vec2<f16> (unpack2x16float: see the comment above)
        return T.Cast("float16x2", T.call_pure_extern("float32x2", "unpack2x16float", v))

    def team(bx, ty):  # the workgroup's row team of warp ty, as a global index
        return bx * W + ty if KS == 1 else bx * WT + ty // KS

    def group(ty, tx, it, u):  # the group lane tx of warp ty takes at step `it`, unrolled step u
        return (it * U + u) * 32 + tx if KS == 1 else ((it * U + u) * KS + ty % KS) * 32 + tx

    def row(bx, ty, r):  # weight row of warp row r (silu: gate rows, then the matching up rows)
        if silu:
            return T.min(team(bx, ty) * R2 + r % R2, inter - 1) + (r // R2) * inter
        return T.min(team(bx, ty) * R + r, out_f - 1)

    @T.macro
    def load(qw, qs, wdst, sdst, bx, ty, tx, it):  # step `it`'s weights and scales (lanes past G re-read group G-1)
        for u in T.unroll(U):
            for r in T.unroll(R):
                g = T.meta_var(T.min(group(ty, tx, it, u), G - 1))
                n = T.meta_var(row(bx, ty, r))
                for v in T.unroll(VW):
                    wdst[(u * R + r) * VW + v] = qw[n, T.Ramp(g * 4 * VW + 4 * v, 1, 4)]
                sdst[u * R + r] = T.Cast(f32, qs[n, g])

    def sum4(t4):  # xf32: the chains' sums
        return t4[0] if CH == 1 else (t4[0] + t4[1]) + (t4[2] + t4[3])

    def halves(hh):  # the fp16x2 accumulators' halves in float32, summed pairwise
        h = [T.Cast(f32, T.Shuffle([hh[k]], [0])) + T.Cast(f32, T.Shuffle([hh[k]], [1])) for k in range(CH)]
        while len(h) > 1:
            h = [h[k] + h[k + 1] for k in range(0, len(h), 2)]
        return h[0]

    def pair(a, b):  # two activations -> the u32 of their fp16 pair
        # pack2x16float, not bitcast<u32>(vec2<f16>): naga 0.32 has no size-changing bitcast (docs/tvm-notes.md);
        # exact for fp16 activations (the float32 twin's x is rounded to fp16 here)
        return T.call_pure_extern(u32, "pack2x16float", T.Cast("float32x2", T.Shuffle([a, b], [0, 1])))

    xs_len, xs_type = (G * 32, f32) if xf32 else (G * 16, u32)

    def w32(w, e, left):  # nibble e of w as the float32 1 + nib/16 (at the mantissa's bits 19..22)
        m = T.shift_left(w, T.Cast(u32, 19 - 4 * e)) if left else T.shift_right(w, T.Cast(u32, 4 * e - 19))
        return T.reinterpret(f32, T.bitwise_or(T.bitwise_and(m, T.uint32(0x00780000)), T.uint32(0x3F800000)))

    @T.macro
    def stage32(sv, xs, xq, i, e):  # xf32: staged word e = 4 g + q's 8 values (sv[8 i ..]) and their sum
        for h in T.unroll(2):
            for k in T.unroll(4):
                xs[(((e % 4) * 2 + h) * G + e // 4) * 4 + k] = sv[i * 8 + h * 4 + k]
        xq[(e % 4) * G + e // 4] = ((sv[i * 8] + sv[i * 8 + 1]) + (sv[i * 8 + 2] + sv[i * 8 + 3])) + (
            (sv[i * 8 + 4] + sv[i * 8 + 5]) + (sv[i * 8 + 6] + sv[i * 8 + 7]))

    @T.macro
    def body(x, dl, nw, qw, qs, b, out, xsum):
        bx = T.launch_thread("blockIdx.x", blocks)
        ty = T.launch_thread("threadIdx.y", W)
        tx = T.launch_thread("threadIdx.x", 32)
        xs = T.alloc_buffer((xs_len,), xs_type, scope="shared")
        xq = T.alloc_buffer((G * 4,), f32, scope="shared")  # xf32: each staged word's sum of its 8 values
        red = T.alloc_buffer((W * R * 32,), f32, scope="shared")
        red2 = T.alloc_buffer((W,), f32, scope="shared")  # norm: the warps' sums of squares
        acc = T.alloc_buffer((R,), f32, scope="local")
        wv = T.alloc_buffer((U * R * VW,), "uint32x4", scope="local")
        sc = T.alloc_buffer((U * R,), f32, scope="local")
        wn = T.alloc_buffer((U * R * VW,), "uint32x4", scope="local")  # the next step's, loaded before this one's math
        sn = T.alloc_buffer((U * R + 1,), f32, scope="local")  # [U R]: xf32's group sum of x
        xa = T.alloc_buffer((2,), x_dtype + "x4", scope="local")
        da = T.alloc_buffer((2,), x_dtype + "x4", scope="local")
        sv = T.alloc_buffer((max(stage, 1) * 8,), f32, scope="local")  # norm: s = x + delta of the thread's words
        xv = T.alloc_buffer((4,), "uint32x4", scope="local")
        xf = T.alloc_buffer((8,), "float32x4", scope="local")  # xf32: the group's 32 activations
        hh = T.alloc_buffer((CH,), "float16x2", scope="local")
        t4 = T.alloc_buffer((4,), f32, scope="local")  # xf32 with 4 chains: one sum a word
        tt = T.alloc_buffer((1,), f32, scope="local")
        load(qw, qs, wv, sc, bx * P, ty, tx, 0)  # the first weights in flight while x is staged
        if norm:
            norm_scale(x, dl, xsum, xa, da, sv, tt, red, red2, bx, ty, tx)
            for i in T.unroll(stage):
                e = T.meta_var((i * W + ty) * 32 + tx)
                if e < G * 4:
                    for h in T.unroll(2):
                        da[h] = nw[T.Ramp(e * 8 + 4 * h, 1, 4)]
                    if xf32:
                        for h in T.unroll(2):
                            for k in T.unroll(4):
                                sv[i * 8 + h * 4 + k] = T.Cast(f32, T.Cast(x_dtype, sv[i * 8 + h * 4 + k] * tt[0]
                                                                           * T.Cast(f32, T.Shuffle([da[h]], [k]))))
                        stage32(sv, xs, xq, i, e)
                    else:
                        for s4 in T.unroll(4):  # add_rms_norm_gpu's (s * rsqrt) * w, rounded to fp16
                            xs[((e % 4) * G + e // 4) * 4 + s4] = pair(
                                T.Cast(x_dtype, sv[i * 8 + s4] * tt[0] * T.Cast(f32, T.Shuffle([da[0]], [s4]))),
                                T.Cast(x_dtype, sv[i * 8 + 4 + s4] * tt[0] * T.Cast(f32, T.Shuffle([da[1]], [s4]))))
        else:
            for i in T.serial(stage):
                e = T.meta_var((i * W + ty) * 32 + tx)  # = 4 g + q: a warp reads 512 contiguous bytes of x
                if e < G * 4:
                    xa[0] = x[0, T.Ramp(e * 8, 1, 4)]
                    xa[1] = x[0, T.Ramp(e * 8 + 4, 1, 4)]
                    if xf32:
                        for h in T.unroll(2):
                            for k in T.unroll(4):
                                sv[h * 4 + k] = T.Cast(f32, T.Shuffle([xa[h]], [k]))
                        stage32(sv, xs, xq, 0, e)
                    else:
                        for s4 in T.unroll(4):  # chunk c = e % 4 of group g = e // 4: pair j at (c G + g) 4 + j
                            lo, hi = T.meta_var(src(s4))  # 4-bit: (x[8e + j], x[8e + j + 4]); 8-bit: see src
                            xs[((e % 4) * G + e // 4) * 4 + s4] = pair(T.Shuffle([xa[lo[0]]], [lo[1]]),
                                                                       T.Shuffle([xa[hi[0]]], [hi[1]]))
        T.tvm_storage_sync("shared")
        for p in T.serial(P):  # row blocks bx * P + p, on the x staged above
            if p > 0:
                load(qw, qs, wv, sc, bx * P + p, ty, tx, 0)
            for r in T.unroll(R):
                acc[r] = T.float32(0)
            for it in T.serial(steps):
                if it + 1 < steps:
                    load(qw, qs, wn, sn, bx * P + p, ty, tx, it + 1)
                for u in T.unroll(U):
                    g = T.meta_var(group(ty, tx, it, u))
                    if xf32:
                        if g < G:
                            for k in T.unroll(8):  # word q = k // 2, half k % 2
                                xf[k] = xs[T.Ramp((k * G + g) * 4, 1, 4)]
                            sn[U * R] = (xq[g] + xq[G + g]) + (xq[2 * G + g] + xq[3 * G + g])
                            for r in T.unroll(R):
                                for k in T.unroll(4):
                                    t4[k] = T.float32(0)
                                tt[0] = T.float32(0)
                                for q in T.unroll(4):
                                    for e in T.unroll(5):  # nibbles 0..4: shifted left, 5..7: right
                                        t4[q % CH] = t4[q % CH] + T.Shuffle([xf[q * 2 + e // 4]], [e % 4]) * w32(
                                            T.Shuffle([wv[u * R + r]], [q]), e, True)
                                    for e3 in T.unroll(3):
                                        t4[q % CH] = t4[q % CH] + T.Shuffle([xf[q * 2 + 1]], [e3 + 1]) * w32(
                                            T.Shuffle([wv[u * R + r]], [q]), e3 + 5, False)
                                tt[0] = sum4(t4)
                                acc[r] = acc[r] + (tt[0] - T.float32(1.4375) * sn[U * R]) * (sc[u * R + r] * T.float32(16))
                    else:
                        if g < G:
                            for q in T.unroll(4):
                                xv[q] = xs[T.Ramp((q * G + g) * 4, 1, 4)]
                            for r in T.unroll(R):
                                if h2:
                                    for k in T.unroll(CH):
                                        hh[k] = T.Broadcast(T.float16(0), 2)
                                    for q in T.unroll(4):
                                        for s in T.unroll(4):
                                            v, lane, shift = T.meta_var(weight(s, q))
                                            hh[(v * 4 + lane) % CH] = T.call_pure_extern("float16x2", "fma", as_h2(
                                                T.bitwise_or(T.bitwise_and(T.shift_right(T.Shuffle(
                                                    [wv[(u * R + r) * VW + v]], [lane]), T.Cast(u32, shift)),
                                                    T.uint32(mask)), base)) - sub, as_h2(T.Shuffle([xv[q]], [s])),
                                                hh[(v * 4 + lane) % CH])
                                    tt[0] = halves(hh)
                                    acc[r] = acc[r] + tt[0] * (sc[u * R + r] * T.float32(mult))
                                else:
                                    tt[0] = T.float32(0)
                                    for q in T.unroll(4):
                                        for s in T.unroll(4):
                                            v, lane, shift = T.meta_var(weight(s, q))
                                            for hi in T.unroll(2):
                                                tt[0] = tt[0] + T.Shuffle([T.call_pure_extern(
                                                    "float32x2", "unpack2x16float", T.Shuffle([xv[q]], [s]))], [hi]) * (
                                                    T.reinterpret(f32, T.bitwise_and(T.shift_right(T.Shuffle(
                                                        [wv[(u * R + r) * VW + v]], [lane]), T.Cast(u32, shift + 16 * hi)),
                                                        T.uint32(mask & 0xFFFF)) | T.uint32(0x4B000000))
                                                    - T.float32(offset))
                                    acc[r] = acc[r] + tt[0] * sc[u * R + r]
                if it + 1 < steps:
                    for k in T.unroll(U * R):
                        sc[k] = sn[k]
                    for k in T.unroll(U * R * VW):
                        wv[k] = wn[k]
            store_rows(red, acc, tt, out, b, bx * P + p, ty, tx)
            if P > 1 and _rows_in_shared(sg, KS):
                T.tvm_storage_sync("shared")  # `red` is written again by the next pass

    return _gemv_func(body, in_f, out_f, words, G, n_out, x_dtype, "float16", out_dtype, norm, bias)


# ---------------------------------------------------------------------------------------------------------------
# Decode GEMV with integer dot products (`--opt webgpu_gemv=dp4a`), the route of llama.cpp's GPU backends for
# Q4_0 decode (MMVQ with q8_1 activations), written for WGSL's `dot4I8Packed`:
#
# * x is quantized while it is staged in workgroup memory: per group of 32, d = max|x| / 127 and
#   q = round(x * (127 / max|x|)) (round half to even; all-zero groups give d = 0, q = 0). A staging thread takes
#   one packed word's 8 activations (4 threads a group, as int4_gemv_h2 stages), writes their max |x|, and after a
#   barrier reads its group's 4 maxima, rounds its 8 values and packs them four a word with `pack4xI8` in the nibble
#   order of the weights: (elements 0, 2, 4, 6 of the word, elements 1, 3, 5, 7), because `w & 0x0F0F0F0F` and
#   `(w >> 4) & 0x0F0F0F0F` spread packed word k's 8 nibbles to those bytes (nibbles are 0..15: positive as int8).
#   Beside the words: d per group and 7 * sum(q) per word (the first version, one thread a group, serialised 32
#   values a thread: the 8B qkv with the norm took 20 us against h2's 14).
# * per group and row: 4 packed words (one 16-byte load) -> 8 masked words -> 8 `dot4I8Packed` against the staged
#   words (four 8-byte workgroup loads shared by the lane's rows): sum(nib * q) exact in i32 (|.| <= 15 * 127 *
#   32), minus 7 * sum(q) removes the offset, then one float FMA with (weight scale * d). About 1 instruction a
#   weight where int4_gemv_h2 needs ~3 (shift, mask, or, the f16 <-> f32 round trip of naga's unpack2x16float, FMA).
# * the schedule is int4_gemv_h2's: a lane owns a group a step, the next step's weights double-buffered in
#   registers, one barrier before the rows' 32-value sums; the norm (staged) and silu (epilogue) fusions the same.
# The arithmetic differs from the float kernels: each activation is rounded to 8 bits within its group
# (|error| <= d / 2), so an output is off the float GEMV by at most sum over i of |w_i| d_g(i) / 2; tests check both
# that bound and a numpy model of exactly this arithmetic (tests/test_webgpu_dp4a.py).
# WGSL: `dot4I8Packed` and `pack4xI8` are the `packed_4x8_integer_dot_product` language extension, which wgpu 0.32's
# naga accepts without an `enable` (checked on lavapipe); naga emits SPIR-V's OpSDot where the device has the
# integer dot-product capability (Vulkan 1.3 core, VK_KHR_shader_integer_dot_product) and a polyfill of shifts,
# sign extensions and multiply-adds otherwise.
# ---------------------------------------------------------------------------------------------------------------
def dp4a_config(in_f: int, out_f: int, silu: bool = False) -> tuple[int, int, int]:
    """(warps, rows, unroll) of int4_gemv_dp4a: h2_config's. H200, in the 8B decode (profiled, run 9 in
    docs/benchmarks/vulkan-h200.md), h2_config's against the 8 warps x 2 rows x 2 groups (8 x 4 x 1 with silu) that
    the kernels alone had picked (run 8): qkv with the norm 12.2 against 14.3 us a call, o 9.3 against 10.6,
    gate_up with the norm and silu 30.3 against 31.4, down equal (25.7). One group a lane a step at `in` <= 4096
    (run 9's: h2_config's 4 groups a step there, run 10, were not measured with this kernel)."""
    w, r, u, _ = h2_config(in_f, out_f, silu)
    return w, r, (1 if in_f <= 4096 else u)


def gemv_passes(in_f: int, out_f: int, silu: bool, config: tuple[int, int, int], kernel: str) -> int:
    """Row blocks a workgroup of int4_gemv_dp4a / int4_gemv_h2 (`kernel`) computes one after the other on the x it
    staged (and normed) once; only dp4a's gate_up (silu) takes more than 1: 4 while that leaves at least 256
    workgroups, else 2 while it leaves 256, else 1. H200, 8B tg128 with the step queued ahead (runs 16, 17, 19
    and 20 in docs/benchmarks/vulkan-h200.md): dp4a gate_up at 1 / 2 / 3 / 4 / 6 / 8 passes (1,792 ... 224
    workgroups) 400.6-402.6 / 402.3 / 394.2 / 410.1-411.8 / 401.9 / 398.9 tok/s, 4 ahead of 1 whichever ran first
    in the call; qkv and o at 2 passes 391.0 (lost). h2 (the `kernel` argument): gate_up at 2 passes 342.8 and
    342.6 as a variant timed after the default build (338.7-339.2 at 1), but 338.6 as run 20's default build, so
    the gain was the call's order, not the kernel: h2 stays at 1 (4 passes: 332.5). The 1B's dp4a at 4 against
    1: 1,179 against 1,188 (its host-bound noise)."""
    warps, rows, _ = config
    if not silu or kernel != "dp4a":
        return 1
    blocks = -(-(out_f // 2) // (warps * rows // 2))
    for p in (4, 2):
        if blocks // p >= 256:
            return p
    return 1


def dp4a_group_staging(in_f: int, norm: bool) -> bool:
    """int4_gemv_dp4a's default staging: one thread a group for a plain GEMV with `in` over 4096, else four."""
    return not norm and in_f > 4096


DP4A_ACT_GROUPS = (8, 32)  # activations a d of int4_gemv_dp4a covers: 8 (a packed word's) or 32 (a group's)


def dp4a_shared_bytes(in_f: int, out_f: int, norm: bool = False, act_group: int = 8) -> int:
    """Workgroup memory of int4_gemv_dp4a with its default staging: the staged int8 x (in_f bytes), per group its
    d and 7 * sum(q) (four of each with a d per packed word, act_group 8; with a d per group, one d and either one
    sum (one staging thread a group) or four partial maxima and four partial sums (four)), the lanes' partial sums
    (at most 32 rows a workgroup: 4 KiB). The 8B's down (14336) with a d per group needs 22,016 bytes with one
    thread a group, 34,560 with four: over the vulkan preset's 32 KiB (run 8's final kernel fell back to
    int4_gemv_h2 there); with a d per word 32,768 with one thread a group, exactly the preset's 32 KiB, and the
    norm-fused kernel (four threads a group) does not fit there."""
    if act_group == 8:  # four staging threads a group also keep one float of `amx`; the norm its warps' sums
        return in_f + in_f // 32 * 32 + 32 * 32 * 4 + (0 if dp4a_group_staging(in_f, norm) else 4) + (128 if norm else 0)
    return in_f + in_f // 32 * (8 if dp4a_group_staging(in_f, norm) else 36) + 32 * 32 * 4


def dp4a_supports(in_f: int, out_f: int, x_dtype: str, scale_dtype: str, out_dtype: str, target=None,
                  norm: bool = False, act_group: int = 8) -> bool:
    """Whole groups, float16 or float32 activations / scales / output, staged x within workgroup memory (`norm`:
    the norm-fused kernel's)."""
    limit = int(target.attrs.get("max_shared_memory_per_block", 16384)) if target is not None else 16384
    floats = ("float16", "float32")
    return in_f % 32 == 0 and x_dtype in floats and scale_dtype in floats and out_dtype in floats \
        and dp4a_shared_bytes(in_f, out_f, norm, act_group) <= limit


def int4_gemv_dp4a(in_f: int, out_f: int, bias: bool, warps: int | None = None, rows: int | None = None,
                   unroll: int | None = None, x_dtype: str = "float16", scale_dtype: str = "float16",
                   out_dtype: str = "float16", norm_eps: float | None = None, silu: bool = False,
                   stage_threads: int | None = None, passes: int | None = None, sg: int = 0, act_group: int = 8):
    """Decode GEMV for packed INT4 weights on the q4f16_1 grid (nibble - 7, a scale per group of 32) with int8
    activations and `dot4I8Packed` (see the comment above); arguments and fusions as int4_gemv_h2 (x, [delta,
    norm weight], q_weight, q_scale, [bias], out, [x + delta]).

    stage_threads: threads that quantize one group of 32 activations while x is staged. 4 (each 8 activations,
    the group's maximum met in workgroup memory, one more barrier; x staged as four 8-byte words and four partial
    sums a group); 1 (one thread the whole group, x staged as two 16-byte words and one sum a group; no norm
    fusion). Default (dp4a_group_staging): 1 for a plain GEMV with `in` over 4096, where four do not fit 32 KiB at
    the 8B's down (14336 -> 4096; H200 run 9: 22.3 us a call in the decode against h2's 25.7, and 23.8 with four
    threads where the adapter's 48 KiB allowed them); else 4 (the norm-fused qkv 14.3 us against 20.0 with one,
    H200 run 8).

    passes: row blocks a workgroup computes one after the other on the x it staged once (gemv_passes by default):
    fewer workgroups, each paying the staging (and the norm) once for `passes` blocks of rows.

    sg: as int4_gemv_h2's; with sg >= 4 the four staging threads of a group also meet its maximum by xor shuffles
    (no workgroup memory for it, one barrier less).

    act_group: activations one int8 scale d covers. 8 (default): a d per packed word, as the CPU int8 kernels'
    act_group 8 (docs/fidelity.md: on SmolLM2 with the file's weights, per 8 keeps 97.9% top-1 of the fp32
    activations' answers, per 32 96.4%); a staging thread's own maximum, so four staging threads need not meet; per
    group and row four integer sums, each times its d, then one FMA with the scale. 32: a d per group of 32
    (llama.cpp's Q8_1 activations), one integer sum and one FMA per group and row."""
    from .._tvm import compiler

    T = compiler().T
    f32, u32, i32 = "float32", "uint32", "int32"
    if in_f % 32:
        raise ValueError(f"int4_gemv_dp4a needs `in` a multiple of 32, got {in_f}")
    if act_group not in DP4A_ACT_GROUPS:
        raise ValueError(f"int4_gemv_dp4a: act_group {act_group} (one of {DP4A_ACT_GROUPS})")
    per_word = act_group == 8

    norm = norm_eps is not None
    group_staging = (stage_threads or (1 if dp4a_group_staging(in_f, norm) else 4)) == 1
    if stage_threads not in (None, 1, 4) or (group_staging and norm):
        raise ValueError(f"int4_gemv_dp4a: stage_threads {stage_threads} (1 or 4; 1 without the norm fusion)")
    dw, dr, du = dp4a_config(in_f, out_f, silu)
    W, R, U = warps or dw, rows or dr, unroll or du
    P = passes or gemv_passes(in_f, out_f, silu, (W, R, U), "dp4a")
    if P < 1:
        raise ValueError(f"int4_gemv_dp4a: passes {passes} (1 or more)")
    if silu and (R % 2 or out_f % 2 or bias):
        raise ValueError(f"int4_gemv_dp4a with silu needs an even row count and out, no bias (rows {R}, out {out_f})")
    G = in_f // 32
    words = in_f // 8
    inter = out_f // 2
    R2 = R // 2 if silu else R
    n_out = inter if silu else out_f
    KS = 1  # one warp a row team (int4_gemv_h2's ksplit is not offered here)
    store_rows = _store_rows(R, R2, W, n_out, silu, bias, out_dtype, KS, sg)
    blocks = (n_out + W * R2 * P - 1) // (W * R2 * P)
    steps = (G + 32 * U - 1) // (32 * U)
    stage = (G * 4 + W * 32 - 1) // (W * 32)  # staging rounds: a thread stages one packed word's 8 activations
    norm_scale = _norm_scale(stage, W, G, in_f, norm_eps, x_dtype, sg)
    stage1 = (G + W * 32 - 1) // (W * 32)  # group staging: a thread stages one group's 32 activations
    lo_mask = T.uint32(0x0F0F0F0F)

    def row(bx, ty, r):  # weight row of warp row r (silu: gate rows, then the matching up rows)
        if silu:
            return T.min((bx * W + ty) * R2 + r % R2, inter - 1) + (r // R2) * inter
        return T.min((bx * W + ty) * R + r, out_f - 1)

    @T.macro
    def load(qw, qs, wdst, sdst, bx, ty, tx, it):  # step `it`'s weights and scales (lanes past G re-read group G-1)
        for u in T.unroll(U):
            for r in T.unroll(R):
                g = T.meta_var(T.min((it * U + u) * 32 + tx, G - 1))
                n = T.meta_var(row(bx, ty, r))
                wdst[u * R + r] = qw[n, T.Ramp(g * 4, 1, 4)]
                sdst[u * R + r] = T.Cast(f32, qs[n, g])

    def i8x4(a, b, c, d):  # four rounded floats -> their int8s packed in a u32 (pack4xI8 keeps the low 8 bits)
        return T.call_pure_extern(u32, "pack4xI8", T.Shuffle(
            [T.Cast(i32, a), T.Cast(i32, b), T.Cast(i32, c), T.Cast(i32, d)], [0, 1, 2, 3]))

    shfl_max = sg >= 4 and not per_word  # a group's 4 staging threads (consecutive lanes) meet its max by shuffles

    @T.macro
    def partial_max(sv, amx, gm, tt, ty, tx):  # each staging thread's max |x| over its 8 activations
        for i in T.unroll(stage):
            e = T.meta_var((i * W + ty) * 32 + tx)
            if shfl_max:  # the group's max in every one of its 4 lanes (gm[i]); the shuffles outside the branch
                gm[i] = T.float32(0)
                if e < G * 4:
                    for k in T.unroll(8):
                        gm[i] = T.max(gm[i], T.fabs(sv[i * 8 + k]))
                for k in T.unroll(2):
                    gm[i] = T.max(gm[i], _shfl_xor(T, gm[i], k, 4))
            else:
                if e < G * 4:
                    tt[0] = T.float32(0)
                    for k in T.unroll(8):
                        tt[0] = T.max(tt[0], T.fabs(sv[i * 8 + k]))
                    amx[e] = tt[0]

    @T.macro
    def quantize(sv, amx, gm, tt, iz, xs, xd, xz, ty, tx):  # after a barrier: the group's max from its 4 threads
        for i in T.unroll(stage):
            e = T.meta_var((i * W + ty) * 32 + tx)  # = 4 g + q: packed word q of group g
            if e < G * 4:
                if per_word:  # the thread's own 8 activations: its word's d
                    tt[0] = T.float32(0)
                    for k in T.unroll(8):
                        tt[0] = T.max(tt[0], T.fabs(sv[i * 8 + k]))
                    xd[(e % 4) * G + e // 4] = tt[0] * T.float32(1 / 127)
                else:
                    if shfl_max:
                        tt[0] = gm[i]
                    else:
                        tt[0] = T.max(T.max(amx[e // 4 * 4], amx[e // 4 * 4 + 1]), T.max(amx[e // 4 * 4 + 2],
                                                                                     amx[e // 4 * 4 + 3]))
                    if e % 4 == 0:
                        xd[e // 4] = tt[0] * T.float32(1 / 127)
                tt[0] = T.if_then_else(tt[0] > T.float32(0), T.float32(127) / tt[0], T.float32(0))
                iz[0] = T.int32(0)
                for k in T.unroll(8):
                    sv[i * 8 + k] = T.round(sv[i * 8 + k] * tt[0])
                    iz[0] = iz[0] + T.Cast(i32, sv[i * 8 + k])
                # word q of the group's staged pairs: (elements 0, 2, 4, 6 of packed word q, elements 1, 3, 5, 7)
                xs[(e % 4) * G + e // 4] = T.Shuffle([i8x4(*[sv[i * 8 + h + 2 * j] for j in range(4)])
                                                      for h in range(2)], [0, 1])
                xz[(e % 4) * G + e // 4] = iz[0] * 7

    @T.macro
    def quantize_group(hv, am, iz, xs, xd, xz, g):  # one group's 32 activations hv (as f32) -> staged int8
        for w in T.unroll(32 // act_group):  # each act group (per_word: packed word w): its d, 7 * sum(q) at [w][g]
            am[0] = T.float32(0)
            for k in T.unroll(act_group):
                am[0] = T.max(am[0], T.fabs(hv[act_group * w + k]))
            am[1] = T.if_then_else(am[0] > T.float32(0), T.float32(127) / am[0], T.float32(0))
            iz[0] = T.int32(0)
            for k in T.unroll(act_group):
                hv[act_group * w + k] = T.round(hv[act_group * w + k] * am[1])
                iz[0] = iz[0] + T.Cast(i32, hv[act_group * w + k])
            xd[w * G + g] = am[0] * T.float32(1 / 127)
            xz[w * G + g] = iz[0] * 7
        for c in T.unroll(2):  # staged word 4c + j: packed word 2c + j // 2, its even (j even) or odd elements
            xs[c * G + g] = T.Shuffle([i8x4(*[hv[8 * (2 * c + j // 2) + j % 2 + 2 * e] for e in range(4)])
                                       for j in range(4)], [0, 1, 2, 3])

    # staged entries of x a group (NW) and 7 * sum(q) entries a group (NZ): one staging thread a group stores two
    # 16-byte words (uint32x4) and one sum, four store four 8-byte words (uint32x2) and four sums
    NW, NZ = (2, 1) if group_staging else (4, 4)
    ND = 4 if per_word else 1  # d entries a group
    if per_word:
        NZ = 4  # 7 * sum(q) a word

    def x_half(xv, k, h):  # the staged int8s that weight word k's nibbles h (0: low, 1: high) meet
        return T.Shuffle([xv[k // 2]], [(k % 2) * 2 + h]) if group_staging else T.Shuffle([xv[k]], [h])

    @T.macro
    def row_passes(qw, qs, wv, sc, wn, sn, acc, xv, xs, xd, xz, isum, tt, red, out, b, bx, ty, tx, dv, zv):
        for p in T.serial(P):  # row blocks bx * P + p, on the x staged before
            if p > 0:
                load(qw, qs, wv, sc, bx * P + p, ty, tx, 0)
            for r in T.unroll(R):
                acc[r] = T.float32(0)
            for it in T.serial(steps):
                if it + 1 < steps:
                    load(qw, qs, wn, sn, bx * P + p, ty, tx, it + 1)
                for u in T.unroll(U):
                    g = T.meta_var((it * U + u) * 32 + tx)
                    if g < G:
                        for c in T.unroll(NW):
                            xv[c] = xs[c * G + g]
                        if per_word:  # four words, each its integer sum times its d, then the scale
                            for k in T.unroll(4):
                                dv[k] = xd[k * G + g]
                                zv[k] = xz[k * G + g]
                            for r in T.unroll(R):
                                tt[0] = T.float32(0)
                                for k in T.unroll(4):
                                    wk = T.meta_var(T.Shuffle([wv[u * R + r]], [k]))
                                    isum[0] = T.call_pure_extern(
                                        i32, "dot4I8Packed", T.bitwise_and(wk, lo_mask), x_half(xv, k, 0)) \
                                        + T.call_pure_extern(i32, "dot4I8Packed", T.bitwise_and(
                                            T.shift_right(wk, T.uint32(4)), lo_mask), x_half(xv, k, 1)) - zv[k]
                                    tt[0] = tt[0] + T.Cast(f32, isum[0]) * dv[k]
                                acc[r] = acc[r] + tt[0] * sc[u * R + r]
                        else:  # one integer sum a group, one FMA with (scale x d)
                            tt[0] = xd[g]
                            iz = T.meta_var(xz[g] if NZ == 1 else (xz[g] + xz[G + g]) + (xz[2 * G + g]
                                                                                         + xz[3 * G + g]))
                            for r in T.unroll(R):
                                isum[0] = T.int32(0) - iz
                                for k in T.unroll(4):
                                    wk = T.meta_var(T.Shuffle([wv[u * R + r]], [k]))
                                    isum[0] = isum[0] + T.call_pure_extern(
                                        i32, "dot4I8Packed", T.bitwise_and(wk, lo_mask), x_half(xv, k, 0)) \
                                        + T.call_pure_extern(i32, "dot4I8Packed", T.bitwise_and(
                                            T.shift_right(wk, T.uint32(4)), lo_mask), x_half(xv, k, 1))
                                acc[r] = acc[r] + T.Cast(f32, isum[0]) * (sc[u * R + r] * tt[0])
                if it + 1 < steps:
                    for k in T.unroll(U * R):
                        sc[k] = sn[k]
                        wv[k] = wn[k]
            store_rows(red, acc, tt, out, b, bx * P + p, ty, tx)
            if P > 1 and _rows_in_shared(sg, KS):
                T.tvm_storage_sync("shared")  # `red` is written again by the next pass

    @T.macro
    def body_group(x, qw, qs, b, out):  # stage_threads 1 (no norm): x as [half][group] 16-byte words
        bx = T.launch_thread("blockIdx.x", blocks)
        ty = T.launch_thread("threadIdx.y", W)
        tx = T.launch_thread("threadIdx.x", 32)
        xs = T.alloc_buffer((G * 2,), "uint32x4", scope="shared")  # [half c][group]: 4 words, one 16-byte load
        xd = T.alloc_buffer((G * ND,), f32, scope="shared")  # per_word: [word][group]
        xz = T.alloc_buffer((G * ND,), i32, scope="shared")  # 7 * sum of the group's (per_word: word's) int8s
        red = T.alloc_buffer((W * R * 32,), f32, scope="shared")
        acc = T.alloc_buffer((R,), f32, scope="local")
        wv = T.alloc_buffer((U * R,), "uint32x4", scope="local")
        sc = T.alloc_buffer((U * R,), f32, scope="local")
        wn = T.alloc_buffer((U * R,), "uint32x4", scope="local")
        sn = T.alloc_buffer((U * R,), f32, scope="local")
        xa = T.alloc_buffer((8,), x_dtype + "x4", scope="local")
        hv = T.alloc_buffer((32,), f32, scope="local")
        am = T.alloc_buffer((2,), f32, scope="local")
        xv = T.alloc_buffer((2,), "uint32x4", scope="local")
        isum = T.alloc_buffer((1,), i32, scope="local")
        tt = T.alloc_buffer((1,), f32, scope="local")
        dv = T.alloc_buffer((4,), f32, scope="local")  # per_word: a group's four d
        zv = T.alloc_buffer((4,), i32, scope="local")  # per_word: its four 7 * sum(q)
        load(qw, qs, wv, sc, bx * P, ty, tx, 0)  # the first weights in flight while x is staged
        for i in T.serial(stage1):
            g = T.meta_var((i * W + ty) * 32 + tx)  # a warp reads 32 groups: 2 KiB of contiguous x
            if g < G:
                for h in T.unroll(8):
                    xa[h] = x[0, T.Ramp(g * 32 + 4 * h, 1, 4)]
                    for k in T.unroll(4):
                        hv[h * 4 + k] = T.Cast(f32, T.Shuffle([xa[h]], [k]))
                quantize_group(hv, am, isum, xs, xd, xz, g)
        T.tvm_storage_sync("shared")
        row_passes(qw, qs, wv, sc, wn, sn, acc, xv, xs, xd, xz, isum, tt, red, out, b, bx, ty, tx, dv, zv)

    @T.macro
    def body_plain(x, dl, nw, qw, qs, b, out, xsum):
        body_group(x, qw, qs, b, out)

    @T.macro
    def body(x, dl, nw, qw, qs, b, out, xsum):
        bx = T.launch_thread("blockIdx.x", blocks)
        ty = T.launch_thread("threadIdx.y", W)
        tx = T.launch_thread("threadIdx.x", 32)
        xs = T.alloc_buffer((G * 4,), "uint32x2", scope="shared")  # [word q][group]: the q-th 8 activations
        xd = T.alloc_buffer((G * ND,), f32, scope="shared")  # d per group (per_word: [word q][group])
        xz = T.alloc_buffer((G * 4,), i32, scope="shared")  # [word q][group]: 7 * sum of its 8 int8s
        amx = T.alloc_buffer((1 if shfl_max or per_word else G * 4,), f32, scope="shared")  # staging threads' max
        gm = T.alloc_buffer((stage,), f32, scope="local")  # shfl_max: the group's max |x| a staging round
        red = T.alloc_buffer((W * R * 32,), f32, scope="shared")
        red2 = T.alloc_buffer((W,), f32, scope="shared")  # norm: the warps' sums of squares
        acc = T.alloc_buffer((R,), f32, scope="local")
        wv = T.alloc_buffer((U * R,), "uint32x4", scope="local")
        sc = T.alloc_buffer((U * R,), f32, scope="local")
        wn = T.alloc_buffer((U * R,), "uint32x4", scope="local")
        sn = T.alloc_buffer((U * R,), f32, scope="local")
        xa = T.alloc_buffer((2,), x_dtype + "x4", scope="local")
        da = T.alloc_buffer((2,), x_dtype + "x4", scope="local")
        sv = T.alloc_buffer((stage * 8,), f32, scope="local")  # the thread's activations (norm: s, then the norm)
        xv = T.alloc_buffer((4,), "uint32x2", scope="local")
        isum = T.alloc_buffer((1,), i32, scope="local")
        tt = T.alloc_buffer((1,), f32, scope="local")
        dv = T.alloc_buffer((4,), f32, scope="local")  # per_word: a group's four d
        zv = T.alloc_buffer((4,), i32, scope="local")  # per_word: its four 7 * sum(q)
        load(qw, qs, wv, sc, bx * P, ty, tx, 0)  # the first weights in flight while x is staged
        if norm:
            norm_scale(x, dl, xsum, xa, da, sv, tt, red, red2, bx, ty, tx)
            for i in T.unroll(stage):
                e = T.meta_var((i * W + ty) * 32 + tx)
                if e < G * 4:
                    for h in T.unroll(2):
                        da[h] = nw[T.Ramp(e * 8 + 4 * h, 1, 4)]
                        for k in T.unroll(4):  # add_rms_norm_gpu's (s * rsqrt) * w, rounded to the activation type
                            sv[i * 8 + h * 4 + k] = T.Cast(f32, T.Cast(x_dtype, sv[i * 8 + h * 4 + k] * tt[0]
                                                                       * T.Cast(f32, T.Shuffle([da[h]], [k]))))
        else:
            for i in T.unroll(stage):
                e = T.meta_var((i * W + ty) * 32 + tx)  # = 4 g + q: a warp reads 512 contiguous bytes of fp16 x
                if e < G * 4:
                    for h in T.unroll(2):
                        xa[h] = x[0, T.Ramp(e * 8 + 4 * h, 1, 4)]
                        for k in T.unroll(4):
                            sv[i * 8 + h * 4 + k] = T.Cast(f32, T.Shuffle([xa[h]], [k]))
        if not per_word:  # the group's maximum: its four staging threads meet
            partial_max(sv, amx, gm, tt, ty, tx)
            if not shfl_max:
                T.tvm_storage_sync("shared")
        quantize(sv, amx, gm, tt, isum, xs, xd, xz, ty, tx)
        T.tvm_storage_sync("shared")
        row_passes(qw, qs, wv, sc, wn, sn, acc, xv, xs, xd, xz, isum, tt, red, out, b, bx, ty, tx, dv, zv)

    return _gemv_func(body_plain if group_staging else body, in_f, out_f, words, G, n_out, x_dtype, scale_dtype,
                      out_dtype, norm, bias)
