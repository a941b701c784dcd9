"""The decode GEMV with its weights streamed by cp.async (kernels/cuda_gemv_async.py) without a GPU.

* a numpy model of cuda_gemv.int4_gemv_h2's arithmetic with x in shared memory (per lane its groups in order, two
  fp16x2 chains a group and row, fp32 per group with scale * 32, the warp butterfly, the K-split partials in warp
  order) is within fp16 tolerance of float64, and sensitive to the order it models;
* the CUDA source itself, run on the host through tests/cuda_host_emu.h (cp.async as a copy at issue), gives the
  model's values bit for bit: steps with a guarded tail, 1-3 stages, K split over 1, 2 and 4 warps, the folded and
  plain nibble decodes, the Q4_0 grid, an `out` no block tiles evenly;
* the registry takes it for the long-`in` decode GEMV only while cuda_gemv_async.ASYNC_STAGES > 0 (plain 4-bit rows,
  two steps a lane or more), and it builds for sm_90 with PDL (its own wait, no prologue) and for sm_80 without.
On the H200 (bench/gpu_pdl.py) every build with it is checked bit-equal to the register kernel's.
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


def _f16(v):
    return np.asarray(v, np.float64).astype(np.float16)


def _fma32(a, b, c):  # float32 fma: the exact product, one rounding (via float64; exact for these magnitudes)
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _chains(x, d, G, out_f, g):
    """The group's four fp16 accumulators per row: (chain q % 2) x (low half: elements s, high half: s + 4)."""
    h = np.zeros((2, 2, out_f), np.float16)  # [chain][half][row]
    xg = x.astype(np.float16).reshape(G, 32)
    for q in range(4):
        for s in range(4):
            for half, e in ((0, s), (1, s + 4)):
                h[q % 2, half] = _f16(d[:, g, q, e] * np.float64(xg[g, 8 * q + e]) + h[q % 2, half].astype(np.float64))
    return h


def gemv_model(x: np.ndarray, qw: np.ndarray, qs: np.ndarray, offset: int, ksplit: int) -> np.ndarray:
    """x [in] fp16 -> [out] fp16 as int4_gemv_h2(xsmem=True) computes it (and int4_gemv_async.cu): lane v of a row's
    team takes groups v, v + 32 ksplit, ... in order; per group two fp16 chains a half (each FMA rounded once, the
    nibble's (q - offset) / 32 exact), the four halves summed in fp32 as (lo0 + hi0) + (lo1 + hi1), times scale * 32
    in one fp32 FMA; per warp the butterfly xor 16, 8, 4, 2, 1; the team's warps' sums in order."""
    in_f, out_f = x.shape[0], qw.shape[0]
    G, VL = in_f // 32, 32 * ksplit
    nib = np.stack([(qw.reshape(out_f, G, 4) >> np.uint32(4 * e)) & np.uint32(15) for e in range(8)], -1)
    d = (nib.astype(np.float64) - offset) / 32
    scale32 = qs.astype(np.float32) * np.float32(32)
    lanes = np.zeros((VL, out_f), np.float32)
    for g in range(G):
        h = _chains(x, d, G, out_f, g).astype(np.float32)
        s = (h[0, 0] + h[0, 1]) + (h[1, 0] + h[1, 1])
        lanes[g % VL] = _fma32(s, scale32[:, g], lanes[g % VL])
    out = np.zeros(out_f, np.float32)
    for k in range(ksplit):  # warp k of the team: lanes 32k .. 32k + 31, the butterfly, then the warps in order
        val = lanes[32 * k:32 * k + 32].copy()
        for o in (16, 8, 4, 2, 1):
            val = val + val[np.arange(32) ^ o]
        out = val[0] if k == 0 else out + val[0]
    return out.astype(np.float16)


def _case(rng, in_f, out_f, row, outliers=True):
    s = get_scheme(row)
    qw, qs = ref.quantize(rng.standard_normal((out_f, in_f)).astype(np.float32) * 0.05, s)[:2]
    x = rng.standard_normal(in_f).astype(np.float16)
    if outliers:  # a few channels at +-2000, as real down-projection inputs have
        x[rng.choice(in_f, 6, replace=False)] = rng.choice([-2000.0, 2000.0], 6)
    expect = ref.dequantize(qw, qs, in_f, s).astype(np.float64) @ x.astype(np.float64)
    return s, qw.astype(np.uint32), qs.astype(np.float16), x, expect


@pytest.mark.parametrize("ksplit", [1, 2])
def test_model_within_fp16_tolerance_and_sensitive(ksplit):
    rng = np.random.default_rng(5)
    s, qw, qs, x, expect = _case(rng, 2048, 24, "q4f16_1")
    got = gemv_model(x, qw, qs, s.offset, ksplit).astype(np.float64)
    assert np.linalg.norm(got - expect) / np.linalg.norm(expect) < 1e-3
    wrong = gemv_model(np.roll(x, 1), qw, qs, s.offset, ksplit).astype(np.float64)  # x paired one element off
    assert np.linalg.norm(wrong - expect) / np.linalg.norm(expect) > 0.1


