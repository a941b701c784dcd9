#ifndef EDGELLM_Q4GEMM_WGMMA
#define EDGELLM_Q4GEMM_WGMMA
// INT4 prefill GEMM on Hopper's warpgroup tensor-core instruction (wgmma.mma_async, sm_90a only). Needs the helpers
// of int4_gemm_mma_pipelined.cu (eq4_cp16, eq4_cp4, eq4_nib2, eq4_dec), pasted before this fragment.
//
// Swapped operands: out^T = W x^T. A = the weights, [64 features x 16 k] per warpgroup and k16 step, decoded from
// INT4 straight into the wgmma A register fragment (same layout as mma.sync m16n8k16's A: warp w of the warpgroup
// holds features 16w + g and 16w + g + 8, k = 2q, 2q+1 and +8), so decoded weights never touch shared memory.
// B = the activation tile [BR rows x 64 k] fp16 in shared memory, K-major with the 128-byte swizzle (16-byte chunk c
// of row r at c ^ (r % 8): what cp.async writes), read by the tensor cores through a matrix descriptor; BR is the
// wgmma N (64, 128 or 256). D = [64 features x BR rows] fp32 in registers (BR / 2 per thread).
// One block: NWG warpgroups (each 64 features, all sharing the activation tile), ST shared-memory stages of 64 k
// filled by cp.async, loads issued ST - 2 stages ahead; the wgmma group of a stage is left in flight while the
// next stage's weights are decoded (wait_group 1), so a slot is refilled two iterations after its last use.
// Epilogue: the fp32 tile scaled by 1/16 (the decode gives 16x the weights, as in the tc2 kernel), + bias, fp16,
// transposed through shared memory into row-major 16-byte stores.
__device__ __forceinline__ void eqw_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void eqw_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void eqw_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory"); }
__device__ __forceinline__ void eqw_keep(float& r) { asm volatile("" : "+f"(r) :: "memory"); }
// shared-memory matrix descriptor: start >> 4, leading offset 1 (unused with swizzle), stride 1024 bytes between
// 8-row groups, 128-byte swizzle (layout type 1)
__device__ __forceinline__ unsigned long long eqw_desc(unsigned addr) {
  return (unsigned long long)((addr & 0x3FFFFu) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32)
         | (1ull << 62);
}
template <int N> struct EqwMma;
template <> struct EqwMma<64> {
  static __device__ __forceinline__ void run(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                             unsigned long long desc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
                 "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1) : "memory");
  }
};
template <> struct EqwMma<128> {
  static __device__ __forceinline__ void run(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                             unsigned long long desc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
                 "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1) : "memory");
  }
};
template <> struct EqwMma<256> {
  static __device__ __forceinline__ void run(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                             unsigned long long desc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
                 "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc), "r"(1) : "memory");
  }
};

template <int NWG, int BR, int ST>
struct EqwCfg {
  static constexpr int NT = 128 * NWG, BF = 64 * NWG, BK = 64;
  static constexpr int XB = BR * BK * 2, WB = BF * BK / 2, SB = BF * 4;
  __host__ __device__ static constexpr int stage(bool zp) { return (XB + WB + SB + (zp ? SB : 0) + 1023) / 1024 * 1024; }
  // dynamic shared memory asked of the launch: the stages (the epilogue's tile reuses them) + 1024 for alignment
  __host__ __device__ static constexpr int smem(bool zp) {
    return (ST * stage(zp) > BR * (BF + 8) * 2 ? ST * stage(zp) : BR * (BF + 8) * 2) + 1024;
  }
};

