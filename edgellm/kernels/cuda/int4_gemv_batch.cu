#ifndef EDGELLM_Q4GEMV_BATCH
#define EDGELLM_Q4GEMV_BATCH
// Batched INT4 decode GEMV (kernels/cuda_gemv_batch.py): out[r, n] = sum_k x[r, k] W[n, k] (+ bias[n]) for
// m <= R rows of x, each weight word loaded from HBM once and applied to every row.
//
// Block: NW warps, warp w owns FB consecutive output features; the lanes of a warp split `in` by groups of 32
// (lane l takes group l of each 1024-wide chunk). Per chunk the block stages x[0..m) (rows >= m read as 0) in
// shared memory, already as the fp16 pairs the decode meets: (x[8q+s], x[8q+s+4]), s = 0..3, of word q of a group,
// at xs[((r * 4 + q) * 32 + g) * 4 + s] (a warp's 16-byte loads of one (r, q) are contiguous: no bank conflict).
// A lane's weights for the next chunk (FB x 16 bytes, plus scales) are loaded before the current one's arithmetic.
//
// Arithmetic (that of int4_gemv_h2 per row): `(w >> 4s) & 0x000F000F | 0x50005000` is the fp16 pair
// (32 + nib_s/32, 32 + nib_{s+4}/32); minus 32 + OFF/32 (exact) it is ((nib - OFF)/32) for both. Per row r, feature
// f and group: two fp16x2 accumulators (even and odd words, 8 HFMA2 each, in the order q = 0..3, s = 0..3); the four
// halves go to fp32 and meet the scale * 32 in one FMA into the fp32 accumulator of (f, r). ZP (the Q4_1 grid,
// nib * s + min, computed with OFF = 8 as (nib - 8) s + (min + 8 s)): per row and group, the sum of x / 32 in two
// fp16x2 chains (q even / odd, over the permuted pairs), its four halves in fp32, times (min + 8 s) * 32.
// The end: a warp shuffle reduction per (f, r); lane 0 stores fp16 (+ bias).
#include <cuda_fp16.h>

