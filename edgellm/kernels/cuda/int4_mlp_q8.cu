#ifndef EDGELLM_MLP_Q8
#define EDGELLM_MLP_Q8
// The one-token MLP of the int8-activation chain as ONE kernel (kernels/cuda_gemv_dp4a.py mlp_q8): the residual
// add + RMSNorm, gate_up + silu and down, the arithmetic of edgellm_add_rms_norm_q8, then edgellm_q4gemv_dp4a with
// SILU / PREQ / QOUT (gate_up, 4 rows a warp: QOUT_SILU_CONFIG's 4, 4, 2, 1) and with PREQ (down, teams of 2 warps
// of 2 rows, 2 groups a step: LONG_IN_CONFIG's split), sum for sum in the same order: the same values as the three
// kernels. Needs int4_gemv_dp4a.cu's helpers (pasted before it).
//
// Why one kernel: between two kernels of a decode step the memory system idles while the first drains and the next
// one's blocks wait for its completion (1.5-3 us on the H200 even with PDL); Llama-3-8B's MLP is three kernels a
// layer. Here the blocks take units of work from a ticket counter (unit 0: the norm; then the gate_up units of 2W
// outputs; then the down units of W rows) and wait on counters, not on kernel boundaries: a block that takes a
// down unit issues its first weight loads, then waits until every gate_up unit is done. Tickets are handed out in
// order, so a block only ever waits for units that running blocks hold: no deadlock whatever the grid and
// residency. The counters (edgellm_mlp_sync) are zero between launches: the last block out resets them. Launches
// of the kernel must not overlap (one stream; under PDL each kernel of the chain waits for its predecessor).
//
// ws (global, [HID / 8 + INTER / 8] uint4): the normed x, then silu(gate) * up, quantized a packed word at a time.
// smem: [4 GM] uint2 (q), [4 GM] float (d), [4 GM] int (OFF * sum q), [W][2] float, [2 W] float, [32] float, [2] int.
#include <cuda_fp16.h>

__device__ unsigned edgellm_mlp_sync[4];  // next ticket, norm done, gate_up units done, blocks out

__device__ __forceinline__ unsigned emq_ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
// thread 0: until *p >= target; then the block (the caller's __syncthreads)
__device__ __forceinline__ void emq_wait_at_least(const unsigned* p, unsigned target) {
  while (emq_ld_acquire(p) < target) __nanosleep(64);
}
// the block's writes are done (the caller's __syncthreads before): thread 0 publishes n more units
__device__ __forceinline__ void emq_publish(unsigned* p, unsigned n) {
  __threadfence();
  atomicAdd(p, n);
}

// weight words and scales of step `it` of R rows (rows[r]) for lane vl of VL lanes: U groups g = (it U + u) VL + vl
template <int R, int U, int VL, int G>
__device__ __forceinline__ void emq_load(uint4* wv, float* sc, const unsigned* __restrict__ qw,
                                         const half* __restrict__ qs, const long long* rows, int it, int vl) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int g = (it * U + u) * VL + vl;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (g < G) {
        wv[u * R + r] = __ldg(reinterpret_cast<const uint4*>(qw + (rows[r] * G + g) * 4));
        sc[u * R + r] = __half2float(qs[rows[r] * G + g]);
      } else {
        wv[u * R + r] = make_uint4(0u, 0u, 0u, 0u);
        sc[u * R + r] = 0.f;
      }
    }
  }
}

// edgellm_q4gemv_dp4a's `compute` of one step: the same products in the same order
template <int R, int U, int VL, int G>
__device__ __forceinline__ void emq_compute(const uint4* wv, const float* sc, float* acc, const uint2* xq,
                                            const float* xd, const int* xc, int it, int vl) {
  unsigned all = 0u;
#pragma unroll
  for (int c = 0; c < U * R; ++c) all ^= wv[c].x ^ __float_as_uint(sc[c]);
  const int dep = (int)eqd_zero_after(all, (unsigned)vl | 32u);
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int g = (it * U + u) * VL + vl;
    if (g < G) {
      float t[R];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint2 q = xq[g * 4 + k];
        const float d = xd[g * 4 + k];
        const int c0 = dep - xc[g * 4 + k];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint4 wc = wv[u * R + r];
          const unsigned w = k == 0 ? wc.x : k == 1 ? wc.y : k == 2 ? wc.z : wc.w;
          const int s = eqd_dot((w >> 4) & 0x0F0F0F0Fu, q.y, eqd_dot(w & 0x0F0F0F0Fu, q.x, c0));
          t[r] = k == 0 ? (float)s * d : fmaf((float)s, d, t[r]);
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = fmaf(t[r], sc[u * R + r], acc[r]);
    }
  }
}

