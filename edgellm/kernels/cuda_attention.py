"""Tensor-core ragged prefill attention for CUDA (sm_80+), a drop-in for TVM's `batch_prefill_ragged_kv`.

TVM's CUDA kernel (`_attention_prefill_ragged`) computes q.k and p.v on CUDA cores in 32 x 32 tiles over a fixed
grid of 16 x h_kv blocks: at Llama-3-8B shapes a 512-token prefill spends about 0.6 ms per layer in it. This one is
FlashAttention-2 shaped: mma.sync m16n8k16 (fp16 in, fp32 accumulate), Q/K fragments by ldmatrix, V by
ldmatrix.trans, online softmax in fp32 with exp2 (log2 domain, the lse convention of TVM's kernels, which the
runtime's merge kernels rely on), K and V tiles streamed by cp.async so that one loads while the other is used.

Work split: the q rows of a kv head's group are packed as TVM packs them (row r of a sequence = token r / G,
q head kv_head * G + r % G), so a block of BM = 64 packed rows shares every K/V tile among the G q heads of its
group. Grid: (row tiles of all sequences, h_kv); a block finds its sequence by walking q_indptr (the grid is sized
for the worst case, ceil(total rows / BM) + batch_size tiles; blocks past the end return). Within a sequence the
tile order is reversed, so that under a causal mask the longest tiles start first.

The PrimFunc is only the launch around one CUDA device function (`T.cuda.func_call` with its source), as
`kernels/cuda_gemm.py:int4_gemm_tc2` does: TVMScript in this wheel has no spelling for cp.async groups or ldmatrix.
"""

from __future__ import annotations

from .cuda import cuda_source

BM = 64  # packed q rows per block: 4 warps x 16 rows
BN = 64  # keys per K/V tile
THREADS = 128
HEAD_DIMS = (64, 128)


def smem_bytes(head_dim: int) -> int:
    """Q, K and V tiles, fp16: 3 x 64 rows x head_dim."""
    return (BM + 2 * BN) * head_dim * 2


def supports(target, dtype: str, head_dim: int, v_head_dim: int, attn_kind: str, rope_inline: bool) -> bool:
    """Where `paged_kv_cache` swaps this kernel in: CUDA sm_80+ (mma.sync m16n8k16, cp.async, ldmatrix), fp16,
    head_dim 64 or 128 for q, k and v, multi-head (not MLA) attention, and RoPE applied before the cache (the kernel
    has no inline RoPE; it refuses rotary_mode != 0 at run time as well). KernelOptions.cuda_attention=tvm keeps
    TVM's kernel (the registry asks this only when the option allows it)."""
    if target.kind.name != "cuda" or dtype != "float16" or attn_kind != "mha" or rope_inline:
        return False
    arch = str(target.attrs.get("arch", ""))
    if not arch.startswith("sm_") or int("".join(ch for ch in arch[3:] if ch.isdigit()) or 0) < 80:
        return False
    return head_dim in HEAD_DIMS and v_head_dim == head_dim


_SRC = cuda_source("attention_prefill_ragged.cu")


