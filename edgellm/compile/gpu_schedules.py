"""GPU schedules (CUDA, Metal, OpenCL) for edgellm's own kernels (PrimFuncs carrying `edgellm.kernel`)."""

from __future__ import annotations

from .schedules import _done, _has_block, _open


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


def schedule_gpu_embedding(func, target):
    sch = _open(func, inline_dequant=True)
    t, j = sch.get_loops(sch.get_sblock("embed"))
    bx, tx = sch.split(sch.fuse(t, j), [None, min(256, _max_threads(target))])
    sch.bind(bx, "blockIdx.x")
    sch.bind(tx, "threadIdx.x")
    return _done(sch)


def schedule_gpu_kernel(kind: str | None, func, target):
    """Dispatch on the kernel kind for a GPU target; None when edgellm has no rule for the function."""
    if kind in ("gemv", "gemm"):
        return schedule_gpu_linear(func, target, gemv=kind == "gemv")
    if kind == "embedding":
        return schedule_gpu_embedding(func, target)
    return None
