"""Prefill GEMM on tensor cores for packed INT4 weights (CUDA sm_80+), same signature as `kernels.linear(None, ...)`.

The decode GEMV is in quant/gpu_kernels.py; this file holds the prefill kernel only.
"""

from __future__ import annotations

from .._tvm import compiler
from .gpu_kernels import GROUP, PER_WORD, QMAX

# ---------------------------------------------------------------------------------------------------------------
# Prefill GEMM on tensor cores (CUDA sm_80+): hand-written TVMScript with PTX mma.sync m16n8k16 (fp16 x fp16 ->
# fp32). `sch.tensorize` crashes in this TVM wheel, so the kernel is written pre-scheduled (tir.is_scheduled).
#
# Block tile BM x BN = 128 x 128 of [rows x out features], 8 warps as 2 (rows) x 4 (features), a warp owns 64 x 32
# (4 x 4 mma tiles, 64 fp32 accumulators per lane). Per K step of 32 (one quant group): the x tile (fp16, rows past
# the real count read 0) and the weight tile, decoded to fp16 `(nib - 7) * scale` by the whole block, go to shared
# memory (rows padded to 40 halves: the fragment loads hit 32 distinct banks); then two k16 steps of 16 mma each,
# fragments read with plain 32-bit shared loads in the m16n8k16 register layout. Epilogue: fp32 -> out dtype
# (+ bias), rows past the real count are not stored.
# ---------------------------------------------------------------------------------------------------------------
TC_BM, TC_BN, TC_BK, TC_PAD = 128, 128, 32, 40
TC_HALF2 = True  # decode the weight tile with fp16x2 arithmetic (int4_gemm_tc's `half2`)


def tc_supports(in_f: int, out_f: int, x_dtype: str, scale_dtype: str, out_dtype: str) -> bool:
    """fp16 activations/scales/output, `in` a whole number of K steps (any `out`: the last tile is guarded)."""
    return in_f % TC_BK == 0 and x_dtype == scale_dtype == out_dtype == "float16" and out_f > 0


