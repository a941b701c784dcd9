// Standalone check + timing of the INT4 prefill GEMMs on an H200 (issue 16 item 3): the wgmma kernel
// (edgellm/kernels/cuda/int4_gemm_wgmma.cu) against the tc2 mma.sync kernel (int4_gemm_mma_pipelined.cu), both
// compiled from the fragments TVM pastes, in one binary. Build here (no GPU needed):
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -o harness harness.cu
// Run there: ./harness [reps]   (prints a table; every output checked against a naive fp32 GPU reference with
// the output poisoned by NaN first; three weight grids: q4f16_1 offset 7, Q4_0 offset 8, Q4_1 with minimums).
// Variant names: wg<warpgroups>_r<rows per block>_s<stages>[b2: two blocks per SM][_ld0: per-stage address
// arithmetic, the kernel's LD 0]; tc2_<config> as in kernels/cuda_gemm.TC2_CONFIGS. Results: docs/benchmarks/h200-wgmma.md
#include <cuda_fp16.h>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <cmath>
#include <vector>
#include <algorithm>
#include <string>
#include "../../edgellm/kernels/cuda/int4_gemm_mma_pipelined.cu"
#include "../../edgellm/kernels/cuda/int4_gemm_wgmma.cu"

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { \
  fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #x); exit(1); } } while (0)

struct Args { const half* x; const unsigned* qw; const half* qs; const half* qm; const half* bias; half* out;
              long long m; int in_f, out_f; };

template <int WM, int WN, int MI, int NI, int ST, int MINB, int MODE, int OFF, bool ZP, bool BIAS>
__global__ void __launch_bounds__(32 * WM * WN, MINB) k_tc2(Args a) {
  extern __shared__ __align__(16) unsigned char sm[];
  edgellm_q4gemm<WM, WN, MI, NI, ST, BIAS, MODE, OFF, ZP>(a.x, a.qw, a.qs, a.qm, a.bias, a.out, a.m, a.in_f, a.out_f, sm);
}
template <int NWG, int BR, int ST, int MINB, int OFF, bool ZP, bool BIAS, int LD>
__global__ void __launch_bounds__(128 * NWG, MINB) k_wg(Args a) {
  extern __shared__ __align__(16) unsigned char sm[];
  edgellm_q4gemm_wgmma<NWG, BR, ST, BIAS, OFF, ZP, LD>(a.x, a.qw, a.qs, a.qm, a.bias, a.out, a.m, a.in_f, a.out_f, sm);
}

__global__ void k_ref(Args a, int off, bool zp, float* ref) {  // fp32, fp16-rounded weights; 128 features x 8 rows
  __shared__ float xs[8][256];
  const int n = blockIdx.x * 128 + threadIdx.x;
  const long long r0 = (long long)blockIdx.y * 8;
  const int W = a.in_f / 8, G = a.in_f / 32;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int k0 = 0; k0 < a.in_f; k0 += 256) {
    __syncthreads();
    for (int i = threadIdx.x; i < 8 * 256; i += 128) {
      const int rr = i / 256, kk = i % 256;
      xs[rr][kk] = (r0 + rr < a.m && k0 + kk < a.in_f) ? __half2float(a.x[(r0 + rr) * a.in_f + k0 + kk]) : 0.f;
    }
    __syncthreads();
    if (n < a.out_f)
      for (int kk = 0; kk < 256 && k0 + kk < a.in_f; ++kk) {
        const int k = k0 + kk;
        const unsigned wd = a.qw[(long long)n * W + k / 8];
        const int qv = (wd >> (4 * (k % 8))) & 15;
        const float sc = __half2float(a.qs[(long long)n * G + k / 32]);
        const float w = zp ? __half2float(__float2half_rn(qv * sc + __half2float(a.qm[(long long)n * G + k / 32])))
                           : __half2float(__float2half_rn((qv - off) * sc));
#pragma unroll
        for (int rr = 0; rr < 8; ++rr) acc[rr] += xs[rr][kk] * w;
      }
  }
  if (n >= a.out_f) return;
  const float b = a.bias ? __half2float(a.bias[n]) : 0.f;
  for (int rr = 0; rr < 8; ++rr)
    if (r0 + rr < a.m) ref[(r0 + rr) * a.out_f + n] = acc[rr] + b;
}

