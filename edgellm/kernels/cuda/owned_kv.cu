#ifndef EDGELLM_OWNED_KV
#define EDGELLM_OWNED_KV
// edgellm's own paged KV cache for CUDA (kernels/owned_kv.py). Layout of `pages`: [L, P, 2, KV, 16, D] fp16
// (layer, page, K|V, kv head, slot, dim). A row's page table is page_table[row * maxp + pos / 16]; the token at
// position pos lives in slot pos % 16 of that page.

// RoPE (rotate-half, float32 angles pos * inv_freq[j]) on the q and k heads of each new token, K and V written
// into the token's page slot, and rotated q / k and v copied out for the attention of the chunk among itself.
// Block (token i, heads HB * blockIdx.y ..) over the H + 2 KV heads of q | k | v, D / 2 threads, one head after the
// other (a block per head was 24,576 blocks of 64 threads for a 512-token Llama-3-8B chunk: 30 us a layer, bound by
// block launches); token i belongs to row i / per_row at position pos0[row] + i % per_row.
template <int D, int HB>
__device__ __forceinline__ void edgellm_kv_append(
    const half* __restrict__ qkv, const float* __restrict__ inv_freq, const int* __restrict__ page_table,
    const int* __restrict__ pos0, half* __restrict__ pages, half* __restrict__ q_out, half* __restrict__ k_out,
    half* __restrict__ v_out, int per_row, int maxp, long long P, int layer, int H, int KV) {
  constexpr int HALF = D / 2;
  const int i = blockIdx.x, j = threadIdx.x, row = i / per_row, pos = pos0[row] + i % per_row;
  const int page = page_table[row * maxp + pos / 16], slot = pos % 16;
  half* base = pages + ((long long)layer * P + page) * 2 * KV * 16 * D;
  float s, c;
  sincosf((float)pos * inv_freq[j], &s, &c);
  const int h0 = (int)blockIdx.y * HB;
  for (int h = h0; h < min(H + 2 * KV, h0 + HB); ++h) {
    const half* x = qkv + ((long long)i * (H + 2 * KV) + h) * D;
    if (h >= H + KV) {  // v: copied as it is
      const int kh = h - H - KV;
      half* v = v_out + ((long long)i * KV + kh) * D;
      half* dst = base + ((KV + kh) * 16 + slot) * D;
      const half a = x[j], b = x[j + HALF];
      v[j] = a;
      v[j + HALF] = b;
      dst[j] = a;
      dst[j + HALF] = b;
      continue;
    }
    const float x0 = __half2float(x[j]), x1 = __half2float(x[j + HALF]);
    const half r0 = __float2half(x0 * c - x1 * s), r1 = __float2half(x1 * c + x0 * s);
    if (h < H) {
      half* q = q_out + ((long long)i * H + h) * D;
      q[j] = r0;
      q[j + HALF] = r1;
    } else {
      const int kh = h - H;
      half* k = k_out + ((long long)i * KV + kh) * D;
      k[j] = r0;
      k[j + HALF] = r1;
      half* dst = base + (kh * 16 + slot) * D;
      dst[j] = r0;
      dst[j + HALF] = r1;
    }
  }
}

// Keys per split: the live context kv_len cut in `splits` parts, rounded up to whole 32-key tiles (at least one
// tile). It follows the context, not the page table's capacity: a decode step at context 130 runs 5 one-tile splits
// per kv head (with the capacity's chunk, a 4096-token table gave 128-key splits, 2 blocks per kv head working 4
// tiles each in series); a replayed CUDA graph reads pos0 on the device, so the split adapts without a re-capture.
__device__ __forceinline__ int edgellm_split_chunk(int kv_len, int splits) {
  const int tiles = (kv_len + splits * 32 - 1) / (splits * 32);
  return (tiles > 0 ? tiles : 1) * 32;
}