template <int NWG, int BR, int ST, bool BIAS, int OFF = 7, bool ZP = false, int LD = 1>
__device__ __forceinline__ void edgellm_q4gemm_wgmma(const half* __restrict__ x, const unsigned* __restrict__ qw,
    const half* __restrict__ qs, const half* __restrict__ qm, const half* __restrict__ bias, half* __restrict__ out,
    long long m, int in_f, int out_f, unsigned char* smem_raw) {
  using C = EqwCfg<NWG, BR, ST>;
  constexpr int NT = C::NT, BF = C::BF, BK = C::BK, XB = C::XB, WB = C::WB, SB = C::SB;
  constexpr int STAGE = C::stage(ZP);
  static_assert(ST >= 3, "two stages in use while one loads");
  static_assert(BR == 64 || BR == 128 || BR == 256, "wgmma N");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, q = lane & 3;
  const int wg = warp >> 2, wq = warp & 3;
  const long long row0 = (long long)blockIdx.x * BR;
  const int col0 = blockIdx.y * BF, KT = in_f / BK, W = in_f / 8, G = in_f / 32;
  const unsigned sraw = (unsigned)__cvta_generic_to_shared(smem_raw);
  const unsigned sbase = (sraw + 1023u) & ~1023u;  // the 128-byte swizzle repeats every 1024 bytes
  unsigned char* smem = smem_raw + (sbase - sraw);

  auto load_plain = [&](int kt, int s) {
    const unsigned xs = sbase + s * STAGE, ws = xs + XB, ss = ws + WB, ms = ss + SB;
#pragma unroll
    for (int i = 0; i < (BR * 8 + NT - 1) / NT; ++i) {  // x: 8 chunks of 16 bytes per row, chunk c of row r at c ^ (r % 8)
      const int c = tid + i * NT, r = c >> 3, ch = c & 7;
      const long long gr = row0 + r;
      const half* src = gr < m ? x + gr * in_f + kt * BK + ch * 8 : x;
      if ((BR * 8) % NT == 0 || c < BR * 8) eq4_cp16(xs + (r * 8 + (ch ^ (r & 7))) * 16, src, gr < m ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < (BF * 2 + NT - 1) / NT; ++i) {  // weights: a 16-byte chunk per row and group
      const int c = tid + i * NT;
      if (c < BF * 2) {
        const int r = c >> 1, kg = c & 1, gn = col0 + r;
        const unsigned* src = gn < out_f ? qw + (long long)gn * W + kt * 8 + kg * 4 : qw;
        eq4_cp16(ws + (r * 2 + (kg ^ ((r >> 2) & 1))) * 16, src, gn < out_f ? 16 : 0);
      }
    }
#pragma unroll
    for (int i = 0; i < (BF + NT - 1) / NT; ++i) {  // scales (and minimums): the two groups' fp16 of a row
      const int r = tid + i * NT, gn = col0 + r;
      if (r < BF) eq4_cp4(ss + r * 4, gn < out_f ? qs + (long long)gn * G + kt * 2 : qs, gn < out_f ? 4 : 0);
      if (ZP && r < BF) eq4_cp4(ms + r * 4, gn < out_f ? qm + (long long)gn * G + kt * 2 : qm, gn < out_f ? 4 : 0);
    }
  };

  // LD 1: each thread's source pointers and destinations computed once (rows past m and features past out_f
  // point at the tensor's start with size 0: zero fill); a stage adds kt * 64 elements (the loop's address
  // arithmetic was about half of its instructions, and the kernel is issue-bound at two blocks per SM)
  constexpr int NX = (BR * 8 + NT - 1) / NT, NW = (BF * 2 + NT - 1) / NT, NS = (BF + NT - 1) / NT;
  const half* xp[NX];
  unsigned xd[NX];
  int xsz[NX];
  const unsigned* wp[NW];
  unsigned wd[NW];
  int wsz[NW];
  const half* sp[NS];
  const half* mp[NS];
  int ssz[NS];
  if (LD == 1) {
#pragma unroll
    for (int i = 0; i < NX; ++i) {
      const int c = tid + i * NT, r = c >> 3, ch = c & 7;
      const long long gr = row0 + r;
      xsz[i] = gr < m ? 16 : 0;
      xp[i] = gr < m ? x + gr * in_f + ch * 8 : x;
      xd[i] = (r * 8 + (ch ^ (r & 7))) * 16;
    }
#pragma unroll
    for (int i = 0; i < NW; ++i) {
      const int c = tid + i * NT, r = c >> 1, kg = c & 1, gn = col0 + r;
      wsz[i] = gn < out_f ? 16 : 0;
      wp[i] = gn < out_f ? qw + (long long)gn * W + kg * 4 : qw;
      wd[i] = XB + (r * 2 + (kg ^ ((r >> 2) & 1))) * 16;
    }
#pragma unroll
    for (int i = 0; i < NS; ++i) {
      const int gn = col0 + tid + i * NT;
      ssz[i] = gn < out_f ? 4 : 0;
      sp[i] = gn < out_f ? qs + (long long)gn * G : qs;
      mp[i] = gn < out_f ? qm + (long long)gn * G : qm;
    }
  }
  auto load = [&](int kt, int s) {
    if (LD != 1) {
      load_plain(kt, s);
      return;
    }
    const unsigned st = sbase + s * STAGE;
#pragma unroll
    for (int i = 0; i < NX; ++i)
      if ((BR * 8) % NT == 0 || tid + i * NT < BR * 8) eq4_cp16(st + xd[i], xp[i] + (xsz[i] ? kt * BK : 0), xsz[i]);
#pragma unroll
    for (int i = 0; i < NW; ++i)
      if ((BF * 2) % NT == 0 || tid + i * NT < BF * 2) eq4_cp16(st + wd[i], wp[i] + (wsz[i] ? kt * 8 : 0), wsz[i]);
#pragma unroll
    for (int i = 0; i < NS; ++i) {
      const int r = tid + i * NT;
      if (BF % NT == 0 || r < BF) {
        eq4_cp4(st + XB + WB + r * 4, sp[i] + (ssz[i] ? kt * 2 : 0), ssz[i]);
        if (ZP) eq4_cp4(st + XB + WB + SB + r * 4, mp[i] + (ssz[i] ? kt * 2 : 0), ssz[i]);
      }
    }
  };

  const unsigned offs = (0x6400u + OFF) | ((0x6400u + 16 * OFF) << 16);  // fp16x2 (1024 + OFF, 1024 + 16 OFF)
  const half2 hoffs = *reinterpret_cast<const half2*>(&offs);
  const half2 sixteen_one = __halves2half2(__float2half(16.f), __float2half(1.f));
  const half2 sixteen = __float2half2_rn(16.f);
  const unsigned selq = 0x4040u | q | (q << 8);  // prmt: byte q of a word into both halves
  unsigned magic;
  asm volatile("mov.b32 %0, 0x64006400;\n" : "=r"(magic));
  const int fr = wg * 64 + wq * 16 + g;  // this lane's feature rows in the block: fr and fr + 8
  // the A fragments of slot `slot`'s 4 k16 steps: [k16 step][A register]
  auto decode = [&](int slot, unsigned (&a)[4][4]) {
    const unsigned char* st = smem + slot * STAGE;
    const unsigned* ws = reinterpret_cast<const unsigned*>(st + XB);
    const half2* ss = reinterpret_cast<const half2*>(st + XB + WB);
    const half2* msm = reinterpret_cast<const half2*>(st + XB + WB + SB);  // ZP only
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // rows fr (A registers 0, 2) and fr + 8 (1, 3)
      const int r = fr + h * 8;
      const half2 s2 = ss[r];
      half2 m2 = sixteen;
      if (ZP) m2 = msm[r];
#pragma unroll
      for (int kg = 0; kg < 2; ++kg) {
        const half s = kg ? __high2half(s2) : __low2half(s2);
        const half2 sc = __hmul2(__halves2half2(s, s), sixteen_one);
        half2 mn = sixteen;
        if (ZP) {
          const half mm = kg ? __high2half(m2) : __low2half(m2);
          mn = __hmul2(__halves2half2(mm, mm), sixteen);
        }
        const uint4 w4 = *reinterpret_cast<const uint4*>(ws + r * 8 + ((kg ^ ((r >> 2) & 1)) * 4));
        a[kg * 2][h] = eq4_dec<ZP>(eq4_nib2(w4.x, selq, magic), hoffs, sc, mn);
        a[kg * 2][h + 2] = eq4_dec<ZP>(eq4_nib2(w4.y, selq, magic), hoffs, sc, mn);
        a[kg * 2 + 1][h] = eq4_dec<ZP>(eq4_nib2(w4.z, selq, magic), hoffs, sc, mn);
        a[kg * 2 + 1][h + 2] = eq4_dec<ZP>(eq4_nib2(w4.w, selq, magic), hoffs, sc, mn);
      }
    }
  };

  float acc[BR / 2];
#pragma unroll
  for (int i = 0; i < BR / 2; ++i) acc[i] = 0.f;
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < KT) load(s, s);
    asm volatile("cp.async.commit_group;\n" ::);
  }
  unsigned a[4][4], an[4][4];
  asm volatile("cp.async.wait_group %0;\n" :: "n"(ST - 2) : "memory");
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // cp.async wrote what the tensor cores read
  __syncthreads();
  decode(0, a);
  // iteration kt: wgmma on slot kt (A decoded the iteration before) while stage kt + 1 is decoded; the wgmma group
  // is waited for at the end of the iteration, so no wgmma is in flight across the loop's back edge
  for (int kt = 0; kt < KT; ++kt) {
    const unsigned xs_addr = sbase + (kt % ST) * STAGE;
    eqw_fence();
#pragma unroll
    for (int s = 0; s < 4; ++s)  // k16 step s: 32 bytes further along the 128-byte rows
      EqwMma<BR>::run(acc, a[s][0], a[s][1], a[s][2], a[s][3], eqw_desc(xs_addr + s * 32));
    eqw_commit();
    asm volatile("cp.async.wait_group %0;\n" :: "n"(ST - 3) : "memory");  // stage kt + 1 is in
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();  // ... for everyone; every warpgroup's wgmma of stage kt - 1 has completed: its slot is free
    if (kt + ST - 1 < KT) load(kt + ST - 1, (kt + ST - 1) % ST);
    asm volatile("cp.async.commit_group;\n" ::);
    if (kt + 1 < KT) decode((kt + 1) % ST, an);
    eqw_wait<0>();
    // the tensor cores read A's registers asynchronously and ptxas does not know it: without this use after the
    // wait it hands them to the decode above while the wgmma is in flight (seen in SASS: PRMT into HGMMA's A)
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int e = 0; e < 4; ++e) asm volatile("" :: "r"(a[s][e]) : "memory");
#pragma unroll
    for (int s = 0; s < 4; ++s)
