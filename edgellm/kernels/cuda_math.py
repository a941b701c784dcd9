"""Small CUDA kernels of the model body, written pre-scheduled in TVMScript (`tirx.is_scheduled`: dlight skips them).

* `add_rms_norm_gpu`: the residual add and the next RMSNorm in one kernel (decode ran them as two: 2 x 32 launches
  per Llama-3-8B token, 1.3 + 2.0 us each on an H100).
* `silu_mul_gpu`: the MLP's silu(gate) * up in 16-byte vectors (TVM's fused split/silu/multiply ran at ~40 GB/s
  in an 8B prefill).
* `argmax_partial_gpu` + `argmax_final_gpu`: greedy token ids on the device, so a greedy decode step copies 4
  bytes back instead of the logits (0.5 MB per token for a 128256-word vocabulary) and skips the host argmax.
* `greedy_advance_gpu`: argmax_final's reduction ending the owned cache's `decode_greedy` step, which also feeds
  the token to the next step on the device (ids, pos0 in place) and writes it to mapped host memory: no copies
  between two steps of a greedy chain (device_runners/engine.py Engine.greedy_chain).

One thread block per row. Numbers on a GPU: bench/gpu_run.py (the tiny models end to end vs numpy and
transformers, argmax vs numpy).
"""

from __future__ import annotations

from .._tvm import compiler


