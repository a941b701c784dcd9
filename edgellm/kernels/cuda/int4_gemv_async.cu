#ifndef EDGELLM_Q4GEMV_ASYNC
#define EDGELLM_Q4GEMV_ASYNC
// One-token INT4 decode GEMV whose weights stream through a per-thread ring of shared memory by cp.async
// (kernels/cuda_gemv_async.py): out[n] = sum_k x[k] W[n, k], the arithmetic of cuda_gemv.int4_gemv_h2 with x staged in
// shared memory (xsmem), value for value and in the same order, so the two give the same bits for the same (W, R, U, KS,
// fold) pick.
//
// Why: int4_gemv_h2 loads a step's weights into registers, then does the step's arithmetic, then loads the next step.
// A long `in` (the down projections: 3-4 steps a lane) then alternates between loading and computing: while a warp
// computes, none of its bytes are in flight (H200, Llama-3-8B down: 12.2 us for 33 MB, 66% of the copy rate). Loads
// of the next step issued into registers ahead of time are sunk by ptxas to their use (docs/benchmarks/h200-pdl.md,
// run 37). cp.async writes shared memory, which ptxas cannot sink: steps it + 1 .. it + S - 1 are in flight while
// step it is computed, and step it + S is issued as soon as its slot is read.
//
// Work split (int4_gemv_h2's): a block is W warps; KS consecutive warps form a team owning R consecutive rows; virtual
// lane v = 32 (warp % KS) + lane takes groups v, v + 32 KS, ... in steps of U groups (the last step guarded). Per step
// and lane: U x R 16-byte weight chunks and U x R scales (the 4-byte aligned pair holding the group's scale), into
// slot it % S of the thread's own ring (a thread reads back only what it copied: cp.async.wait_group is the only
// synchronization the ring needs). Before the PDL wait: the first S steps' copies (weights are parameters nothing of the
// step writes) and, with PF, the block's rows asked into L2; after it, x staged as the (x[8j+s], x[8j+s+4]) pairs.
//
// smem: [4][G] uint4 (x pairs), [S][U R][NT] uint4 (weights), [S][U R][NT] uint32 (scale pairs), [W][R] float.
#include <cuda_fp16.h>

#ifndef EDGELLM_PDL_MARKS
#define EDGELLM_PDL_MARKS
// a kernel whose TVMScript launch calls edgellm_pdl_waits_inside() places its own PDL wait (kernels/cuda_pdl.py)
__device__ __forceinline__ void edgellm_pdl_waits_inside() {}
__device__ __forceinline__ void edgellm_noop() {}
#endif

// (w - cen) * x + acc in fp16x2: cuda_gemv.h2_fma_sub's two instructions
__device__ __forceinline__ unsigned eqa_fma_sub(unsigned w, unsigned cen, unsigned x, unsigned acc) {
  unsigned t, r;
  asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(t) : "r"(w), "r"(cen));
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(t), "r"(x), "r"(acc));
  return r;
}
// (w / 16 + c16) * x + acc in fp16x2: cuda_gemv.h2_fma_sub16's (the nibble on mantissa bits 4..7)
__device__ __forceinline__ unsigned eqa_fma_sub16(unsigned w, unsigned c16, unsigned x, unsigned acc) {
  unsigned t, r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(t) : "r"(w), "r"(0x2C002C00u), "r"(c16));
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(t), "r"(x), "r"(acc));
  return r;
}
__device__ __forceinline__ void eqa_cp16(void* dst, const void* src) {  // 16 bytes global -> shared, L1 bypassed
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src)
               : "memory");
}
__device__ __forceinline__ void eqa_cp4(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src)
               : "memory");
}
__device__ __forceinline__ void eqa_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void eqa_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }
__device__ __forceinline__ void eqa_prefetch_l2(const void* p, unsigned n) {  // [p, p + n) into L2 (sm_90)
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(n) : "memory");
}
__device__ __forceinline__ float eqa_lo(unsigned u) { return __half2float(__ushort_as_half((unsigned short)(u & 0xFFFFu))); }
__device__ __forceinline__ float eqa_hi(unsigned u) { return __half2float(__ushort_as_half((unsigned short)(u >> 16))); }

template <int W, int R, int U, int KS, int S, int G, int OUTF, int OFF, bool FOLD, bool PF, bool PDL>
__device__ __forceinline__ void edgellm_q4gemv_async(const half* __restrict__ x, const unsigned* __restrict__ qw,
                                                     const half* __restrict__ qs, half* __restrict__ out,
                                                     unsigned char* smem) {
  static_assert(W % KS == 0 && S >= 1 && G % 2 == 0, "warps a multiple of ksplit; G even (4-byte scale pairs)");
  constexpr int NT = W * 32, TEAMS = W / KS, VL = 32 * KS, BLK = TEAMS * R, C = U * R;
  constexpr int NS = (G + VL * U - 1) / (VL * U);  // steps a lane
  constexpr unsigned BASE = 0x50005000u, CEN = 0x50005000u + OFF * 0x10001u;
  constexpr unsigned C16 = (0xC000u + OFF * 16u) * 0x10001u;  // -(2 + OFF / 32) in both halves
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int row0 = (blockIdx.x * TEAMS + warp / KS) * R;  // first row of this warp's team
  const int vl = (warp % KS) * 32 + lane;
  uint4* xs = reinterpret_cast<uint4*>(smem);
  uint4* wring = xs + 4 * G;
  unsigned* sring = reinterpret_cast<unsigned*>(wring + S * C * NT);
  float* part = reinterpret_cast<float*>(sring + S * C * NT);

  auto issue = [&](int it) {  // step it's copies into slot it % S: one commit group (empty past the last step)
    if (it < NS) {
      const int slot = it % S;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int g = (it * U + u) * VL + vl;
        if (g < G) {
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const long long row = min(row0 + r, OUTF - 1);  // clamped: the loads stay in bounds
            eqa_cp16(wring + (slot * C + u * R + r) * NT + tid, qw + (row * G + g) * 4);
            eqa_cp4(sring + (slot * C + u * R + r) * NT + tid, qs + row * G + (g & ~1));
          }
        }
      }
    }
    eqa_commit();
  };