#pragma unroll
      for (int e = 0; e < 4; ++e) a[s][e] = an[s][e];
  }
  eqw_wait<0>();
#pragma unroll
  for (int i = 0; i < BR / 2; ++i) eqw_keep(acc[i]);
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  __syncthreads();  // every warp is done with the stages: the tile below reuses them
  constexpr int CP = BF + 8;  // row pitch in halves of the output tile [BR rows x BF features]
  half* cs = reinterpret_cast<half*>(smem);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int f = fr + h * 8, gc = col0 + f;
    const float b = (BIAS && gc < out_f) ? __half2float(bias[gc]) : 0.f;
#pragma unroll
    for (int i = 0; i < BR / 8; ++i)
#pragma unroll
      for (int e = 0; e < 2; ++e)  // D: register 4i + 2h + e is feature f, row 8i + 2q + e
        cs[(8 * i + 2 * q + e) * CP + f] = __float2half_rn(acc[4 * i + 2 * h + e] * 0.0625f + b);
  }
  __syncthreads();
  const bool vec = (out_f & 7) == 0;
#pragma unroll 4
  for (int c = tid; c < BR * (BF / 8); c += NT) {
    const int r = c / (BF / 8), ch = c % (BF / 8), gc = col0 + ch * 8;
    const long long gr = row0 + r;
    if (gr >= m) continue;
    const half* src = cs + r * CP + ch * 8;
    half* dst = out + gr * out_f + gc;
    if (vec && gc + 8 <= out_f) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int e = 0; e < 8; ++e)
        if (gc + e < out_f) dst[e] = src[e];
    }
  }
}
#endif
