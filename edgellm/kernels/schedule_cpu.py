"""CPU schedules for the tensor-expression linear and embedding kernels (kernels/te_linear.py).

Linear: reduce along `in` in vector-wide chunks (rfactor), parallel over tiles of output features. In the GEMV
(decode) the INT4 decode is inlined into the dot product; in the GEMM (prefill) the weight tile is decoded once into a
local buffer and reused by every row. GPU schedules live in schedule_gpu.py; the registry picks (kernels/registry.py).
"""

from __future__ import annotations

from .._tvm import compiler


def vector_lanes(target, dtype_bits: int = 32) -> int:
    """Lanes of `dtype_bits` in the target's vector register, as LLVM sees the target (AVX-512 16, NEON 4)."""
    if target.kind.name != "llvm":
        return 128 // dtype_bits
    bits = int(compiler().tvm.target.codegen.llvm_get_vector_width(target))
    return max(bits, 128) // dtype_bits


def _largest_divisor(n: int, candidates) -> int:
    return next((c for c in candidates if c > 0 and n % c == 0), 1)


def _has_block(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
    except Exception:  # tvm raises a ScheduleError subclass when the block is absent
        return False
    return True


def _open(func, inline_dequant: bool):
    """A schedule of `func`, with the INT4 decode block inlined into its consumer when asked (and present)."""
    sch = compiler().s_tir.Schedule(func)
    if inline_dequant and _has_block(sch, "dequant"):
        sch.compute_inline(sch.get_sblock("dequant"))
    return sch


def _done(sch):
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_cpu_linear(func, target, gemv: bool):
    """Schedule a `linear` kernel (blocks: [dequant], matmul, [epilogue]) for an LLVM CPU target."""
    sch = _open(func, inline_dequant=gemv)
    lanes = vector_lanes(target)
    has_dequant, has_epilogue = _has_block(sch, "dequant"), _has_block(sch, "epilogue")
    y = sch.get_sblock("matmul")
    i, n, k = sch.get_loops(y)
    in_f, out_f = int(sch.get(k).extent), int(sch.get(n).extent)
    vl = _largest_divisor(in_f, [lanes, lanes // 2, 4, 2])
    nt = _largest_divisor(out_f, [4, 2] if gemv else [8, 4, 2])
    no, ni = sch.split(n, [None, nt])
    sch.reorder(no, i, ni, k)
    ko, kv = sch.split(k, [None, vl])
    rf = sch.rfactor(kv, factor_axis=2)
    no_, i_, ni_, ko_, kv_ = sch.get_loops(rf)
    sch.reorder(ko_, ni_, kv_)  # no, i, ko, ni, kv: each x chunk loaded once for nt rows of W
    sch.reverse_compute_at(y, i_)
    if has_epilogue:
        sch.reverse_compute_at(sch.get_sblock("epilogue"), i_)
    if has_dequant and not gemv:
        deq = sch.get_sblock("dequant")
        sch.compute_at(deq, no_)
        # vectorize the tile decode explicitly: LLVM's auto-vectorizer drops it when the module also holds host
        # functions (shape_func), which made batch/prefill GEMMs ~8x slower inside a built model
        dk = sch.get_loops(deq)[-1]
        _, dkv = sch.split(dk, [None, _largest_divisor(in_f, [lanes, lanes // 2, 4, 2])])
        sch.vectorize(dkv)
    sch.vectorize(kv_)
    sch.unroll(ni_)
    sch.parallel(no_)
    sch.decompose_reduction(rf, ko_)
    return _done(sch)


def schedule_cpu_embedding(func, target):
    sch = _open(func, inline_dequant=True)
    t, _ = sch.get_loops(sch.get_sblock("embed"))
    sch.parallel(t)
    return _done(sch)
