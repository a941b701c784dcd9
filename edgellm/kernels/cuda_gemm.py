"""Prefill GEMM on tensor cores for packed INT4 weights (CUDA sm_80+; wgmma on sm_90), same signature as
`te_linear.linear(None, ...)`.

The decode GEMV is in kernels/cuda_gemv.py; this file holds the prefill kernel only.
"""

from __future__ import annotations

from .._tvm import compiler
from .cuda import cuda_source
from .cuda_gemv import GROUP, PER_WORD, QMAX

# ---------------------------------------------------------------------------------------------------------------
# Prefill GEMM on tensor cores (CUDA sm_80+): hand-written TVMScript with PTX mma.sync m16n8k16 (fp16 x fp16 ->
# fp32). `sch.tensorize` crashes in this TVM wheel, so the kernel is written pre-scheduled (tirx.is_scheduled).
#
# Block tile BM x BN = 128 x 128 of [rows x out features], 8 warps as 2 (rows) x 4 (features), a warp owns 64 x 32
# (4 x 4 mma tiles, 64 fp32 accumulators per lane). Per K step of 32 (one quant group): the x tile (fp16, rows past
# the real count read 0) and the weight tile, decoded to fp16 `(nib - 7) * scale` by the whole block, go to shared
# memory (rows padded to 40 halves: the fragment loads hit 32 distinct banks); then two k16 steps of 16 mma each,
# fragments read with plain 32-bit shared loads in the m16n8k16 register layout. Epilogue: fp32 -> out dtype
# (+ bias), rows past the real count are not stored.
# ---------------------------------------------------------------------------------------------------------------
TC_BM, TC_BN, TC_BK, TC_PAD = 128, 128, 32, 40


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
    return func.with_attrs({"edgellm.kernel": "gemm", "op_pattern": 8, "tirx.is_scheduled": True, "tir.noalias": True,
                            "edgellm.gemm": "tc_mma_m16n8k16"})


# ---------------------------------------------------------------------------------------------------------------
# Prefill GEMM, second generation (`int4_gemm_tc2`): a multi-stage cp.async pipeline with the weights decoded
# straight into mma B fragments. The PrimFunc is the launch (grid, block, dynamic shared memory) around one CUDA
# device function (`T.cuda.func_call` with its source): TVMScript in this wheel has no spelling for cp.async groups
# with a zero-fill size, nor for byte permutes, and the first kernel showed that the schedule we need is easier to
# state (and to check against ptxas) as CUDA than as pre-scheduled TIR.
#
# Per stage BK = 64 (two quant groups): the raw x tile [BM x 64] fp16 (rows past m zero-filled by cp.async), the
# packed weight words [BN x 8] and the scales [BN x 2] go to shared memory, ST stages deep, one barrier per stage.
# MODE 1 (what the pipeline uses): natural k order. x fragments by ldmatrix.x4 (which returns the mma's A register
# quad as is; 16-byte chunks of row r stored at chunk ^ (r % 8), so its 8 row addresses hit distinct banks). B: in
# m16n8k16 a lane (g = lane / 4, q = lane % 4) needs k = 2q, 2q+1 (+8) of feature g, i.e. byte q of each of the 4
# words of a group of its weight row: one 16-byte shared load (shared by the 4 lanes of a row), then per word one
# prmt with a lane-dependent selector. The two weight chunks of rows 4..7 mod 8 are swapped: no bank conflicts.
# MODE 0 (kept for A/B, slower): the k order inside a group permuted the same way for x and W (a sum over k allows
# it) so that a lane needs exactly word q and x values 8q .. 8q+7: plain 16-byte x loads, but the mma's A quad then
# has to be assembled from two loads with register moves (about 170 extra instructions per stage and warp).
# MODE 2: as 1, B decoded per k16 step (meant to cut live registers; ptxas hoists it back: no change measured).
# Decode of a nibble pair (2v, 2v+1) of word w: prmt puts byte v in both halves, one lop3 keeps (lo nibble, hi
# nibble << 4) and sets the fp16 exponent of 1024: (1024 + lo, 1024 + 16 hi); subtracting (1031, 1136) is exact and
# gives (lo - 7, 16 (hi - 7)); times (16 s, s) is 16x the weight, rounded once, i.e. 16x the fp16 value the first
# kernel (and the float32 reference rounded to fp16) has. The fp32 accumulators are scaled by 1/16 (exact) at the end.
# ---------------------------------------------------------------------------------------------------------------
TC2_BK = 64


