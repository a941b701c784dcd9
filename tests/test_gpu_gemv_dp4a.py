"""The CUDA decode GEMV with int8 activations (`--opt cuda_gemv=dp4a`, kernels/cuda_gemv_dp4a.py) without a GPU.

* the CUDA source itself, run on the host through tests/cuda_host_emu.h, against a numpy model of its arithmetic (a
  scale d per 8 activations, q = rint(x * 127 / max|x|), exact integer sums minus offset * sum(q), one float product
  per d and scale: test_webgpu_dp4a's model with the grid's offset, the reciprocal rounded before its product), and
  within the bound the activations' rounding allows of the float GEMV: steps with a guarded tail, K split over
  warps, the silu epilogue, the Q4_0 grid, an `out` no block tiles evenly, outlier activations;
* the quantized MLP chain (add_rms_norm_q8 -> gate_up + silu with quantized input and output -> down) on the host
  against numpy, and the registry's chain only where gate_up does not stage the norm;
* the registry takes it with the option, for the plain GEMV and gate_up + silu, and by default (auto) for the plain
  GEMVs of `in` >= 2048 and the MLP chain; the norm-fused GEMVs, the 8-bit head, the Q4_1 grid and bias keep their
  kernels;
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


def _quant8(v: np.ndarray):
    """eqd_quant8 in numpy: per word of 8 (float32 of fp16 values) q = rint(v * (127 * (1 / max|v|))), d = max / 127."""
    hv = v.astype(np.float32).reshape(-1, 8)
    am = np.abs(hv).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(am > 0, np.float32(127) * (np.float32(1) / am), np.float32(0)).astype(np.float32)
    q = np.rint(hv * inv[:, None]).astype(np.int64)
    return q, (am * np.float32(1 / 127)).astype(np.float32)


def _host_source() -> str:
    """kernels/cuda/int4_gemv_dp4a.cu for tests/cuda_host_emu.h: its two PTX helpers replaced (the load fence's zero
    is a plain 0, the L2 prefetch nothing)."""
    src = (Path(__file__).parents[1] / "edgellm" / "kernels" / "cuda" / "int4_gemv_dp4a.cu").read_text()
    src = src.replace("#include <cuda_fp16.h>", "")
    for head, body in {r"unsigned eqd_zero_after\(unsigned v, unsigned s\) \{": "return 0u * v * s;",
                       r"void eqd_prefetch_l2\(const void\* p, unsigned n\) \{": "",
                       # cp.async: the copy at once (the thread's own slots: nothing else reads them), n = 0 zeros
                       r"void eqd_cp16\(void\* dst, const void\* src, unsigned n\) \{":
                           "if (n) memcpy(dst, src, 16); else memset(dst, 0, 16);",
                       r"void eqd_commit\(\) \{": "",
                       r"void eqd_wait_groups\(int n\) \{": "(void)n;"}.items():
        src, n = re.subn(rf"({head}).*?\n\}}\n", rf"\1 {body} }}\n", src, count=1, flags=re.S)
        assert n == 1, head
    return src


def dp4a_model(x: np.ndarray, qw: np.ndarray, qs: np.ndarray, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy model of int4_gemv_dp4a.cu: per packed word of 8 activations d = max|x| / 127 and q = rint(x * (127 * (1 /
    max|x|))) in float32; per row and word the exact integer sum(nib * q) - offset * sum(q) times d, times the group's
    scale; the float sums in float64 (the kernel's float32 order differs: the comparison allows the fp16 output's
    rounding). Returns (out [out_f] float64, d [in / 8])."""
    out_f, words = qw.shape
    q, d = _quant8(x)
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
    src = _host_source()
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