_EMU_MAIN = r"""
#include "cuda_host_emu.h"
#include "kernel_emu.h"
#include <cstdio>
#include <cstdlib>
template <int W, int R, int U, int KS, int S, int G, int OUTF, int OFF, bool FOLD>
void launch(const half* x, const unsigned* qw, const half* qs, half* o) {
  constexpr int TEAMS = W / KS, NT = W * 32;
  std::vector<unsigned char> smem(4 * G * 16 + S * U * R * NT * 20 + W * R * 4 + 16);
  for (int bx = 0; bx < (OUTF + TEAMS * R - 1) / (TEAMS * R); ++bx)
    emu_run_block(bx, 0, NT, [&](int) {
      edgellm_q4gemv_async<W, R, U, KS, S, G, OUTF, OFF, FOLD, false, true>(x, qw, qs, o, smem.data()); });
}
int main(int argc, char** argv) {  // case in.bin out.bin
  int c = atoi(argv[1]);
  int G = atoi(argv[4]), OUTF = atoi(argv[5]);
  FILE* f = fopen(argv[2], "rb");
  std::vector<half> x(G * 32), qs((size_t)OUTF * G), o(OUTF, half{0x7E00});
  std::vector<unsigned> qw((size_t)OUTF * G * 4);
  size_t got = fread(x.data(), 2, x.size(), f) + fread(qw.data(), 4, qw.size(), f) + fread(qs.data(), 2, qs.size(), f);
  fclose(f);
  if (got != x.size() + qw.size() + qs.size()) return 2;
  CASES
  f = fopen(argv[3], "wb");
  fwrite(o.data(), 2, o.size(), f);
  fclose(f);
}
"""

# (warps, rows, unroll, ksplit, stages, G, out, row, fold): steps a lane = ceil(G / (32 ksplit unroll))
CASES = [
    (4, 2, 1, 1, 2, 70, 19, "q4f16_1", False),  # 3 steps, the last 6 groups guarded; 19 rows: a partial block
    (4, 2, 2, 2, 3, 200, 16, "q4f16_1", True),  # 2 steps (a tail), 3 stages (more than the steps)
    (8, 1, 2, 4, 2, 300, 9, "q4f16_0", True),  # K split over 4 warps, the Q4_0 grid (offset 8)
    (2, 4, 1, 1, 1, 64, 8, "q4f16_1", True),  # 1 stage: no overlap, still the same values
    (16, 2, 2, 2, 2, 448, 33, "q4f16_1", True),  # Llama-3-8B's down pick and `in`
]


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="the host emulation needs g++")
def test_kernel_source_on_the_host_equals_the_model(tmp_path, host_emu):
    src = (Path(__file__).parents[1] / "edgellm" / "kernels" / "cuda" / "int4_gemv_async.cu").read_text()
    src = src.replace("#include <cuda_fp16.h>", "")
    subs = {  # the PTX helpers: fp16x2 arithmetic emulated, cp.async a copy at issue (wait / commit then nothing)
        r"unsigned eqa_fma_sub\(unsigned w, unsigned cen, unsigned x, unsigned acc\) \{":
            "return emu_h2(emu_h2(w, cen, 0, 0), x, acc, 1);",
        r"unsigned eqa_fma_sub16\(unsigned w, unsigned c16, unsigned x, unsigned acc\) \{":
            "return emu_h2(emu_h2(w, 0x2C002C00u, c16, 1), x, acc, 1);",
        r"void eqa_cp16\(void\* dst, const void\* src\) \{": "memcpy(dst, src, 16);",
        r"void eqa_cp4\(void\* dst, const void\* src\) \{": "memcpy(dst, src, 4);",
        r"void eqa_commit\(\) \{": "",
        r"void eqa_wait\(\) \{": "",
        r"void eqa_prefetch_l2\(const void\* p, unsigned n\) \{": "",
    }
    for head, body in subs.items():
        src, n = re.subn(rf"({head}).*?\n?\}}\n", rf"\1 {body} }}\n", src, count=1, flags=re.S)
        assert n == 1, head
    cases = "\n  ".join(f"if (c == {i}) launch<{w}, {r}, {u}, {k}, {st}, {g}, {n}, {get_scheme(row).offset}, "
                        f"{str(fold).lower()}>(x.data(), qw.data(), qs.data(), o.data());"
                        for i, (w, r, u, k, st, g, n, row, fold) in enumerate(CASES))
    host_emu({"kernel_emu.h": src}, _EMU_MAIN.replace("CASES", cases))
    rng = np.random.default_rng(11)
    for i, (w, r, u, k, st, g, n, row, fold) in enumerate(CASES):
        s, qw, qs, x, expect = _case(rng, g * 32, n, row)
        (tmp_path / "in.bin").write_bytes(x.tobytes() + qw.tobytes() + qs.tobytes())
        subprocess.run(["./emu", str(i), "in.bin", "out.bin", str(g), str(n)], cwd=tmp_path, check=True)
        got = np.frombuffer((tmp_path / "out.bin").read_bytes(), np.float16)
        assert np.isfinite(got).all(), i  # every row written (the output starts as NaN)
        model = gemv_model(x, qw, qs, s.offset, k)
        assert np.array_equal(got.view(np.uint16), model.view(np.uint16)), (i, np.abs(got - model).max())
        assert np.linalg.norm(got - expect) / np.linalg.norm(expect) < 1e-3, i