def tc2_choice(in_f: int, out_f: int) -> tuple[str, str | None]:
    """(config, small-rows config) the pipeline uses for an `in` -> `out` linear, from H100 timings at Llama-3-8B
    shapes (bench/gpu_gemm_tune.py, docs/benchmarks/h100-gemm.json): from 6144 outputs on, two 128 x 128 blocks per
    SM (128 registers a thread) win; below, one block per SM (no spills). Up to 256 rows, outputs up to 8192 take a
    64-row tile (twice the blocks); wider outputs have blocks enough at 128 rows."""
    return ("128x128b2" if out_f >= 6144 else "128x128"), ("64x128" if out_f <= 8192 else None)


TC2_CONFIGS: dict[str, tuple[int, int, int, int, int, int, int]] = {
    # name: (warps along rows, warps along features, 16-row mma tiles per warp, 8-feature mma tiles per warp, stages,
    #        blocks per SM asked of ptxas (2 caps a 256-thread block at 128 registers), MODE of the CUDA template)
    "128x128": (2, 4, 4, 4, 4, 1, 1),
    "128x128b2": (2, 4, 4, 4, 4, 2, 1),
    "128x128p": (2, 4, 4, 4, 4, 1, 0),
    "128x128k": (2, 4, 4, 4, 4, 1, 2),
    "128x128kb2": (2, 4, 4, 4, 4, 2, 2),
    "128x128w4": (2, 2, 4, 8, 4, 1, 1),  # 4 warps of 64 x 64
    "128x128w4kb2": (2, 2, 4, 8, 4, 2, 2),
    "64x128": (2, 4, 2, 4, 4, 2, 1),
    "64x128k": (2, 4, 2, 4, 4, 2, 2),
    "128x64": (4, 2, 2, 4, 4, 2, 1),
}

_TC2_SRC = cuda_source("int4_gemm_mma_pipelined.cu")

# ---------------------------------------------------------------------------------------------------------------
# Prefill GEMM, third generation, Hopper only (`int4_gemm_tc2` with a WGMMA_CONFIGS name): wgmma.mma_async, the
# warpgroup tensor-core instruction of sm_90a (kernels/cuda/int4_gemm_wgmma.cu; compile/cuda.py builds a module that
# contains it for sm_90a). Operands swapped, out^T = W x^T: the weights are wgmma's A, decoded from INT4 by the same
# prmt/lop3 trick as tc2 straight into A's register fragment (they never touch shared memory); the activations are
# B, a [rows x 64] fp16 tile per stage in shared memory with the 128-byte swizzle, filled by cp.async, read by the
# tensor cores through a matrix descriptor. A block is NWG warpgroups of 64 features each sharing the activation
# tile; the wgmma of stage k runs while stage k + 1 is decoded. H200, Llama-3-8B shapes at 512 rows
# (bench/gpu_wgmma, docs/benchmarks/h200-wgmma.md), tc2's pick -> wgmma's: gate_up 479 -> 283 us, down 265 -> 171,
# qkv 139 -> 72, o 83 -> 55; 8B pp512 end to end 15,800 -> 24,871 tok/s (transformers fp16: 20,300).
# ---------------------------------------------------------------------------------------------------------------
WGMMA_CONFIGS: dict[str, tuple[int, int, int, int]] = {
    # name: (warpgroups (64 features each), rows per block (the wgmma N: 64, 128 or 256), stages, blocks per SM
    #        asked of ptxas)
    "wg2_r128_s4b2": (2, 128, 4, 2),
    "wg2_r128_s4": (2, 128, 4, 1),
    "wg3_r128_s4": (3, 128, 4, 1),
    "wg2_r64_s4b2": (2, 64, 4, 2),
    "wg2_r256_s4": (2, 256, 4, 1),
}