def test_registry_takes_it_with_the_option_and_by_default_for_long_rows(monkeypatch):
    from edgellm.kernels import KernelOptions, KernelRegistry, cuda_gemv
    from edgellm.quant.schemes import get_scheme
    from edgellm.targets import resolve

    cuda = resolve("cuda-sm90").tvm()
    name, f = _pick(cuda, 1, 14336, 4096, "q4f16_1", cuda_gemv="dp4a")
    assert name == "int4_gemv_dp4a" and str(f.attrs["edgellm.gemv"]) == "dp4a_w16r2u1k2_cp3"  # the ring (sm_90)

    def pick(rows, in_f, out_f, row, bias=False, **options):  # the name alone: no kernel built
        s = get_scheme(row)
        return KernelRegistry(cuda, KernelOptions(**options))._pick_linear(rows, in_f, out_f, s, s.act_dtype, bias)[0]

    assert pick(1, 4096, 4096, "q4f16_0", cuda_gemv="dp4a") == "int4_gemv_dp4a_o8"
    # auto: dp4a from `in` AUTO_MIN_IN (2048) on (the 1B's o and down, the 8B's), fp16x2 below (SmolLM2's 576, 1536)
    assert pick(1, 14336, 4096, "q4f16_1") == "int4_gemv_dp4a"
    assert pick(1, 2048, 2048, "q4f16_1") == "int4_gemv_dp4a"
    assert pick(1, 1536, 576, "q4f16_1") == "int4_gemv_fp16x2_smem"
    assert pick(1, 14336, 4096, "q4f16_1", cuda_gemv="fp16x2-smem") == "int4_gemv_fp16x2_smem"
    assert pick(1, 14336, 4096, "q4f16_2", cuda_gemv="dp4a") == "int4_gemv_fp16x2_smem_min"  # the Q4_1 grid
    assert pick(1, 4096, 6144, "q4f16_1", bias=True, cuda_gemv="dp4a") == "int4_gemv_fp16x2_smem"
    assert pick(1, 4096, 128256, "q8f16_1", cuda_gemv="dp4a") == "int8_gemv_fp16x2"  # the 8-bit head
    assert "dp4a" not in pick(None, 4096, 4096, "q4f16_1", cuda_gemv="dp4a")  # prefill: the GEMM
    # the fused GEMVs: int4_gemv_h2 stubbed (its TVMScript takes seconds to build), the labels of what is asked
    monkeypatch.setattr(cuda_gemv, "int4_gemv_h2", lambda *a, **k: {"h2": (a, k)})
    reg = KernelRegistry(cuda, KernelOptions(cuda_gemv="dp4a"))
    s = get_scheme("q4f16_1")
    silu = reg.fused_gemv(4096, 28672, s, "float16", False, None, True)
    assert str(silu.attrs["edgellm.gemv"]) == "dp4a_w4r2u4k1_silu"
    assert "h2" in reg.fused_gemv(4096, 6144, s, "float16", False, 1e-5, False)  # qkv with the norm: fp16x2
    # gate_up + silu quantizing x in every block: only with the option (auto takes the chain, dp4a_mlp, instead)
    assert "h2" in KernelRegistry(cuda).fused_gemv(4096, 28672, s, "float16", False, None, True)


def test_long_rows_take_a_lanes_groups_in_one_step_where_they_are_few(monkeypatch):
    """gemv_config: int4_gemv_h2's work split, the long `in` (down) with a lane's groups in one step where they are
    at most LONG_IN_UNROLL (the 1B's 8192: 4 groups a lane, one step; the 8B's 14,336: 7 a lane, 2 a step)."""
    from edgellm.kernels import cuda_gemv_dp4a as gd
    from edgellm.kernels.cuda_gemv import xs_gemv_config

    assert gd.gemv_config(8192, 2048) == (16, 2, 4, 2)
    # sm_90: the 8B's o in 256 blocks of 16 warps (WIDE_MIN_BLOCKS); the 1B's (128 blocks so) keeps 8; sm_80 keeps 8
    assert gd.gemv_config(4096, 4096, 90) == (16, 2, 4, 2) and gd.gemv_config(4096, 4096, 80) == (8, 2, 4, 2)
    assert gd.gemv_config(2048, 2048, 90) == (8, 2, 4, 2)
    assert gd.ring_plan(4096, 4096, 90) == ((16, 2, 4, 2), 0)
    assert gd.gemv_config(14336, 4096) == tuple(xs_gemv_config(14336, 4096)[:4]) == (16, 2, 2, 2)
    assert gd.gemv_config(4096, 4096) == tuple(xs_gemv_config(4096, 4096)[:4])  # shorter rows: h2's pick
    monkeypatch.setattr(gd, "LONG_IN_UNROLL", 2)
    assert gd.gemv_config(8192, 2048) == tuple(xs_gemv_config(8192, 2048)[:4]) == (16, 2, 2, 2)