def int4_gemm_tc(in_f: int, out_f: int, bias: bool, prefetch: bool = True, half2: bool = False):
    """y[m, n] = sum_k x[m, k] * W[n, k] (+ b[n]) for a symbolic row count m; x, y fp16, W packed INT4 (q4f16_1
    layout: nibble i of word j is element 8j+i, offset +7, one fp16 scale per 32). Arguments: x, q_weight, q_scale,
    [bias], out. Already scheduled for CUDA sm_80+ (mma.sync m16n8k16, fp32 accumulation). `prefetch`: the next
    K step's global loads are issued before this step's mma work (held in registers), hiding their latency.
    `half2`: the weight tile decoded two weights per fp16x2 instruction, `(0x6400 | nib) - 1031` (exact) times the
    scale: one rounding, the same fp16 values as the float32 path."""
    from tvm.script import tirx as T

    c = compiler()
    if not tc_supports(in_f, out_f, "float16", "float16", "float16"):
        raise ValueError(f"int4_gemm_tc: unsupported shape {in_f} -> {out_f}")
    W, G = in_f // PER_WORD, in_f // GROUP
    KT = in_f // TC_BK
    BM, BN, PAD = TC_BM, TC_BN, TC_PAD
    NB = (out_f + BN - 1) // BN
    M = c.tirx.Var("m", "int64")

    @T.macro
    def gload(x, qw, qs, xr, wv, sc, bx, by, tx, k):
        # x tile: 128 rows x 32 halves = 512 chunks of 8 halves (16 bytes); 2 per thread; rows past m read 0
        for c2 in T.unroll(2):
            if T.Cast("int64", by * BM + (tx + c2 * 256) // 4) < M:
                for v in T.vectorized(8):
                    xr[c2 * 8 + v] = x[T.Cast("int64", by * BM + (tx + c2 * 256) // 4),
                                       k * TC_BK + ((tx + c2 * 256) % 4) * 8 + v]
            else:
                for v in T.vectorized(8):
                    xr[c2 * 8 + v] = T.float16(0)
        # weight tile: 128 rows x 4 words; a thread takes 2 words (16 weights) of row tx // 2 and its scale
        if bx * BN + tx // 2 < out_f:
            sc[0] = T.Cast("float32", qs[bx * BN + tx // 2, k])
            for c2 in T.unroll(2):
                wv[c2] = qw[bx * BN + tx // 2, k * 4 + (tx % 2) * 2 + c2]
        else:
            sc[0] = T.float32(0)
            for c2 in T.unroll(2):
                wv[c2] = T.uint32(0)

    @T.macro
    def sstore(xs, ws, xr, wv, sc, tx):
        for c2 in T.unroll(2):
            for v in T.vectorized(8):
                xs[((tx + c2 * 256) // 4) * PAD + ((tx + c2 * 256) % 4) * 8 + v] = xr[c2 * 8 + v]
        if half2:  # two weights per instruction: 0x6400 | nib is the fp16 1024 + nib, exactly
            for c2 in T.unroll(2):
                for j in T.unroll(4):
                    ws[T.ramp((tx // 2) * PAD + ((tx % 2) * 2 + c2) * 8 + j * 2, 1, 2)] = (T.reinterpret(
                        "float16x2", T.bitwise_or(T.bitwise_or(
                            T.bitwise_and(T.shift_right(wv[c2], T.uint32(8 * j)), T.uint32(15)),
                            T.shift_left(T.bitwise_and(T.shift_right(wv[c2], T.uint32(8 * j + 4)), T.uint32(15)),
                                         T.uint32(16))), T.uint32(0x64006400)))
                        - T.Broadcast(T.float16(1024 + QMAX), 2)) * T.Broadcast(T.Cast("float16", sc[0]), 2)
        else:
            for c2 in T.unroll(2):
                for e in T.unroll(8):
                    ws[(tx // 2) * PAD + ((tx % 2) * 2 + c2) * 8 + e] = T.Cast("float16", T.Cast("float32", T.Cast(
                        "int32", T.bitwise_and(T.shift_right(wv[c2], T.uint32(e * 4)), T.uint32(15))) - 7) * sc[0])

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x_h: T.handle, qw: T.Buffer((out_f, W), "uint32"), qs: T.Buffer((out_f, G), "float16"),
               b_h: T.handle, out_h: T.handle):
        x = T.match_buffer(x_h, (M, in_f), "float16")
        bias_buf = T.match_buffer(b_h, (out_f,), "float16")
        out = T.match_buffer(out_h, (M, out_f), "float16")
        bx = T.launch_thread("blockIdx.x", NB)
        by = T.launch_thread("blockIdx.y", (M + BM - 1) // BM)
        tx = T.launch_thread("threadIdx.x", 256)
        # 1-D with a row pitch of PAD halves (a 2-D buffer would be compacted to the 32 columns used)
        xs = T.alloc_buffer((BM * PAD,), "float16", scope="shared")
        ws = T.alloc_buffer((BN * PAD,), "float16", scope="shared")
        acc = T.alloc_buffer((64,), "float32", scope="local")
        af = T.alloc_buffer((16,), "uint32", scope="local")  # fragments: 2 halves per 32-bit register
        bf = T.alloc_buffer((8,), "uint32", scope="local")
        wv = T.alloc_buffer((2,), "uint32", scope="local")
        sc = T.alloc_buffer((1,), "float32", scope="local")
        xr = T.alloc_buffer((16,), "float16", scope="local")  # the x chunks on their way to shared memory
        warp = T.meta_var(tx // 32)
        lane = T.meta_var(tx % 32)
        gid = T.meta_var(lane // 4)
        qid = T.meta_var(lane % 4)
        wm = T.meta_var(warp // 4)
        wn = T.meta_var(warp % 4)
        for i in T.unroll(64):
            acc[i] = T.float32(0)
        if prefetch:  # step 0's tile in registers; each step then loads the next one before its mma work
            gload(x, qw, qs, xr, wv, sc, bx, by, tx, 0)
        for ko in range(KT):
            T.tvm_storage_sync("shared")
            if not prefetch:
                gload(x, qw, qs, xr, wv, sc, bx, by, tx, ko)
            sstore(xs, ws, xr, wv, sc, tx)
            T.tvm_storage_sync("shared")
            if prefetch:  # noqa: SIM102 (a Python flag and a TIR condition)
                if ko + 1 < KT:
                    gload(x, qw, qs, xr, wv, sc, bx, by, tx, ko + 1)
            for kk in T.unroll(2):
                for mi in T.unroll(4):
                    for h in T.unroll(2):
                        for hr in T.unroll(2):
                            af[mi * 4 + h * 2 + hr] = T.reinterpret("uint32", xs[T.ramp(
                                (wm * 64 + mi * 16 + hr * 8 + gid) * PAD + kk * 16 + h * 8 + qid * 2, 1, 2)])
                for ni in T.unroll(4):
                    for h in T.unroll(2):
                        bf[ni * 2 + h] = T.reinterpret("uint32", ws[T.ramp(
                            (wn * 32 + ni * 8 + gid) * PAD + kk * 16 + h * 8 + qid * 2, 1, 2)])
                for mi in T.unroll(4):
                    for ni in T.unroll(4):
                        T.ptx_legacy.mma("float32", "m16n8k16", "row", "col", "fp16", "fp16", "fp32",
                                         af.data, mi * 4, bf.data, ni * 2, acc.data, (mi * 4 + ni) * 4, False)
        for mi in T.unroll(4):
            for ni in T.unroll(4):
                for hr in T.unroll(2):
                    for e in T.unroll(2):
                        row = T.meta_var(T.Cast("int64", by * BM + wm * 64 + mi * 16 + hr * 8 + gid))
                        col = T.meta_var(bx * BN + wn * 32 + ni * 8 + qid * 2 + e)
                        if row < M and col < out_f:
                            if bias:
                                out[row, col] = T.Cast("float16", acc[(mi * 4 + ni) * 4 + hr * 2 + e]
                                                       + T.Cast("float32", bias_buf[col]))
                            else:
                                out[row, col] = T.Cast("float16", acc[(mi * 4 + ni) * 4 + hr * 2 + e])

    params = list(kernel.params)
    keep = params[:3] + ([params[3]] if bias else []) + [params[4]]
    func = c.tirx.PrimFunc(keep, kernel.body, kernel.ret_type, kernel.attrs)
    return func.with_attrs({"edgellm.kernel": "gemm", "op_pattern": 8, "tir.is_scheduled": True, "tir.noalias": True,
                            "edgellm.gemm": "tc_mma_m16n8k16"})