__global__ void k_fill(unsigned* p, long long n, unsigned seed) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15; h *= 0x27d4eb2du; h ^= h >> 16;
    p[i] = h;
  }
}
__global__ void k_fill_half(half* p, long long n, unsigned seed, float lo, float hi) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15; h *= 0x27d4eb2du; h ^= h >> 16;
    p[i] = __float2half_rn(lo + (hi - lo) * (h >> 8) * (1.f / 16777216.f));
  }
}
__global__ void k_err(const half* out, const float* ref, long long n, double* acc) {  // sum d^2, sum r^2, max|d|, nan count
  double d2 = 0, r2 = 0, mx = 0, nan = 0;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
    const float o = __half2float(out[i]), r = ref[i];
    if (!(fabsf(o) < 1e30f)) { nan += 1; continue; }
    const double d = (double)o - r; d2 += d * d; r2 += (double)r * r; mx = fmax(mx, fabs(d));
  }
  atomicAdd(acc, d2); atomicAdd(acc + 1, r2); atomicAdd(acc + 2, nan);
  unsigned long long* pm = reinterpret_cast<unsigned long long*>(acc + 3);
  atomicMax(pm, __double_as_longlong(mx));  // non-negative doubles order as their bits
}

typedef void (*Launch)(const Args&, cudaStream_t);
struct Variant { std::string name; Launch fn; };

template <int WM, int WN, int MI, int NI, int ST, int MINB, int MODE, int OFF, bool ZP, bool BIAS>
void launch_tc2(const Args& a, cudaStream_t s) {
  constexpr int BM = WM * 16 * MI, BN = WN * 8 * NI, BK = 64;
  constexpr int SMEM = ST * (BM * BK * 2 + BN * BK / 2 + BN * 4 * (ZP ? 2 : 1));
  auto k = k_tc2<WM, WN, MI, NI, ST, MINB, MODE, OFF, ZP, BIAS>;
  static bool init = false;
  if (!init) { CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM)); init = true; }
  dim3 grid((unsigned)((a.m + BM - 1) / BM), (a.out_f + BN - 1) / BN);
  k<<<grid, 32 * WM * WN, SMEM, s>>>(a);
}
template <int NWG, int BR, int ST, int MINB, int OFF, bool ZP, bool BIAS, int LD = 1>
void launch_wg(const Args& a, cudaStream_t s) {
  constexpr int SMEM = EqwCfg<NWG, BR, ST>::smem(ZP);
  auto k = k_wg<NWG, BR, ST, MINB, OFF, ZP, BIAS, LD>;
  static bool init = false;
  if (!init) { CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM)); init = true; }
  dim3 grid((unsigned)((a.m + BR - 1) / BR), (a.out_f + 64 * NWG - 1) / (64 * NWG));
  k<<<grid, 128 * NWG, SMEM, s>>>(a);
}

// the variants, per grid (OFF, ZP) and bias
template <int OFF, bool ZP, bool BIAS>
std::vector<Variant> variants() {
  return {
    {"tc2_128x128", launch_tc2<2, 4, 4, 4, 4, 1, 1, OFF, ZP, BIAS>},
    {"tc2_128x128b2", launch_tc2<2, 4, 4, 4, 4, 2, 1, OFF, ZP, BIAS>},
    {"tc2_64x128", launch_tc2<2, 4, 2, 4, 4, 2, 1, OFF, ZP, BIAS>},
    {"wg2_r256_s4", launch_wg<2, 256, 4, 1, OFF, ZP, BIAS>},
    {"wg2_r128_s4", launch_wg<2, 128, 4, 1, OFF, ZP, BIAS>},
    {"wg2_r128_s4b2", launch_wg<2, 128, 4, 2, OFF, ZP, BIAS>},
    {"wg3_r128_s4", launch_wg<3, 128, 4, 1, OFF, ZP, BIAS>},
    {"wg2_r64_s4b2", launch_wg<2, 64, 4, 2, OFF, ZP, BIAS>},
    {"wg1_r128_s4b2", launch_wg<1, 128, 4, 2, OFF, ZP, BIAS>},
    {"wg2_r128_s3b2", launch_wg<2, 128, 3, 2, OFF, ZP, BIAS>},
    {"wg2_r256_s4_ld0", launch_wg<2, 256, 4, 1, OFF, ZP, BIAS, 0>},
    {"wg2_r128_s4b2_ld0", launch_wg<2, 128, 4, 2, OFF, ZP, BIAS, 0>},
    {"wg3_r128_s4_ld0", launch_wg<3, 128, 4, 1, OFF, ZP, BIAS, 0>},
    {"wg2_r64_s4b2_ld0", launch_wg<2, 64, 4, 2, OFF, ZP, BIAS, 0>},
  };
}

