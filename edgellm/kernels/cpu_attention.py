"""CPU kernels for TVM's paged KV cache: attention (decode, prefill) and RoPE.

kernels/kv_cache.py builds `TIRPagedKVCache` for every target; on CPU (llvm) the registry swaps in these three TIR
functions in place of TVM's, keeping their signatures (the C++ runtime calls them positionally):

- `tir_attention_decode_cpu`: TVM's kernel is serial over heads and scalar over head_dim (SmolLM2 decode at
  context 512: 324 us per layer). Ours runs the (sequence, q head) pairs in parallel, walks the cache a page at a
  time (online softmax per page: one rescale of the output per 16 rows), vectorizes the q.k dot products and the
  weighted V sums over head_dim, and computes exp2 with a vectorizable polynomial.
- `tir_attention_prefill_ragged_cpu` (attention among a prefill chunk's own tokens): the same approach; TVM's
  also scores the masked half of the causal rectangle (SmolLM2, 128 tokens: 3.9 -> 0.6 ms per layer).
- `tir_split_rotary`: TVM's evaluates pow/cos/sin for every element of q and k (15 heads x 64 per token); ours
  computes cos/sin once per token and frequency (rotary_dim / 2 of them) with the same frequency functions, so
  every rope scaling TVM supports keeps its meaning, and rotates the heads with vector arithmetic.

On CUDA the registry swaps the ragged prefill attention for kernels/cuda_attention.py instead.

Other cache kernels (prefill against cached pages, sliding window, tree attention, copies) stay TVM's. Shapes:
b sequences, h q heads, kv heads, d head_dim, P page_size; a cache page is [2 (k, v), kv, P, d].
"""

from __future__ import annotations

from .._tvm import compiler
from .cpu_math import LOG2E, fast_exp2, tree_max16, tree_sum16

c = compiler()
T, tirx = c.T, c.tirx

PARALLEL_MIN = 9 * 8  # attention runs serially below this many (page or query, q head) pairs
SPLITS = 4  # decode attention: page ranges per sequence on the parallel path
ROPE_PARALLEL_MIN = 32  # split_rotary runs serially below this many tokens
NEG = -5e4  # the running max starts here, as in TVM's kernels (their lse convention: log2 domain)


@T.macro
def softmax_block(s, red, st, o, D):
    """Online softmax over one block of 16 scores s (log2 domain, padded rows at NEG): st = [running max, running
    sum, new max, rescale]; rescales the output accumulator o[0:D] and leaves exp2(s - max) in s."""
    for i in T.vectorized(16):
        red[i] = s[i]
    tree_max16(red)
    st[2] = T.max(st[0], red[0])
    st[3] = fast_exp2(st[0] - st[2])
    st[1] = st[1] * st[3]
    for i in T.vectorized(D):
        o[i] = o[i] * st[3]
    st[0] = st[2]
    for i in T.vectorized(16):
        s[i] = fast_exp2(s[i] - st[0])
        red[i] = s[i]
    tree_sum16(red)
    st[1] = st[1] + red[0]