// Attention of query token i (heads of kv head blockIdx.x % KV) over keys [split * chunk, min(kv_len, ...)) of its
// row's pages, kv_len = pos0[row] + (causal ? i % per_row + 1 : 0): unnormalized output o_part [n, H, splits, D]
// and (max, sum) ml [n, H, splits, 2], scores in the log2 domain. 128 threads; tiles of 32 keys (two pages);
// each split covers edgellm_split_chunk(kv_len, splits) keys. smem: G * D + G * 32 + 3 * G floats.
// The split [begin, end) of one block (token i, kv head kvh) over its row's pages, q already in smem (sq: q * scale
// * log2(e), [G][D]): 32-key tiles with an online softmax, then (o, m, l) of the split written at e0 (head g at
// e0 + g * splits). paged_attn_partial and decode_attn share it, so their splits are the same arithmetic.
template <int D, int G>
__device__ __forceinline__ void edgellm_attn_split(
    const half* __restrict__ pages, const int* __restrict__ page_table, float* __restrict__ o_part,
    float* __restrict__ ml, int row, int maxp, long long P, int layer, int KV, int kvh, int begin, int end,
    long long e0, int splits, float* smem) {
  constexpr int ITEMS = (G * D / 2 + 127) / 128;  // (head, dim pair) items per thread in the output
  const int tid = threadIdx.x;
  const float* sq = smem;
  float* ss = smem + G * D;    // [G][32] scores, then probabilities
  float* sm = ss + G * 32;     // [G] running max
  float* sl = sm + G;          // [G] running sum
  float* sa = sl + G;          // [G] rescale of this tile
  if (tid < G) {
    sm[tid] = -INFINITY;
    sl[tid] = 0.f;
  }
  float2 acc[ITEMS];
#pragma unroll
  for (int t = 0; t < ITEMS; ++t) acc[t] = make_float2(0.f, 0.f);
  const half* lbase = pages + (long long)layer * P * 2 * KV * 16 * D;
  const int* pt = page_table + row * maxp;
  const int warp = tid >> 5, lane = tid & 31;
  __syncthreads();
  for (int t0 = begin; t0 < end; t0 += 32) {
    {  // scores: 4 threads per key, D / 4 dims each
      const int kk = tid >> 2, qq = tid & 3, j = t0 + kk;
      float dot[G];
#pragma unroll
      for (int g = 0; g < G; ++g) dot[g] = 0.f;
      if (j < end) {
        const half* kp = lbase + (((long long)pt[j >> 4] * 2 * KV + kvh) * 16 + (j & 15)) * D + qq * (D / 4);
#pragma unroll
        for (int c = 0; c < D / 32; ++c) {
          const uint4 raw = reinterpret_cast<const uint4*>(kp)[c];
          const half2* h2 = reinterpret_cast<const half2*>(&raw);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 f = __half22float2(h2[e]);
            const int d = qq * (D / 4) + c * 8 + e * 2;
#pragma unroll
            for (int g = 0; g < G; ++g) dot[g] += f.x * sq[g * D + d] + f.y * sq[g * D + d + 1];
          }
        }
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], 1);
        dot[g] += __shfl_xor_sync(0xffffffffu, dot[g], 2);
      }
      if (qq == 0) {
#pragma unroll
        for (int g = 0; g < G; ++g) ss[g * 32 + kk] = j < end ? dot[g] : -INFINITY;
      }
    }
    __syncthreads();
    for (int g = warp; g < G; g += 4) {  // online softmax, one warp per head
      const float s = ss[g * 32 + lane];
      float mx = s;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_old = sm[g], m_new = fmaxf(m_old, mx);
      const float p = exp2f(s - m_new);
      float sum = p;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      ss[g * 32 + lane] = p;
      __syncwarp();
      if (lane == 0) {
        const float a = exp2f(m_old - m_new);
        sa[g] = a;
        sl[g] = sl[g] * a + sum;
        sm[g] = m_new;
      }
    }
    __syncthreads();
    const int nk = min(32, end - t0);
    const half* v0 = lbase + (((long long)pt[t0 >> 4] * 2 + 1) * KV + kvh) * 16 * D;
    const half* v1 = nk > 16 ? lbase + (((long long)pt[(t0 >> 4) + 1] * 2 + 1) * KV + kvh) * 16 * D : v0;
#pragma unroll
    for (int t = 0; t < ITEMS; ++t) {
      const int w = tid + t * 128;
      if (w < G * D / 2) {
        const int g = w / (D / 2), d = 2 * (w % (D / 2));
        const float a = sa[g];
        float2 o = make_float2(acc[t].x * a, acc[t].y * a);
#pragma unroll
        for (int k = 0; k < 32; ++k) {
          // no branch, so the 32 loads are all in flight at once (a guard per key serialized them: 11 us per 8B
          // layer); past the tile's last key read that key again (written, finite) with p = 0
          const int kc = min(k, nk - 1);
          const float2 vv = __half22float2(*reinterpret_cast<const half2*>((kc < 16 ? v0 : v1) + (kc & 15) * D + d));
          const float p = ss[g * 32 + k];
          o.x += p * vv.x;
          o.y += p * vv.y;
        }
        acc[t] = o;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int t = 0; t < ITEMS; ++t) {
    const int w = tid + t * 128;
    if (w < G * D / 2) {
      float* o = o_part + (e0 + (w / (D / 2)) * splits) * D + 2 * (w % (D / 2));
      o[0] = acc[t].x;
      o[1] = acc[t].y;
    }
  }
  if (tid < G) {
    ml[2 * (e0 + tid * splits)] = sm[tid];
    ml[2 * (e0 + tid * splits) + 1] = sl[tid];
  }
}


template <int D, int G>
__device__ __forceinline__ void edgellm_paged_attn_partial(
    const half* __restrict__ q, const half* __restrict__ pages, const int* __restrict__ page_table,
    const int* __restrict__ pos0, float* __restrict__ o_part, float* __restrict__ ml, int per_row, int causal,
    int maxp, long long P, int layer, int KV, int splits, float scale_log2, float* smem) {
  const int i = blockIdx.x / KV, kvh = blockIdx.x % KV, split = blockIdx.y, tid = threadIdx.x;
  const int H = G * KV, row = i / per_row;
  const int kv_len = pos0[row] + (causal ? i % per_row + 1 : 0), chunk = edgellm_split_chunk(kv_len, splits);
  const int begin = split * chunk, end = min(kv_len, begin + chunk);
  const long long e0 = ((long long)i * H + kvh * G) * splits + split;  // (i, head kvh*G + g, split) = e0 + g*splits
  if (begin >= end) {
    if (tid < G) {
      ml[2 * (e0 + tid * splits)] = -INFINITY;
      ml[2 * (e0 + tid * splits) + 1] = 0.f;
    }
    return;
  }
  float* sq = smem;  // [G][D] q * scale * log2(e), then edgellm_attn_split's tiles
  for (int w = tid; w < G * D; w += 128) sq[w] = __half2float(q[((long long)i * H + kvh * G) * D + w]) * scale_log2;
  edgellm_attn_split<D, G>(pages, page_table, o_part, ml, row, maxp, P, layer, KV, kvh, begin, end, e0, splits,
                           smem);
}

