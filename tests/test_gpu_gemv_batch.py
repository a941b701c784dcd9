"""The batched INT4 decode GEMV behind the symbolic-rows CUDA linear (kernels/cuda_gemv_batch.py) without a GPU.

* a numpy model of the kernel's arithmetic (kernels/cuda/int4_gemv_batch.cu: per row, feature and group two fp16
  accumulators fed by fp16 FMAs of the centred weights / 32 in the kernel's order, fp32 per group with scale * 32;
  the Q4_1 grid's sum of x / 32 in two fp16 chains over the permuted pairs) stays within fp16 tolerance of float64
  on the dequantized weights, for each 4-bit row, with and without outlier activations;
* the registry gives the symbolic-rows linear the dispatching PrimFunc by default (--opt cuda_gemm_small=gemv), the
  plain GEMM with cuda_gemm_small=gemm; the decode GEMV (rows=1) and other targets are unchanged;
* the function builds for sm_80 / sm_90: one kernel per row bucket plus the GEMM's two, each bucket's template
  instantiated, and the host code branching on m (every kernel launched from the host module);
* a tiny model compiles for CUDA with the option on (sm_90) and off (sm_80); the manifest records both.
The kernel checked and timed on the H200: bench/gpu_gemv_batch.py.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_gpu_kernels import _pick, needs_nvcc  # pytest puts tests/ on sys.path

from edgellm.quant import reference as ref
from edgellm.quant.schemes import get_scheme


def _fma16(a, b, c):
    return (a.astype(np.float64) * b + c.astype(np.float64)).astype(np.float16)


def batch_model(x: np.ndarray, qw: np.ndarray, qs: np.ndarray, scheme, qm=None) -> np.ndarray:
    """x [m, in] fp16 -> [m, out] as int4_gemv_batch.cu computes it (before the final fp16 rounding)."""
    m, in_f = x.shape
    out_f, groups = qw.shape[0], in_f // 32
    off = 8 if scheme.zero_point else scheme.offset
    xg = x.astype(np.float16).reshape(m, groups, 32)
    w = qw.reshape(out_f, groups, 4)
    h = np.zeros((2, m, out_f, groups), np.float16)  # the (even, odd word) accumulators, both halves alike
    for q in range(4):
        for s in range(4):  # pair s of word q: elements 8q + s (low half) and 8q + s + 4 (high half)
            for e in (s, s + 4):
                nib = (w[:, :, q] >> np.uint32(4 * e)) & np.uint32(15)
                d = (nib.astype(np.float64) - off) / 32  # exact in fp16: (0x5000 | nib) - (32 + off / 32)
                h[q % 2] = _fma16(d[None], xg[:, None, :, 8 * q + e], h[q % 2])
    dot = h.astype(np.float32).sum(0)  # the four halves in fp32
    out = dot.astype(np.float64) * (qs.astype(np.float32) * np.float32(32))[None]
    if scheme.zero_point:  # sum of x / 32: chain q % 2 over the pairs of word q, in (q, s) order, each half alike
        xs = np.zeros((2, m, groups, 2), np.float16)
        for q in range(4):
            for s in range(4):
                for lane, e in enumerate((s, s + 4)):
                    xs[q % 2, :, :, lane] = _fma16(xg[:, :, 8 * q + e], 1 / 32, xs[q % 2, :, :, lane])
        xsum = xs.astype(np.float32).sum((0, 3))  # [m, groups]
        mz = (qm.astype(np.float32) + qs.astype(np.float32) * np.float32(off)) * np.float32(32)
        out = out + xsum.astype(np.float64)[:, None, :] * mz[None]
    return out.astype(np.float32).astype(np.float64).sum(2)  # fp32 per group, summed over groups


@pytest.mark.parametrize("row", ["q4f16_1", "q4f16_0", "q4f16_2"])
@pytest.mark.parametrize("outliers", [False, True])
def test_batch_arithmetic_within_fp16_tolerance(row, outliers):
    scheme = get_scheme(row)
    rng = np.random.default_rng(7)
    in_f, out_f, m = 1088, 40, 5  # `in`: one whole 1024-wide chunk and a partial one
    w = rng.standard_normal((out_f, in_f)).astype(np.float32) * 0.05 + (0.02 if scheme.zero_point else 0)
    parts = ref.quantize(w, scheme)
    x = rng.standard_normal((m, in_f)).astype(np.float16)
    if outliers:  # a few channels at +-2000, as real down-projection inputs have
        x[:, rng.choice(in_f, 8, replace=False)] = rng.choice([-2000.0, 2000.0], (m, 8))
    qm = parts[2] if scheme.zero_point else None
    expect = x.astype(np.float64) @ ref.dequantize(parts[0], parts[1], in_f, scheme, qm).astype(np.float64).T
    got = batch_model(x, parts[0], parts[1], scheme, qm)
    assert np.isfinite(got).all()
    for r in range(m):  # each row on its own: a row's error must not hide behind another's norm
        assert np.linalg.norm(got[r] - expect[r]) / np.linalg.norm(expect[r]) < 1e-3, r


def test_model_sees_a_wrong_order():
    """The model is sensitive to what it models: pairing the wrong elements (x[8q+s] with nibble s+1) is far off."""
    scheme = get_scheme("q4f16_1")
    rng = np.random.default_rng(1)
    parts = ref.quantize(rng.standard_normal((8, 64)).astype(np.float32), scheme)
    x = rng.standard_normal((2, 64)).astype(np.float16)
    expect = x.astype(np.float64) @ ref.dequantize(parts[0], parts[1], 64, scheme).astype(np.float64).T
    shuffled = np.roll(x.reshape(2, 2, 32), 1, axis=2).reshape(2, 64)
    got = batch_model(shuffled, parts[0], parts[1], scheme)
    assert np.linalg.norm(got - expect) / np.linalg.norm(expect) > 0.1


def test_registry_dispatches_few_rows_to_the_batched_gemv():
    from edgellm.kernels import KernelOptions
    from edgellm.targets import resolve

    cuda = resolve("cuda-sm90").tvm()
    for row, grid, label in (("q4f16_1", "", ""), ("q4f16_0", "_o8", "_o8"), ("q4f16_2", "_min", "_z")):
        name, f = _pick(cuda, None, 4096, 6144, row)
        assert name == f"int4_gemm_wgmma{grid}+gemv_batch16"  # sm_90: the wgmma GEMM above 16 rows
        assert str(f.attrs["edgellm.gemm"]).endswith(f"+gemv_batch_r16{label}_mma_k2")  # mma_ksplit(6144)
        assert _pick(cuda, None, 4096, 6144, row, cuda_gemm_small="gemv-simt")[0] == (
            f"int4_gemm_wgmma{grid}+gemv_batch16_simt")
        name, f = _pick(cuda, None, 4096, 6144, row, cuda_gemm_small="gemm")
        assert name == f"int4_gemm_wgmma{grid}" and "gemv_batch" not in str(f.attrs["edgellm.gemm"])
        assert "gemv_batch" not in _pick(cuda, 1, 4096, 6144, row)[0]  # the decode GEMV: its own kernel
    assert _pick(cuda, None, 96, 64, "q4f16_1")[0] == "int4_gemm_mma_half2"  # `in` % 64: no tc2, no dispatch
    assert "gemv_batch" not in _pick(resolve("vulkan").tvm(), None, 4096, 6144, "q4f16_1")[0]
    assert KernelOptions.parse(["cuda_gemm_small=gemm"]).cuda_gemm_small == "gemm"
    with pytest.raises(ValueError, match="cuda_gemm_small"):
        KernelOptions.parse(["cuda_gemm_small=gemmv"])


def test_arguments_are_checked():
    from edgellm.kernels import cuda_gemv_batch as gb

    with pytest.raises(ValueError, match="multiple of 32"):
        gb.int4_linear_small_rows(100, 64, False)
    with pytest.raises(ValueError, match="rows_max"):
        gb.int4_linear_small_rows(128, 64, False, rows_max=12)
    with pytest.raises(ValueError, match="multiple of 64"):
        gb.int4_linear_small_rows(96, 64, False, ("128x128", None))


@needs_nvcc
@pytest.mark.parametrize("preset", ["cuda-sm80", "cuda-sm90"])
def test_dispatch_builds(preset):
    import tvm

    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.kernels import cuda_gemm
    from edgellm.kernels import cuda_gemv_batch as gb
    from edgellm.targets import resolve

    funcs = {"d": gb.int4_linear_small_rows(4096, 1024, False, cuda_gemm.tc2_choice(4096, 1024)),
             "dz": gb.int4_linear_small_rows(576, 960, True, cuda_gemm.tc2_choice(576, 960), zero_point=True),
             "r8": gb.int4_linear_small_rows(160, 77, True, None, rows_max=8, offset=8),
             "simt": gb.int4_linear_small_rows(160, 77, True, None, rows_max=8, offset=8, mma=False)}
    target = resolve(preset).tvm()
    prepare_cuda_build()
    with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        lib = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}), target=target)
    src = lib.mod.imports[0].inspect_source()
    kernels = {n: sorted(set(re.findall(rf"__global__ void __launch_bounds__\([^)]*\) ({n}_kernel(?:_\d+)?)\(", src)))
               for n in funcs}
    assert [len(kernels[n]) for n in funcs] == [6, 6, 3, 3]  # 4 buckets + the GEMM's two tiles; rows_max 8: 3
    for r in (2, 4):  # fp16x2 SIMT
        assert f"edgellm_q4gemv_batch<{r}, 4, 4, 7, false, false>" in src
        assert f"edgellm_q4gemv_batch<{r}, 4, 4, 8, true, true>" in src  # the Q4_1 grid centred at 8, bias
    for r in (8, 16):  # tensor cores, `in` split over mma_ksplit(out) warps
        assert f"edgellm_q4gemv_batch_mma<{r}, 4, {gb.mma_ksplit(1024)}, 7, false, false>" in src
        assert f"edgellm_q4gemv_batch_mma<{r}, 4, {gb.mma_ksplit(960)}, 8, true, true>" in src
    assert "edgellm_q4gemv_batch_mma<8, 4, 4, 8, false, true>" in src  # rows_max 8 (offset 8, bias)
    assert "edgellm_q4gemv_batch_mma<16, 4, 4, 8, false, true>" not in src
    assert "edgellm_q4gemv_batch<8, " not in src.replace("edgellm_q4gemv_batch<8, 4, 4, 8, false, true>", "")
    assert "edgellm_q4gemm<" in src
    host = lib.mod.inspect_source("ll")  # the host code: it launches every kernel by name, picked by m
    assert all(f'"{k}"' in host or f"{k}\\00" in host for ks in kernels.values() for k in ks)


@needs_nvcc
def test_tiny_model_compiles_with_the_option_on_and_off(cuda_tiny_build, checkpoints, tmp_path):
    """The option's default (gemv) is the session's shared cuda-sm90 build of the tiny Llama (tests/conftest.py);
    the option off is compiled here for sm_80."""
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.kernels import KernelOptions

    assert KernelOptions().cuda_gemm_small == "gemv"
    out = tmp_path / "gemm"
    compile_model(CompileArgs(model=str(checkpoints["llama"]), output=out, target="cuda-sm80", quant="q4f16_1",
                              runtime=RuntimeOptions(context_window=128, prefill_chunk=64),
                              kernel_options=KernelOptions(cuda_gemm_small="gemm")))
    chosen = {}
    for value, art in (("gemv", cuda_tiny_build()["out"]), ("gemm", out)):  # (both archs with the option on: above)
        m = json.loads((art / "manifest.json").read_text())
        assert m["kernels"]["options"]["cuda_gemm_small"] == value
        chosen[value] = set(m["kernels"]["chosen"]["linear"])
    # hidden 64 -> q/k/v/o and gate/up take the dispatch; down (in 160, not a multiple of 64) keeps its GEMM
    assert "int4_gemm_wgmma+gemv_batch16" in chosen["gemv"]  # sm_90
    assert not any("gemv_batch" in n for n in chosen["gemm"]) and "int4_gemm_mma_pipelined" in chosen["gemm"]


_EMU_MAIN = r"""
#include "cuda_host_emu.h"
#include "kernel_emu.h"
#include <cstdio>
#include <cstdlib>
template <int R, int OFF, bool ZP, bool BIAS, int MMA>  // MMA: 0 the SIMT kernel, else KS of the tensor-core one
void launch(const half* x, const unsigned* qw, const half* qs, const half* qm, const half* b, half* o, long long m,
            int in_f, int out_f) {
  constexpr int NW = 4, FB = MMA ? 16 / MMA : 4, NT = NW * 32;
  std::vector<unsigned char> smem(R * 4 * 32 * 16);
  for (int bx = 0; bx < (out_f + NW * FB - 1) / (NW * FB); ++bx)
    emu_run_block(bx, 0, NT, [&](int) {
      if constexpr (MMA > 0) edgellm_q4gemv_batch_mma<R, NW, (MMA > 0 ? MMA : 1), OFF, ZP, BIAS>(x, qw, qs, qm, b, o, m, in_f, out_f, smem.data());
      else edgellm_q4gemv_batch<R, FB, NW, OFF, ZP, BIAS>(x, qw, qs, qm, b, o, m, in_f, out_f, smem.data()); });
}
int main(int argc, char** argv) {  // R OFF ZP BIAS m in out in.bin out.bin MMA
  int R = atoi(argv[1]), OFF = atoi(argv[2]), ZP = atoi(argv[3]), BIAS = atoi(argv[4]), MMA = atoi(argv[10]);
  long long m = atoll(argv[5]);
  int in_f = atoi(argv[6]), out_f = atoi(argv[7]);
  FILE* f = fopen(argv[8], "rb");
  std::vector<half> x(m * in_f), qs((size_t)out_f * in_f / 32), qm(qs.size()), b(out_f), o(m * out_f, half{0x7E00});
  std::vector<unsigned> qw((size_t)out_f * in_f / 8);
  size_t got = fread(x.data(), 2, x.size(), f) + fread(qw.data(), 4, qw.size(), f) + fread(qs.data(), 2, qs.size(), f)
      + fread(qm.data(), 2, qm.size(), f) + fread(b.data(), 2, b.size(), f);
  fclose(f);
  if (got != x.size() + qw.size() + 2 * qs.size() + b.size()) return 2;
#define L(r, off, zp, bi, mma) if (R == r && OFF == off && ZP == zp && BIAS == bi && MMA == mma) { \
    launch<r, off, zp, bi, mma>(x.data(), qw.data(), qs.data(), qm.data(), b.data(), o.data(), m, in_f, out_f); }
  L(2, 7, 0, 0, 0) L(4, 7, 0, 1, 0) L(8, 8, 0, 1, 0) L(16, 7, 0, 0, 0) L(8, 8, 1, 1, 0) L(16, 8, 1, 0, 0)
  L(8, 7, 0, 1, 1) L(16, 7, 0, 0, 2) L(8, 8, 0, 1, 4) L(8, 8, 1, 1, 2) L(16, 8, 1, 0, 1) L(16, 7, 0, 0, 4)
  f = fopen(argv[9], "wb");
  fwrite(o.data(), 2, o.size(), f);
  fclose(f);
}
"""


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="the host emulation needs g++")
def test_kernel_source_on_the_host(tmp_path, host_emu):
    """The CUDA source itself (its two PTX helpers replaced by fp16 emulations), run on the host through
    tests/cuda_host_emu.h: every grid, bucket sizes with fewer rows than the bucket, a partial 1024-wide chunk of
    `in`, an `out` no block tiles evenly, bias; the NaN-poisoned output all written, each row within fp16 tolerance
    of float64 and close to the numpy model above."""
    import subprocess
    from pathlib import Path

    src = (Path(__file__).parents[1] / "edgellm" / "kernels" / "cuda" / "int4_gemv_batch.cu").read_text()
    src = src.replace("#include <cuda_fp16.h>", "")
    src = re.sub(r"(unsigned eqb_hsub2\(unsigned a, unsigned b\) \{).*?\n\}", r"\1 return emu_h2(a, b, 0, 0); }", src,
                 flags=re.S)
    src = re.sub(r"(unsigned eqb_hfma2\(unsigned a, unsigned b, unsigned c\) \{).*?\n\}",
                 r"\1 return emu_h2(a, b, c, 1); }", src, flags=re.S)
    src = re.sub(r"(unsigned eqb_hmul2\(unsigned a, unsigned b\) \{).*?\n\}", r"\1 return emu_h2(a, b, 0, 2); }", src,
                 flags=re.S)
    src = re.sub(r"(void eqb_mma\([^)]*\) \{).*?\n\}", r"\1 emu_mma(d, a0, a1, a2, a3, b0, b1); }", src, flags=re.S)
    host_emu({"kernel_emu.h": src}, _EMU_MAIN)
    rng = np.random.default_rng(3)
    cases = [(2, "q4f16_1", False, 1, 1088, 77), (4, "q4f16_1", True, 3, 1088, 77), (8, "q4f16_0", True, 5, 1088, 33),
             (16, "q4f16_1", False, 16, 1088, 20), (16, "q4f16_1", False, 9, 64, 17), (8, "q4f16_2", True, 8, 1088, 77),
             (16, "q4f16_2", False, 13, 2048, 18)]
    # the tensor-core kernel (buckets 8 and 16; last field: its K split over 1, 2 or 4 warps): 16 features a warp,
    # so `out` 77 leaves a partial warp and block
    cases = [(*c, 0) for c in cases] + [(8, "q4f16_1", True, 5, 1088, 77, 1), (16, "q4f16_1", False, 16, 1088, 40, 2),
                                        (16, "q4f16_1", False, 11, 64, 17, 4), (8, "q4f16_0", True, 8, 1088, 33, 4),
                                        (8, "q4f16_2", True, 8, 1088, 77, 2), (16, "q4f16_2", False, 13, 2048, 18, 1),
                                        (16, "q4f16_1", False, 16, 3072, 77, 4)]
    for bucket, row, bias, m, k, n, mma in cases:
        s = get_scheme(row)
        parts = ref.quantize(rng.standard_normal((n, k)).astype(np.float32) * 0.05 + (0.02 if s.zero_point else 0), s)
        qm = parts[2] if s.zero_point else None
        x = rng.standard_normal((m, k)).astype(np.float16)
        x[m - 1, rng.choice(k, 4, replace=False)] = 2000
        b = (rng.standard_normal(n) * 0.5).astype(np.float16)
        (tmp_path / "in.bin").write_bytes(x.tobytes() + parts[0].astype(np.uint32).tobytes()
                                          + parts[1].astype(np.float16).tobytes()
                                          + (np.zeros_like(parts[1]) if qm is None else qm).astype(np.float16).tobytes()
                                          + b.tobytes())
        off = 8 if s.zero_point else s.offset
        subprocess.run(["./emu", str(bucket), str(off), str(int(s.zero_point)), str(int(bias)), str(m), str(k), str(n),
                        "in.bin", "out.bin", str(int(mma))], cwd=tmp_path, check=True)
        got = np.frombuffer((tmp_path / "out.bin").read_bytes(), np.float16).reshape(m, n).astype(np.float64)
        add = b.astype(np.float64) if bias else 0
        expect = x.astype(np.float64) @ ref.dequantize(parts[0], parts[1], k, s, qm).astype(np.float64).T + add
        model = batch_model(x, parts[0], parts[1], s, qm) + add
        assert np.isfinite(got).all(), (bucket, row, m)
        err = np.linalg.norm(got - expect, axis=1) / np.linalg.norm(expect, axis=1)
        assert err.max() < 1e-3, (bucket, row, m, err)
        if not mma:  # the model is the SIMT kernel's arithmetic; the tensor-core one rounds the scaled weight instead
            assert np.abs(got - model).max() / np.abs(model).max() < 2e-3, (bucket, row, m)  # ~1 fp16 ulp
