"""The CUDA decode GEMV with int8 activations (`--opt cuda_gemv=dp4a`, kernels/cuda_gemv_dp4a.py) without a GPU.

* the CUDA source itself, run on the host through tests/cuda_host_emu.h, against a numpy model of its arithmetic (a
  scale d per 8 activations, q = rint(x * 127 / max|x|), exact integer sums minus offset * sum(q), one float product
  per d and scale: test_webgpu_dp4a's model with the grid's offset, the reciprocal rounded before its product), and within the bound the activations' rounding
  allows of the float GEMV: steps with a guarded tail, K split over warps, the silu epilogue, the Q4_0 grid, an
  `out` no block tiles evenly, outlier activations;
* the registry takes it only with the option, for the plain GEMV and gate_up + silu; the norm-fused GEMVs, the 8-bit
  head, the Q4_1 grid and bias keep their kernels;
* it builds for sm_90 with PDL (its own wait) and for sm_80 without.
On the H200: bench/gpu_pdl.py's owned-dp4a variant (tok/s, and against the fp16x2 build within the tolerance).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_gpu_kernels import _pick, needs_nvcc  # pytest puts tests/ on sys.path

from edgellm.quant import reference as ref
from edgellm.quant.schemes import get_scheme


def dp4a_model(x: np.ndarray, qw: np.ndarray, qs: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy model of int4_gemv_dp4a.cu: per packed word of 8 activations d = max|x| / 127 and q = rint(x * (127 * (1 /
    max|x|))) in float32; per row and word the exact integer sum(nib * q) - offset * sum(q) times d, times the group's
    scale; the float sums in float64 (the kernel's float32 order differs: the comparison allows the fp16 output's
    rounding). Returns (out [out_f] float64, d [in / 8])."""
    out_f, words = qw.shape
    hv = x.astype(np.float32).reshape(words, 8)
    am = np.abs(hv).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(am > 0, np.float32(127) * (np.float32(1) / am), np.float32(0)).astype(np.float32)
    q = np.rint(hv * inv[:, None]).astype(np.int64)
    d = (am * np.float32(1 / 127)).astype(np.float32)
    nib = ((qw[:, :, None] >> (np.arange(8, dtype=np.uint32) * 4)) & 15).astype(np.int64)
    isum = (nib * q[None]).sum(-1) - offset * q.sum(-1)[None]
    scale = np.repeat(qs.astype(np.float64), 4, axis=1)  # each word's group scale
    return (isum * d[None].astype(np.float64) * scale).sum(-1), d


def _silu(g, u):
    g16, u16 = np.float16(g).astype(np.float64), np.float16(u).astype(np.float64)
    return g16 / (1 + np.exp(-g16)) * u16


_EMU_MAIN = r"""
#include "cuda_host_emu.h"
#include "kernel_emu.h"
#include <cstdio>
#include <cstdlib>
template <int W, int R, int U, int KS, int G, int NOUT, int OFF, bool SILU>
void launch(const half* x, const unsigned* qw, const half* qs, half* o) {
  constexpr int TEAMS = W / KS, H = SILU ? R / 2 : R;
  std::vector<unsigned char> smem(G * 4 * 16 + W * R * 4 + 16);
  for (int bx = 0; bx < (NOUT + TEAMS * H - 1) / (TEAMS * H); ++bx)
    emu_run_block(bx, 0, W * 32, [&](int) {
      edgellm_q4gemv_dp4a<W, R, U, KS, G, NOUT, OFF, SILU, false, true>(x, qw, qs, o, smem.data()); });
}
int main(int argc, char** argv) {  // case in.bin out.bin G rows nout
  int c = atoi(argv[1]), G = atoi(argv[4]), ROWS = atoi(argv[5]), NOUT = atoi(argv[6]);
  FILE* f = fopen(argv[2], "rb");
  std::vector<half> x(G * 32), qs((size_t)ROWS * G), o(NOUT, half{0x7E00});
  std::vector<unsigned> qw((size_t)ROWS * G * 4);
  size_t got = fread(x.data(), 2, x.size(), f) + fread(qw.data(), 4, qw.size(), f) + fread(qs.data(), 2, qs.size(), f);
  fclose(f);
  if (got != x.size() + qw.size() + qs.size()) return 2;
  CASES
  f = fopen(argv[3], "wb");
  fwrite(o.data(), 2, o.size(), f);
  fclose(f);
}
"""