// Merge the S splits of (token, head) entries blockIdx.x * R .. + R - 1 of `total` (D threads, one entry after
// the other: a block per entry was 16,384 blocks for a 512-token Llama-3-8B chunk, 39 us a layer, bound by block
// launches): out = sum_s o_s 2^(m_s - M) / sum_s l_s 2^(m_s - M); with `extra` (o1, lse1: the chunk's attention
// among itself, log2 domain) merged in by its lse. A (token, head) with no key at all and no extra writes zeros.
template <int D, int S, int R>
__device__ __forceinline__ void edgellm_paged_attn_merge(
    const float* __restrict__ o_part, const float* __restrict__ ml, const half* __restrict__ o1,
    const float* __restrict__ lse1, half* __restrict__ out, int extra, long long total) {
  const long long d = threadIdx.x;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const long long e = (long long)blockIdx.x * R + r;
    if (e >= total) return;
    const float2* mls = reinterpret_cast<const float2*>(ml) + e * S;
    float m[S], l[S];
    float M = -INFINITY;
#pragma unroll
    for (int s = 0; s < S; ++s) {
      const float2 x = mls[s];
      m[s] = x.x;
      l[s] = x.y;
    }
#pragma unroll
    for (int s = 0; s < S; ++s) M = l[s] > 0.f ? fmaxf(M, m[s]) : M;
    // the splits with keys are a prefix (split s covers keys from s * chunk on); their loads are issued together,
    // without a branch per split (that serialized them), re-reading the last one where s >= cnt with weight 0
    int cnt = 0;
#pragma unroll
    for (int s = 0; s < S; ++s) cnt += l[s] > 0.f;
    float L = 0.f, acc = 0.f;
    if (cnt > 0) {
#pragma unroll
      for (int s = 0; s < S; ++s) {
        const float w = s < cnt ? exp2f(m[s] - M) : 0.f;
        L += l[s] * w;
        acc += o_part[(e * S + min(s, cnt - 1)) * D + d] * w;
      }
    }
    float res;
    if (extra) {
      const float l1 = lse1[e];
      const float M2 = L > 0.f ? fmaxf(M, l1) : l1;
      const float w1 = exp2f(l1 - M2), wp = L > 0.f ? exp2f(M - M2) : 0.f;
      res = (acc * wp + __half2float(o1[e * D + d]) * w1) / (L * wp + w1);
    } else {
      res = L > 0.f ? acc / L : 0.f;
    }
    out[e * D + d] = __float2half(res);
  }
}
template <int D, int S>
__device__ __forceinline__ void edgellm_paged_attn_merge_alone(
    const float* __restrict__ o_part, const float* __restrict__ ml, half* __restrict__ out, long long total) {
  edgellm_paged_attn_merge<D, S, 1>(o_part, ml, nullptr, nullptr, out, 0, total);
}
// RoPE (rotate-half, float32 angle pos * inv_freq[j]) on the G query heads at xq (G x D fp16, one after the other),
// rounded to fp16 as kv_append rounds them, times scale_log2 into sq [G][D]; NT threads of the block share it.
template <int D, int G, int NT>
__device__ __forceinline__ void edgellm_rope_q(const half* __restrict__ xq, const float* __restrict__ inv_freq,
                                               int pos, float scale_log2, float* sq) {
  constexpr int HALF = D / 2;
  for (int w = threadIdx.x; w < G * HALF; w += NT) {
    const int g = w / HALF, j = w % HALF;
    float sn, cs;
    sincosf((float)pos * inv_freq[j], &sn, &cs);
    const half* x = xq + g * D;
    const float x0 = __half2float(x[j]), x1 = __half2float(x[j + HALF]);
    sq[g * D + j] = __half2float(__float2half(x0 * cs - x1 * sn)) * scale_log2;
    sq[g * D + j + HALF] = __half2float(__float2half(x1 * cs + x0 * sn)) * scale_log2;
  }
}
// The merge of a decode step's splits inside decode_attn_merge (no merge kernel): the last block of (token i, kv
// head kvh) to finish merges the `active` splits of its G heads and writes out [n, H, D] fp16. Counter: int32 word
// i * KV + kvh of the control page (device_runners/kv_pages.py control_words), zero whenever no kernel runs.
// Each active block has written its partials; it fences, syncs, and thread 0 counts it in (atomicAdd); the block
// that sees active - 1 blocks before it is the last: it resets the word to 0 (every other block of the pair has counted by
// then, and the next kernel to use it runs after this one completes), fences, and reads every active split's
// (o, m, l) from L2 (__ldcg: a line of the other blocks' partials in this SM's L1 could be stale). With one active
// split there is no other block to wait for (no atomic). The arithmetic is edgellm_paged_attn_merge's, in its order,
// so the output is decode_attn + paged_attn_merge_alone's bit for bit: M = max of the splits' m, w_s = 2^(m_s - M),
// L = sum_s l_s w_s and acc = sum_s o_s w_s (s = 0, 1, ... in series), out = acc / L. The merge kernel also adds, for
// each split past the active ones (l = 0, w = 0), 0 to L and o_{active-1} * 0 to acc: here the latter once (it can
// only turn a -0 into +0, and a second time changes nothing). The weights are computed once per head (a warp per
// head, a lane per split) into smem, not once per output element. e: the entry of head kvh * G (i * H + kvh * G);
// smem: the split's (G * D + G * 32 + 3 * G floats, free once the split is written), here G * 65 + 1 floats.
// NT: the block's threads (128 in decode_attn_merge, 32 * W in decode_attn_warps).
template <int D, int G, int S, int NT = 128>
__device__ __forceinline__ void edgellm_decode_merge(
    const float* __restrict__ o_part, const float* __restrict__ ml, half* __restrict__ out, int* counter, int active,
    long long e, float* smem) {
  static_assert(S <= 32, "the merge's weights take one lane per split");
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  float* sw = smem;            // [G][32] w_s, 0 past the active splits
  float* sl = smem + G * 32;   // [G][32] l_s
  float* sL = smem + G * 64;   // [G] L
  int* merger = reinterpret_cast<int*>(smem + G * 65);  // whether this block merges
  __threadfence();  // this block's partials, visible to the whole device before it is counted
  __syncthreads();  // every thread of the block has written (and is done with smem)
  if (tid == 0) {
    int is_last = 1;
    if (active > 1) {
      is_last = atomicAdd(counter, 1) == active - 1;
      if (is_last) *counter = 0;
    }
    __threadfence();  // the other blocks' partials are read after their counts were seen
    *merger = is_last;
  }
  __syncthreads();
  if (!*merger) return;
  // acc: C splits at a time, their loads issued together (a load in the same branch as its use waits for it), only
  // for the active splits, the first C before the weights (their loads overlap the (m, l) loads: at tg128 contexts,
  // <= 8 active splits, one round trip to L2 in all); the terms past the active splits are the merge kernel's
  // o_{active-1} * 0, applied once at the end (adding a zero a second time changes nothing). C * ITEMS <= 32 loads
  // in flight per thread: ptxas (nvcc 13, sm_90a) gives the kernel 71 registers for G 4, D 128 and 72 for G 8, D 128
  // (46 and 48 without the merge); C = 8 at G 8 took 117.
  constexpr int ITEMS = (G * D + NT - 1) / NT, C = ITEMS >= 8 ? 4 : 8;
  float v[C][ITEMS];
  auto load = [&](int s0) {
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
      for (int t = 0; t < ITEMS; ++t) {
        const int w = tid + t * NT;
        v[c][t] = 0.f;
        if (s0 + c < active && w < G * D) v[c][t] = __ldcg(o_part + ((e + w / D) * S + s0 + c) * D + w % D);
      }
  };
  load(0);
  const float2* mls = reinterpret_cast<const float2*>(ml);
  for (int g = warp; g < G; g += NT / 32) {
    const float2 x = __ldcg(mls + (e + g) * S + min(lane, active - 1));
    float M = x.y > 0.f ? x.x : -INFINITY;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, off));
    if (lane < S) {
      sw[g * 32 + lane] = lane < active ? exp2f(x.x - M) : 0.f;
      sl[g * 32 + lane] = x.y;
    }
    __syncwarp();
    if (lane == 0) {
      float L = 0.f;
      for (int s = 0; s < active; ++s) L += sl[g * 32 + s] * sw[g * 32 + s];
      sL[g] = L;
    }
  }
  __syncthreads();
  float acc[ITEMS], last[ITEMS];