#pragma unroll
  for (int it = 0; it < S; ++it) issue(it);
  if constexpr (PF) {  // the block's rows (weights, then scales widened to 16-byte bounds) into L2, before the wait
    if (tid == 0) {
      const int r0 = blockIdx.x * BLK, n = min(BLK, OUTF - r0);
      eqa_prefetch_l2(qw + (long long)r0 * G * 4, (unsigned)(n * G * 16));
      const long long s0 = ((long long)r0 * G * 2) & ~15ll;
      const long long s1 = min(((long long)(r0 + n) * G * 2 + 15) & ~15ll, (long long)OUTF * G * 2 / 16 * 16);
      if (s1 > s0) eqa_prefetch_l2(reinterpret_cast<const unsigned char*>(qs) + s0, (unsigned)(s1 - s0));
    }
  }
  if constexpr (PDL) {  // x and every store come after the kernel before has completed
    cudaGridDependencySynchronize();
    cudaTriggerProgrammaticLaunchCompletion();
  }
  for (int j = tid; j < 4 * G; j += NT) {  // word j = 4g + q of x (x[8j .. 8j+7]) -> its 4 pairs at xs[q][g]
    const uint4 v = reinterpret_cast<const uint4*>(x)[j];
    uint4 p;  // (x0, x4) (x1, x5) (x2, x6) (x3, x7) from (x0, x1) (x2, x3) (x4, x5) (x6, x7)
    p.x = __byte_perm(v.x, v.z, 0x5410);
    p.y = __byte_perm(v.x, v.z, 0x7632);
    p.z = __byte_perm(v.y, v.w, 0x5410);
    p.w = __byte_perm(v.y, v.w, 0x7632);
    xs[(j & 3) * G + (j >> 2)] = p;
  }
  __syncthreads();

  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.f;
#pragma unroll
  for (int it = 0; it < NS; ++it) {
    eqa_wait<S - 1>();  // step it's group has landed (one group committed per step, S ahead)
    const int slot = it % S;
    uint4 wv[C];
    unsigned sv[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      wv[c] = wring[(slot * C + c) * NT + tid];
      sv[c] = sring[(slot * C + c) * NT + tid];
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int g = (it * U + u) * VL + vl;
      if (g < G) {
        unsigned hs[R][2];
#pragma unroll
        for (int r = 0; r < R; ++r) hs[r][0] = hs[r][1] = 0u;
#pragma unroll
        for (int q = 0; q < 4; ++q) {  // word q of the group: its pairs (x0,x4) (x1,x5) (x2,x6) (x3,x7)
          const uint4 xv = xs[q * G + g];
          const unsigned xp[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const uint4 wc = wv[u * R + r];
            const unsigned w = q == 0 ? wc.x : q == 1 ? wc.y : q == 2 ? wc.z : wc.w;
            if constexpr (FOLD) {  // nibbles (2h, 2h+4) at bits 0, (2h+1, 2h+5) at bits 4 of w >> 8h
#pragma unroll
              for (int h = 0; h < 2; ++h) {
                hs[r][q % 2] = eqa_fma_sub(((w >> (8 * h)) & 0x000F000Fu) | BASE, CEN, xp[2 * h], hs[r][q % 2]);
                hs[r][q % 2] = eqa_fma_sub16(((w >> (8 * h)) & 0x00F000F0u) | BASE, C16, xp[2 * h + 1], hs[r][q % 2]);
              }
            } else {
#pragma unroll
              for (int sh = 0; sh < 4; ++sh)
                hs[r][q % 2] = eqa_fma_sub(((w >> (4 * sh)) & 0x000F000Fu) | BASE, CEN, xp[sh], hs[r][q % 2]);
            }
          }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const unsigned pair = sv[u * R + r];
          const float scale = g & 1 ? eqa_hi(pair) : eqa_lo(pair);
          acc[r] = acc[r] + ((eqa_lo(hs[r][0]) + eqa_hi(hs[r][0])) + (eqa_lo(hs[r][1]) + eqa_hi(hs[r][1])))
                                * (scale * 32.0f);
        }
      }
    }
    issue(it + S);  // after the slot's values were used
  }
  eqa_wait<0>();  // no copy left in flight when the block exits
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float red = acc[r];
#pragma unroll
    for (int o = 0; o < 5; ++o) red = red + __shfl_xor_sync(0xFFFFFFFFu, red, 16 >> o);
    if constexpr (KS == 1) {
      if (lane == 0 && row0 + r < OUTF) out[row0 + r] = __float2half_rn(red);
    } else if (lane == 0) {
      part[warp * R + r] = red;
    }
  }
  if constexpr (KS > 1) {
    __syncthreads();
    if (warp % KS == 0 && lane < R) {  // the team's first warp: lane r sums row r's KS partials in warp order
      float red = part[warp * R + lane];
#pragma unroll
      for (int k = 1; k < KS; ++k) red = red + part[(warp + k) * R + lane];
      if (row0 + lane < OUTF) out[row0 + lane] = __float2half_rn(red);
    }
  }
}
#endif