def test_the_ring_where_rows_are_long_and_take_several_steps(monkeypatch):
    """ring_plan: the cp.async ring, 3 steps of one group deep, for the long-`in` GEMVs of more than one step a lane
    on sm_90 (the 8B's down: 4 steps of 2 groups in registers) where two blocks fit an SM; not for one step (the
    1B's down), a short `in` (gate_up, o) or sm_80 (164 KB an SM); ASYNC_DEPTH overrides by shape in the split
    asked, capped at its steps."""
    from edgellm.kernels import cuda_gemv_dp4a as gd

    assert gd.ring_plan(14336, 4096, 90) == ((16, 2, 1, 2), 3) and gd.gemv_config(14336, 4096) == (16, 2, 2, 2)
    assert gd.steps_per_lane(14336, 2, 2) == 4 and gd.steps_per_lane(14336, 1, 2) == 7
    assert gd.ring_plan(8192, 2048, 90) == (gd.gemv_config(8192, 2048), 0)  # one step: every load before the wait
    assert gd.ring_plan(4096, 28672, 90, gd.QOUT_SILU_CONFIG) == (gd.QOUT_SILU_CONFIG, 0)
    assert gd.ring_plan(8192, 57344, 90, gd.QOUT_SILU_CONFIG) == (gd.QOUT_SILU_CONFIG, 0)  # a fixed split: no rule
    assert gd.ring_plan(4096, 4096, 90)[1] == 0
    assert gd.ring_plan(14336, 4096, 80) == ((16, 2, 2, 2), 0)
    assert gd.smem_bytes(14336, 16, 2, 1, 3, 32) <= gd.ASYNC_MAX_SMEM < gd.smem_bytes(14336, 16, 2, 2, 3, 32)
    monkeypatch.setattr(gd, "ASYNC_DEPTH", {(14336, 4096): 4, (4096, 28672): 3})
    assert gd.ring_plan(14336, 4096, 90) == ((16, 2, 2, 2), 4) and gd.ring_plan(14336, 4096, 80)[1] == 4
    assert gd.ring_plan(4096, 28672, 90, gd.QOUT_SILU_CONFIG)[1] == 2  # capped at its 2 steps
    with pytest.raises(ValueError, match="depth 3"):
        gd.int4_gemv_dp4a(4096, 28672, *gd.QOUT_SILU_CONFIG, silu=True, depth=3)


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
        dn_cfg, dn_depth = gd.ring_plan(14336, 4096, 90 if pdl else 80)
        funcs = {"down": gd.int4_gemv_dp4a(14336, 4096, 16, 2, 2, 2, pdl=pdl),
                 "gu": gd.int4_gemv_dp4a(4096, 28672, 4, 2, 4, 1, silu=True, pdl=pdl),
                 "guq": gd.int4_gemv_dp4a(4096, 28672, 8, 2, 4, 1, silu=True, pdl=pdl, preq=True, qout=True),
                 "downq": gd.int4_gemv_dp4a(14336, 4096, *dn_cfg, pdl=pdl, preq=True, depth=dn_depth),
                 "norm": gd.add_rms_norm_q8(4096, 1e-5)}
        if pdl:  # sm_90's o (the short GEMVs' 16-warp blocks, WIDE_MIN_BLOCKS)
            funcs["o16"] = gd.int4_gemv_dp4a(4096, 4096, *gd.gemv_config(4096, 4096, 90), pdl=True)
        with resolve(preset).tvm(), tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
            lib = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}))
        src = lib.mod.imports[0].inspect_source()
        p = str(pdl).lower()
        assert f"edgellm_q4gemv_dp4a<16, 2, 2, 2, 448, 4096, 7, false, false, {p}, false, false>" in src
        assert f"edgellm_q4gemv_dp4a<4, 2, 4, 1, 128, 14336, 7, true, false, {p}, false, false>" in src
        assert f"edgellm_q4gemv_dp4a<8, 2, 4, 1, 128, 14336, 7, true, false, {p}, true, true>" in src
        down = ("1, 2, 448, 4096, 7, false, false, true, true, false, 3" if pdl
                else "2, 2, 448, 4096, 7, false, false, false, true, false")
        assert f"edgellm_q4gemv_dp4a<16, 2, {down}>" in src  # sm_90: down through the cp.async ring
        assert "edgellm_add_rms_norm_q8<4096>" in src
        assert ("edgellm_pdl_waits_inside();" in src) == pdl
        if pdl:  # the GEMVs wait inside; only the norm kernel gets patch_source's prologue
            assert cuda_pdl.patch_source(src)[1] == ["norm_kernel"]
            w, r, u, _ = dn_cfg
            regs = _ptxas_registers(src)
            # the ring pays only while two of down's 512-thread blocks share an SM (h200-pdl.md runs 53-55: one block
            # an SM lost 6-9%); the 8B's o keeps its 256 blocks of 16 warps in one wave of 2 an SM (run 60)
            assert regs["downq_kernel"] <= 65536 // (2 * 512) and regs["o16_kernel"] <= 65536 // (2 * 512), regs
            assert gd.smem_bytes(14336, w, r, u, dn_depth, w * r) <= 227 * 1024 // 2