#pragma unroll
  for (int t = 0; t < ITEMS; ++t) acc[t] = last[t] = 0.f;
#pragma unroll
  for (int s0 = 0; s0 < S; s0 += C) {
    if (s0 >= active) break;
    if (s0 > 0) load(s0);
#pragma unroll
    for (int c = 0; c < C; ++c)
#pragma unroll
      for (int t = 0; t < ITEMS; ++t) {
        const int w = tid + t * NT;
        if (s0 + c < active && w < G * D) {
          acc[t] += v[c][t] * sw[(w / D) * 32 + s0 + c];
          last[t] = v[c][t];
        }
      }
  }
#pragma unroll
  for (int t = 0; t < ITEMS; ++t) {
    const int w = tid + t * NT, g = w / D;
    if (w < G * D) {
      if (active < S) acc[t] += last[t] * sw[g * 32 + S - 1];  // w = 0 there
      const float L = sL[g];
      out[(e + g) * D + w % D] = __float2half(L > 0.f ? acc[t] / L : 0.f);
    }
  }
}

// A decode step's RoPE, KV append and split-K attention for one layer in one kernel (before: kv_append +
// paged_attn_partial, two kernels and a boundary per layer). Block (token i, kv head, split); each row decodes one
// token at position pos = pos0[row]. Every block applies RoPE to its G query heads (kv_append's arithmetic: q
// rounded to fp16); the block whose split holds `pos` (the last one with keys) also writes the new token's rotated k
// and its v into the page slot, then syncs, so its own loop reads them from the page; every other block reads only
// keys < pos, which no block of this kernel writes. Each block then computes its split as paged_attn_partial does.
// MERGE = 0 (edgellm_decode_attn): a split past the last key writes (-inf, 0) and paged_attn_merge follows; the
// merged output equals the two-kernel path's bit for bit. MERGE = S (edgellm_decode_attn_merge, splits = S): a
// split past the last key exits at once, and the last active block merges (edgellm_decode_merge) into `out`.
// smem: G * D + G * 32 + 3 * G floats.
template <int D, int G, int MERGE>
__device__ __forceinline__ void edgellm_decode_attn_impl(
    const half* __restrict__ qkv, const float* __restrict__ inv_freq, const int* __restrict__ page_table,
    const int* __restrict__ pos0, half* __restrict__ pages, float* __restrict__ o_part, float* __restrict__ ml,
    half* __restrict__ out, int maxp, long long P, int layer, int KV, int splits, float scale_log2, float* smem) {
  constexpr int HALF = D / 2;
  const int i = blockIdx.x / KV, kvh = blockIdx.x % KV, split = blockIdx.y, tid = threadIdx.x;
  const int H = G * KV, row = i, pos = pos0[row], kv_len = pos + 1, chunk = edgellm_split_chunk(kv_len, splits);
  const int active = (kv_len + chunk - 1) / chunk;
  const int begin = split * chunk, end = min(kv_len, begin + chunk);
  const long long e0 = ((long long)i * H + kvh * G) * splits + split;
  if (split >= active) {  // no key here: an empty split for paged_attn_merge, as paged_attn_partial writes it
    if (MERGE == 0 && tid < G) {
      ml[2 * (e0 + tid * splits)] = -INFINITY;
      ml[2 * (e0 + tid * splits) + 1] = 0.f;
    }
    return;
  }
  float* sq = smem;  // [G][D] q * scale * log2(e), then edgellm_attn_split's tiles
  const half* xq = qkv + (long long)i * (H + 2 * KV) * D;
  edgellm_rope_q<D, G, 128>(xq + kvh * G * D, inv_freq, pos, scale_log2, sq);  // kv_append's arithmetic
  if (end == kv_len) {  // this split holds the new token: its k (rotated) and v into the page slot
    half* base = pages + ((long long)layer * P + page_table[row * maxp + pos / 16]) * 2 * KV * 16 * D;
    const half* xk = xq + (H + kvh) * D;
    const half* xv = xq + (H + KV + kvh) * D;
    half* dk = base + (kvh * 16 + pos % 16) * D;
    half* dv = base + ((KV + kvh) * 16 + pos % 16) * D;
    for (int j = tid; j < HALF; j += 128) {
      float sn, cs;
      sincosf((float)pos * inv_freq[j], &sn, &cs);
      const float x0 = __half2float(xk[j]), x1 = __half2float(xk[j + HALF]);
      dk[j] = __float2half(x0 * cs - x1 * sn);
      dk[j + HALF] = __float2half(x1 * cs + x0 * sn);
      dv[j] = xv[j];
      dv[j + HALF] = xv[j + HALF];
    }
  }
  // edgellm_attn_split syncs the block before its first load: the new k / v are then visible to it
  edgellm_attn_split<D, G>(pages, page_table, o_part, ml, row, maxp, P, layer, KV, kvh, begin, end, e0, splits,
                           smem);
  if (MERGE > 0) {
    // the counters: int32 words of the control page, page P - 1 of layer 0
    int* counter = reinterpret_cast<int*>(pages + (P - 1) * 2 * KV * 16 * D) + i * KV + kvh;
    edgellm_decode_merge<D, G, (MERGE > 0 ? MERGE : 1)>(o_part, ml, out, counter, active, (long long)i * H + kvh * G,
                                                         smem);
  }
}
template <int D, int G>
__device__ __forceinline__ void edgellm_decode_attn(
    const half* __restrict__ qkv, const float* __restrict__ inv_freq, const int* __restrict__ page_table,
    const int* __restrict__ pos0, half* __restrict__ pages, float* __restrict__ o_part, float* __restrict__ ml,
    int maxp, long long P, int layer, int KV, int splits, float scale_log2, float* smem) {
  edgellm_decode_attn_impl<D, G, 0>(qkv, inv_freq, page_table, pos0, pages, o_part, ml, nullptr, maxp, P, layer, KV,
                                    splits, scale_log2, smem);
}
// decode_attn with the merge in its last block per (token, kv head): out [n, H, D] fp16; o_part / ml are scratch.
template <int D, int G, int S>
__device__ __forceinline__ void edgellm_decode_attn_merge(
    const half* __restrict__ qkv, const float* __restrict__ inv_freq, const int* __restrict__ page_table,
    const int* __restrict__ pos0, half* __restrict__ pages, float* __restrict__ o_part, float* __restrict__ ml,
    half* __restrict__ out, int maxp, long long P, int layer, int KV, float scale_log2, float* smem) {
  static_assert(S > 0, "S: the splits");
  edgellm_decode_attn_impl<D, G, S>(qkv, inv_freq, page_table, pos0, pages, o_part, ml, out, maxp, P, layer, KV, S,
                                    scale_log2, smem);
}
// DECODE_ATTN "warps" (kernels/owned_kv.py decode_attn_warps_func): a decode step's RoPE, KV append and attention
// with a shorter chain of dependent round trips than decode_attn_impl (there: q RoPE, sync, page table, K, scores,
// sync, softmax, sync, V only then, accumulate; ~5.7-7 us a layer on the H200 at tg128 contexts, run 15).
// Block (token i, kv head kvh, split) of W warps; each WARP owns 32-key tiles (lane = key for the scores, lane = D / 32
// dims for the output) and, right after reading pos0 and the page table (loaded together up to S * W * 32 keys),
// issues all loads of its first tile, K rows and V values alike (V does not depend on the scores), before the
// block's q RoPE and its one sync: keys < pos are
// not written in this kernel, and the new token's k / v, written into the page slot by the block that owns pos,
// are taken from shared memory after the sync instead of the page (its page read is stale and dropped). A warp's
// online softmax uses shuffles only; the W warps' (m, l, o) merge in shared memory. Split size: W tiles a warp
// round, per = ceil(kv_len / (S * W * 32)) rounds, chunk = per * W * 32 keys (the live context from pos0 on the
// device: a replayed graph adapts), so up to W * 32 keys (256 at W 8: tg128 contexts) one block writes `out` at
// once; longer contexts have up to S blocks, merged by the last one (edgellm_decode_merge, the control-page counter).
// Not bit-equal to decode_attn_impl (another summation order). smem (floats): G * D (q) + D (new k, v as fp16) +
// 2 * W * G ((m, l) per warp) + W * G * D (per warp: p [G][32], then o [G][D]) + 4 (alignment).
// A kernel whose TVMScript launch calls this (owned_kv.py, EARLY) places its own PDL wait (kernels/cuda_pdl.py
// WAITS_INSIDE): the generated kernel gets no prologue.
#ifndef EDGELLM_PDL_MARKS  // also defined by int4_gemv_dp4a.cu: the two share a CUDA module
#define EDGELLM_PDL_MARKS
__device__ __forceinline__ void edgellm_pdl_waits_inside() {}
__device__ __forceinline__ void edgellm_noop() {}
#endif