__device__ __forceinline__ unsigned eqb_hsub2(unsigned a, unsigned b) {
  unsigned r;
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
__device__ __forceinline__ unsigned eqb_hfma2(unsigned a, unsigned b, unsigned c) {
  unsigned r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}
__device__ __forceinline__ float eqb_sum4(unsigned a, unsigned b) {  // (lo a + hi a) + (lo b + hi b) in fp32
  const float2 fa = __half22float2(*reinterpret_cast<const half2*>(&a));
  const float2 fb = __half22float2(*reinterpret_cast<const half2*>(&b));
  return (fa.x + fa.y) + (fb.x + fb.y);
}

// x[0..rows) of chunk c (groups 32c .. 32c + 31) into shared memory as the decode's pairs; rows >= `rows` and groups
// past G as 0. Item (r, g, q): 8 halves of x -> 4 pairs.
template <int R, int NT>
__device__ __forceinline__ void eqb_stage(const half* __restrict__ x, uint4* xs, int rows, int in_f, int G, int c) {
  for (int i = threadIdx.x; i < R * 128; i += NT) {
    const int r = i >> 7, g = (i >> 2) & 31, q = i & 3, gg = c * 32 + g;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (r < rows && gg < G) v = *reinterpret_cast<const uint4*>(x + (long long)r * in_f + gg * 32 + q * 8);
    uint4 p;  // (x0, x4) (x1, x5) (x2, x6) (x3, x7) from (x0, x1) (x2, x3) (x4, x5) (x6, x7)
    p.x = __byte_perm(v.x, v.z, 0x5410);
    p.y = __byte_perm(v.x, v.z, 0x7632);
    p.z = __byte_perm(v.y, v.w, 0x5410);
    p.w = __byte_perm(v.y, v.w, 0x7632);
    xs[(r * 4 + q) * 32 + g] = p;
  }
}

template <int R, int FB, int NW, int OFF, bool ZP, bool BIAS>
__device__ __forceinline__ void edgellm_q4gemv_batch(const half* __restrict__ x, const unsigned* __restrict__ qw,
    const half* __restrict__ qs, const half* __restrict__ qm, const half* __restrict__ bias, half* __restrict__ out,
    long long m, int in_f, int out_f, unsigned char* smem) {
  constexpr unsigned BASE = 0x50005000u, CEN = 0x50005000u + OFF * 0x10001u, XS32 = 0x28002800u;  // 1/32, 1/32
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = (blockIdx.x * NW + warp) * FB;
  const int G = in_f >> 5, W4 = in_f >> 3, nchunks = (G + 31) >> 5;
  const int rows = m < R ? (int)m : R;
  uint4* xs = reinterpret_cast<uint4*>(smem);  // [R][4][32] of 4 fp16 pairs

  float acc[FB][R];
#pragma unroll
  for (int f = 0; f < FB; ++f)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[f][r] = 0.f;

  uint4 wn[FB];
  unsigned short sn[FB], mnn[FB];
  auto load_w = [&](int c) {
    const int g = c * 32 + lane;
#pragma unroll
    for (int f = 0; f < FB; ++f) {
      const int n = min(n0 + f, out_f - 1);
      if (g < G) {
        wn[f] = *reinterpret_cast<const uint4*>(qw + (long long)n * W4 + g * 4);
        sn[f] = reinterpret_cast<const unsigned short*>(qs)[(long long)n * G + g];
        if (ZP) mnn[f] = reinterpret_cast<const unsigned short*>(qm)[(long long)n * G + g];
      }
    }
  };
  load_w(0);
  for (int c = 0; c < nchunks; ++c) {
    __syncthreads();  // the previous chunk's x is read by every warp
    eqb_stage<R, NW * 32>(x, xs, rows, in_f, G, c);
    __syncthreads();
    const bool have = c * 32 + lane < G;
    uint4 w[FB];
    unsigned short s16[FB], m16[FB];
#pragma unroll
    for (int f = 0; f < FB; ++f) {
      w[f] = wn[f];
      s16[f] = sn[f];
      m16[f] = mnn[f];
    }
    if (c + 1 < nchunks) load_w(c + 1);  // in flight during this chunk's arithmetic
    if (!have) continue;
    unsigned d[FB][16];  // the decoded pairs, shared by every row
    float sc[FB], mz[FB];
#pragma unroll
    for (int f = 0; f < FB; ++f) {
      const unsigned wq[4] = {w[f].x, w[f].y, w[f].z, w[f].w};
#pragma unroll
      for (int q = 0; q < 4; ++q)
#pragma unroll
        for (int s = 0; s < 4; ++s) d[f][q * 4 + s] = eqb_hsub2(((wq[q] >> (4 * s)) & 0x000F000Fu) | BASE, CEN);
      const float sf = __half2float(__ushort_as_half(s16[f]));
      sc[f] = sf * 32.f;
      mz[f] = ZP ? (__half2float(__ushort_as_half(m16[f])) + sf * (float)OFF) * 32.f : 0.f;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < rows) {
        unsigned xp[16];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const uint4 v = xs[(r * 4 + q) * 32 + lane];
          xp[q * 4] = v.x; xp[q * 4 + 1] = v.y; xp[q * 4 + 2] = v.z; xp[q * 4 + 3] = v.w;
        }
        float xsum = 0.f;
        if (ZP) {
          unsigned c0 = 0u, c1 = 0u;
#pragma unroll
          for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int s = 0; s < 4; ++s) {
              if (q % 2 == 0) c0 = eqb_hfma2(xp[q * 4 + s], XS32, c0);
              else c1 = eqb_hfma2(xp[q * 4 + s], XS32, c1);
            }
          xsum = eqb_sum4(c0, c1);
        }
#pragma unroll
        for (int f = 0; f < FB; ++f) {
          unsigned h0 = 0u, h1 = 0u;
#pragma unroll
          for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int s = 0; s < 4; ++s) {
              if (q % 2 == 0) h0 = eqb_hfma2(d[f][q * 4 + s], xp[q * 4 + s], h0);
              else h1 = eqb_hfma2(d[f][q * 4 + s], xp[q * 4 + s], h1);
            }
          acc[f][r] = fmaf(eqb_sum4(h0, h1), sc[f], acc[f][r]);
          if (ZP) acc[f][r] = fmaf(xsum, mz[f], acc[f][r]);
        }
      }
    }
  }