def attention_prefill_ragged_cuda(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str):
    """Attention among the new tokens of each sequence (q, k, v ragged by q_indptr / kv_indptr), with exactly the
    arguments of TVM's `_attention_prefill_ragged` (its `batch_prefill_ragged_kv`): output [total, h_q, d] fp16 and
    lse [total, h_q] float32 in the log2 domain. Causal rows see keys < token + 1 + (kv_len - q_len), as TVM's
    `_causal_mask`. rotary_mode must be 0 (RoPE applied before the cache); the kernel asserts it."""
    from tvm.script import tirx as T

    H, KV, D = num_qo_heads, num_kv_heads, head_dim
    if dtype != "float16" or D not in HEAD_DIMS or H % KV != 0:
        raise ValueError(f"attention_prefill_ragged_cuda: unsupported (dtype {dtype}, head_dim {D}, heads {H}/{KV}); "
                         f"needs float16, head_dim in {HEAD_DIMS} and q heads a multiple of kv heads: "
                         "keep TVM's kernel")
    G = H // KV
    SMEM = smem_bytes(D)
    CALL = f"edgellm_attn_prefill_ragged<{D}, {G}>"

    @T.prim_func(private=True, check_well_formed=False)
    def batch_prefill_ragged_kv(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
                                var_kv_indptr: T.handle, var_q_rope_position: T.handle,
                                var_k_rope_pos_offset: T.handle, var_output: T.handle, var_lse: T.handle,
                                causal: T.int32, rotary_mode: T.int32, rope_scale: T.float32,
                                rope_theta: T.float32, sm_scale: T.float32):
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
        lse = T.match_buffer(var_lse, (qo_len, H), "float32")

        assert rotary_mode == 0, "edgellm CUDA prefill attention expects RoPE applied before the cache (rotary_mode 0)"
        # worst case of row tiles over all sequences: ceil(total rows / BM) + one partial tile per sequence
        T.launch_thread("blockIdx.x", (qo_len * G + BM - 1) // BM + batch_size)
        T.launch_thread("blockIdx.y", KV)
        T.launch_thread("threadIdx.x", THREADS)
        sm = T.alloc_buffer((SMEM,), "uint8", scope="shared.dyn")
        T.evaluate(T.cuda.func_call(
            CALL, q.data, T.address_of(q_indptr[0]), k.data, v.data, T.address_of(kv_indptr[0]), output.data,
            lse.data, batch_size, causal, sm_scale, H, KV, sm.data, source_code=_SRC))

    return batch_prefill_ragged_kv.with_attrs({
        "global_symbol": "batch_prefill_ragged_kv", "tirx.is_scheduled": True,
        "tirx.noalias": True, "edgellm.kernel": "attention_prefill_ragged_mma"})


def attention_chunk_cuda(num_kv_heads: int, num_qo_heads: int, head_dim: int):
    """The same device function for the owned KV cache (kernels/owned_kv.py): one sequence's chunk among itself,
    causal, q [n, h, d], k/v [n, h_kv, d], indptr [0, n] -> output [n, h, d] fp16, lse [n, h] (log2 domain);
    sm_scale = head_dim^-0.5 baked in."""
    from tvm.script import tirx as T

    H, KV, D = num_qo_heads, num_kv_heads, head_dim
    if D not in HEAD_DIMS or H % KV != 0:
        raise ValueError(f"attention_chunk_cuda: unsupported (head_dim {D}, heads {H}/{KV})")
    G = H // KV
    SMEM = smem_bytes(D)
    CALL = f"edgellm_attn_prefill_ragged<{D}, {G}>"
    scale = float(D ** -0.5)

    @T.prim_func(private=True, check_well_formed=False)
    def attn_chunk(var_q: T.handle, var_indptr: T.handle, var_k: T.handle, var_v: T.handle, var_output: T.handle,
                   var_lse: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        n = T.int64()
        q = T.match_buffer(var_q, (n, H, D), "float16")
        indptr = T.match_buffer(var_indptr, (2,), "int32")
        k = T.match_buffer(var_k, (n, KV, D), "float16")
        v = T.match_buffer(var_v, (n, KV, D), "float16")
        output = T.match_buffer(var_output, (n, H, D), "float16")
        lse = T.match_buffer(var_lse, (n, H), "float32")
        with T.sblock("root"):
            T.reads()
            T.writes()
            T.launch_thread("blockIdx.x", (n * G + BM - 1) // BM + 1)
            T.launch_thread("blockIdx.y", KV)
            T.launch_thread("threadIdx.x", THREADS)
            sm = T.alloc_buffer((SMEM,), "uint8", scope="shared.dyn")
            T.evaluate(T.cuda.func_call(
                CALL, q.data, indptr.data, k.data, v.data, indptr.data, output.data, lse.data, 1, 1,
                T.float32(scale), H, KV, sm.data, source_code=_SRC))

    return attn_chunk.with_attr("edgellm.kernel", "attention_chunk_mma")