def test_registry_takes_it_for_long_in_only_when_on(monkeypatch):
    from edgellm.kernels import cuda_gemv_async as ga
    from edgellm.targets import resolve

    cuda = resolve("cuda-sm90").tvm()
    assert ga.ASYNC_STAGES == 0 or _pick(cuda, 1, 14336, 4096, "q4f16_1")[0] == "int4_gemv_async"
    monkeypatch.setattr(ga, "ASYNC_STAGES", 2)
    name, f = _pick(cuda, 1, 14336, 4096, "q4f16_1")  # Llama-3-8B down: 4 steps a lane
    assert name == "int4_gemv_async" and str(f.attrs["edgellm.gemv"]) == "async_w16r2u2k2s2_fs"
    assert _pick(cuda, 1, 8192, 2048, "q4f16_0")[0] == "int4_gemv_async_o8"  # 1B down, the Q4_0 grid; 2 steps
    assert str(_pick(cuda, 1, 8192, 2048, "q4f16_1")[1].attrs["edgellm.gemv"]).endswith("_pf")  # 9.4 MB: prefetched
    for in_f, out_f, row in ((4096, 14336, "q4f16_1"), (4096, 4096, "q4f16_1"), (14336, 4096, "q4f16_2")):
        assert not _pick(cuda, 1, in_f, out_f, row)[0].startswith("int4_gemv_async")  # one step / the Q4_1 grid
    assert not _pick(cuda, 1, 14336, 4096, "q4f16_1", bias=True)[0].startswith("int4_gemv_async")
    assert not _pick(cuda, None, 14336, 4096, "q4f16_1")[0].startswith("int4_gemv_async")  # prefill: the GEMM
    assert not _pick(resolve("jetson-xavier").tvm(), 1, 14336, 4096, "q4f16_1")[0].startswith("int4_gemv_async")  # sm_72: no cp.async
    monkeypatch.setattr(ga, "ASYNC_STAGES", 0)
    assert _pick(cuda, 1, 14336, 4096, "q4f16_1")[0] == "int4_gemv_fp16x2_smem"


def test_arguments_are_checked():
    from edgellm.kernels import cuda_gemv_async as ga

    with pytest.raises(ValueError, match="multiple of 64"):
        ga.int4_gemv_async(96, 64, 4, 2, 1, 1, False, stages=2)
    with pytest.raises(ValueError, match="stages"):
        ga.int4_gemv_async(4096, 64, 4, 2, 1, 1, False, stages=0)
    with pytest.raises(ValueError, match="shared memory"):
        ga.int4_gemv_async(14336, 64, 32, 4, 4, 2, False, stages=4)
    assert ga.smem_bytes(14336, 16, 2, 2, 2) == 28672 + 81920 + 128 and ga.blocks_per_sm(14336, 16, 2, 2, 2) == 2


@needs_nvcc
def test_builds_with_and_without_pdl():
    import tvm

    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.kernels import cuda_gemv_async as ga
    from edgellm.kernels import cuda_pdl
    from edgellm.targets import resolve

    prepare_cuda_build()
    for preset, pdl in (("cuda-sm90", True), ("cuda-sm80", False)):
        funcs = {"down": ga.int4_gemv_async(14336, 4096, 16, 2, 2, 2, True, stages=2, pdl=pdl),
                 "small": ga.int4_gemv_async(8192, 2048, 16, 2, 2, 2, True, stages=3, pdl=pdl)}
        with resolve(preset).tvm(), tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
            lib = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}))
        src = lib.mod.imports[0].inspect_source()
        assert "edgellm_q4gemv_async<16, 2, 2, 2, 2, 448, 4096, 7, true, false, " + str(pdl).lower() + ">" in src
        p = str(pdl).lower()  # the 1B's 9.4 MB: its rows prefetched into L2 where there is PDL
        assert f"edgellm_q4gemv_async<16, 2, 2, 2, 3, 256, 2048, 7, true, {p}, {p}>" in src
        assert re.search(r"__launch_bounds__\(512, 2\) down_kernel", src)  # two blocks an SM: 110 KB each
        assert ("edgellm_pdl_waits_inside();" in src) == pdl
        if pdl:  # its wait is inside: patch_source adds no prologue
            assert cuda_pdl.patch_source(src)[1] == []