def _ptxas_registers(src: str) -> dict[str, int]:
    """Registers a thread of each kernel of `src` takes, from nvcc's ptxas -v for sm_90a."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.cu").write_text(src)
        r = subprocess.run(["nvcc", "-arch=sm_90a", "-cubin", "-O3", "-Xptxas", "-v", "k.cu", "-o", "k.cubin"],
                           cwd=tmp, capture_output=True, text=True, check=True)
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"Function properties for (\w+)\n(?:.*\n)*?.*?Used (\d+) registers", r.stderr)}


def test_the_pdl_marks_are_defined_once_per_module():
    """int4_gemv_dp4a.cu and owned_kv.cu both define the PDL marks a launch calls; a module holding both (the owned
    cache's decode with this GEMV) compiles only if each definition sits under the same guard."""
    root = Path(__file__).parents[1] / "edgellm" / "kernels" / "cuda"
    for name in ("int4_gemv_dp4a.cu", "owned_kv.cu"):
        src = (root / name).read_text()
        guard = src.index("#ifndef EDGELLM_PDL_MARKS")
        assert guard < src.index("void edgellm_pdl_waits_inside()") < src.index("#endif", guard), name
        assert guard < src.index("void edgellm_noop()") < src.index("#endif", guard), name



_CHAIN_MAIN = r"""
#include "cuda_host_emu.h"
#include "kernel_emu.h"
#include <cstdio>
#include <cstdlib>
constexpr int HID = 256, INTER = 96, G1 = HID / 32, G2 = INTER / 32;
int main(int argc, char** argv) {  // in.bin out.bin eps
  FILE* f = fopen(argv[1], "rb");
  std::vector<half> x(HID), y(HID), w(HID), qs1(2 * INTER * G1), qs2(HID * G2), xo(HID), out(HID, half{0x7E00});
  std::vector<unsigned> qw1(2 * INTER * G1 * 4), qw2(HID * G2 * 4);
  std::vector<uint4> hq(HID / 8), aq(INTER / 8);
  size_t got = fread(x.data(), 2, HID, f) + fread(y.data(), 2, HID, f) + fread(w.data(), 2, HID, f)
      + fread(qw1.data(), 4, qw1.size(), f) + fread(qs1.data(), 2, qs1.size(), f)
      + fread(qw2.data(), 4, qw2.size(), f) + fread(qs2.data(), 2, qs2.size(), f);
  fclose(f);
  if (got != 3 * HID + qw1.size() + qs1.size() + qw2.size() + qs2.size()) return 2;
  float eps = atof(argv[3]);
  std::vector<float> red(32);
  emu_run_block(0, 0, HID / 8, [&](int) { edgellm_add_rms_norm_q8<HID>(x.data(), y.data(), w.data(), xo.data(), reinterpret_cast<unsigned*>(hq.data()), eps, red.data()); });
  std::vector<unsigned char> sm(1 << 16);
  for (int bx = 0; bx < INTER / 8; ++bx)  // gate_up + silu, QOUT_SILU_CONFIG: 4 warps x 2 outputs, one word a block
    emu_run_block(bx, 0, 128, [&](int) { edgellm_q4gemv_dp4a<4, 4, 2, 1, G1, INTER, 7, true, false, true, true, true>(hq.data(), qw1.data(), qs1.data(), aq.data(), sm.data()); });
  for (int bx = 0; bx < HID / 8; ++bx)  // down: 4 warps, K split over 2, 2 rows a team
    emu_run_block(bx, 0, 128, [&](int) { edgellm_q4gemv_dp4a<4, 4, 1, 1, G2, HID, 7, false, false, true, true, false>(aq.data(), qw2.data(), qs2.data(), out.data(), sm.data()); });
  f = fopen(argv[2], "wb");
  fwrite(xo.data(), 2, HID, f);
  fwrite(hq.data(), 16, hq.size(), f);
  fwrite(aq.data(), 16, aq.size(), f);
  fwrite(out.data(), 2, HID, f);
  fclose(f);
}
"""


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="the host emulation needs g++")
def test_quantized_mlp_chain_on_the_host(tmp_path, host_emu):
    """add_rms_norm_q8 -> gate_up + silu (PREQ, QOUT) -> down (PREQ), the CUDA source on the host: the residual and
    the normed x's quantization exactly as numpy computes them, gate_up's quantized output equal to eqd_quant8 of
    the silu of the model's sums (fp16-rounded) but where a rounding tie flips, and down within the rounding of
    the model and of the float MLP on the same weights."""
    src = _host_source()
    host_emu({"kernel_emu.h": src}, _CHAIN_MAIN)
    rng = np.random.default_rng(17)
    hid, inter, eps = 256, 96, 1e-5
    s = get_scheme("q4f16_1")
    x = (rng.standard_normal(hid) * 3).astype(np.float16)
    y = rng.standard_normal(hid).astype(np.float16)
    w = (1 + 0.1 * rng.standard_normal(hid)).astype(np.float16)
    qw1, qs1 = [a for a in ref.quantize(rng.standard_normal((2 * inter, hid)).astype(np.float32) * 0.05, s)[:2]]
    qw2, qs2 = [a for a in ref.quantize(rng.standard_normal((hid, inter)).astype(np.float32) * 0.05, s)[:2]]
    (tmp_path / "in.bin").write_bytes(b"".join(a.tobytes() for a in (
        x, y, w, qw1.astype(np.uint32), qs1.astype(np.float16), qw2.astype(np.uint32), qs2.astype(np.float16))))
    subprocess.run(["./emu", "in.bin", "out.bin", str(eps)], cwd=tmp_path, check=True)
    raw = (tmp_path / "out.bin").read_bytes()
    xo = np.frombuffer(raw[:2 * hid], np.float16)
    hq = np.frombuffer(raw[2 * hid:2 * hid + 2 * hid], np.uint32).reshape(-1, 4)
    aq = np.frombuffer(raw[4 * hid:4 * hid + 2 * inter], np.uint32).reshape(-1, 4)
    out = np.frombuffer(raw[4 * hid + 2 * inter:], np.float16).astype(np.float64)
    sres = (x.astype(np.float32) + y.astype(np.float32)).astype(np.float16)
    assert np.array_equal(xo, sres)  # the residual x + y
    sf = sres.astype(np.float32)
    r = np.float32(1) / np.sqrt(np.float32((sf * sf).sum(dtype=np.float32) / hid + np.float32(eps)))
    h = (sf * r * w.astype(np.float32)).astype(np.float16)
    q, d = _quant8(h.astype(np.float32))

    def unpack(words):  # uint32 [n, 4] -> q [n, 8] in element order, d, sum
        b = words[:, :2].copy().view(np.int8).reshape(-1, 2, 4)  # (elements 0, 2, 4, 6 | 1, 3, 5, 7)
        qq = np.empty((len(words), 8), np.int64)
        qq[:, 0::2], qq[:, 1::2] = b[:, 0], b[:, 1]
        return qq, words[:, 2].copy().view(np.float32), words[:, 3].astype(np.int32)

    hq_q, hq_d, hq_s = unpack(hq)
    assert (np.abs(hq_d - d) <= np.spacing(d)).all()  # rsqrt's last bit may differ from numpy's
    assert (np.abs(hq_q - q) <= 1).all() and (hq_q != q).mean() < 0.02 and np.array_equal(hq_s, hq_q.sum(1))
    gate_up, _ = dp4a_model(h, qw1.astype(np.uint32), qs1.astype(np.float16), 7)
    act = _silu(gate_up[:inter], gate_up[inter:])
    aq_q, aq_d, aq_s = unpack(aq)
    want_q, want_d = _quant8(act.astype(np.float16).astype(np.float32))
    assert np.allclose(aq_d, want_d, rtol=4e-3) and (np.abs(aq_q - want_q) <= 1).all()
    assert np.array_equal(aq_s, aq_q.sum(1))
    deq = (aq_q * aq_d[:, None].astype(np.float64)).reshape(-1)  # the activations down sees
    model = ref.dequantize(qw2, qs2, inter, s).astype(np.float64) @ deq
    assert np.allclose(out, model, rtol=2e-3, atol=2e-3 * np.abs(model).max())
    exact_act = _silu(*np.split(ref.dequantize(qw1, qs1, hid, s).astype(np.float64) @ h.astype(np.float64), 2))
    exact = ref.dequantize(qw2, qs2, inter, s).astype(np.float64) @ exact_act
    assert np.linalg.norm(out - exact) / np.linalg.norm(exact) < 0.03


