"""The one-token INT4 decode GEMV with its weights streamed through shared memory by cp.async (CUDA sm_80+).

`cuda_gemv.int4_gemv_h2` (x staged in shared memory) loads a step's weights into registers, computes the step, then
loads the next: for a long `in` (the down projections, 2-4 steps a lane) a warp has no bytes in flight while it
computes. This kernel (kernels/cuda/int4_gemv_async.cu) keeps `stages` steps in flight in a per-thread ring of shared
memory, with the same work split and arithmetic as int4_gemv_h2 for the same (warps, rows, unroll, ksplit, fold):
the same values, bit for bit. `applies` says where the registry takes it: plain 4-bit symmetric rows (no bias, no
zero point, no fusion), at least two steps a lane, G even, the shared memory within the SM's.

ASYNC_STAGES: the ring's depth; 0 leaves the decode GEMV to int4_gemv_h2 everywhere (an A/B knob of
bench/gpu_pdl.py until measured).
"""

from __future__ import annotations

from .._tvm import compiler
from .cuda import cuda_source
from .cuda_gemv import GROUP, QMAX, prefetches_l2

ASYNC_STAGES = 0
SMEM_MAX = 227 * 1024  # an sm_80 / sm_90 block's dynamic shared memory at most (opt-in)
SMEM_SM = 228 * 1024  # an SM's, of which 1 KB a resident block is reserved
_SRC = cuda_source("int4_gemv_async.cu")


def steps(in_f: int, warps: int, rows: int, unroll: int, ksplit: int) -> int:
    """Steps a lane makes over `in` (the last one guarded where the groups do not fill it)."""
    vl = 32 * ksplit
    return (in_f // GROUP + vl * unroll - 1) // (vl * unroll)


def smem_bytes(in_f: int, warps: int, rows: int, unroll: int, stages: int) -> int:
    """x as pairs ([4][G] x 16 bytes), the ring ([S][U R][threads] x (16 + 4) bytes) and the K-split partials."""
    return 4 * (in_f // GROUP) * 16 + stages * unroll * rows * warps * 32 * 20 + warps * rows * 4


def blocks_per_sm(in_f: int, warps: int, rows: int, unroll: int, stages: int) -> int:
    """Resident blocks an SM holds by shared memory and threads (2,048 threads an SM)."""
    return max(0, min(SMEM_SM // (smem_bytes(in_f, warps, rows, unroll, stages) + 1024), 2048 // (32 * warps)))


def applies(in_f: int, out_f: int, cfg: tuple[int, int, int, int], sm: int, bias: bool = False,
            zero_point: bool = False, stages: int | None = None) -> bool:
    """Whether the registry builds this kernel for a plain decode GEMV with int4_gemv_h2's pick `cfg` = (warps, rows,
    unroll, ksplit): ASYNC_STAGES (or `stages`) > 0, sm_80+, no bias / zero point, in a whole number of groups with
    G even (the scales are copied as 4-byte pairs), two steps a lane or more (with one there is nothing to overlap),
    and its shared memory within a block's."""
    s = ASYNC_STAGES if stages is None else stages
    w, r, u, k = cfg
    g = in_f // GROUP
    return (s > 0 and sm >= 80 and not bias and not zero_point and in_f % GROUP == 0 and g % 2 == 0
            and steps(in_f, w, r, u, k) >= 2 and smem_bytes(in_f, w, r, u, s) <= SMEM_MAX)


def int4_gemv_async(in_f: int, out_f: int, warps: int, rows: int, unroll: int, ksplit: int, fold: bool,
                    stages: int | None = None, offset: int = QMAX, pdl: bool = False):
    """The decode GEMV y[1, out] = x[1, in] W^T, arguments (x, q_weight, q_scale, out) as int4_gemv_h2's without bias,
    already scheduled. `pdl` (sm_90): the first `stages` steps' copies (and the L2 prefetch of the block's rows where
    cuda_gemv.prefetches_l2) before the wait for the kernel before; x after it."""
    from tvm.script import tirx as T

    from .cuda_pdl import WAITS_INSIDE

    s = ASYNC_STAGES if stages is None else stages
    if s < 1:
        raise ValueError(f"int4_gemv_async: stages must be >= 1, got {s}")
    if in_f % GROUP or (in_f // GROUP) % 2:
        raise ValueError(f"int4_gemv_async needs `in` a multiple of {2 * GROUP}, got {in_f}")
    if warps % ksplit or min(warps, rows, unroll, ksplit) < 1:
        raise ValueError(f"int4_gemv_async: warps {warps} must be a positive multiple of ksplit {ksplit}")
    if not 0 <= offset < 16:
        raise ValueError(f"int4_gemv_async: offset must be in 0..15, got {offset}")
    smem = smem_bytes(in_f, warps, rows, unroll, s)
    if smem > SMEM_MAX:
        raise ValueError(f"int4_gemv_async needs {smem} bytes of shared memory (in {in_f}, {warps} warps, {s} stages), "
                         f"over {SMEM_MAX}; take fewer stages or warps")
    G, W = in_f // GROUP, warps
    teams = W // ksplit
    nb = (out_f + teams * rows - 1) // (teams * rows)
    minb = max(1, blocks_per_sm(in_f, W, rows, unroll, s))
    pf = pdl and prefetches_l2(in_f, out_f)
    b = {True: "true", False: "false"}
    call = (f"edgellm_q4gemv_async<{W}, {rows}, {unroll}, {ksplit}, {s}, {G}, {out_f}, {offset}, {b[fold]}, {b[pf]}, "
            f"{b[pdl]}>")
    mark = WAITS_INSIDE if pdl else "edgellm_noop"

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x: T.Buffer((1, in_f), "float16"), qw: T.Buffer((out_f, G * 4), "uint32"),
               qs: T.Buffer((out_f, G), "float16"), out: T.Buffer((1, out_f), "float16")):
        with T.sblock("root"):
            T.reads()
            T.writes()
            T.launch_thread("blockIdx.x", nb)
            T.launch_thread("threadIdx.x", W * 32)
            sm = T.alloc_buffer((smem,), "uint8", scope="shared.dyn")
            with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", minb):
                T.evaluate(T.call_extern("void", mark))
                T.evaluate(T.cuda.func_call(call, x.data, qw.data, qs.data, out.data, sm.data, source_code=_SRC))

    grid = "" if offset == QMAX else f"_o{offset}"
    return kernel.with_attrs({"edgellm.kernel": "gemv", "op_pattern": 8, "tirx.is_scheduled": True,
                              "tir.noalias": True,
                              "edgellm.gemv": f"async_w{W}r{rows}u{unroll}k{ksplit}s{s}" + ("_fs" if fold else "")
                              + grid + ("_pf" if pf else "")})