struct Shape { const char* name; long long m; int in_f, out_f; bool timed; };

int main(int argc, char** argv) {
  const int reps = argc > 1 ? atoi(argv[1]) : 20;
  const bool only_check = argc > 2 && std::string(argv[2]) == "check";
  std::vector<Shape> shapes = {
    {"8B.qkv", 512, 4096, 6144, true}, {"8B.o", 512, 4096, 4096, true}, {"8B.gate_up", 512, 4096, 28672, true},
    {"8B.down", 512, 14336, 4096, true},
    {"8B.qkv", 128, 4096, 6144, true}, {"8B.o", 128, 4096, 4096, true}, {"8B.gate_up", 128, 4096, 28672, true},
    {"8B.down", 128, 14336, 4096, true},
    {"1B.qkv", 512, 2048, 3072, true}, {"1B.o", 512, 2048, 2048, true}, {"1B.gate_up", 512, 2048, 16384, true},
    {"1B.down", 512, 8192, 2048, true},
    {"edge", 77, 2048, 4100, false}, {"edge", 300, 1024, 2112, false}, {"edge", 1, 64, 8, false},
    {"edge", 513, 4096, 6144, false},
  };
  long long maxx = 0, maxw = 0, maxs = 0, maxo = 0;
  for (auto& s : shapes) {
    maxx = std::max(maxx, s.m * s.in_f); maxw = std::max(maxw, (long long)s.out_f * s.in_f / 8);
    maxs = std::max(maxs, (long long)s.out_f * s.in_f / 32); maxo = std::max(maxo, s.m * s.out_f);
  }
  const int NSET = 3;  // weight sets rotated while timing (the 8B gate_up weights are about the L2's size)
  half *x, *qs[NSET], *qm[NSET], *bias, *out; unsigned* qw[NSET]; float* ref; double* err;
  CK(cudaMalloc(&x, maxx * 2)); CK(cudaMalloc(&bias, 65536 * 2)); CK(cudaMalloc(&out, maxo * 2));
  CK(cudaMalloc(&ref, maxo * 4)); CK(cudaMalloc(&err, 64));
  for (int i = 0; i < NSET; ++i) {
    CK(cudaMalloc(&qw[i], maxw * 4)); CK(cudaMalloc(&qs[i], maxs * 2)); CK(cudaMalloc(&qm[i], maxs * 2));
  }
  cudaStream_t st; CK(cudaStreamCreate(&st));
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  unsigned seed = 1234;
  int fails = 0, checks = 0;
  struct Grid { const char* name; int off; bool zp; };
  const Grid grids[3] = {{"o7", 7, false}, {"o8", 8, false}, {"min", 0, true}};
  printf("%-11s %5s %6s %6s %-4s %-15s %9s %9s %8s %8s\n", "shape", "m", "in", "out", "grid", "kernel", "rel_err",
         "max_err", "us", "TFLOP/s");
  for (auto& s : shapes) {
    for (int gi = 0; gi < 3; ++gi) {
      const Grid& gd = grids[gi];
      for (int bi = 0; bi < 2; ++bi) {
        const bool use_bias = bi == 1;
        if (use_bias && !(gi == 0 && !s.timed)) continue;  // bias: checked on the edge shapes, o7 grid
        // fresh random inputs for every check
        k_fill_half<<<1024, 256>>>(x, s.m * s.in_f, seed++, -1.f, 1.f);
        k_fill_half<<<256, 256>>>(bias, s.out_f, seed++, -0.5f, 0.5f);
        for (int i = 0; i < NSET; ++i) {
          k_fill<<<1024, 256>>>(qw[i], (long long)s.out_f * s.in_f / 8, seed++);
          k_fill_half<<<1024, 256>>>(qs[i], (long long)s.out_f * s.in_f / 32, seed++, 0.002f, 0.02f);
          k_fill_half<<<1024, 256>>>(qm[i], (long long)s.out_f * s.in_f / 32, seed++, -0.16f, 0.0f);
        }
        CK(cudaGetLastError());
        Args a{x, qw[0], qs[0], qm[0], use_bias ? bias : nullptr, out, s.m, s.in_f, s.out_f};
        dim3 rg((s.out_f + 127) / 128, (unsigned)((s.m + 7) / 8));
        k_ref<<<rg, 128>>>(a, gd.off, gd.zp, ref);
        CK(cudaGetLastError()); CK(cudaDeviceSynchronize());
        std::vector<Variant> vs;
        if (gi == 0) vs = use_bias ? variants<7, false, true>() : variants<7, false, false>();
        else if (gi == 1) vs = variants<8, false, false>();
        else vs = variants<0, true, false>();
        for (auto& v : vs) {
          CK(cudaMemset(out, 0xFF, s.m * s.out_f * 2));  // NaN poison
          CK(cudaMemset(err, 0, 64));
          v.fn(a, st);
          CK(cudaGetLastError()); CK(cudaStreamSynchronize(st));
          k_err<<<256, 256>>>(out, ref, s.m * s.out_f, err);
          CK(cudaGetLastError());
          double h[4]; CK(cudaMemcpy(h, err, 32, cudaMemcpyDeviceToHost));
          const double rel = std::sqrt(h[0] / std::max(h[1], 1e-30));
          const bool ok = h[2] == 0 && rel < 2e-3;
          ++checks; if (!ok) ++fails;
          double us = 0, tf = 0;
          if (s.timed && gi == 0 && !use_bias && !only_check && ok) {
            std::vector<float> ts;
            for (int w = 0; w < 3; ++w) { Args b = a; b.qw = qw[w % NSET]; b.qs = qs[w % NSET]; v.fn(b, st); }
            for (int r = 0; r < reps; ++r) {
              Args b = a; b.qw = qw[r % NSET]; b.qs = qs[r % NSET]; b.qm = qm[r % NSET];
              CK(cudaEventRecord(e0, st)); v.fn(b, st); CK(cudaEventRecord(e1, st));
              CK(cudaEventSynchronize(e1)); float ms; CK(cudaEventElapsedTime(&ms, e0, e1)); ts.push_back(ms);
            }
            CK(cudaGetLastError());
            std::sort(ts.begin(), ts.end());
            us = ts[ts.size() / 2] * 1e3; tf = 2.0 * s.m * s.in_f * s.out_f / (us * 1e-6) / 1e12;
          }
          if (s.timed && gi == 0 && !use_bias) {
            printf("%-11s %5lld %6d %6d %-4s %-15s %9.2e %9.2e %8.1f %8.1f%s\n", s.name, s.m, s.in_f, s.out_f, gd.name,
                   v.name.c_str(), rel, h[3], us, tf, ok ? "" : "  FAIL");
          } else if (!ok) {
            printf("%-11s %5lld %6d %6d %-4s %-15s %9.2e %9.2e nan=%.0f%s  FAIL\n", s.name, s.m, s.in_f, s.out_f,
                   gd.name, v.name.c_str(), rel, h[3], h[2], use_bias ? " bias" : "");
          }
          fflush(stdout);
        }
      }
    }
  }
  printf("checks: %d, failed: %d\n", checks, fails);
  return fails ? 2 : 0;
}