def _log2(n: int) -> int:
    if n <= 0 or n & (n - 1):
        raise ValueError(f"thread count must be a power of two, got {n}")
    return n.bit_length() - 1


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def add_rms_norm_gpu(hidden: int, eps: float, dtype: str, threads: int | None = None, *, lanes: int | None = None,
                     max_threads: int = 1024, reduce: str = "warp"):
    """(x [n, hidden], y [n, hidden], w [hidden]) -> s = x + y (in `dtype`), rms_norm(s) * w. Same function as
    `x + y` followed by TVM's rms_norm: the sum is rounded to `dtype` first and the norm computed in float32 from
    the rounded values.

    One block per token. A thread owns chunks of `lanes` elements (default 16 bytes: 8 fp16 / 4 fp32; single
    elements if `hidden` is not a multiple of that), read and written as vectors and kept in registers between the
    two passes; by default there are as many threads as chunks (32..max_threads). The sum of squares meets by
    `reduce`: "warp" (CUDA) = warp shuffles, then across warps through shared memory, one barrier; "tree" (WebGPU,
    where subgroups span an adapter-dependent number of lanes) = a shared-memory tree in ping-pong halves, one barrier per
    level."""
    T = compiler().T
    f32 = "float32"
    if reduce not in ("warp", "tree"):
        raise ValueError(f"reduce must be 'warp' or 'tree', got {reduce!r}")
    width = lanes or 16 // (2 if dtype == "float16" else 4)
    vec = width if hidden % width == 0 else 1
    chunks = hidden // vec
    threads = threads or min(max_threads, max(32, _pow2_at_least(chunks)))
    levels = _log2(threads)
    if reduce == "warp" and threads % 32:
        raise ValueError(f"thread count must be a multiple of the warp size 32, got {threads}")
    per, warps = (chunks + threads - 1) // threads, threads // 32
    warp = reduce == "warp"
    red_len = warps if warp else 2 * threads

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
        red = T.alloc_buffer((red_len,), f32, scope="shared")
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
        if warp:
            for k in T.unroll(5):  # butterfly: every lane ends with its warp's sum
                acc[0] = acc[0] + T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), acc[0], T.shift_left(1, k), 32, 32)
            if tx % 32 == 0:
                red[tx // 32] = acc[0]
            T.tvm_storage_sync("shared")
            acc[0] = T.float32(0)
            for k in T.unroll(warps):
                acc[0] = acc[0] + red[k]
            acc[0] = T.rsqrt(acc[0] / T.float32(hidden) + T.float32(eps))
        else:
            red[tx] = acc[0]
            T.tvm_storage_sync("shared")
            for k in T.unroll(levels):  # level k reads half k % 2 and writes the other (no branch around the
                # barrier: TVM's sync planner cannot place one inside)
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


def silu_mul_gpu(inter: int, dtype: str, threads: int = 128):
    """gate_up [n, 2 * inter] -> silu(gate) * up [n, inter] (float32 arithmetic, rounded once to `dtype`), the
    function of `split` + `silu` + `multiply` in TVM. Blocks of `threads` over (16-byte chunks of a row, rows):
    each thread reads one 16-byte chunk of gate and of up and writes one of the output. TVM's fused version of
    those three ops took 1.0 ms for a Llama-3-8B 512-token prefill (32 x [512, 14336]): about 40 GB/s."""
    T = compiler().T
    f32 = "float32"
    width = 16 // (2 if dtype == "float16" else 4)
    vec = width if inter % width == 0 else 1
    chunks = inter // vec
    blocks = (chunks + threads - 1) // threads
    _log2(threads)

    @T.prim_func(private=True, check_well_formed=False)
    def silu_mul(var_x: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        n = T.int64()
        x = T.match_buffer(var_x, (n, 2 * inter), dtype)
        out = T.match_buffer(var_out, (n, inter), dtype)
        # a root block: Relax's reshape-pattern analysis (RewriteDataflowReshape) rejects a one-input, one-output
        # PrimFunc whose body is not a block
        with T.sblock("root"):
            T.reads()
            T.writes()
            bx = T.launch_thread("blockIdx.x", blocks)
            by = T.launch_thread("blockIdx.y", n)
            tx = T.launch_thread("threadIdx.x", threads)
            g = T.alloc_buffer((vec,), dtype, scope="local")
            u = T.alloc_buffer((vec,), dtype, scope="local")
            o = T.alloc_buffer((vec,), dtype, scope="local")
            if bx * threads + tx < chunks:
                for e in T.vectorized(vec):
                    g[e] = x[by, (bx * threads + tx) * vec + e]
                for e in T.vectorized(vec):
                    u[e] = x[by, inter + (bx * threads + tx) * vec + e]
                for e in T.unroll(vec):
                    o[e] = T.Cast(dtype, T.Cast(f32, g[e]) / (T.float32(1) + T.exp(-T.Cast(f32, g[e])))
                                  * T.Cast(f32, u[e]))
                for e in T.vectorized(vec):
                    out[by, (bx * threads + tx) * vec + e] = o[e]

    return silu_mul


ARGMAX_PARTS = 64  # first-stage blocks of the device argmax: a 128256-word row is 8 KB per block


def _argmax_tree(threads: int, none: int):
    """Macro: a block's (value, index) candidates in `best`/`idx` (one per thread; sv, si: shared, `threads` each)
    -> the winner in thread 0's best[0], idx[0]: the larger value, and of two equal ones the smaller index; index
    `none` marks a thread with no candidate. Its own two registers of scratch are allocated inside."""
    T = compiler().T
    levels = _log2(threads)

    @T.macro
    def tree(sv, si, best, idx, tx):
        mine = T.alloc_buffer((1,), "float32", scope="local")
        other = T.alloc_buffer((1,), "int32", scope="local")
        sv[tx] = best[0]
        si[tx] = idx[0]
        T.tvm_storage_sync("shared")
        for k in T.unroll(levels):  # no branch: TVM's sync planner cannot place barriers inside one
            other[0] = T.if_then_else(tx < T.shift_right(threads, k + 1),
                                      si[T.min(tx + T.shift_right(threads, k + 1), threads - 1)], T.int32(none))
            best[0] = sv[T.min(tx + T.shift_right(threads, k + 1), threads - 1)]
            mine[0] = sv[tx]
            idx[0] = si[tx]
            T.tvm_storage_sync("shared")
            # take the other slot's candidate if it has one and this slot has none, a smaller value, or an equal
            # value at a larger index (threads past the half keep theirs)
            take = T.meta_var(T.And(other[0] < none, T.Or(idx[0] == none, T.Or(best[0] > mine[0], T.And(
                best[0] == mine[0], other[0] < idx[0])))))
            sv[tx] = T.Select(take, best[0], mine[0])
            si[tx] = T.Select(take, other[0], idx[0])
            T.tvm_storage_sync("shared")
        best[0] = sv[0]
        idx[0] = si[0]

    return tree


def _argmax_warp(threads: int, none: int):
    """Macro: _argmax_tree's contract (the winner in thread 0's best[0], idx[0]) by warp shuffles: each
    warp's 32 candidates meet in 5 xor steps (every lane ends with the warp's best), the warps' bests in shared
    memory, one barrier, then thread 0 takes the warps' in order. One barrier where the tree has 2 a level."""
    T = compiler().T
    if threads % 32 or threads < 32:
        raise ValueError(f"the warp argmax needs a multiple of the warp size (32) threads, got {threads}")
    warps = threads // 32

    @T.macro
    def better(take, ov, oi, best, idx):  # the other candidate (ov, oi) over (best, idx): _argmax_tree's rule
        take[0] = T.And(oi[0] < none, T.Or(idx[0] == none, T.Or(ov[0] > best[0], T.And(ov[0] == best[0],
                                                                                       oi[0] < idx[0]))))
        best[0] = T.Select(take[0], ov[0], best[0])
        idx[0] = T.Select(take[0], oi[0], idx[0])

    @T.macro
    def tree(sv, si, best, idx, tx):
        ov = T.alloc_buffer((1,), "float32", scope="local")
        oi = T.alloc_buffer((1,), "int32", scope="local")
        take = T.alloc_buffer((1,), "bool", scope="local")
        for k in T.unroll(5):
            ov[0] = T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), best[0], T.shift_left(1, k), 32, 32)
            oi[0] = T.tvm_warp_shuffle_xor(T.tvm_warp_activemask(), idx[0], T.shift_left(1, k), 32, 32)
            better(take, ov, oi, best, idx)
        if tx % 32 == 0:
            sv[tx // 32] = best[0]
            si[tx // 32] = idx[0]
        T.tvm_storage_sync("shared")
        if tx == 0:
            for w in T.serial(1, warps):  # warp w's slice lies after warp w - 1's: ties keep the earlier index
                ov[0] = sv[w]
                oi[0] = si[w]
                better(take, ov, oi, best, idx)

    return tree


def _argmax_reduce(threads: int, none: int, reduce: str):
    if reduce not in ("tree", "warp"):
        raise ValueError(f"argmax reduce {reduce!r}: tree (workgroup memory; WebGPU) or warp (shuffles; CUDA)")
    return _argmax_warp(threads, none) if reduce == "warp" else _argmax_tree(threads, none)


def argmax_partial_gpu(vocab: int, parts: int = ARGMAX_PARTS, threads: int = 256, dtype: str = "float32",
                       reduce: str = "tree"):
    """Stage 1 of the device argmax: logits [b, 1, vocab] (`dtype`: float32, or float16 where the head's output is
    read as it is, skipping its cast) -> (value, index) of the first maximum of each of `parts` contiguous slices
    per row ([b, parts] float32 and int32; index `vocab` for an empty slice). fp16 values are compared as float32,
    which they convert to exactly: the same ids as the float32 input cast from them. One block per (slice, row): a
    single block per row (the first version) read 0.5 MB at one SM's pace, 29 us. `reduce`: how a block's
    candidates meet, "tree" (workgroup memory, two barriers a level) or "warp" (shuffles, one barrier; CUDA)."""
    T = compiler().T
    chunk = (vocab + parts - 1) // parts
    per = (chunk + threads - 1) // threads
    tree = _argmax_reduce(threads, vocab, reduce)

    @T.prim_func(private=True, check_well_formed=False)
    def argmax_partial(var_logits: T.handle, var_pv: T.handle, var_pi: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        b = T.int64()
        logits = T.match_buffer(var_logits, (b, 1, vocab), dtype)
        pv = T.match_buffer(var_pv, (b, parts), "float32")
        pi = T.match_buffer(var_pi, (b, parts), "int32")
        with T.sblock("root"):
            T.reads()
            T.writes()
            bx = T.launch_thread("blockIdx.x", parts)
            by = T.launch_thread("blockIdx.y", b)
            tx = T.launch_thread("threadIdx.x", threads)
            best = T.alloc_buffer((1,), "float32", scope="local")
            idx = T.alloc_buffer((1,), "int32", scope="local")
            mine = T.alloc_buffer((1,), "float32", scope="local")
            sv = T.alloc_buffer((threads,), "float32", scope="shared")
            si = T.alloc_buffer((threads,), "int32", scope="shared")
            best[0] = T.float32(-3.4e38)
            idx[0] = T.int32(vocab)
            for j in T.unroll(per):  # ascending indices per thread: a strict > keeps the first of equal values
                if j * threads + tx < chunk and bx * chunk + j * threads + tx < vocab:
                    mine[0] = T.Cast("float32", logits[by, 0, bx * chunk + j * threads + tx])
                    if mine[0] > best[0] or idx[0] == vocab:
                        best[0] = mine[0]
                        idx[0] = bx * chunk + j * threads + tx
            tree(sv, si, best, idx, tx)
            if tx == 0:
                pv[by, bx] = best[0]
                pi[by, bx] = idx[0]

    return argmax_partial


def argmax_final_gpu(vocab: int, parts: int = ARGMAX_PARTS, reduce: str = "tree"):
    """Stage 2: the slices' candidates [b, parts] -> token ids [b, 1] int32 (numpy's argmax: the first index of
    the largest value; -inf logits are fine, NaN compares false everywhere where numpy would return it)."""
    T = compiler().T
    tree = _argmax_reduce(parts, vocab, reduce)

    @T.prim_func(private=True, check_well_formed=False)
    def argmax_final(var_pv: T.handle, var_pi: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        b = T.int64()
        pv = T.match_buffer(var_pv, (b, parts), "float32")
        pi = T.match_buffer(var_pi, (b, parts), "int32")
        out = T.match_buffer(var_out, (b, 1), "int32")
        with T.sblock("root"):
            T.reads()
            T.writes()
            bx = T.launch_thread("blockIdx.x", b)
            tx = T.launch_thread("threadIdx.x", parts)
            best = T.alloc_buffer((1,), "float32", scope="local")
            idx = T.alloc_buffer((1,), "int32", scope="local")
            sv = T.alloc_buffer((parts,), "float32", scope="shared")
            si = T.alloc_buffer((parts,), "int32", scope="shared")
            best[0] = pv[bx, tx]
            idx[0] = pi[bx, tx]
            tree(sv, si, best, idx, tx)
            if tx == 0:
                out[bx, 0] = idx[0]

    return argmax_final


# greedy_advance_gpu's write of the token into page-locked host memory: `addr` (a device pointer of a mapped host
# buffer, runtime/cuda_async.py CudaAsync.mapped; 0: no write) + slot. The system fence makes the write visible to
# the host before any later write of the kernel (the host reads it after an event recorded behind the kernel).
SINK_WRITE = ("[](long long addr, int slot, int token) { if (addr != 0) { reinterpret_cast<volatile int*>(addr)[slot]"
              " = token; __threadfence_system(); } }")


def greedy_advance_gpu(vocab: int, parts: int = ARGMAX_PARTS, reduce: str = "warp"):
    """The last kernel of the owned cache's `decode_greedy` (models/llama.py): argmax_final_gpu's reduction of one
    row's slice candidates, then the next step's inputs advanced on the device, so that consecutive greedy steps
    need no copy between them: the token into ids [1, 1] (in place: the next step's input), pos0 [1] one further
    (in place), and the token into host memory at sink[0] + 4 * (pos0 % 2) (a mapped page-locked
    buffer whose device address is in `sink` [1] int64; 0: none) where the host reads it after an event (the slot
    by position parity: a step's token stays there while the next step runs). CUDA only: `reduce` warp by default."""
    T = compiler().T
    tree = _argmax_reduce(parts, vocab, reduce)

    @T.prim_func(private=True, check_well_formed=False)
    def greedy_advance(var_pv: T.handle, var_pi: T.handle, var_ids: T.handle, var_pos0: T.handle,
                       var_sink: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        pv = T.match_buffer(var_pv, (1, parts), "float32")
        pi = T.match_buffer(var_pi, (1, parts), "int32")
        ids = T.match_buffer(var_ids, (1, 1), "int32")
        pos0 = T.match_buffer(var_pos0, (1,), "int32")
        sink = T.match_buffer(var_sink, (1,), "int64")
        with T.sblock("root"):
            T.reads()
            T.writes()
            tx = T.launch_thread("threadIdx.x", parts)
            best = T.alloc_buffer((1,), "float32", scope="local")
            idx = T.alloc_buffer((1,), "int32", scope="local")
            sv = T.alloc_buffer((parts,), "float32", scope="shared")
            si = T.alloc_buffer((parts,), "int32", scope="shared")
            best[0] = pv[0, tx]
            idx[0] = pi[0, tx]
            tree(sv, si, best, idx, tx)
            if tx == 0:
                ids[0, 0] = idx[0]
                T.evaluate(T.call_extern("void", SINK_WRITE, sink[0], T.bitwise_and(pos0[0], 1), idx[0]))
                pos0[0] = pos0[0] + 1

    return greedy_advance