_WG_SRC = _TC2_SRC + cuda_source("int4_gemm_wgmma.cu")  # the wgmma fragment uses tc2's decode and copy helpers


def wgmma_smem_bytes(config: str, zero_point: bool = False) -> int:
    """Dynamic shared memory of a wgmma config (EqwCfg::smem in the fragment): the stages, each rounded up to 1024
    bytes (the swizzle's period), or the epilogue's [rows x (features + 8)] fp16 tile if larger, + 1024 to align."""
    nwg, br, st, _ = WGMMA_CONFIGS[config]
    bf = 64 * nwg
    stage = -(-(br * TC2_BK * 2 + bf * TC2_BK // 2 + bf * 4 * (2 if zero_point else 1)) // 1024) * 1024
    return max(st * stage, br * (bf + 8) * 2) + 1024


def wgmma_choice(in_f: int, out_f: int) -> tuple[str, str]:
    """(config for more than 256 rows, config up to 256 rows) from the H200 timings (bench/gpu_wgmma,
    docs/benchmarks/h200-wgmma.md): wide outputs (gate_up) two 128 x 128 blocks per SM; 6144-wide (qkv) 192 features
    x 128 rows (one wave at 512 rows); 3072..12287 one 128 x 128 block per SM; narrower outputs, and everything but
    gate_up up to 256 rows, 128 features x 64 rows, two blocks per SM (twice the blocks)."""
    if out_f >= 12288:
        return "wg2_r128_s4b2", "wg2_r128_s4b2"
    if out_f >= 6144 and out_f % 192 == 0:
        return "wg3_r128_s4", "wg2_r64_s4b2"
    return ("wg2_r128_s4" if out_f >= 3072 else "wg2_r64_s4b2"), "wg2_r64_s4b2"


def gemm_choice(in_f: int, out_f: int, sm: int, mode: str = "auto") -> tuple[str, str | None]:
    """(config, small-rows config) of the pipelined prefill GEMM for --opt cuda_gemm=`mode` on sm_`sm`: wgmma on
    sm_90 (auto or wgmma), the tc2 mma.sync configs elsewhere (auto or mma-pipelined)."""
    from .options import KernelOptionError

    if mode == "wgmma" and sm != 90:
        raise KernelOptionError(f"--opt cuda_gemm=wgmma needs an sm_90 target (Hopper's wgmma); this one is sm_{sm}: "
                                "use cuda_gemm=auto or mma-pipelined")
    if mode == "wgmma" or (mode == "auto" and sm == 90):
        return wgmma_choice(in_f, out_f)
    return tc2_choice(in_f, out_f)


def gemm_kernel_name(config: str) -> str:
    """The registry's name of the pipelined GEMM with tile `config` (before the grid suffix)."""
    return "int4_gemm_wgmma" if config in WGMMA_CONFIGS else "int4_gemm_mma_pipelined"


def tc2_supports(in_f: int, out_f: int, x_dtype: str, scale_dtype: str, out_dtype: str) -> bool:
    """fp16 activations/scales/output and `in` a whole number of 64-wide stages (two groups, so the scale pair of a
    row is 4-byte aligned for cp.async); any `out` (the last tile is zero-filled and guarded)."""
    return in_f % TC2_BK == 0 and x_dtype == scale_dtype == out_dtype == "float16" and out_f > 0


def tc2_smem_bytes(config: str, zero_point: bool = False) -> int:
    wm, wn, mi, ni, st, _, _ = TC2_CONFIGS[config]
    bm, bn = wm * 16 * mi, wn * 8 * ni
    return st * (bm * TC2_BK * 2 + bn * TC2_BK // 2 + bn * 4 * (2 if zero_point else 1))


def tc2_launcher(in_f: int, out_f: int, bias: bool, config: str, small: str | None, small_rows: int, offset: int,
                 zero_point: bool, M):
    """(TVMScript macro launching the tc2 GEMM for `M` rows: the `small` config's tile when M <= small_rows, else
    `config`'s; the kernel's label, e.g. `wgmma_wg2_r128_s4/wg2_r64_s4b2@256_8_false`). Shared by int4_gemm_tc2 and
    the GEMM branch of cuda_gemv_batch.int4_linear_small_rows; the macro takes (x, qw, qs, min pointer, bias
    pointer, out)."""
    from tvm.script import tirx as T

    off = 0 if zero_point else offset
    grid = "" if (off, zero_point) == (QMAX, False) else f", {off}, {'true' if zero_point else 'false'}"

    def tile(name: str):
        if name in WGMMA_CONFIGS:
            nwg, br, st, min_blocks = WGMMA_CONFIGS[name]
            return (br, (out_f + 64 * nwg - 1) // (64 * nwg), 128 * nwg, wgmma_smem_bytes(name, zero_point),
                    min_blocks, f"edgellm_q4gemm_wgmma<{nwg}, {br}, {st}, {'true' if bias else 'false'}{grid}>")
        wm, wn, mi, ni, st, min_blocks, mode = TC2_CONFIGS[name]
        return (wm * 16 * mi, (out_f + wn * 8 * ni - 1) // (wn * 8 * ni), 32 * wm * wn,
                tc2_smem_bytes(name, zero_point), min_blocks,
                f"edgellm_q4gemm<{wm}, {wn}, {mi}, {ni}, {st}, {'true' if bias else 'false'}, {mode}{grid}>")

    BM, NB, NT, SMEM, MINB, CALL = tile(config)
    BMs, NBs, NTs, SMEMs, MINBs, CALLs = tile(small or config)
    two = small is not None
    src = _WG_SRC if config in WGMMA_CONFIGS or (small or config) in WGMMA_CONFIGS else _TC2_SRC

    @T.macro
    def launch(x, qw, qs, mp, bp, out):
        if two and M <= small_rows:
            T.launch_thread("blockIdx.x", (M + BMs - 1) // BMs)
            T.launch_thread("blockIdx.y", NBs)
            T.launch_thread("threadIdx.x", NTs)
            sms = T.alloc_buffer((SMEMs,), "uint8", scope="shared.dyn")
            with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", MINBs):
                T.evaluate(T.cuda.func_call(CALLs, x.data, qw.data, qs.data, mp, bp, out.data, M, in_f, out_f,
                                            sms.data, source_code=src))
        else:
            # row tiles fastest: the row tiles sharing a weight tile run together, each weight byte leaves DRAM once
            T.launch_thread("blockIdx.x", (M + BM - 1) // BM)
            T.launch_thread("blockIdx.y", NB)
            T.launch_thread("threadIdx.x", NT)
            sm = T.alloc_buffer((SMEM,), "uint8", scope="shared.dyn")
            with T.attr(0, "tirx.launch_bounds_min_blocks_per_sm", MINB):  # __launch_bounds__(NT, MINB)
                T.evaluate(T.cuda.func_call(CALL, x.data, qw.data, qs.data, mp, bp, out.data, M, in_f, out_f,
                                            sm.data, source_code=src))

    kind = "wgmma" if config in WGMMA_CONFIGS else "tc2_cp_async"
    label = f"{kind}_{config}" + (f"/{small}@{small_rows}" if small else "") + grid.replace(", ", "_")
    return launch, label


def q4_linear_func(in_f: int, out_f: int, bias: bool, zero_point: bool, M, body):
    """The PrimFunc of a 4-bit fp16 linear over `M` rows whose TVMScript macro `body(x, qw, qs, min pointer, bias
    pointer, out)` launches the kernels: arguments x [M, in], q_weight, q_scale, [q_min if zero_point], [bias if
    bias], out [M, out] (an absent argument's pointer is another buffer's, never read). Shared by int4_gemm_tc2 and
    cuda_gemv_batch.int4_linear_small_rows."""
    from tvm.script import tirx as T

    W, G = in_f // PER_WORD, in_f // GROUP

    @T.prim_func(private=True, check_well_formed=False)
    def kernel(x_h: T.handle, qw: T.Buffer((out_f, W), "uint32"), qs: T.Buffer((out_f, G), "float16"),
               m_h: T.handle, b_h: T.handle, out_h: T.handle):
        x = T.match_buffer(x_h, (M, in_f), "float16")
        qm = T.match_buffer(m_h, (out_f, G), "float16")
        bias_buf = T.match_buffer(b_h, (out_f,), "float16")
        out = T.match_buffer(out_h, (M, out_f), "float16")
        bp = T.meta_var(bias_buf.data if bias else out.data)  # without bias the pointer is never read
        mp = T.meta_var(qm.data if zero_point else qs.data)  # without a zero point the pointer is never read
        body(x, qw, qs, mp, bp, out)

    params = list(kernel.params)
    keep = params[:3] + ([params[3]] if zero_point else []) + ([params[4]] if bias else []) + [params[5]]
    return compiler().tirx.PrimFunc(keep, kernel.body, kernel.ret_type, kernel.attrs)


def int4_gemm_tc2(in_f: int, out_f: int, bias: bool, config: str = "128x128", small: str | None = None,
                  small_rows: int = 256, offset: int = QMAX, zero_point: bool = False):
    """Same function as `int4_gemm_tc` (x [m, in] fp16, q4f16_1 weights, optional bias, out [m, out] fp16, fp32
    accumulation), as a cp.async multi-stage pipeline with the weights decoded into mma B fragments (see above).
    `config` names a tile shape in TC2_CONFIGS (or WGMMA_CONFIGS: the wgmma kernel, sm_90 only); with `small`, calls
    with m <= small_rows launch that config instead (a smaller tile: more blocks for the 132 SMs when few rows come).
    Needs sm_80+ (cp.async, mma.sync m16n8k16).
    The row's grid: `offset` (the stored value of a zero weight: 7 for q4f16_1, 8 for the Q4_0 grid of q4f16_0)
    or `zero_point` (q * scale + min, the Q4_1 grid of q4f16_2: one more argument q_min after q_scale, staged
    beside the scales; the decode's multiply becomes an fma with 16 min)."""
    c = compiler()
    if not tc2_supports(in_f, out_f, "float16", "float16", "float16"):
        raise ValueError(f"int4_gemm_tc2: unsupported shape {in_f} -> {out_f}: `in` must be a multiple of {TC2_BK}")
    for name in (config, small or config):
        if name not in TC2_CONFIGS and name not in WGMMA_CONFIGS:
            raise ValueError(f"int4_gemm_tc2: unknown config {name!r}; pick one of "
                             f"{sorted(TC2_CONFIGS) + sorted(WGMMA_CONFIGS)}")
    if not 0 <= offset < 16:
        raise ValueError(f"int4_gemm_tc2: offset must be in 0..15, got {offset}")
    M = c.tirx.Var("m", "int64")
    launch, label = tc2_launcher(in_f, out_f, bias, config, small, small_rows, offset, zero_point, M)
    func = q4_linear_func(in_f, out_f, bias, zero_point, M, launch)
    return func.with_attrs({"edgellm.kernel": "gemm", "op_pattern": 8, "tirx.is_scheduled": True, "tir.noalias": True,
                            "edgellm.gemm": label})