// NG > 1: the G * NG q heads of a kv head split over NG blocks of G heads each (blockIdx.x = (token * KV + kv head) *
// NG + the block's group): each block reads the kv head's K / V (from L2 after the first) and does 1 / NG of the
// arithmetic; the group-0 block writes the new token's k / v into its page, the others take it from their own smem.
// Each head's arithmetic is the same at any NG (bit-equal), the counters are per (token, kv head, group).
template <int D, int G, int S, int W, bool EARLY = false, int NG = 1>
__device__ __forceinline__ void edgellm_decode_attn_warps(
    const half* __restrict__ qkv, const float* __restrict__ inv_freq, const int* __restrict__ page_table,
    const int* __restrict__ pos0, half* __restrict__ pages, float* __restrict__ o_part, float* __restrict__ ml,
    half* __restrict__ out, int maxp, long long P, int layer, int KV, float scale_log2, float* smem_raw) {
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static_assert(S >= 1 && S <= 32, "the merge's weights take one lane per split");
  constexpr int NT = 32 * W, HALF = D / 2, DL = D / 32;  // DL: output dims per lane (2 or 4)
  const int i = blockIdx.x / (KV * NG), kvh = (blockIdx.x / NG) % KV, grp = blockIdx.x % NG;
  const int split = blockIdx.y, tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31, H = G * NG * KV, row = i, hq = (kvh * NG + grp) * G;  // hq: first q head
  const int* pt = page_table + row * maxp;
  // the page table entries of the warp's first tile where a split is one tile a warp (per == 1: contexts up to
  // S * W * 32 keys), loaded together with pos0, which they do not depend on: one dependent round trip less
  // (pos0, then the pages, then K / V) before the K / V loads; entries past the row's pages are never used
  const int t0s = split * W * 32 + warp * 32;
  const int spec0 = pt[min(t0s >> 4, maxp - 1)], spec1 = pt[min((t0s >> 4) + 1, maxp - 1)];
  const int pos = pos0[row], kv_len = pos + 1;
  const int per = (kv_len + S * W * 32 - 1) / (S * W * 32), chunk = per * W * 32;
  const int active = (kv_len + chunk - 1) / chunk;
  if (split >= active) return;  // no key here (the merge counts the active splits only)
  const int begin = split * chunk, end = min(kv_len, begin + chunk);
  const int nwarps = min(W, (end - begin + 31) / 32);  // warps with keys
  float* smem = reinterpret_cast<float*>((reinterpret_cast<unsigned long long>(smem_raw) + 15) & ~15ull);
  float* sq = smem;                                    // [G][D] q * scale * log2(e)
  half* snew = reinterpret_cast<half*>(smem + G * D);  // [2][D] the new token's k (rotated, fp16) and v
  float* sml = smem + G * D + D;                       // [W][G][2] each warp's (m, l)
  float* sw = sml + 2 * W * G + warp * G * D;          // this warp's p [G][32], then its o [G][D]
  const half* lbase = pages + (long long)layer * P * 2 * KV * 16 * D;
  // the warp's tile at t0 (a multiple of 32: pages p0 = t0 / 16 and p1 = t0 / 16 + 1, p1 = p0 where the tile ends
  // in p0): the lane's key row (key t0 + lane) and, for each of the 32 keys, the lane's DL dims of V, at constant
  // offsets from the two pages. A slot past the last key is read but never used (it may hold anything, NaN too: its
  // score is replaced by -inf, and the accumulation selects 0 for its V, as p * NaN would not be 0).
  uint4 kr[D / 8];
  unsigned vr[32][DL / 2];
  int p0, p1;
  auto tile_pages = [&](int t0) {
    p0 = pt[t0 >> 4];
    p1 = t0 + 16 < end ? pt[(t0 >> 4) + 1] : p0;
  };
  auto load_k = [&]() {
    const half* kp = lbase + (((long long)(lane < 16 ? p0 : p1) * 2 * KV + kvh) * 16 + (lane & 15)) * D;
#pragma unroll
    for (int c = 0; c < D / 8; ++c) kr[c] = reinterpret_cast<const uint4*>(kp)[c];
  };
  auto load_v = [&]() {
    const half* v0 = lbase + (((long long)p0 * 2 + 1) * KV + kvh) * 16 * D + lane * DL;
    const half* v1 = lbase + (((long long)p1 * 2 + 1) * KV + kvh) * 16 * D + lane * DL;
#pragma unroll
    for (int k = 0; k < 32; ++k) {
      const unsigned* src = reinterpret_cast<const unsigned*>((k < 16 ? v0 : v1) + (k & 15) * D);
#pragma unroll
      for (int e = 0; e < DL / 2; ++e) vr[k][e] = src[e];
    }
  };
  int t0 = begin + warp * 32;
  if (warp < nwarps) {
    if (per == 1) {  // t0 == t0s
      p0 = spec0;
      p1 = t0 + 16 < end ? spec1 : spec0;
    } else {
      tile_pages(t0);
    }
    load_k();
    load_v();
  }
  if constexpr (EARLY) {
    // launched with PDL (owned_kv.WARPS_EARLY): everything above reads only what earlier steps wrote (pos0, the page
    // table, K / V of positions before pos; the slot at pos is patched from smem below), so it is issued before the
    // wait for the kernel before (the qkv GEMV) and overlaps its tail; nothing is written before the wait
    cudaGridDependencySynchronize();           // griddepcontrol.wait (CUDA's sm_90 device runtime intrinsics)
    cudaTriggerProgrammaticLaunchCompletion();  // griddepcontrol.launch_dependents
  }
  // RoPE on q (kv_append's arithmetic and rounding), while the loads are in flight
  const half* xq = qkv + (long long)i * (H + 2 * KV) * D;
  edgellm_rope_q<D, G, NT>(xq + hq * D, inv_freq, pos, scale_log2, sq);
  const bool owner = end == kv_len;  // this split holds the new token: its k (rotated) and v into the page slot
  if (owner) {
    half* base = pages + ((long long)layer * P + pt[pos / 16]) * 2 * KV * 16 * D;
    const half* xk = xq + (H + kvh) * D;
    const half* xv = xq + (H + KV + kvh) * D;
    half* dk = base + (kvh * 16 + pos % 16) * D;
    half* dv = base + ((KV + kvh) * 16 + pos % 16) * D;
    for (int j = tid; j < HALF; j += NT) {
      float sn, cs;
      sincosf((float)pos * inv_freq[j], &sn, &cs);
      const float x0 = __half2float(xk[j]), x1 = __half2float(xk[j + HALF]);
      const half r0 = __float2half(x0 * cs - x1 * sn), r1 = __float2half(x1 * cs + x0 * sn);
      const half v0 = xv[j], v1 = xv[j + HALF];
      if (NG == 1 || grp == 0) {
        dk[j] = r0;
        dk[j + HALF] = r1;
        dv[j] = v0;
        dv[j + HALF] = v1;
      }
      snew[j] = r0;
      snew[j + HALF] = r1;
      snew[D + j] = v0;
      snew[D + j + HALF] = v1;
    }
  }
  __syncthreads();  // q in smem; the new k / v in smem (and in the page for the next steps)
  float m_run[G], l_run[G], acc[G][DL];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m_run[g] = -INFINITY;
    l_run[g] = 0.f;
#pragma unroll
    for (int e = 0; e < DL; ++e) acc[g][e] = 0.f;
  }
  // one tile of the warp: the new token patched in, scores, online softmax, p * V. The first tile's K and V loads
  // were all issued before the sync; a further tile (contexts over S * W * 32 keys, 8,192 at S 32, W 8: bandwidth
  // matters more than latency there) loads its V after the scores (late): with K and V of a later tile in flight
  // together too, ptxas (nvcc 13, sm_90a, -O3) spilled 44-248 bytes at head_dim 128 (255 registers)
  auto tile = [&](bool late) {
    if (owner && pos >= t0 && pos < t0 + 32) {  // the new token's k / v from smem, not its stale page read
      if (t0 + lane == pos) {
#pragma unroll
        for (int c = 0; c < D / 8; ++c) kr[c] = reinterpret_cast<const uint4*>(snew)[c];
      }
#pragma unroll
      for (int k = 0; k < 32; ++k) {
        if (t0 + k == pos) {
#pragma unroll
          for (int e = 0; e < DL / 2; ++e) vr[k][e] = reinterpret_cast<const unsigned*>(snew + D + lane * DL)[e];
        }
      }
    }
    float s[G];  // scores of the lane's key, log2 domain
#pragma unroll
    for (int g = 0; g < G; ++g) s[g] = 0.f;
#pragma unroll
    for (int c = 0; c < D / 8; ++c) {
      const half2* h2 = reinterpret_cast<const half2*>(&kr[c]);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float2 a = __half22float2(h2[2 * e]), b = __half22float2(h2[2 * e + 1]);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float4 qv = reinterpret_cast<const float4*>(sq + g * D + c * 8)[e];
          s[g] += a.x * qv.x + a.y * qv.y + b.x * qv.z + b.y * qv.w;
        }
      }
    }
    const bool valid = t0 + lane < end;
    float alpha[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {  // the warp's online softmax (lane 0's key always exists: mx is finite)
      const float sv = valid ? s[g] : -INFINITY;
      float mx = sv;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(m_run[g], mx);
      const float p = exp2f(sv - m_new);
      float sum = p;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      alpha[g] = exp2f(m_run[g] - m_new);
      l_run[g] = l_run[g] * alpha[g] + sum;
      m_run[g] = m_new;
      sw[g * 32 + lane] = p;
    }
    __syncwarp();
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int e = 0; e < DL; ++e) acc[g][e] *= alpha[g];
    if (late) load_v();
    const int nk = end - t0;  // keys of this tile (more than 32: the tile is full)