def attention_decode_cpu(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, page_size: int = 16):
    """Decode attention over the paged cache, same arguments as TVM's `_attention_decode_cpu` (no sliding window).

    Short caches (below PARALLEL_MIN pages x heads) run serially. Longer ones split each sequence's pages into
    SPLITS ranges processed in parallel, every range for all heads (each K/V byte comes from memory once, and the
    work divides evenly: at context 128+ decode attention reads the cache from DRAM), then merge the partial
    softmax states. rotary_mode must be 0 (RoPE already applied to q and to the cached k: RopeMode.NORMAL
    without sliding window, the only combination that reaches this kernel). lse is TVM's: log2 domain.
    """
    H, KV, D, P = num_qo_heads, num_kv_heads, head_dim, page_size
    G = H // KV
    assert D % 16 == 0 and P == 16, "the registry keeps TVM's kernel for other shapes"
    V = 16  # vector lanes for the dot products (LLVM splits 16 into the target's width: 1 zmm, 4 NEON q)
    DC = D // V
    f32 = "float32"
    exp2 = fast_exp2  # vectorizable; TVM's kernel calls libm exp2 per row
    S = SPLITS

    @T.macro
    def head_range(Q, pages, page_table_values, last_page_len, sm_scale, b, h, begin, npages, p0, p1, o, st):
        """o[D] (unnormalized), st[0] running max, st[1] running sum over the pages [p0, p1) of sequence b."""
        with T.sblock("attn"):
            T.reads()  # the regions depend on lets bound inside; nothing schedules this block
            T.writes()
            q = T.sblock_alloc_buffer((D,), f32)
            acc = T.sblock_alloc_buffer((V,), f32)
            s = T.sblock_alloc_buffer((P,), f32)
            red = T.sblock_alloc_buffer((P,), f32)
            kvh: T.let[T.int32] = h // G
            for i in T.vectorized(D):
                q[i] = T.Cast(f32, Q[b, h, i]) * (sm_scale * LOG2E)
                o[i] = T.float32(0)
            st[0] = T.float32(NEG)
            st[1] = T.float32(1)
            for pp in T.serial(p1 - p0):
                page: T.let[T.int32] = page_table_values[begin + p0 + pp]
                rows: T.let[T.int32] = T.if_then_else(p0 + pp == npages - 1, last_page_len[b], P)
                # scores of this page's rows (log2 domain): s[r] = q . k_r
                for r in T.serial(rows):
                    for i in T.vectorized(V):
                        acc[i] = q[i] * T.Cast(f32, pages[page, 0, kvh, r, i])
                    for j in T.serial(DC - 1):
                        for i in T.vectorized(V):
                            acc[i] = acc[i] + q[(j + 1) * V + i] * T.Cast(f32, pages[page, 0, kvh, r, (j + 1) * V + i])
                    tree_sum16(acc)
                    s[r] = acc[0]
                for r in T.serial(P - rows):
                    s[rows + r] = T.float32(NEG * 4)
                # online softmax, one page at a time
                softmax_block(s, red, st, o, D)
                for r in T.serial(rows):
                    for i in T.vectorized(D):
                        o[i] = o[i] + s[r] * T.Cast(f32, pages[page, 1, kvh, r, i])

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv(
        Q_handle: T.handle,
        pages_handle: T.handle,
        page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle,
        var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "batch_decode_paged_kv_cpu", "tirx.noalias": True})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        pages_elem_offset = T.int64()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        Q = T.match_buffer(Q_handle, (B, H, D), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, KV, P, D), dtype, elem_offset=pages_elem_offset)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset)  # noqa: F841
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_position_elem_offset)  # noqa: F841
        output = T.match_buffer(output_handle, (B, H, D), dtype)
        lse = T.match_buffer(lse_handle, (B, H), f32)
        last_page_len = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_info_elem_offset)

        assert rotary_mode == 0, "edgellm CPU decode attention expects RoPE applied before the cache (rotary_mode 0)"
        with T.sblock("root"):
            T.reads()
            T.writes()
            part_o = T.sblock_alloc_buffer((B * S, H, D), f32)  # split-KV partial states (parallel path)
            part_st = T.sblock_alloc_buffer((B * S, H, 2), f32)
            if nnz_pages * H < PARALLEL_MIN:
                for bh in T.serial(B * H):
                    with T.sblock("serial"):
                        T.reads()
                        T.writes()
                        o = T.sblock_alloc_buffer((D,), f32)
                        st = T.sblock_alloc_buffer((4,), f32)  # running max, running sum, new max, rescale
                        b: T.let[T.int32] = bh // H
                        begin: T.let[T.int32] = page_table_indptr[b]
                        npages: T.let[T.int32] = page_table_indptr[b + 1] - begin
                        head_range(Q, pages, page_table_values, last_page_len, sm_scale, b, bh % H, begin, npages,
                                   0, npages, o, st)
                        for i in T.vectorized(D):
                            output[b, bh % H, i] = T.Cast(dtype, o[i] / st[1])
                        lse[b, bh % H] = st[0] + T.log2(st[1])
            else:
                for t in T.parallel(B * S):
                    with T.sblock("split"):
                        T.reads()
                        T.writes()
                        o = T.sblock_alloc_buffer((D,), f32)
                        st = T.sblock_alloc_buffer((4,), f32)
                        b: T.let[T.int32] = t // S
                        begin: T.let[T.int32] = page_table_indptr[b]
                        npages: T.let[T.int32] = page_table_indptr[b + 1] - begin
                        for h in T.serial(H):
                            head_range(Q, pages, page_table_values, last_page_len, sm_scale, b, h, begin, npages,
                                       npages * (t % S) // S, npages * (t % S + 1) // S, o, st)
                            for i in T.vectorized(D):
                                part_o[t, h, i] = o[i]
                            part_st[t, h, 0] = st[0]
                            part_st[t, h, 1] = st[1]
                for bh in T.serial(B * H):
                    with T.sblock("merge"):
                        T.reads()
                        T.writes()
                        o = T.sblock_alloc_buffer((D,), f32)
                        st = T.sblock_alloc_buffer((3,), f32)  # max, sum, factor
                        b: T.let[T.int32] = bh // H
                        h: T.let[T.int32] = bh % H
                        st[0] = T.float32(NEG)
                        for sp in T.serial(S):
                            st[0] = T.max(st[0], part_st[b * S + sp, h, 0])
                        st[1] = T.float32(0)
                        for i in T.vectorized(D):
                            o[i] = T.float32(0)
                        for sp in T.serial(S):
                            st[2] = exp2(part_st[b * S + sp, h, 0] - st[0])
                            st[1] = st[1] + part_st[b * S + sp, h, 1] * st[2]
                            for i in T.vectorized(D):
                                o[i] = o[i] + part_o[b * S + sp, h, i] * st[2]
                        for i in T.vectorized(D):
                            output[b, h, i] = T.Cast(dtype, o[i] / st[1])
                        lse[b, h] = st[0] + T.log2(st[1])

    return batch_decode_paged_kv


def attention_prefill_ragged_cpu(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str):
    """Attention among the new tokens of each sequence (q, k, v ragged by indptr), TVM's
    `_attention_prefill_ragged_cpu` arguments. TVM's is serial and scalar and scores every (query, key) pair of
    the rectangle, masked ones included; ours runs (query, head) pairs in parallel (rows paired first/last so the
    causal triangle splits evenly over threads), stops at the causal limit, and works in chunks of 16 keys with
    vector dot products, fast_exp2 and one output rescale per chunk. rotary_mode must be 0.
    """
    H, KV, D, C = num_qo_heads, num_kv_heads, head_dim, 16
    G = H // KV
    assert D % 16 == 0, "the registry keeps TVM's kernel for other shapes"
    V, DC, f32 = 16, head_dim // 16, "float32"

    @T.macro
    def one_row(q, k, v, output, lse, q0, kv0, qo_len, kv_len, causal, sm_scale, t):
        with T.sblock("attn"):
            T.reads()
            T.writes()
            qv = T.sblock_alloc_buffer((D,), f32)
            o = T.sblock_alloc_buffer((D,), f32)
            acc = T.sblock_alloc_buffer((V,), f32)
            s = T.sblock_alloc_buffer((C,), f32)
            red = T.sblock_alloc_buffer((C,), f32)
            st = T.sblock_alloc_buffer((4,), f32)  # running max, running sum, new max, rescale factor
            pair: T.let[T.int32] = t // H
            h: T.let[T.int32] = t % H
            row: T.let[T.int32] = T.if_then_else(pair % 2 == 0, pair // 2, qo_len - 1 - pair // 2)
            kvh: T.let[T.int32] = h // G
            n: T.let[T.int32] = T.if_then_else(causal > 0, kv_len - qo_len + row + 1, kv_len)
            for i in T.vectorized(D):
                qv[i] = T.Cast(f32, q[q0 + row, h, i]) * (sm_scale * LOG2E)
                o[i] = T.float32(0)
            st[0] = T.float32(NEG)
            st[1] = T.float32(1)
            for ch in T.serial((n + C - 1) // C):
                rows: T.let[T.int32] = T.min(C, n - ch * C)
                for r in T.serial(rows):
                    for i in T.vectorized(V):
                        acc[i] = qv[i] * T.Cast(f32, k[kv0 + ch * C + r, kvh, i])
                    for j in T.serial(DC - 1):
                        for i in T.vectorized(V):
                            acc[i] = acc[i] + qv[(j + 1) * V + i] * T.Cast(f32, k[kv0 + ch * C + r, kvh, (j + 1) * V + i])
                    tree_sum16(acc)
                    s[r] = acc[0]
                for r in T.serial(C - rows):
                    s[rows + r] = T.float32(NEG * 4)
                softmax_block(s, red, st, o, D)
                for r in T.serial(rows):
                    for i in T.vectorized(D):
                        o[i] = o[i] + s[r] * T.Cast(f32, v[kv0 + ch * C + r, kvh, i])
            for i in T.vectorized(D):
                output[q0 + row, h, i] = T.Cast(dtype, o[i] / st[1])
            lse[q0 + row, h] = st[0] + T.log2(st[1])

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
                                var_kv_indptr: T.handle, var_q_rope_position: T.handle,
                                var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
                                causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32,
                                rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "global_symbol": "batch_prefill_ragged_kv", "tirx.noalias": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, H, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, KV, D), dtype)
        v = T.match_buffer(var_v, (kv_len, KV, D), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_position_elem_offset)  # noqa: F841
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)  # noqa: F841
        output = T.match_buffer(var_output, (qo_len, H, D), dtype)
        lse = T.match_buffer(var_lse, (qo_len, H), f32)

        assert rotary_mode == 0, "edgellm CPU prefill attention expects RoPE applied before the cache (rotary_mode 0)"
        for b in T.serial(batch_size):
            with T.sblock("seq"):
                T.reads()
                T.writes()
                q0: T.let[T.int32] = q_indptr[b]
                kv0: T.let[T.int32] = kv_indptr[b]
                nq: T.let[T.int32] = q_indptr[b + 1] - q0
                nkv: T.let[T.int32] = kv_indptr[b + 1] - kv0
                if nq * H < PARALLEL_MIN:
                    for t in T.serial(nq * H):
                        one_row(q, k, v, output, lse, q0, kv0, nq, nkv, causal, sm_scale, t)
                else:
                    for t in T.parallel(nq * H):
                        one_row(q, k, v, output, lse, q0, kv0, nq, nkv, causal, sm_scale, t)

    return batch_prefill_ragged_kv