// N quantized words from global (written by other blocks in this launch: read past L1) into the staging arrays, NT
// threads; unrolled, so a thread's loads are all in flight at once
template <int N, int NT, int OFF>
__device__ __forceinline__ void emq_stage(const uint4* __restrict__ src, uint2* xq, float* xd, int* xc) {
#pragma unroll
  for (int j0 = 0; j0 < N; j0 += NT) {
    const int j = j0 + (int)threadIdx.x;
    if (j < N) {
      const uint4 v = __ldcg(src + j);
      xq[j] = make_uint2(v.x, v.y);
      xd[j] = __uint_as_float(v.z);
      xc[j] = OFF * (int)v.w;
    }
  }
}

template <int W, int HID, int INTER, int OFF, bool PDL, int DU = 2>
__device__ __forceinline__ void edgellm_mlp_q8(const half* __restrict__ x, const half* __restrict__ y,
                                               const half* __restrict__ nw, const unsigned* __restrict__ gw,
                                               const half* __restrict__ gs, const unsigned* __restrict__ dw,
                                               const half* __restrict__ ds, half* __restrict__ xo,
                                               half* __restrict__ out, void* __restrict__ wsp, float eps,
                                               unsigned char* smem) {
  constexpr int NT = 32 * W, G1 = HID / 32, G2 = INTER / 32, GM = G1 > G2 ? G1 : G2;
  constexpr int OUT1 = 2 * W;                            // gate_up outputs a unit: 2 a warp (4 rows)
  constexpr int NU1 = INTER / OUT1, NU2 = HID / W;       // down: W rows a unit, W / 2 teams of 2 warps, 2 rows each
  constexpr int NUNITS = 1 + NU1 + NU2;
  constexpr int NS1 = (G1 + 64 - 1) / 64, NS2 = (G2 + 64 * DU - 1) / (64 * DU);  // steps a lane
  constexpr int NV = HID / 8, KV = NV / NT, NWV = NV / 32;              // the norm: add_rms_norm_q8's NV threads
  static_assert(DU == 1 || DU == 2 || DU == 4, "down: at most 4 groups a step (the 8 weight registers)");
  static_assert(W % 2 == 0 && OUT1 % 8 == 0 && INTER % OUT1 == 0 && HID % W == 0, "whole units");
  static_assert(HID % 32 == 0 && INTER % 32 == 0 && NV % NT == 0 && NWV <= 32, "whole groups, words and warps");
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  uint2* xq = reinterpret_cast<uint2*>(smem);
  float* xd = reinterpret_cast<float*>(xq + 4 * GM);
  int* xc = reinterpret_cast<int*>(xd + 4 * GM);
  float* part = reinterpret_cast<float*>(xc + 4 * GM);
  float* qo = part + 2 * W;
  float* red = qo + OUT1;
  int* tk = reinterpret_cast<int*>(red + 32);
  unsigned* sync = edgellm_mlp_sync;
  uint4* __restrict__ ws = reinterpret_cast<uint4*>(wsp);
  uint4* hq = ws + NV;  // silu(gate) * up, quantized

  uint4 wv[8];
  float sc[8];
  long long rows[4];
  auto rows_of = [&](int t) {  // this thread's rows of unit t (gate_up: gate p, p + 1, up p, p + 1; down: p, p + 1)
    if (t >= 1 && t <= NU1) {
      const int p = (t - 1) * OUT1 + 2 * warp;
      rows[0] = p, rows[1] = p + 1, rows[2] = (long long)INTER + p, rows[3] = (long long)INTER + p + 1;
    } else if (t > NU1 && t < NUNITS) {
      const int p = (t - 1 - NU1) * W + 2 * (warp / 2);
      rows[0] = p, rows[1] = p + 1;
    }
  };
  auto load_first = [&](int t) {  // step 0 of unit t: weights only (parameters nothing in the step writes)
    rows_of(t);
    if (t >= 1 && t <= NU1) emq_load<4, 2, 32, G1>(wv, sc, gw, gs, rows, 0, lane);
    else if (t > NU1 && t < NUNITS) emq_load<2, DU, 64, G2>(wv, sc, dw, ds, rows, 0, (warp & 1) * 32 + lane);
  };

  if (tid == 0) tk[0] = (int)atomicAdd(&sync[0], 1u);
  __syncthreads();
  int t = tk[0], it_count = 1;  // tk[0] is read after the barrier above: the loop writes tk[1] first
  load_first(t);
  if constexpr (PDL) {  // x, y and every store after the kernel before has completed
    cudaGridDependencySynchronize();
    cudaTriggerProgrammaticLaunchCompletion();
  }
  bool have_x = false, have_h = false;
  unsigned mine = 0u;  // thread 0: gate_up units done and not yet published
  while (t < NUNITS) {
    int* next = tk + (it_count & 1);
    if (tid == 0) *next = (int)atomicAdd(&sync[0], 1u);  // the next unit's ticket, under this unit's work
    int tn;  // read after this unit's first barrier past the compute; its first loads go under the epilogue
    if (t == 0) {  // x + y, and rms_norm(x + y) * w quantized into ws[0, NV): edgellm_add_rms_norm_q8's arithmetic
      auto sum8 = [&](int v, float* s, unsigned* so) {  // word v of x + y, fp16-rounded (so: packed)
        const uint4 xv = reinterpret_cast<const uint4*>(x)[v], yv = reinterpret_cast<const uint4*>(y)[v];
        const unsigned xs[4] = {xv.x, xv.y, xv.z, xv.w}, ys[4] = {yv.x, yv.y, yv.z, yv.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const half a0 = __float2half_rn(__half2float(__ushort_as_half((unsigned short)(xs[e] & 0xFFFFu)))
                                           + __half2float(__ushort_as_half((unsigned short)(ys[e] & 0xFFFFu))));
          const half a1 = __float2half_rn(__half2float(__ushort_as_half((unsigned short)(xs[e] >> 16)))
                                           + __half2float(__ushort_as_half((unsigned short)(ys[e] >> 16))));
          s[2 * e] = __half2float(a0);
          s[2 * e + 1] = __half2float(a1);
          so[e] = (unsigned)__half_as_ushort(a0) | ((unsigned)__half_as_ushort(a1) << 16);
        }
      };
      for (int k = 0; k < KV; ++k) {  // the sum of squares of word v's 8, then its warp's (words v / 32 * 32 ..)
        const int v = tid + NT * k;
        float s[8], ss = 0.f;
        unsigned so[4];
        sum8(v, s, so);
        reinterpret_cast<uint4*>(xo)[v] = make_uint4(so[0], so[1], so[2], so[3]);
#pragma unroll
        for (int e = 0; e < 8; ++e) ss = ss + s[e] * s[e];
#pragma unroll
        for (int o = 0; o < 5; ++o) ss = ss + __shfl_xor_sync(0xFFFFFFFFu, ss, 1 << o);
        if (lane == 0) red[warp + W * k] = ss;
      }
      __syncthreads();
      float tot = 0.f;
#pragma unroll
      for (int k = 0; k < NWV; ++k) tot = tot + red[k];
      const float r = rsqrtf(tot / (float)HID + eps);
      for (int k = 0; k < KV; ++k) {  // x + y again (a few KB from L1 / L2, not registers held over the barrier)
        const int v = tid + NT * k;
        float s[8], h[8];
        unsigned so[4];
        sum8(v, s, so);
        const uint4 wn = reinterpret_cast<const uint4*>(nw)[v];
        const unsigned wsv[4] = {wn.x, wn.y, wn.z, wn.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          h[2 * e] = __half2float(__float2half_rn(s[2 * e] * r
                                                  * __half2float(__ushort_as_half((unsigned short)(wsv[e] & 0xFFFFu)))));
          h[2 * e + 1] = __half2float(__float2half_rn(s[2 * e + 1] * r
                                                      * __half2float(__ushort_as_half((unsigned short)(wsv[e] >> 16)))));
        }
        ws[v] = eqd_quant8(h);
      }
      __syncthreads();
      tn = *next;
      load_first(tn);
      if (tid == 0) emq_publish(&sync[1], 1u);
    } else if (t <= NU1) {  // gate_up + silu: outputs (t - 1) OUT1 + 2 warp + {0, 1}, quantized into hq
      if (!have_x) {
        if (tid == 0) emq_wait_at_least(&sync[1], 1u);
        __syncthreads();
        emq_stage<NV, NT, OFF>(ws, xq, xd, xc);
        __syncthreads();
        have_x = true;
      }
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int it = 0; it < NS1; ++it) {
        if (it > 0) emq_load<4, 2, 32, G1>(wv, sc, gw, gs, rows, it, lane);
        emq_compute<4, 2, 32, G1>(wv, sc, acc, xq, xd, xc, it, lane);
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int o = 0; o < 5; ++o) acc[r] = acc[r] + __shfl_xor_sync(0xFFFFFFFFu, acc[r], 16 >> o);
      }
      if (lane == 0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const float g16 = __half2float(__float2half_rn(acc[i])), u16 = __half2float(__float2half_rn(acc[i + 2]));
          qo[2 * warp + i] = __half2float(__float2half_rn(g16 / (1.f + __expf(-g16)) * u16));
        }
      }
      __syncthreads();
      tn = *next;
      load_first(tn);
      if (tid < OUT1 / 8) hq[(t - 1) * (OUT1 / 8) + tid] = eqd_quant8(qo + 8 * tid);
      __syncthreads();  // qo is free again
      if (tid == 0) {
        ++mine;
        if (tn > NU1) {  // leaving gate_up: the block's units published at once (one fence a block, not a unit)
          emq_publish(&sync[2], mine);
          mine = 0u;
        }
      }
    } else {  // down: rows (t - 1 - NU1) W + 2 (warp / 2) + {0, 1}, the team's 64 lanes over the row
      if (!have_h) {
        if (tid == 0) emq_wait_at_least(&sync[2], (unsigned)NU1);
        __syncthreads();
        emq_stage<INTER / 8, NT, OFF>(hq, xq, xd, xc);
        __syncthreads();
        have_h = true;
      }
      const int vl = (warp & 1) * 32 + lane;
      float acc[2] = {0.f, 0.f};
#pragma unroll
      for (int it = 0; it < NS2; ++it) {
        if (it > 0) emq_load<2, DU, 64, G2>(wv, sc, dw, ds, rows, it, vl);
        emq_compute<2, DU, 64, G2>(wv, sc, acc, xq, xd, xc, it, vl);
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
#pragma unroll
        for (int o = 0; o < 5; ++o) acc[r] = acc[r] + __shfl_xor_sync(0xFFFFFFFFu, acc[r], 16 >> o);
        if (lane == 0) part[warp * 2 + r] = acc[r];
      }
      __syncthreads();
      const long long orow = rows[lane & 1];
      tn = *next;
      load_first(tn);
      if ((warp & 1) == 0 && lane < 2) out[orow] = __float2half_rn(part[warp * 2 + lane] + part[(warp + 1) * 2 + lane]);
      __syncthreads();  // part is free again
    }
    t = tn;
    ++it_count;
  }
  if (tid == 0 && atomicAdd(&sync[3], 1u) == gridDim.x - 1) {  // the last block out: every ticket is taken
    sync[0] = 0u, sync[1] = 0u, sync[2] = 0u, sync[3] = 0u;
    __threadfence();
  }
}
#endif