def test_chain_only_where_gate_up_does_not_stage_the_norm():
    from edgellm.kernels import KernelOptions, KernelRegistry
    from edgellm.targets import resolve

    cuda, s = resolve("cuda-sm90").tvm(), get_scheme("q4f16_1")
    chain = KernelRegistry(cuda, KernelOptions(cuda_gemv="dp4a")).dp4a_mlp(4096, 14336, s, "float16", 1e-5)
    assert [str(f.attrs.get("edgellm.gemv", "norm")) for f in chain] == [
        "norm", "dp4a_w4r4u2k1_silu_preq_qout", "dp4a_w16r2u1k2_preq_cp3"]  # Llama-3-8B; down: the cp.async ring
    assert KernelRegistry(cuda, KernelOptions(cuda_gemv="dp4a")).dp4a_mlp(2048, 8192, s, "float16", 1e-5) is None
    assert KernelRegistry(cuda).dp4a_mlp(4096, 14336, s, "float16", 1e-5) is not None  # auto: `in` >= AUTO_MIN_IN
    assert KernelRegistry(cuda, KernelOptions(cuda_gemv="fp16x2-smem")).dp4a_mlp(
        4096, 14336, s, "float16", 1e-5) is None  # the option off
    assert KernelRegistry(cuda, KernelOptions(cuda_gemv="dp4a", cuda_fuse="all")).dp4a_mlp(
        4096, 14336, s, "float16", 1e-5) is None
    assert KernelRegistry(cuda, KernelOptions(cuda_gemv="dp4a")).dp4a_mlp(
        4096, 14336, get_scheme("q4f16_2"), "float16", 1e-5) is None  # the Q4_1 grid