# (warps, rows, unroll, ksplit, G, outputs, row, silu): steps a lane = ceil(G / (32 ksplit unroll))
CASES = [
    (4, 2, 1, 1, 70, 19, "q4f16_1", False),  # 3 steps, the last 6 groups guarded; 19 rows: a partial block
    (4, 2, 4, 1, 64, 22, "q4f16_1", True),  # gate_up's pick: one step a lane (half the lanes idle), silu
    (8, 2, 2, 2, 300, 9, "q4f16_0", False),  # K split over 2 warps, the Q4_0 grid (offset 8)
    (4, 4, 2, 2, 130, 10, "q4f16_1", True),  # K split with silu: 2 outputs a team
    (16, 2, 2, 2, 448, 33, "q4f16_1", False),  # Llama-3-8B's down pick and `in`
]


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="the host emulation needs g++")
def test_kernel_source_on_the_host(tmp_path, host_emu):
    src = (Path(__file__).parents[1] / "edgellm" / "kernels" / "cuda" / "int4_gemv_dp4a.cu").read_text()
    src = src.replace("#include <cuda_fp16.h>", "")
    for head, body in {r"unsigned eqd_zero_after\(unsigned v, unsigned s\) \{": "return 0u * v * s;",
                       r"void eqd_prefetch_l2\(const void\* p, unsigned n\) \{": ""}.items():
        src, n = re.subn(rf"({head}).*?\n\}}\n", rf"\1 {body} }}\n", src, count=1, flags=re.S)
        assert n == 1, head
    cases = "\n  ".join(f"if (c == {i}) launch<{w}, {r}, {u}, {k}, {g}, {n}, {get_scheme(row).offset}, "
                        f"{str(silu).lower()}>(x.data(), qw.data(), qs.data(), o.data());"
                        for i, (w, r, u, k, g, n, row, silu) in enumerate(CASES))
    host_emu({"kernel_emu.h": src}, _EMU_MAIN.replace("CASES", cases))
    rng = np.random.default_rng(13)
    for i, (w, r, u, k, g, n, row, silu) in enumerate(CASES):
        s = get_scheme(row)
        rows = 2 * n if silu else n
        in_f = g * 32
        qw, qs = ref.quantize(rng.standard_normal((rows, in_f)).astype(np.float32) * 0.05, s)[:2]
        qw, qs = qw.astype(np.uint32), qs.astype(np.float16)
        x = rng.standard_normal(in_f).astype(np.float16)
        if not silu:  # outliers, as down's input has (gate_up's is normed)
            x[rng.choice(in_f, 6, replace=False)] = rng.choice([-2000.0, 2000.0], 6)
        x[:8] = 0  # an all-zero word: d = 0
        (tmp_path / "in.bin").write_bytes(x.tobytes() + qw.tobytes() + qs.tobytes())
        subprocess.run(["./emu", str(i), "in.bin", "out.bin", str(g), str(rows), str(n)], cwd=tmp_path, check=True)
        got = np.frombuffer((tmp_path / "out.bin").read_bytes(), np.float16).astype(np.float64)
        assert np.isfinite(got).all(), i  # every output written (it starts as NaN)
        model, d = dp4a_model(x, qw, qs, s.offset)
        deq = ref.dequantize(qw, qs, in_f, s).astype(np.float64)
        exact = deq @ x.astype(np.float64)
        bound = (np.abs(deq).reshape(rows, -1, 8) * (d.astype(np.float64)[None, :, None] / 2)).sum((1, 2))
        if silu:
            want = _silu(model[:n], model[n:])
            assert np.allclose(got, want, rtol=4e-3, atol=1e-3 * np.abs(want).max()), i
            ref_out = _silu(exact[:n], exact[n:])
            assert np.linalg.norm(got - ref_out) / np.linalg.norm(ref_out) < 0.02, i
        else:
            ulp = np.spacing(np.abs(model).astype(np.float16)).astype(np.float64)
            assert (np.abs(got - model) <= ulp * 0.5 + 1e-5 * np.abs(model).max()).all(), i
            assert (np.abs(got - exact) <= bound + ulp).all(), i  # within the activations' rounding of the float GEMV
            wrong = dp4a_model(np.roll(x, 1), qw, qs, s.offset)[0]  # the model notices x one element off
            assert np.abs(wrong - model).max() > 10 * (ulp.max() + 1e-5 * np.abs(model).max())


