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
`quant/gpu_gemm.py:int4_gemm_tc2` does: TVMScript in this wheel has no spelling for cp.async groups or ldmatrix.
"""

from __future__ import annotations

import os

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
    has no inline RoPE; it refuses rotary_mode != 0 at run time as well). EDGELLM_CUDA_ATTN=tvm keeps TVM's kernel
    (A/B builds)."""
    if os.environ.get("EDGELLM_CUDA_ATTN", "mma") == "tvm":
        return False
    if target.kind.name != "cuda" or dtype != "float16" or attn_kind != "mha" or rope_inline:
        return False
    arch = str(target.attrs.get("arch", ""))
    if not arch.startswith("sm_") or int("".join(ch for ch in arch[3:] if ch.isdigit()) or 0) < 80:
        return False
    return head_dim in HEAD_DIMS and v_head_dim == head_dim


_SRC = r"""
#ifndef EDGELLM_ATTN_PREFILL_RAGGED
#define EDGELLM_ATTN_PREFILL_RAGGED
__device__ __forceinline__ void eat_cp16(unsigned dst, const void* src, int n) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void eat_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void eat_wait() { asm volatile("cp.async.wait_group %0;\n" :: "n"(N)); }
__device__ __forceinline__ void eat_ldm4(unsigned* a, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(addr));
}
__device__ __forceinline__ void eat_ldm4t(unsigned* a, unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(addr));
}
__device__ __forceinline__ void eat_mma(float* d, const unsigned* a, unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ unsigned eat_pack(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

// One block: BM = 64 packed rows (token, q head of kv head blockIdx.y's group) x D, 4 warps of 16 rows.
// Shared memory: Q [64][D], K [64][D], V [64][D] fp16, 16-byte chunk c of row r stored at chunk c ^ (r & 7) so
// that ldmatrix's 8 row addresses (same chunk, 8 rows) hit 8 different bank groups.
template <int D, int G>
__device__ __forceinline__ void edgellm_attn_prefill_ragged(
    const half* __restrict__ q, const int* __restrict__ q_indptr, const half* __restrict__ k,
    const half* __restrict__ v, const int* __restrict__ kv_indptr, half* __restrict__ out,
    float* __restrict__ lse, int batch_size, int causal, float sm_scale, int H, int KV,
    unsigned char* smem) {
  constexpr int CH = D / 8;  // 16-byte chunks per row
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, qd = lane & 3;
  const int kvh = blockIdx.y;
  // find this block's sequence and its tile inside it
  int tile = blockIdx.x, b = 0, q0 = 0, nq = 0;
  for (; b < batch_size; ++b) {
    q0 = q_indptr[b];
    nq = q_indptr[b + 1] - q0;
    const int nt = (nq * G + 63) / 64;
    if (tile < nt) { tile = nt - 1 - tile; break; }  // reversed: longest causal tiles first
    tile -= nt;
  }
  if (b >= batch_size) return;
  const int kv0 = kv_indptr[b], nkv = kv_indptr[b + 1] - kv0;
  const int r0 = tile * 64;  // first packed row
  const int shift = nkv - nq;  // causal: token t sees keys < t + 1 + shift (TVM's _causal_mask)
  const unsigned sq = (unsigned)__cvta_generic_to_shared(smem);
  const unsigned sk = sq + 64 * D * 2, sv = sk + 64 * D * 2;
  const int stride = KV * D;  // elements between consecutive tokens of k / v
  // Q tile
#pragma unroll
  for (int i = 0; i < 64 * CH / 128; ++i) {
    const int c = tid + i * 128, r = c / CH, ch = c % CH, pr = r0 + r, t = pr / G;
    const half* src = t < nq ? q + ((long long)(q0 + t) * H + kvh * G + pr % G) * D + ch * 8 : q;
    eat_cp16(sq + (r * CH + (ch ^ (r & 7))) * 16, src, t < nq ? 16 : 0);
  }
  eat_commit();
  // key range of this block: causal rows stop at their diagonal
  const int t_last = min(nq - 1, (r0 + 63) / G), t_first = r0 / G;
  const int kv_end = causal ? max(0, min(nkv, t_last + 1 + shift)) : nkv;
  const int full_end = causal ? max(0, min(nkv, t_first + 1 + shift)) : nkv;  // keys visible to every row
  const int ntiles = (kv_end + 63) / 64;
  auto load_kv = [&](const half* base, unsigned dst, int j) {
#pragma unroll
    for (int i = 0; i < 64 * CH / 128; ++i) {
      const int c = tid + i * 128, r = c / CH, ch = c % CH, key = j * 64 + r;
      const half* src = key < nkv ? base + (long long)(kv0 + key) * stride + kvh * D + ch * 8 : base;
      eat_cp16(dst + (r * CH + (ch ^ (r & 7))) * 16, src, key < nkv ? 16 : 0);
    }
  };
  if (ntiles > 0) load_kv(k, sk, 0);
  eat_commit();
  if (ntiles > 0) load_kv(v, sv, 0);
  eat_commit();

  // rows of this thread: g and g + 8 of the warp's 16
  const int wr = warp * 16;
  int lim[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int t = (r0 + wr + g + h * 8) / G;
    lim[h] = causal ? min(nkv, t + 1 + shift) : nkv;
  }
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m[2] = {-5e4f, -5e4f}, l[2] = {0.f, 0.f};
  const float scale = sm_scale * 1.4426950408889634f;  // log2(e): scores in the log2 domain

  eat_wait<2>();
  __syncthreads();
  unsigned qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int r = wr + (lane & 15), ch = kk * 2 + (lane >> 4);
    eat_ldm4(qf[kk], sq + (r * CH + (ch ^ (r & 7))) * 16);
  }

  for (int j = 0; j < ntiles; ++j) {
    eat_wait<1>();  // K_j has landed (V_j may be in flight)
    __syncthreads();
    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk2 = 0; kk2 < D / 32; ++kk2) {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
        unsigned bf[4];
        const int r = n * 8 + (lane & 7), ch = kk2 * 4 + (lane >> 3);
        eat_ldm4(bf, sk + (r * CH + (ch ^ (r & 7))) * 16);
        eat_mma(s[n], qf[kk2 * 2], bf[0], bf[1]);
        eat_mma(s[n], qf[kk2 * 2 + 1], bf[2], bf[3]);
      }
    }
    __syncthreads();  // every warp is done with K_j
    if (j + 1 < ntiles) load_kv(k, sk, j + 1);
    eat_commit();
    // online softmax (log2 domain); keys past a row's limit are -inf
    const bool mask = (j + 1) * 64 > full_end;
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = j * 64 + n * 8 + qd * 2 + (e & 1);
        float x = s[n][e] * scale;
        if (mask && key >= lim[e >> 1]) x = -INFINITY;
        s[n][e] = x;
        mx[e >> 1] = fmaxf(mx[e >> 1], x);
      }
    }
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 2));
      alpha[h] = exp2f(m[h] - mx[h]);
      m[h] = mx[h];
      l[h] *= alpha[h];
    }
    unsigned pf[4][4];  // P as the A operand of 4 k16 steps
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      const float p0 = exp2f(s[n][0] - m[0]), p1 = exp2f(s[n][1] - m[0]);
      const float p2 = exp2f(s[n][2] - m[1]), p3 = exp2f(s[n][3] - m[1]);
      l[0] += p0 + p1;
      l[1] += p2 + p3;
      pf[n >> 1][(n & 1) * 2] = eat_pack(p0, p1);
      pf[n >> 1][(n & 1) * 2 + 1] = eat_pack(p2, p3);
    }
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= alpha[0]; o[n][1] *= alpha[0];
      o[n][2] *= alpha[1]; o[n][3] *= alpha[1];
    }
    eat_wait<1>();  // V_j has landed (K_{j+1} may be in flight)
    __syncthreads();
#pragma unroll
    for (int kt = 0; kt < 4; ++kt) {
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        unsigned bf[4];
        const int r = kt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, ch = dn * 2 + (lane >> 4);
        eat_ldm4t(bf, sv + (r * CH + (ch ^ (r & 7))) * 16);
        eat_mma(o[dn * 2], pf[kt], bf[0], bf[1]);
        eat_mma(o[dn * 2 + 1], pf[kt], bf[2], bf[3]);
      }
    }
    __syncthreads();  // every warp is done with V_j
    if (j + 1 < ntiles) load_kv(v, sv, j + 1);
    eat_commit();
  }
  eat_wait<0>();
  // row sums across the quad, then output and lse (log2 domain: m + log2(sum), as TVM's kernels)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffff, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffff, l[h], 2);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int pr = r0 + wr + g + h * 8, t = pr / G;
    if (t >= nq) continue;
    const long long row = (long long)(q0 + t) * H + kvh * G + pr % G;
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<__half2*>(out + row * D + n * 8 + qd * 2) =
          __floats2half2_rn(o[n][h * 2] * inv, o[n][h * 2 + 1] * inv);
    if (qd == 0) lse[row] = m[h] + log2f(l[h]);
  }
}
#endif
"""


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