#pragma unroll
  for (int f = 0; f < FB; ++f)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < rows) {
        float v = acc[f][r];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, o);
        const int n = n0 + f;
        if (lane == 0 && n < out_f) {
          if (BIAS) v += __half2float(bias[n]);
          out[(long long)r * out_f + n] = __float2half_rn(v);
        }
      }
    }
}
// The same function on tensor cores (R a multiple of 8; sm_80+): warp w owns 16 consecutive features, an
// mma.sync m16n8k16 per (4 groups, word, half word) and 8 rows of x, A = the weights decoded to fp16 with the scale
// folded in ((nib - OFF) / 32 * 32 s: one rounding, as the tensor-core GEMM; ZP: one fp16 fma with min + 8 s), B = x,
// fp32 accumulation across the whole `in`. The sum over k is taken in any order, so lane (g, q) = (lane / 4,
// lane % 4) feeds the k slots {2q, 2q+1, 2q+8, 2q+9} of step (j, word, u) from group 4j + q of the chunk, features g
// and g + 8: A's pair (slot 2q, 2q+1) is the decode pair s = 2u of that word ((nib 2u, nib 2u+4)), its (2q+8,
// 2q+9) the pair s = 2u + 1; B's pairs for x row g are the staged pairs s = 2u, 2u + 1 of the same word and group.
// Per chunk a lane loads its groups' words of its two features (16-byte loads, 64 contiguous bytes per feature
// across the 4 lanes of a row) before staging x, so the loads overlap the staging. KS > 1: KS warps share a feature
// tile, each taking 8 / KS of a chunk's 8 sets of 4 groups (more blocks for a narrow `out`); their sums meet in
// shared memory at the end.
__device__ __forceinline__ void eqb_mma(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                        unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]) : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ unsigned eqb_hmul2(unsigned a, unsigned b) {
  unsigned r;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

template <int R, int NW, int KS, int OFF, bool ZP, bool BIAS>
__device__ __forceinline__ void edgellm_q4gemv_batch_mma(const half* __restrict__ x, const unsigned* __restrict__ qw,
    const half* __restrict__ qs, const half* __restrict__ qm, const half* __restrict__ bias, half* __restrict__ out,
    long long m, int in_f, int out_f, unsigned char* smem) {
  static_assert(R % 8 == 0 && NW % KS == 0 && 8 % KS == 0, "R: a multiple of 8; KS divides NW and 8");
  constexpr unsigned BASE = 0x50005000u, CEN = 0x50005000u + OFF * 0x10001u;
  constexpr int J = 8 / KS;  // groups of 4 per warp and chunk
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3, kw = warp % KS;
  const int n0 = (blockIdx.x * (NW / KS) + warp / KS) * 16;
  const int G = in_f >> 5, W4 = in_f >> 3, nchunks = (G + 31) >> 5;
  const int rows = m < R ? (int)m : R;
  const int f0 = min(n0 + g, out_f - 1), f1 = min(n0 + g + 8, out_f - 1);
  uint4* xs = reinterpret_cast<uint4*>(smem);
  float acc[R / 8][4];
#pragma unroll
  for (int t = 0; t < R / 8; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[t][i] = 0.f;
  for (int c = 0; c < nchunks; ++c) {
    uint4 w0[J], w1[J];
    unsigned s2[J][2], m2[J][2];  // per group: (32 s, 32 s) and (min + 8 s) pairs of features g, g + 8
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const int gg = c * 32 + 4 * (kw * J + j) + q;
      const bool in = gg < G;
      const int gc = in ? gg : 0;
      w0[j] = *reinterpret_cast<const uint4*>(qw + (long long)f0 * W4 + gc * 4);
      w1[j] = *reinterpret_cast<const uint4*>(qw + (long long)f1 * W4 + gc * 4);
      const float sa = in ? __half2float(qs[(long long)f0 * G + gc]) : 0.f;
      const float sb = in ? __half2float(qs[(long long)f1 * G + gc]) : 0.f;
      half2 h = __floats2half2_rn(sa * 32.f, sa * 32.f);
      s2[j][0] = *reinterpret_cast<unsigned*>(&h);
      h = __floats2half2_rn(sb * 32.f, sb * 32.f);
      s2[j][1] = *reinterpret_cast<unsigned*>(&h);
      if (ZP) {
        const float ma = in ? __half2float(qm[(long long)f0 * G + gc]) + sa * (float)OFF : 0.f;
        const float mb = in ? __half2float(qm[(long long)f1 * G + gc]) + sb * (float)OFF : 0.f;
        h = __floats2half2_rn(ma, ma);
        m2[j][0] = *reinterpret_cast<unsigned*>(&h);
        h = __floats2half2_rn(mb, mb);
        m2[j][1] = *reinterpret_cast<unsigned*>(&h);
      }
    }
    __syncthreads();
    eqb_stage<R, NW * 32>(x, xs, rows, in_f, G, c);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < J; ++j) {
      const unsigned wa[4] = {w0[j].x, w0[j].y, w0[j].z, w0[j].w}, wb[4] = {w1[j].x, w1[j].y, w1[j].z, w1[j].w};
#pragma unroll
      for (int wq = 0; wq < 4; ++wq) {
        unsigned a[2][4];  // [u][a0..a3 of the mma]: (feature g, s = 2u), (g + 8, 2u), (g, 2u + 1), (g + 8, 2u + 1)
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          const unsigned da = eqb_hsub2(((wa[wq] >> (4 * s)) & 0x000F000Fu) | BASE, CEN);
          const unsigned db = eqb_hsub2(((wb[wq] >> (4 * s)) & 0x000F000Fu) | BASE, CEN);
          const unsigned va = ZP ? eqb_hfma2(da, s2[j][0], m2[j][0]) : eqb_hmul2(da, s2[j][0]);
          const unsigned vb = ZP ? eqb_hfma2(db, s2[j][1], m2[j][1]) : eqb_hmul2(db, s2[j][1]);
          a[s >> 1][(s & 1) * 2] = va;
          a[s >> 1][(s & 1) * 2 + 1] = vb;
        }
#pragma unroll
        for (int t = 0; t < R / 8; ++t) {
          const uint4 xb = xs[((8 * t + g) * 4 + wq) * 32 + 4 * (kw * J + j) + q];  // pairs s = 0..3 of x row 8t + g
          eqb_mma(acc[t], a[0][0], a[0][1], a[0][2], a[0][3], xb.x, xb.y);
          eqb_mma(acc[t], a[1][0], a[1][1], a[1][2], a[1][3], xb.z, xb.w);
        }
      }
    }
  }
  if (KS > 1) {  // the KS warps of a feature tile: partial sums through shared memory (x's, read by now)
    float* red = reinterpret_cast<float*>(smem);
    __syncthreads();
    if (kw > 0) {
#pragma unroll
      for (int t = 0; t < R / 8; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) red[((warp * (R / 8) + t) * 4 + i) * 32 + lane] = acc[t][i];
    }
    __syncthreads();
    if (kw > 0) return;
#pragma unroll
    for (int k = 1; k < KS; ++k)
#pragma unroll
      for (int t = 0; t < R / 8; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[t][i] += red[(((warp + k) * (R / 8) + t) * 4 + i) * 32 + lane];
  }
#pragma unroll
  for (int t = 0; t < R / 8; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // c0, c1: feature g, rows 2q, 2q + 1; c2, c3: feature g + 8
      const int r = 8 * t + 2 * q + (i & 1), n = n0 + g + (i >> 1) * 8;
      if (r < rows && n < out_f) {
        float v = acc[t][i];
        if (BIAS) v += __half2float(bias[n]);
        out[(long long)r * out_f + n] = __float2half_rn(v);
      }
    }
}
#endif