def rope_supported(rope_scaling: dict) -> bool:
    """Rope scalings our split_rotary handles (the others keep TVM's kernel): plain RoPE and llama3."""
    return not rope_scaling or rope_scaling.get("rope_type") == "llama3"


def split_rotary_cpu(theta: float, scale: float, head_dim: int, num_q_heads: int, num_kv_heads: int, dtype: str,
                     rope_scaling: dict, rotary_dim: int):
    """qkv [s, h+2kv, d] -> q [s, h, d], k [s, kv, d] with RoPE (rotate-half) at position_map[s], v [s, kv, d].

    Same arguments and results as TVM's `llama_rope_with_position_map` (its `fused_rope`), with the same
    frequency expressions (`switch_rope_freq_func`), evaluated once per token and frequency.
    """
    H, KV, D, HALF = num_q_heads, num_kv_heads, head_dim, rotary_dim // 2
    F = H + 2 * KV
    f32 = "float32"
    freq = c.llm_rope.switch_rope_freq_func(rope_scaling)

    def cos_sin(pos, j):
        out = []
        for pick in (0, 1):  # each call binds fresh Let variables
            res = freq(T.Cast(f32, pos) * tirx.const(scale, f32), j, rotary_dim, theta, f32)
            e = res[pick]
            for var, value in res[2].items():
                e = tirx.Let(var, value, e)
            out.append(e)
        return out

    @T.macro
    def rotate(qkv, dst, s, h, dh, cs, sn, apply_rope):
        if apply_rope > 0:
            for j in T.vectorized(HALF):
                dst[s, dh, j] = T.Cast(dtype, cs[j] * T.Cast(f32, qkv[s, h, j]) + sn[j] * -T.Cast(f32, qkv[s, h, j + HALF]))
            for j in T.vectorized(HALF):
                dst[s, dh, j + HALF] = T.Cast(dtype, cs[j] * T.Cast(f32, qkv[s, h, j + HALF]) + sn[j] * T.Cast(f32, qkv[s, h, j]))
            if D > rotary_dim:  # a Python bool: resolved while parsing
                for j in T.vectorized(D - rotary_dim):
                    dst[s, dh, rotary_dim + j] = qkv[s, h, rotary_dim + j]
        else:
            for j in T.vectorized(D):
                dst[s, dh, j] = qkv[s, h, j]

    @T.macro
    def one_token(qkv, position_map, q, k, v, apply_rope, s):
        with T.sblock("rope"):
            T.reads()
            T.writes()
            cs = T.sblock_alloc_buffer((HALF,), f32)
            sn = T.sblock_alloc_buffer((HALF,), f32)
            if apply_rope > 0:
                for j in T.serial(HALF):
                    cs[j] = cos_sin(position_map[s], j)[0]
                    sn[j] = cos_sin(position_map[s], j)[1]
            for h in T.serial(H):
                rotate(qkv, q, s, h, h, cs, sn, apply_rope)
            for h in T.serial(KV):
                rotate(qkv, k, s, H + h, h, cs, sn, apply_rope)
            for h in T.serial(KV):
                for j in T.vectorized(D):
                    v[s, h, j] = qkv[s, H + KV + h, j]

    @T.prim_func(s_tir=True)
    def fused_rope(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle,
                   var_v: T.handle, apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int32()
        position_map_elem_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, F, D), dtype)
        q = T.match_buffer(var_q, (seq_len, H, D), dtype)
        k = T.match_buffer(var_k, (seq_len, KV, D), dtype)
        v = T.match_buffer(var_v, (seq_len, KV, D), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=position_map_elem_offset)
        if seq_len < ROPE_PARALLEL_MIN:  # decode: one token is less work than waking the pool
            for s in T.serial(seq_len):
                one_token(qkv, position_map, q, k, v, apply_rope, s)
        else:
            for s in T.parallel(seq_len):
                one_token(qkv, position_map, q, k, v, apply_rope, s)

    return fused_rope