def test_the_model_wires_the_chain():
    """models/llama.py _mlp_int8 with the registry's chain for a Llama-3-8B MLP (hidden 4096, inter 14336), exported
    to Relax (shapes and dtypes checked there): the norm kernel that quantizes, gate_up + silu with quantized input
    and output, down taking it, in that order; the decode loop's use of it ran on the H200 (runs 43-44)."""
    from tvm.relax.frontend import nn

    from edgellm.kernels import KernelOptions, KernelRegistry
    from edgellm.models.llama import _mlp_int8
    from edgellm.quant.nn import Linear
    from edgellm.targets import resolve

    hidden, inter, s = 4096, 14336, get_scheme("q4f16_1")
    target = resolve("cuda-sm90").tvm()
    reg = KernelRegistry(target, KernelOptions(cuda_gemv="dp4a"))

    class MLP(nn.Module):
        def __init__(self):
            self.inter = inter
            self.gate_up_proj = Linear(hidden, 2 * inter, s, "float16", reg)
            self.down_proj = Linear(inter, hidden, s, "float16", reg)
            self.norm = nn.RMSNorm(hidden, -1, 1e-5, bias=False, dtype="float16")

        def forward(self, x, o):
            return _mlp_int8(x, o, self.norm, self, reg.dp4a_mlp(hidden, inter, s, "float16", 1e-5))

    spec = {"forward": {"x": nn.spec.Tensor([1, 1, hidden], "float16"),
                        "o": nn.spec.Tensor([1, 1, hidden], "float16")}}
    with target:
        mod, _ = MLP().export_tvm(spec=spec)
    text = mod["forward"].script()
    calls = [text.index(f"R.call_tir({n}, ") for n in ("add_rms_norm_q8", "linear_gemv_silu_q8", "linear_gemv_q8")]
    assert calls == sorted(calls)
    assert "R.call_tir(linear_gemv_silu_q8, (add_rms_norm_q8_1, " in text  # gate_up takes the quantized norm
    assert 'R.Tensor((512, 4), dtype="uint32")' in text and 'out_ty=R.Tensor((1792, 4), dtype="uint32")' in text
    assert 'R.call_tir(linear_gemv_q8, (lv1, ' in text  # down takes gate_up's quantized output
    assert set(reg.chosen["linear_gemv"]) == {"int4_gemv_dp4a_silu_qout", "int4_gemv_dp4a_preq"}


