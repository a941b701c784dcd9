"""Batched INT4 decode GEMV for CUDA: the symbolic-rows linear for a few rows (serve's batch_decode), each weight
word loaded from HBM once and applied to every row.

`batch_decode` with b sequences calls the linear with a symbolic row count, which the prefill tensor-core GEMM
serves: its 64- or 128-row tiles over 128 features leave a small-b call far from memory speed (H200, Llama-3-8B
shape: 8 sequences 16 ms a step, one sequence 2.5 ms). Decode at small b is memory-bound, so the kernel here is the
decode GEMV's arithmetic (kernels/cuda_gemv.int4_gemv_h2: fp16x2 products of the centred weights, fp16 per group,
fp32 across groups) with the decoded weights reused for up to R rows of x (see kernels/cuda/int4_gemv_batch.cu).

Buckets 8 and 16 run by default on tensor cores (`edgellm_q4gemv_batch_mma`: mma.sync m16n8k16 with the weights
as A, 16 features x 16 k, and 8 rows of x as B): per weight pair the SIMT kernel spends one HFMA2 per row, which
caps it below memory speed from about 8 rows on; 2 and 4 rows stay in fp16x2 SIMT.

`int4_linear_small_rows` is one PrimFunc with the GEMM's signature (x [m, in], q_weight, q_scale, [q_min], [bias],
out [m, out]) whose host part branches on m: m <= 2, 4, 8, 16 launch the batched GEMV compiled for that many rows
(at most `rows_max`), more rows launch the prefill GEMM (kernels/cuda_gemm.int4_gemm_tc2, its tile choice
unchanged). TVM's host/device split makes each branch its own kernel; the host code picks one per call.
Grids: q4f16_1 (offset 7), q4f16_0 (offset 8), q4f16_2 (zero_point: computed as (q - 8) s + (min + 8 s)).
"""

from __future__ import annotations

from .._tvm import compiler
from .cuda import cuda_source
from .cuda_gemv import GROUP, QMAX

BUCKETS = (2, 4, 8, 16)  # the row counts a batched GEMV is compiled for; m goes to the smallest that holds it
ROWS_MAX = 16
FEATURES_PER_WARP = 4
WARPS = 4
CHUNK = 1024  # elements of `in` staged in shared memory per step (a group of 32 per lane)

_SRC = cuda_source("int4_gemv_batch.cu")


def supports(in_f: int, out_f: int, x_dtype: str, scale_dtype: str, out_dtype: str) -> bool:
    """fp16 activations, scales and output; `in` a whole number of groups (16-byte weight and x loads)."""
    return in_f % GROUP == 0 and in_f > 0 and out_f > 0 and x_dtype == scale_dtype == out_dtype == "float16"


def smem_bytes(rows: int) -> int:
    return rows * 4 * 32 * 16  # [rows][4 words][32 groups] of 4 fp16 pairs


def mma_ksplit(out_f: int) -> int:
    """Warps sharing a 16-feature tile of the tensor-core kernel (each a share of `in`): wide `out` has blocks enough
    with one (64 features a block); narrower ones split `in` over 2 or 4 warps (32 or 16 features a block) so that
    about a block per SM of the H200's 132 comes. Not measured yet (bench/gpu_gemv_batch.py)."""
    if out_f >= 16 * WARPS * 264:
        return 1
    return 2 if out_f >= 32 * 100 else 4


