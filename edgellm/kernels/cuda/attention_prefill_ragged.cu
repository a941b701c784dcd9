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