_RING_MAIN = r"""
#include "cuda_host_emu.h"
#include "kernel_emu.h"
#include <cstdio>
#include <cstdlib>
template <int W, int R, int U, int KS, int G, int NOUT, bool SILU, bool Q, int D>
void launch(const void* x, const unsigned* qw, const half* qs, void* o) {
  constexpr int TEAMS = W / KS, H = SILU ? R / 2 : R, BLK = TEAMS * H;
  std::vector<unsigned char> smem(G * 4 * 16 + W * R * 4 + BLK * 4 + 16 + D * U * R * W * 32 * 16 + 16);
  unsigned char* sm = smem.data() + (16 - reinterpret_cast<size_t>(smem.data()) % 16) % 16;
  for (int bx = 0; bx < (NOUT + BLK - 1) / BLK; ++bx)
    emu_run_block(bx, 0, W * 32, [&](int) {
      edgellm_q4gemv_dp4a<W, R, U, KS, G, NOUT, 7, SILU, false, true, Q, Q, D>(x, qw, qs, o, sm); });
}
int main(int argc, char** argv) {  // case in.bin out.bin G rows nout
  int c = atoi(argv[1]), G = atoi(argv[4]), ROWS = atoi(argv[5]), NOUT = atoi(argv[6]);
  FILE* f = fopen(argv[2], "rb");
  std::vector<uint4> xq(G * 4);
  std::vector<half> x(G * 32), qs((size_t)ROWS * G);
  std::vector<unsigned> qw((size_t)ROWS * G * 4);
  size_t got = fread(x.data(), 2, x.size(), f) + fread(xq.data(), 16, xq.size(), f) + fread(qw.data(), 4, qw.size(), f)
      + fread(qs.data(), 2, qs.size(), f);
  fclose(f);
  if (got != x.size() + xq.size() + qw.size() + qs.size()) return 2;
  std::vector<uint4> out(NOUT);  // fp16 outputs or quantized words (QOUT)
  CASES
  f = fopen(argv[3], "wb");
  fwrite(out.data(), 16, out.size(), f);
  fclose(f);
}
"""