def int4_linear_small_rows(in_f: int, out_f: int, bias: bool, gemm: tuple[str, str | None] | None = None,
                           rows_max: int = ROWS_MAX, offset: int = QMAX, zero_point: bool = False,
                           mma: bool = True):
    """y[m, n] = sum_k x[m, k] W[n, k] (+ b[n]) for a symbolic m (arguments as `cuda_gemm.int4_gemm_tc2`): m <=
    `rows_max` runs the batched GEMV (the smallest of BUCKETS that holds m), more rows the tensor-core GEMM with
    tile configs `gemm` = (config, small config) (`cuda_gemm.tc2_choice`). gemm=None: the batched GEMV only (m past
    rows_max is then the caller's error: nothing is computed; for standalone benchmarks). `mma`: buckets 8 and 16
    on tensor cores (mma.sync, sm_80+; `edgellm_q4gemv_batch_mma`), else every bucket in fp16x2 SIMT."""
    from tvm.script import tirx as T

    from . import cuda_gemm

    c = compiler()
    if not supports(in_f, out_f, "float16", "float16", "float16"):
        raise ValueError(f"int4_linear_small_rows: unsupported shape {in_f} -> {out_f}: `in` must be a multiple of "
                         f"{GROUP}")
    if rows_max not in BUCKETS:
        raise ValueError(f"int4_linear_small_rows: rows_max must be one of {BUCKETS}, got {rows_max}")
    if not 0 <= offset < 16:
        raise ValueError(f"int4_linear_small_rows: offset must be in 0..15, got {offset}")
    if gemm is not None and not cuda_gemm.tc2_supports(in_f, out_f, "float16", "float16", "float16"):
        raise ValueError(f"int4_linear_small_rows: the GEMM above rows_max needs `in` a multiple of "
                         f"{cuda_gemm.TC2_BK}, got {in_f}")
    M = c.tirx.Var("m", "int64")
    off = 8 if zero_point else offset  # the Q4_1 grid: (q - 8) s + (min + 8 s)
    use = [b <= rows_max for b in BUCKETS]
    tail = "true" if zero_point else "false", "true" if bias else "false"
    ks = mma_ksplit(out_f)
    tc = [mma and b % 8 == 0 for b in BUCKETS]  # the tensor-core kernel for this bucket
    per_block = [16 * WARPS // ks if t else WARPS * FEATURES_PER_WARP for t in tc]
    nbs = [(out_f + f - 1) // f for f in per_block]
    calls = [f"edgellm_q4gemv_batch_mma<{b}, {WARPS}, {ks}, {off}, {tail[0]}, {tail[1]}>" if t else
             f"edgellm_q4gemv_batch<{b}, {FEATURES_PER_WARP}, {WARPS}, {off}, {tail[0]}, {tail[1]}>"
             for b, t in zip(BUCKETS, tc)]
    smem = [smem_bytes(b) for b in BUCKETS]
    has_gemm = gemm is not None
    if has_gemm:  # the tensor-core GEMM above the buckets, launched as cuda_gemm.int4_gemm_tc2 launches it
        tc2, glabel = cuda_gemm.tc2_launcher(in_f, out_f, bias, gemm[0], gemm[1], 256, offset, zero_point, M)
    else:  # a placeholder (the branch is not generated)

        @T.macro
        def tc2(x, qw, qs, mp, bp, out):
            T.evaluate(0)

    @T.macro
    def gemv(x, qw, qs, mp, bp, out, i: T.int32):
        T.launch_thread("blockIdx.x", nbs[i])
        T.launch_thread("threadIdx.x", WARPS * 32)
        sm = T.alloc_buffer((smem[i],), "uint8", scope="shared.dyn")
        T.evaluate(T.cuda.func_call(calls[i], x.data, qw.data, qs.data, mp, bp, out.data, M, in_f, out_f, sm.data,
                                    source_code=_SRC))

    @T.macro
    def dispatch(x, qw, qs, mp, bp, out):
        if M <= BUCKETS[0]:
            gemv(x, qw, qs, mp, bp, out, 0)
        elif use[1] and M <= BUCKETS[1]:
            gemv(x, qw, qs, mp, bp, out, 1)
        elif use[2] and M <= BUCKETS[2]:
            gemv(x, qw, qs, mp, bp, out, 2)
        elif use[3] and M <= BUCKETS[3]:
            gemv(x, qw, qs, mp, bp, out, 3)
        elif has_gemm:
            tc2(x, qw, qs, mp, bp, out)

    func = cuda_gemm.q4_linear_func(in_f, out_f, bias, zero_point, M, dispatch)
    grid = "" if (offset, zero_point) == (QMAX, False) else ("_z" if zero_point else f"_o{offset}")
    label = f"gemv_batch_r{rows_max}{grid}" + (f"_mma_k{ks}" if mma and rows_max >= 8 else "")
    if gemm is not None:  # named as the GEMM it contains (int4_gemm_tc2's label), then the small-rows kernel
        label = f"{glabel}+{label}"
    return func.with_attrs({"edgellm.kernel": "gemm", "op_pattern": 8, "tirx.is_scheduled": True, "tir.noalias": True,
                            "edgellm.gemm": label})
