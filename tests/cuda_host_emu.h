#pragma once
// Host (g++ -std=c++20) emulation of what kernels/cuda/int4_gemv_batch.cu and owned_kv.cu use of CUDA, for tests
// without a GPU (tests/test_gpu_gemv_batch.py, tests/test_owned_kv_cache.py): one fiber per CUDA thread of a
// block, __syncthreads as a block barrier, warp shuffles through a shared array between two warp barriers, fp16 as _Float16 with one rounding per
// fp16x2 operation (the test replaces the kernel's two PTX helpers by emu_h2).
#include <type_traits>
#include <ucontext.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <algorithm>
#define __device__
#define __forceinline__ inline
#define __restrict__
using std::min;
struct half { uint16_t b; };
struct half2 { half x, y; };
struct uint4 { unsigned x, y, z, w; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float h2f(uint16_t b) { _Float16 h; memcpy(&h, &b, 2); return (float)h; }
inline uint16_t d2h(double v) { _Float16 h = (_Float16)v; uint16_t b; memcpy(&b, &h, 2); return b; }
inline float __half2float(half h) { return h2f(h.b); }
inline half __ushort_as_half(unsigned short s) { return half{s}; }
inline half __float2half_rn(float f) { return half{d2h(f)}; }
inline float2 __half22float2(half2 h) { return {h2f(h.x.b), h2f(h.y.b)}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline half __float2half(float f) { return __float2half_rn(f); }
inline half2 __floats2half2_rn(float a, float b) { return {half{d2h(a)}, half{d2h(b)}}; }
inline unsigned __byte_perm(unsigned a, unsigned b, unsigned s) {
  uint8_t by[8]; memcpy(by, &a, 4); memcpy(by + 4, &b, 4); unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)by[(s >> (4 * i)) & 7] << (8 * i);
  return r;
}
inline unsigned emu_h2(unsigned a, unsigned b, unsigned c, int op) {  // op 0: a - b; 1: a * b + c; 2: a * b
  unsigned r = 0;
  for (int i = 0; i < 2; ++i) {
    double x = h2f((a >> (16 * i)) & 0xFFFF), y = h2f((b >> (16 * i)) & 0xFFFF), z = h2f((c >> (16 * i)) & 0xFFFF);
    r |= (unsigned)d2h(op == 1 ? x * y + z : op == 2 ? x * y : x - y) << (16 * i);
  }
  return r;
}
struct Dim { unsigned x = 0, y = 0; };
inline Dim threadIdx, blockIdx;
// A block's threads are fibers (ucontext) of one OS thread, run in thread order until each finishes or waits at a
// barrier; a barrier opens once every live thread of its block (or warp) waits there. Deterministic, and no OS
// thread per CUDA thread: on 2 cores, 256 std::threads meeting at a barrier spent most of a test in the kernel.
struct EmuFiber { ucontext_t ctx; char* stack = nullptr; int wait = 0; bool done = false; };  // wait: 1 block, 2 warp
inline ucontext_t g_sched;
inline EmuFiber g_fib[1024];
inline int g_cur, g_nt;
inline void (*g_tramp_body)(void*, int);
inline void* g_tramp_arg;
constexpr size_t EMU_STACK = 256 * 1024;
inline void emu_tramp() { g_tramp_body(g_tramp_arg, g_cur); g_fib[g_cur].done = true; }
inline void emu_wait(int kind) { g_fib[g_cur].wait = kind; swapcontext(&g_fib[g_cur].ctx, &g_sched); }
inline float g_shfl[1024];
// One CUDA block (bx, by) of nt threads running body(t).
template <typename F>
void emu_run_block(unsigned bx, unsigned by, int nt, F&& body) {
  if (nt < 1 || nt > 1024) abort();
  g_nt = nt;
  blockIdx.x = bx; blockIdx.y = by;
  g_tramp_body = [](void* f, int t) { (*static_cast<std::remove_reference_t<F>*>(f))(t); };
  g_tramp_arg = &body;
  for (int t = 0; t < nt; ++t) {
    EmuFiber& f = g_fib[t];
    if (!f.stack) f.stack = new char[EMU_STACK];
    f.wait = 0; f.done = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack; f.ctx.uc_stack.ss_size = EMU_STACK; f.ctx.uc_link = &g_sched;
    makecontext(&f.ctx, emu_tramp, 0);
  }
  for (;;) {
    for (int t = 0; t < nt; ++t)
      if (!g_fib[t].done && g_fib[t].wait == 0) { g_cur = t; threadIdx.x = t; swapcontext(&g_sched, &g_fib[t].ctx); }
    bool live = false, block_open = true, opened = false;
    for (int t = 0; t < nt; ++t)
      if (!g_fib[t].done) { live = true; block_open &= g_fib[t].wait == 1; }
    if (!live) return;
    if (block_open) {
      for (int t = 0; t < nt; ++t) g_fib[t].wait = 0;
      continue;
    }
    for (int w = 0; w < (nt + 31) / 32; ++w) {
      bool any = false, open = true;
      for (int t = 32 * w; t < std::min(nt, 32 * w + 32); ++t)
        if (!g_fib[t].done) { any = true; open &= g_fib[t].wait == 2; }
      if (any && open) {
        for (int t = 32 * w; t < std::min(nt, 32 * w + 32); ++t) g_fib[t].wait = 0;
        opened = true;
      }
    }
    if (!opened) abort();  // threads waiting at different barriers: a deadlock on the GPU too
  }
}
inline void __syncthreads() { emu_wait(1); }
// Blocks run one after another here, so a block's atomics and fences order nothing across blocks; they are real
// atomics and fences anyway, and __ldcg (an L2 load on the GPU) a plain load.
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
template <typename T> inline T __ldcg(const T* p) { return *p; }
inline void cudaGridDependencySynchronize() {}  // PDL: one kernel at a time here
inline void cudaTriggerProgrammaticLaunchCompletion() {}
inline void __syncwarp() { emu_wait(2); }
// int8 dot products and the float helpers kernels/cuda/int4_gemv_dp4a.cu uses (IEEE float32 on the host as on the GPU)
struct uint2 { unsigned x, y; };
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline int __dp4a(int a, int b, int c) {  // four signed byte products added to c
  for (int i = 0; i < 4; ++i) c += (int)(int8_t)(a >> (8 * i)) * (int)(int8_t)(b >> (8 * i));
  return c;
}
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned short __half_as_ushort(half h) { return h.b; }
inline float rsqrtf(float f) { return 1.0f / std::sqrt(f); }
inline int __float2int_rn(float f) { return (int)std::nearbyint(f); }  // the default mode: half to even
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline float __expf(float f) { return std::exp(f); }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  const int t = threadIdx.x, w = t / 32;
  g_shfl[t] = v; emu_wait(2);
  float r = g_shfl[w * 32 + ((t % 32) ^ o)]; emu_wait(2);
  return r;
}
// mma.sync.m16n8k16 row.col f32.f16.f16.f32, warp-collective: the lanes' fragments through shared arrays (PTX ISA
// layout: lane = 4 g + q; A regs (row g, k 2q..2q+1), (g + 8, 2q..), (g, 2q + 8..), (g + 8, 2q + 8..); B regs (k 2q..,
// col g), (k 2q + 8.., col g); C (g, 2q), (g, 2q + 1), (g + 8, 2q), (g + 8, 2q + 1)); exact products, sum in double
inline unsigned g_mma_a[1024][4], g_mma_b[1024][2];
inline void emu_mma(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
  const int t = threadIdx.x, w = t / 32, l = t % 32, g = l / 4, q = l % 4;
  g_mma_a[t][0] = a0; g_mma_a[t][1] = a1; g_mma_a[t][2] = a2; g_mma_a[t][3] = a3;
  g_mma_b[t][0] = b0; g_mma_b[t][1] = b1;
  emu_wait(2);
  auto A = [&](int row, int k) {  // element (row, k) of A from the lane that holds it
    const int lane = 4 * (row % 8) + (k % 8) / 2, reg = (row >= 8) + 2 * (k >= 8);
    return h2f((g_mma_a[w * 32 + lane][reg] >> (16 * (k % 2))) & 0xFFFF);
  };
  auto B = [&](int k, int col) {
    const int lane = 4 * col + (k % 8) / 2, reg = k >= 8;
    return h2f((g_mma_b[w * 32 + lane][reg] >> (16 * (k % 2))) & 0xFFFF);
  };
  float r[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * q + (i & 1);
    double sum = 0;
    for (int k = 0; k < 16; ++k) sum += (double)A(row, k) * B(k, col);
    r[i] = (float)((double)d[i] + sum);
  }
  emu_wait(2);
  for (int i = 0; i < 4; ++i) d[i] = r[i];
}