def test_registry_takes_it_only_with_the_option():
    from edgellm.kernels import KernelOptions, KernelRegistry
    from edgellm.quant.schemes import get_scheme
    from edgellm.targets import resolve

    cuda = resolve("cuda-sm90").tvm()
    name, f = _pick(cuda, 1, 14336, 4096, "q4f16_1", cuda_gemv="dp4a")
    assert name == "int4_gemv_dp4a" and str(f.attrs["edgellm.gemv"]) == "dp4a_w16r2u2k2"
    assert _pick(cuda, 1, 4096, 4096, "q4f16_0", cuda_gemv="dp4a")[0] == "int4_gemv_dp4a_o8"
    assert _pick(cuda, 1, 14336, 4096, "q4f16_1")[0] == "int4_gemv_fp16x2_smem"  # auto: unchanged
    assert _pick(cuda, 1, 14336, 4096, "q4f16_2", cuda_gemv="dp4a")[0] != "int4_gemv_dp4a"  # the Q4_1 grid
    assert _pick(cuda, 1, 4096, 6144, "q4f16_1", bias=True, cuda_gemv="dp4a")[0] == "int4_gemv_fp16x2_smem"
    assert _pick(cuda, 1, 4096, 128256, "q8f16_1", cuda_gemv="dp4a")[0] == "int8_gemv_fp16x2"  # the 8-bit head
    assert "dp4a" not in _pick(cuda, None, 4096, 4096, "q4f16_1", cuda_gemv="dp4a")[0]  # prefill: the GEMM
    reg = KernelRegistry(cuda, KernelOptions(cuda_gemv="dp4a"))
    s = get_scheme("q4f16_1")
    silu = reg.fused_gemv(4096, 28672, s, "float16", False, None, True)
    assert str(silu.attrs["edgellm.gemv"]) == "dp4a_w4r2u4k1_silu"
    norm = reg.fused_gemv(4096, 6144, s, "float16", False, 1e-5, False)  # qkv with the norm: fp16x2
    assert str(norm.attrs["edgellm.gemv"]).startswith("h2_")
    assert "dp4a" not in str(KernelRegistry(cuda).fused_gemv(4096, 28672, s, "float16", False, None, True).attrs[
        "edgellm.gemv"])


def test_arguments_are_checked():
    from edgellm.kernels import cuda_gemv_dp4a as gd

    with pytest.raises(ValueError, match="multiple of 32"):
        gd.int4_gemv_dp4a(100, 64, 4, 2, 1, 1)
    with pytest.raises(ValueError, match="even"):
        gd.int4_gemv_dp4a(128, 64, 4, 3, 1, 1, silu=True)
    with pytest.raises(ValueError, match="ksplit"):
        gd.int4_gemv_dp4a(128, 64, 4, 2, 1, 3)


@needs_nvcc
def test_builds_with_and_without_pdl():
    import tvm

    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.kernels import cuda_gemv_dp4a as gd
    from edgellm.kernels import cuda_pdl
    from edgellm.targets import resolve

    prepare_cuda_build()
    for preset, pdl in (("cuda-sm90", True), ("cuda-sm80", False)):
        funcs = {"down": gd.int4_gemv_dp4a(14336, 4096, 16, 2, 2, 2, pdl=pdl),
                 "gu": gd.int4_gemv_dp4a(4096, 28672, 4, 2, 4, 1, silu=True, pdl=pdl)}
        with resolve(preset).tvm(), tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
            lib = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}))
        src = lib.mod.imports[0].inspect_source()
        p = str(pdl).lower()
        assert f"edgellm_q4gemv_dp4a<16, 2, 2, 2, 448, 4096, 7, false, false, {p}>" in src
        assert f"edgellm_q4gemv_dp4a<4, 2, 4, 1, 128, 14336, 7, true, false, {p}>" in src
        assert ("edgellm_pdl_waits_inside();" in src) == pdl
        if pdl:  # its wait is inside: patch_source adds no prologue
            assert cuda_pdl.patch_source(src)[1] == []


def test_the_pdl_marks_are_defined_once_per_module():
    """int4_gemv_dp4a.cu and owned_kv.cu both define the PDL marks a launch calls; a module holding both (the owned
    cache's decode with this GEMV) compiles only if each definition sits under the same guard."""
    root = Path(__file__).parents[1] / "edgellm" / "kernels" / "cuda"
    for name in ("int4_gemv_dp4a.cu", "owned_kv.cu"):
        src = (root / name).read_text()
        guard = src.index("#ifndef EDGELLM_PDL_MARKS")
        assert guard < src.index("void edgellm_pdl_waits_inside()") < src.index("#endif", guard), name
        assert guard < src.index("void edgellm_noop()") < src.index("#endif", guard), name
