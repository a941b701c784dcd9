"""GPU schedules (CUDA, Metal, OpenCL) for edgellm's own kernels (PrimFuncs carrying `edgellm.kernel`)."""

from __future__ import annotations

from .._tvm import compiler
from .schedule_cpu import _done, _has_block, _open


def _max_threads(target) -> int:
    return int(target.attrs.get("max_num_threads", target.attrs.get("max_threads_per_block", 256)))


def schedule_gpu_linear(func, target, gemv: bool):
    """GPU linear. GEMV: a block holds a few output features, one warp-wide cross-lane reduction each, every lane
    reading whole packed words. GEMM: a 2-D grid of row x feature tiles, one output per thread.
    Correct on every GPU kind; the fast Hopper/Ampere paths belong to the [gpu] work."""
    sch = _open(func, inline_dequant=True)
    has_epilogue = _has_block(sch, "epilogue")
    y = sch.get_sblock("matmul")
    i, n, k = sch.get_loops(y)
    if gemv:
        # rows_per_block x lanes threads; lane l of a row reads `per` consecutive elements (one packed word),
        # so a warp streams lanes*per contiguous weights per step; the row's sum is a cross-lane allreduce.
        lanes = min(32, _max_threads(target))
        rows = max(1, min(4, _max_threads(target) // lanes))
        per = 8
        no, ni = sch.split(n, [None, rows])
        ko, kl, kin = sch.split(k, [None, lanes, per])
        sch.reorder(no, ni, kl, ko, kin)
        sch.bind(no, "blockIdx.x")
        sch.bind(ni, "threadIdx.y")
        sch.bind(kl, "threadIdx.x")
        out_loop = ni  # one output feature per (warp) thread row
    else:
        ty, tx = 4, min(64, _max_threads(target) // 4)
        bi, ti = sch.split(i, [None, ty])
        bn, tn = sch.split(n, [None, tx])
        sch.reorder(bi, bn, ti, tn, k)
        sch.bind(bi, "blockIdx.y")
        sch.bind(bn, "blockIdx.x")
        sch.bind(ti, "threadIdx.y")
        sch.bind(tn, "threadIdx.x")
        out_loop = tn  # one output per thread
    if has_epilogue:  # cast/bias per output where it is computed; the fp32 accumulator stays in registers
        sch.reverse_compute_at(sch.get_sblock("epilogue"), out_loop)
        sch.set_scope(y, 0, "local")
    return _done(sch)


def schedule_gpu_tiled_gemm(func, target, tm: int = 4, tn_: int = 4):
    """Prefill GEMM (CUDA): a block computes a BM x BN output tile with TM x TN outputs per thread (fp32 registers);
    per K step of BK it stages the activation tile (BM x BK) and the weight tile (BN x BK, INT4 decoded once
    into float32 by the whole block: each thread decodes whole packed words) in shared memory, rows padded by one
    word against bank conflicts. SIMT FMA, no tensor cores."""
    bm_t, bn_t, bk = 16, 16, 32  # threads (rows x features), K step; tm x tn_ outputs per thread
    sch = _open(func, inline_dequant=False)
    has_epilogue, has_dequant = _has_block(sch, "epilogue"), _has_block(sch, "dequant")
    y = sch.get_sblock("matmul")
    i, n, k = sch.get_loops(y)
    if int(sch.get(k).extent) % bk or int(sch.get(n).extent) % (bn_t * tn_):
        return None
    # the row count is symbolic: pad the computation to whole tiles (padded rows read 0 and are never stored), so
    # the shared/local tiles have constant sizes
    sch.pad_einsum(y, [bm_t * tm, bn_t * tn_, bk])
    x_pad, out_pad = sch.get_sblock("x_pad"), sch.get_consumers(y)[0]  # x padded to whole tiles; the copy back
    i, n, k = sch.get_loops(y)
    bi, ti, mi = sch.split(i, [None, bm_t, tm])
    bn, tj, ni = sch.split(n, [None, bn_t, tn_])
    ko, ki = sch.split(k, [None, bk])
    sch.reorder(bi, bn, ti, tj, ko, ki, mi, ni)
    sch.bind(bn, "blockIdx.x")
    sch.bind(bi, "blockIdx.y")
    sch.bind(ti, "threadIdx.y")
    sch.bind(tj, "threadIdx.x")
    sch.set_scope(y, 0, "local")  # the accumulators
    if has_epilogue:  # cast/bias reads the accumulators directly; rows past the real count are never stored
        sch.compute_inline(out_pad)
        sch.reverse_compute_at(sch.get_sblock("epilogue"), tj)
    else:
        sch.reverse_compute_at(out_pad, tj)

    def stage(block):  # a tile staged in shared memory by the whole block, one element per thread per step
        sch.set_scope(block, 0, "shared")  # before compute_at, so the region covers the whole block's tile
        sch.compute_at(block, ko)
        sch.storage_align(block, 0, axis=0, factor=32, offset=1)
        return sch.get_loops(block)[-2:]

    r, c = stage(x_pad)
    _, ty_, tx_ = sch.split(sch.fuse(r, c), [None, bm_t, bn_t])
    sch.bind(ty_, "threadIdx.y")
    sch.bind(tx_, "threadIdx.x")
    if has_dequant:  # weight tile decoded into shared memory: a thread decodes one packed word (8 weights)
        dn, dk = stage(sch.get_sblock("dequant"))
        dko, dki = sch.split(dk, [None, 8])
        _, ty_, tx_ = sch.split(sch.fuse(dn, dko), [None, bm_t, bn_t])
        sch.unroll(dki)
    else:
        r, c = stage(sch.cache_read(y, 1, "shared"))
        _, ty_, tx_ = sch.split(sch.fuse(r, c), [None, bm_t, bn_t])
    sch.bind(ty_, "threadIdx.y")
    sch.bind(tx_, "threadIdx.x")
    sch.decompose_reduction(y, ko)
    sch.unroll(ki)
    sch.unroll(mi)
    sch.unroll(ni)
    return _done(sch)


def h2_gemv_config(in_f: int, out_f: int) -> tuple[int, int, int, int]:
    """(warps, rows, unroll, ksplit) of int4_gemv_h2 for a shape. H100, Llama-3-8B shapes, weights from HBM, runs 3
    and 4 of docs/benchmarks/h100-gemv.json (TE kernel -> this pick, us): a long `in` (down, 14336) with 4 rows a
    team and `in` split over 2 warps (17.0 -> 14.7); many rows (gate_up, lm_head) with 4 rows a warp and no split
    (28.9 -> 25.2, 113 -> 98: 89% and 100% of the copy bandwidth); the short ones (qkv, o) with a 2-warp split
    (one guarded step, 2 groups a lane: 8.7 -> 7.6, 6.9 -> 5.8). A short `in` (< 128 groups) gets one group a lane
    per step and no split. The load fence (int4_gemv_h2's `fence`) swung single configs by up to 25% either way
    (ptxas's scheduling); these picks are measured with it."""
    groups = in_f // 32
    if in_f >= 8192 and out_f >= 4096:
        return 8, 4, 2, 2
    if in_f >= 8192:  # fewer rows (Llama-3.2-1B down, 8192 -> 2048: 7.05 us vs 7.65 above, TE 7.55)
        return 4, 2, 2, 1
    if out_f >= 16384:
        return 4, 4, 2, 1
    if groups >= 128:
        return 8, 2, 4, 2
    return 4, 2, 1, 1


def _sm(target) -> int:
    arch = str(target.attrs.get("arch", ""))
    return int(arch[3:]) if arch.startswith("sm_") and arch[3:].isdigit() else 0


def schedule_gpu_int4_gemv(func, target, warps: int | None = None, rows: int | None = None, x_vector: int = 8,
                           unroll_steps: bool = True, lanes: int = 32):
    """Decode GEMV for packed INT4 weights (kernels/cuda_gemv.py). Lane l of a warp owns whole groups: per step it
    loads one group's 4 packed words (one 16-byte load), 32 activations (`x_vector`-wide loads, cast once to float32
    and shared by the warp's `rows` rows), and the group's scale; a warp streams 512 contiguous weight bytes per row
    per step. The lane partials meet in a warp allreduce; `warps` warps per block. WebGPU calls it with 4-wide x
    loads (WGSL vectors stop at 4) and the steps left rolled (kernels/webgpu_linear.py)."""
    sch = compiler().s_tir.Schedule(func)
    has_epilogue = _has_block(sch, "epilogue")
    acc, dot, xf = sch.get_sblock("matmul"), sch.get_sblock("group_dot"), sch.get_sblock("x_f32")
    i, n, g = sch.get_loops(acc)
    out_f, groups = int(sch.get(n).extent), int(sch.get(g).extent)
    if warps is None and rows is None:
        # two rows per warp share each activation load and cast; 8 warps a block where the grid still has >= 256
        # blocks. H200, Llama-3-8B shapes (docs/benchmarks/h100.md): 8x2 was best or tied at every shape, and
        # 14336 -> 4096 went 18.4 -> 15.4 us against 4x2; 4x1 and 8x1 were 10-25% slower than 4x2.
        warps = 8 if out_f % 16 == 0 and out_f // 16 >= 256 else 4
        rows = 2 if out_f % (warps * 2) == 0 and out_f // (warps * 2) >= 256 else 1
    warps, rows = warps or 4, rows or 1
    lanes = min(lanes, max(8, 1 << (groups - 1).bit_length()))  # small `in`: fewer idle lanes
    bx, ty, r = sch.split(n, [None, warps, rows])
    go, tx = sch.split(g, [None, lanes])
    sch.reorder(bx, ty, tx, go, r)
    rf = sch.rfactor(tx, factor_axis=0)
    loops = sch.get_loops(rf)  # i, bx, ty, tx, go, r
    sch.bind(loops[1], "blockIdx.x")
    sch.bind(loops[2], "threadIdx.y")
    sch.bind(loops[3], "threadIdx.x")
    go_, r_ = loops[4], loops[5]
    sch.compute_at(dot, r_)
    sch.set_scope(dot, 0, "local")
    sch.unroll(sch.get_loops(dot)[-1])
    wl = sch.cache_read(dot, 1, "local")  # the group's 4 packed words: one 16-byte load
    sch.compute_at(wl, r_)
    sch.vectorize(sch.get_loops(wl)[-1])
    sch.compute_at(xf, go_)  # 32 activations as float32, shared by the rows of this lane
    sch.set_scope(xf, 0, "local")
    xl = sch.cache_read(xf, 0, "local")
    sch.compute_at(xl, go_)
    _, xv = sch.split(sch.get_loops(xl)[-1], [None, x_vector])
    sch.vectorize(xv)
    sch.unroll(sch.get_loops(xf)[-1])
    sch.set_scope(rf, 0, "local")
    sch.decompose_reduction(rf, go_)
    if unroll_steps:
        sch.unroll(go_)  # every step's 16-byte loads can be issued before the first group's arithmetic
    # cross-lane sum: the write-back block reduces the lane partials with a warp allreduce
    sch.reverse_compute_at(acc, loops[2])
    inner = sch.get_loops(acc)[3:]  # lane partial (reduce), then the rows when there are several
    if len(inner) == 2:
        sch.reorder(inner[1], inner[0])
    sch.bind(inner[0], "threadIdx.x")
    if has_epilogue:
        sch.reverse_compute_at(sch.get_sblock("epilogue"), loops[2])
        sch.set_scope(acc, 0, "local")
    return _done(sch)


def schedule_gpu_embedding(func, target):
    sch = _open(func, inline_dequant=True)
    t, j = sch.get_loops(sch.get_sblock("embed"))
    bx, tx = sch.split(sch.fuse(t, j), [None, min(256, _max_threads(target))])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return _done(sch)