def _pack8(v: np.ndarray) -> np.ndarray:
    """eqd_quant8's words for float32 values v: uint32 [n / 8, 4] (int8 of elements 0, 2, 4, 6 | 1, 3, 5, 7, d,
    sum q)."""
    q, d = _quant8(v)
    words = np.zeros((len(d), 4), np.uint32)
    b = q.astype(np.int8).view(np.uint8).reshape(-1, 8)
    words[:, 0] = b[:, 0::2].copy().view(np.uint32).reshape(-1)
    words[:, 1] = b[:, 1::2].copy().view(np.uint32).reshape(-1)
    words[:, 2] = d.view(np.uint32)
    words[:, 3] = q.sum(1).astype(np.int32).view(np.uint32)
    return words


# (warps, rows, unroll, ksplit, G, outputs, silu + preq/qout): each at D = 0 and at the ring depths
RING_CASES = [
    (16, 2, 2, 2, 448, 33, False),  # Llama-3-8B's down split: 4 steps a lane, the last one's groups partly guarded
    (4, 4, 2, 1, 130, 16, True),  # the chain's gate_up + silu (preq in, qout out): 3 steps, ring after the outputs
    (8, 2, 1, 2, 100, 9, False),  # one group a step: 4 steps, a partial block
]


@pytest.mark.skipif(__import__("shutil").which("g++") is None, reason="the host emulation needs g++")
def test_cp_async_ring_gives_the_register_path_values(tmp_path, host_emu):
    """int4_gemv_dp4a with its weights through the cp.async ring (D steps ahead, 1..4; the copies emulated at once)
    gives the register path's outputs bit for bit: the same slots read back in the same order, guarded groups as
    zeros, the ring after a qout block's outputs."""
    from edgellm.kernels.cuda_gemv_dp4a import steps_per_lane

    runs = []
    for i, (w, r, u, k, g, n, silu) in enumerate(RING_CASES):
        ns = steps_per_lane(g * 32, u, k)
        for d in range(0, min(4, ns) + 1):
            runs.append((i, d))
    q = {True: "true", False: "false"}
    cases = "\n  ".join(
        f"if (c == {j}) launch<{w}, {r}, {u}, {k}, {g}, {n}, {q[silu]}, {q[silu]}, {d}>("
        f"{'xq.data()' if silu else 'x.data()'}, qw.data(), qs.data(), out.data());"
        for j, (i, d) in enumerate(runs) for (w, r, u, k, g, n, silu) in [RING_CASES[i]])
    host_emu({"kernel_emu.h": _host_source()}, _RING_MAIN.replace("CASES", cases))
    s = get_scheme("q4f16_1")
    outs: dict[int, list] = {}
    for j, (i, d) in enumerate(runs):
        w, r, u, k, g, n, silu = RING_CASES[i]
        rows = 2 * n if silu else n
        rng = np.random.default_rng(100 + i)  # the same inputs for every depth of a case
        qw, qs = ref.quantize(rng.standard_normal((rows, g * 32)).astype(np.float32) * 0.05, s)[:2]
        x = rng.standard_normal(g * 32).astype(np.float16)
        xq = _pack8(x.astype(np.float32))  # preq's input: x quantized as add_rms_norm_q8 leaves it
        (tmp_path / "in.bin").write_bytes(x.tobytes() + xq.tobytes() + qw.astype(np.uint32).tobytes()
                                          + qs.astype(np.float16).tobytes())
        subprocess.run(["./emu", str(j), "in.bin", "out.bin", str(g), str(rows), str(n)], cwd=tmp_path, check=True)
        outs.setdefault(i, []).append((d, (tmp_path / "out.bin").read_bytes()))
    for i, got in outs.items():
        (d0, base), *rest = got
        assert d0 == 0 and len(rest) >= 2, i
        assert any(base[2 * t:2 * t + 2] != b"\0\0" for t in range(4)), i  # the register path wrote outputs
        for d, out in rest:
            assert out == base, (i, d)
