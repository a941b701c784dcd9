#ifndef EDGELLM_Q4GEMM_TC2
#define EDGELLM_Q4GEMM_TC2
__device__ __forceinline__ void eq4_cp16(unsigned dst, const void* src, int n) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void eq4_cp4(unsigned dst, const void* src, int n) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" :: "r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void eq4_ldm4(unsigned* a, unsigned addr) {  // volatile: stays behind the barrier
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(addr));
}
__device__ __forceinline__ unsigned eq4_nib2(unsigned w, unsigned sel, unsigned magic) {
  // prmt: a byte into both halves; one lop3 (a & 0x00F0000F) | magic: (1024 + lo nibble, 1024 + 16 hi nibble)
  unsigned p = __byte_perm(w, 0u, sel), t;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(t) : "r"(p), "n"(0x00F0000F), "r"(magic));
  return t;
}
__device__ __forceinline__ void eq4_mma(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                        unsigned b0, unsigned b1) {
  // not volatile: the compiler may interleave independent mma (two dependent ones back to back stall)
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// the decode of a nibble pair (t = (1024 + lo, 1024 + 16 hi)) to 16x the weights: (t - offs) * sc with
// sc = (16 s, s); ZP (the Q4_1 grid): fma with mn16 = (16 m, 16 m), one rounding of 16 (q s + m)
template <bool ZP>
__device__ __forceinline__ unsigned eq4_dec(unsigned t, half2 offs, half2 sc, half2 mn16) {
  const half2 v = __hsub2(*reinterpret_cast<const half2*>(&t), offs);
  const half2 d = ZP ? __hfma2(v, sc, mn16) : __hmul2(v, sc);
  return *reinterpret_cast<const unsigned*>(&d);
}
// MODE 0: permuted k (16-byte x loads, no ldmatrix); 1: natural k, ldmatrix.x4 for x, a group's B decoded at once;
// 2: as 1, B decoded per k16 step (fewer live registers: fits 128 for two blocks per SM)
// OFF: the stored value of a zero weight ((q - OFF) * s: 7 for q4f16_1, 8 for the Q4_0 grid); ZP: q * s + m with
// the fp16 minimums qm beside the scales (the Q4_1 grid; OFF is then 0)
template <int WM, int WN, int MI, int NI, int ST, bool BIAS, int MODE, int OFF = 7, bool ZP = false>
__device__ __forceinline__ void edgellm_q4gemm(const half* __restrict__ x, const unsigned* __restrict__ qw,
    const half* __restrict__ qs, const half* __restrict__ qm, const half* __restrict__ bias, half* __restrict__ out,
    long long m, int in_f, int out_f, unsigned char* smem) {
  constexpr int NT = 32 * WM * WN, BM = WM * 16 * MI, BN = WN * 8 * NI, BK = 64;
  constexpr int XB = BM * BK * 2, WB = BN * BK / 2, SB = BN * 4, MB = ZP ? BN * 4 : 0, STAGE = XB + WB + SB + MB;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, q = lane & 3;
  const int wm = warp / WN, wn = warp % WN;
  const long long row0 = (long long)blockIdx.x * BM;
  const int col0 = blockIdx.y * BN, KT = in_f / BK, W = in_f / 8, G = in_f / 32;
  const unsigned sbase = (unsigned)__cvta_generic_to_shared(smem);

  auto load = [&](int kt, int s) {
    const unsigned xs = sbase + s * STAGE, ws = xs + XB, ss = ws + WB, ms = ss + SB;
#pragma unroll
    for (int i = 0; i < BM * 8 / NT; ++i) {  // x: 8 chunks of 16 bytes per row, chunk c of row r at c ^ swz(r)
      const int c = tid + i * NT, r = c >> 3, ch = c & 7;
      const long long gr = row0 + r;
      const half* src = gr < m ? x + gr * in_f + kt * BK + ch * 8 : x;
      eq4_cp16(xs + (r * 8 + (ch ^ (MODE ? (r & 7) : ((r & 1) << 2)))) * 16, src, gr < m ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < (BN * 2 + NT - 1) / NT; ++i) {  // weights: a 16-byte chunk per row and group
      const int c = tid + i * NT;
      if (c < BN * 2) {
        const int r = c >> 1, kg = c & 1, gn = col0 + r;
        const unsigned* src = gn < out_f ? qw + (long long)gn * W + kt * 8 + kg * 4 : qw;
        eq4_cp16(ws + (r * 2 + (kg ^ ((r >> 2) & 1))) * 16, src, gn < out_f ? 16 : 0);
      }
    }
#pragma unroll
    for (int i = 0; i < (BN + NT - 1) / NT; ++i) {  // scales: the two groups' fp16 of a row (G even: 4-byte aligned)
      const int r = tid + i * NT, gn = col0 + r;
      if (r < BN) eq4_cp4(ss + r * 4, gn < out_f ? qs + (long long)gn * G + kt * 2 : qs, gn < out_f ? 4 : 0);
      if (ZP && r < BN) eq4_cp4(ms + r * 4, gn < out_f ? qm + (long long)gn * G + kt * 2 : qm, gn < out_f ? 4 : 0);
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
#pragma unroll
  for (int s = 0; s < ST - 1; ++s) {
    if (s < KT) load(s, s);
    asm volatile("cp.async.commit_group;\n" ::);
  }
  const unsigned offs = (0x6400u + OFF) | ((0x6400u + 16 * OFF) << 16);  // fp16x2 (1024 + OFF, 1024 + 16 OFF)
  const half2 hoffs = *reinterpret_cast<const half2*>(&offs);
  const half2 sixteen_one = __halves2half2(__float2half(16.f), __float2half(1.f));
  const half2 sixteen = __float2half2_rn(16.f);
  const unsigned selq = 0x4040u | q | (q << 8);  // prmt: byte q of a word into both halves
  unsigned magic;  // 0x64006400 in a register (lop3 takes one immediate)
  asm volatile("mov.b32 %0, 0x64006400;\n" : "=r"(magic));
  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_ch = lane >> 4;  // ldmatrix.x4 row address of this lane
  for (int kt = 0; kt < KT; ++kt) {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(ST - 2) : "memory");
    __syncthreads();  // stage kt is in; every warp is done with stage kt - 1, whose slot is refilled next
    if (kt + ST - 1 < KT) load(kt + ST - 1, (kt + ST - 1) % ST);
    asm volatile("cp.async.commit_group;\n" ::);
    const unsigned char* st = smem + (kt % ST) * STAGE;
    const half* xs = reinterpret_cast<const half*>(st);
    const unsigned* ws = reinterpret_cast<const unsigned*>(st + XB);
    const half2* ss = reinterpret_cast<const half2*>(st + XB + WB);
    const half2* msm = reinterpret_cast<const half2*>(st + XB + WB + SB);  // ZP only
    const unsigned xs_addr = sbase + (kt % ST) * STAGE;
    if (MODE == 2) {
#pragma unroll
      for (int kg = 0; kg < 2; ++kg) {
        half2 sc[NI], mn[NI];
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          const half2 s2 = ss[wn * 8 * NI + ni * 8 + g];
          const half s = kg ? __high2half(s2) : __low2half(s2);
          sc[ni] = __hmul2(__halves2half2(s, s), sixteen_one);
          if (ZP) {
            const half2 m2 = msm[wn * 8 * NI + ni * 8 + g];
            const half mm = kg ? __high2half(m2) : __low2half(m2);
            mn[ni] = __hmul2(__halves2half2(mm, mm), sixteen);
          } else {
            mn[ni] = sixteen;
          }
        }
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
          unsigned a[MI][4];
#pragma unroll
          for (int mi = 0; mi < MI; ++mi) {
            const int r = wm * 16 * MI + mi * 16 + a_row, ch = kg * 4 + kk * 2 + a_ch;
            eq4_ldm4(a[mi], xs_addr + (r * 8 + (ch ^ (r & 7))) * 16);
          }
#pragma unroll
          for (int ni = 0; ni < NI; ++ni) {
            const int r = wn * 8 * NI + ni * 8 + g;
            const uint2 w2 = *reinterpret_cast<const uint2*>(ws + r * 8 + ((kg ^ ((r >> 2) & 1)) * 4) + 2 * kk);
            const unsigned t0 = eq4_nib2(w2.x, selq, magic), t1 = eq4_nib2(w2.y, selq, magic);
            const unsigned b0 = eq4_dec<ZP>(t0, hoffs, sc[ni], mn[ni]), b1 = eq4_dec<ZP>(t1, hoffs, sc[ni], mn[ni]);
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
              eq4_mma(acc[mi][ni], a[mi][0], a[mi][1], a[mi][2], a[mi][3], b0, b1);
          }
        }
      }
    } else if (MODE == 1) {  // natural k order: A by ldmatrix.x4 (the mma's register quad as is), B from a whole group's words
#pragma unroll
      for (int kg = 0; kg < 2; ++kg) {
        unsigned b[NI][4];
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          const int r = wn * 8 * NI + ni * 8 + g;
          // the row's 4 words of group kg; lane q needs byte q (k = 8j + 2q, +1) of word j for B register j
          const uint4 w4 = *reinterpret_cast<const uint4*>(ws + r * 8 + ((kg ^ ((r >> 2) & 1)) * 4));
          const half2 s2 = ss[r];
          const half s = kg ? __high2half(s2) : __low2half(s2);
          const half2 sc = __hmul2(__halves2half2(s, s), sixteen_one);
          half2 mn = sixteen;
          if (ZP) {
            const half2 m2 = msm[r];
            const half mm = kg ? __high2half(m2) : __low2half(m2);
            mn = __hmul2(__halves2half2(mm, mm), sixteen);
          }
          const unsigned wj[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) b[ni][j] = eq4_dec<ZP>(eq4_nib2(wj[j], selq, magic), hoffs, sc, mn);
        }
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
          unsigned a[MI][4];
#pragma unroll
          for (int mi = 0; mi < MI; ++mi) {
            const int r = wm * 16 * MI + mi * 16 + a_row, ch = kg * 4 + kk * 2 + a_ch;
            eq4_ldm4(a[mi], xs_addr + (r * 8 + (ch ^ (r & 7))) * 16);
          }
#pragma unroll
          for (int mi = 0; mi < MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < NI; ++ni)
              eq4_mma(acc[mi][ni], a[mi][0], a[mi][1], a[mi][2], a[mi][3], b[ni][2 * kk], b[ni][2 * kk + 1]);
        }
      }
    } else {
#pragma unroll
    for (int kg = 0; kg < 2; ++kg) {
      unsigned b[NI][4];
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int r = wn * 8 * NI + ni * 8 + g;
        const unsigned w = ws[r * 8 + ((kg ^ ((r >> 2) & 1)) * 4) + q];
        const half2 s2 = ss[r];
        const half s = kg ? __high2half(s2) : __low2half(s2);
        const half2 sc = __hmul2(__halves2half2(s, s), sixteen_one);
        half2 mn = sixteen;
        if (ZP) {
          const half2 m2 = msm[r];
          const half mm = kg ? __high2half(m2) : __low2half(m2);
          mn = __hmul2(__halves2half2(mm, mm), sixteen);
        }
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const unsigned t = (__byte_perm(w, 0u, 0x4040u | v | (v << 8)) & 0x00F0000Fu) | 0x64006400u;
          b[ni][v] = eq4_dec<ZP>(t, hoffs, sc, mn);
        }
      }
      uint4 a0[MI], a1[MI];  // rows g and g + 8 of each 16-row tile: x values 8q .. 8q+7 of this group
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) {
        const int r = wm * 16 * MI + mi * 16 + g;
        const int pos = ((kg * 4 + q) ^ ((r & 1) << 2)) * 8;
        a0[mi] = *reinterpret_cast<const uint4*>(xs + r * BK + pos);
        a1[mi] = *reinterpret_cast<const uint4*>(xs + (r + 8) * BK + pos);
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
          eq4_mma(acc[mi][ni], a0[mi].x, a1[mi].x, a0[mi].y, a1[mi].y, b[ni][0], b[ni][1]);  // k16 step 0
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni)
          eq4_mma(acc[mi][ni], a0[mi].z, a1[mi].z, a0[mi].w, a1[mi].w, b[ni][2], b[ni][3]);  // k16 step 1
    }
    }
  }
  asm volatile("cp.async.wait_group 0;\n" ::);
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni) {
      const int c = col0 + wn * 8 * NI + ni * 8 + q * 2;
      float b0 = 0.f, b1 = 0.f;
      if (BIAS) {
        if (c < out_f) b0 = __half2float(bias[c]);
        if (c + 1 < out_f) b1 = __half2float(bias[c + 1]);
      }
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const long long r = row0 + wm * 16 * MI + mi * 16 + g + hr * 8;
        if (r < m) {
          const float v0 = acc[mi][ni][hr * 2] * 0.0625f + b0, v1 = acc[mi][ni][hr * 2 + 1] * 0.0625f + b1;
          half* o = out + r * out_f + c;
          if (c + 1 < out_f && (out_f & 1) == 0) {
            *reinterpret_cast<half2*>(o) = __floats2half2_rn(v0, v1);
          } else {
            if (c < out_f) o[0] = __float2half_rn(v0);
            if (c + 1 < out_f) o[1] = __float2half_rn(v1);
          }
        }
      }
    }
}
#endif