#pragma unroll
    for (int k4 = 0; k4 < 8; ++k4) {
      float2 v[4][DL / 2];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int e = 0; e < DL / 2; ++e) {
          const float2 f = __half22float2(*reinterpret_cast<const half2*>(&vr[4 * k4 + kk][e]));
          v[kk][e] = 4 * k4 + kk < nk ? f : make_float2(0.f, 0.f);
        }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float4 p4 = reinterpret_cast<const float4*>(sw + g * 32)[k4];
        const float pk[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
#pragma unroll
          for (int e = 0; e < DL / 2; ++e) {
            acc[g][2 * e] += pk[kk] * v[kk][e].x;
            acc[g][2 * e + 1] += pk[kk] * v[kk][e].y;
          }
      }
    }
    __syncwarp();  // every lane has read p before the next tile (or o) overwrites it
  };
  if (warp < nwarps) {
    tile(false);
    for (t0 += W * 32; t0 < end; t0 += W * 32) {  // contexts over S * W * 32 keys: further rounds
      tile_pages(t0);
      load_k();
      tile(true);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
      for (int e = 0; e < DL; ++e) sw[g * D + lane * DL + e] = acc[g][e];
      if (lane == 0) {
        sml[(warp * G + g) * 2] = m_run[g];
        sml[(warp * G + g) * 2 + 1] = l_run[g];
      }
    }
  }
  __syncthreads();
  // the block's warps merged: out directly when this is the only split, else the split's (o, m, l) for the merge
  const long long e = (long long)i * H + hq;
  for (int w = tid; w < G * D; w += NT) {
    const int g = w / D, d = w % D;
    float M = -INFINITY;
    for (int u = 0; u < nwarps; ++u) M = fmaxf(M, sml[(u * G + g) * 2]);
    float L = 0.f, o = 0.f;
    for (int u = 0; u < nwarps; ++u) {
      const float wt = exp2f(sml[(u * G + g) * 2] - M);
      L += sml[(u * G + g) * 2 + 1] * wt;
      o += smem[G * D + D + 2 * W * G + (u * G + g) * D + d] * wt;
    }
    if (active == 1) {
      out[(e + g) * D + d] = __float2half(o / L);
    } else {
      o_part[((e + g) * S + split) * D + d] = o;
      if (d == 0) {
        ml[2 * ((e + g) * S + split)] = M;
        ml[2 * ((e + g) * S + split) + 1] = L;
      }
    }
  }
  if (active > 1) {
    // the counters: int32 words of the control page, page P - 1 of layer 0 (as decode_attn_merge's)
    int* counter = reinterpret_cast<int*>(pages + (P - 1) * 2 * KV * 16 * D) + (i * KV + kvh) * NG + grp;
    edgellm_decode_merge<D, G, S, NT>(o_part, ml, out, counter, active, e, smem);
  }
}
#endif
