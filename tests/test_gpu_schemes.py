"""CUDA kernels for the GGUF-grid rows (issue 14 item 2) without a GPU: q4f16_0 (the Q4_0 grid, offset 8), q4f16_2
(the Q4_1 grid, scale + min) and the 8-bit GEMV of q8f16_1 (the Q8_0 embedding / head).

* the fp16x2 decode identities of each grid are exact, and a numpy model of the GEMV's fp16 arithmetic (the
  kernel's accumulation order, fp16 rounding per FMA) stays within 1e-3 of float64 on the dequantized weights;
* the registry gives each row the kernel of its grid (never the offset-7 kernels), CUDA only, and the TE path
  elsewhere (Metal, OpenCL, WebGPU);
* the GEMV and the tensor-core GEMM build for sm_80 / sm_90 with each grid's constants;
* a tiny GGUF (Q4_1 or Q4_0 layers, Q8_0 embedding) compiles for CUDA with no --quant into the lossless row, with
  those kernels, and for Metal / Android / Vulkan through the TE kernels.
Their numbers on the H200 (numpy checks at Llama-3-8B shapes, timings, SmolLM2 fidelity): bench/gpu_schemes.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_gpu_kernels import _pick, cuda_source, needs_nvcc  # pytest puts tests/ on sys.path

from edgellm.quant import reference as ref
from edgellm.quant.schemes import get_scheme


def test_decode_identities_are_exact():
    """4-bit: (0x5000 | nib) - (32 + offset/32) == (nib - offset)/32 for offset 8 (Q4_0 grid) and 0 (Q4_1 grid);
    8-bit: (0x4000 | byte) - (2 + 128/512) == (byte - 128)/512; the byte pairs (b0, b2), (b1, b3) of a word."""
    from edgellm.kernels.cuda_gemv import H2_BASE_BITS, H2_BASE_BITS8, H2_SHIFT, H2_SHIFT8

    nib = np.arange(16, dtype=np.uint16)
    for off in (0, 7, 8):
        c = np.uint16(0x5000 + off).view(np.float16)
        assert float(c) == 32 + off / 32
        got = (nib | np.uint16(H2_BASE_BITS & 0xFFFF)).view(np.float16) - c
        np.testing.assert_array_equal(got.astype(np.float64), (nib.astype(np.float64) - off) / 2**H2_SHIFT)
    byte = np.arange(256, dtype=np.uint16)
    c8 = np.uint16(0x4080).view(np.float16)
    assert float(c8) == 2 + 128 / 512
    got = (byte | np.uint16(H2_BASE_BITS8 & 0xFFFF)).view(np.float16) - c8
    np.testing.assert_array_equal(got.astype(np.float64), (byte.astype(np.float64) - 128) / 2**H2_SHIFT8)
    w = np.random.default_rng(0).integers(0, 2**32, 100, dtype=np.uint64).astype(np.uint32)
    for sh in (0, 1):
        pair = (w >> np.uint32(8 * sh)) & np.uint32(0x00FF00FF)
        np.testing.assert_array_equal(pair & 0xFF, (w >> np.uint32(8 * sh)) & 0xFF)
        np.testing.assert_array_equal(pair >> 16, (w >> np.uint32(8 * sh + 16)) & 0xFF)
    # 1/32 for the sum of x (the asymmetric rows' min term) is 0x2800 in fp16
    assert np.uint16(0x2800).view(np.float16) == np.float16(1 / 32)


def _fma16(a, b, c):
    return (a.astype(np.float64) * b + c.astype(np.float64)).astype(np.float16)


def _gemv_model(x: np.ndarray, qw: np.ndarray, qs: np.ndarray, scheme, qm=None) -> np.ndarray:
    """The fp16x2 GEMV's arithmetic (int4_gemv_h2 / int8_gemv_h2) in numpy: per row and group, two fp16
    accumulator pairs (even and odd words) updated by fp16 FMAs of the scaled centred weights, in the kernel's
    order; per group in fp32: the four halves times scale * 2^shift, plus (asymmetric rows) min * 32 * the
    group's fp16 sum of x / 32 (two chains) times (min + 8 scale)."""
    out_f = qw.shape[0]
    bits, wpg = scheme.bits, 32 * scheme.bits // 32
    groups = qw.shape[1] // wpg
    off = 8 if scheme.zero_point else scheme.offset  # the asymmetric rows: (q - 8) d + (min + 8 d)
    unit = 32.0 if bits == 4 else 512.0
    xg = x.astype(np.float16).reshape(groups, 32)
    w = qw.reshape(out_f, groups, wpg)
    acc = np.zeros((2, out_f, groups), np.float16)
    per = 8 if bits == 4 else 4
    for q in range(wpg):
        for e in range(per):
            val = (w[:, :, q] >> np.uint32(bits * e)) & np.uint32((1 << bits) - 1)
            h = (val.astype(np.float64) - off) / unit  # exact in fp16 (test above)
            acc[q % 2] = _fma16(h, xg[None, :, q * per + e].astype(np.float64), acc[q % 2])
    dot = acc.astype(np.float32).sum(0)  # the kernel adds the 4 halves in fp32
    out = dot * (qs.astype(np.float32) * np.float32(unit))
    if scheme.zero_point:
        xs = np.zeros((4, groups), np.float16)  # two fp16x2 chains over the 16 pairs (x[2j], x[2j + 1])
        for i in range(32):
            k = (i // 2) % 2 * 2 + i % 2
            xs[k] = _fma16(xg[:, i].astype(np.float64), 1 / 32, xs[k])
        out = out + (xs.astype(np.float32).sum(0) * 32)[None] * (qm.astype(np.float32) + 8 * qs.astype(np.float32))
    return out.astype(np.float64).sum(1)


@pytest.mark.parametrize("row", ["q4f16_0", "q4f16_2", "q8f16_1"])
@pytest.mark.parametrize("outliers", [False, True])
def test_gemv_arithmetic_error_within_tolerance(row, outliers):
    scheme = get_scheme(row)
    rng = np.random.default_rng(5)
    in_f, out_f = 1024, 128
    w = rng.standard_normal((out_f, in_f)).astype(np.float32) * 0.05 + (0.02 if scheme.zero_point else 0)
    parts = ref.quantize(w, scheme)
    x = rng.standard_normal(in_f).astype(np.float16)
    if outliers:
        x[rng.choice(in_f, 8, replace=False)] = rng.choice([-2000.0, 2000.0], 8)
    qm = parts[2] if scheme.zero_point else None
    expect = ref.dequantize(parts[0], parts[1], in_f, scheme, qm).astype(np.float64) @ x.astype(np.float64)
    got = _gemv_model(x, parts[0], parts[1], scheme, qm)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - expect) / np.linalg.norm(expect) < 1e-3


def test_registry_gives_each_grid_its_kernel():
    from edgellm.kernels import cuda_gemv
    from edgellm.targets import resolve

    cuda, metal, android = resolve("cuda-sm90").tvm(), resolve("metal").tvm(), resolve("android").tvm()
    for row, suffix, nparams in (("q4f16_1", "", 4), ("q4f16_0", "_o8", 4), ("q4f16_2", "_min", 5)):
        name, f = _pick(cuda, 1, 4096, 6144, row)  # auto: int8 activations for the symmetric grids at this `in`
        assert name == ("int4_gemv_fp16x2_smem" if row == "q4f16_2" else "int4_gemv_dp4a") + suffix
        assert len(f.params) == nparams
        name, f = _pick(cuda, 1, 4096, 6144, row, cuda_gemv="fp16x2-smem")
        assert name == "int4_gemv_fp16x2_smem" + suffix and len(f.params) == nparams
        name, f = _pick(cuda, 1, 4096, 6144, row, cuda_gemv="fp16x2")
        assert name == "int4_gemv_fp16x2" + suffix and len(f.params) == nparams
        name, f = _pick(cuda, None, 4096, 6144, row, cuda_gemm_small="gemm")
        assert name == "int4_gemm_wgmma" + suffix and len(f.params) == nparams  # sm_90: the wgmma GEMM
    assert str(_pick(cuda, 1, 4096, 6144, "q4f16_0", cuda_gemv="fp16x2-smem")[1].attrs["edgellm.gemv"]).removesuffix(
        "_pf").endswith("_q4o8")
    assert str(_pick(cuda, 1, 4096, 6144, "q4f16_2")[1].attrs["edgellm.gemv"]).removesuffix("_pf").endswith("_q4o8z")
    name, f = _pick(cuda, 1, 2048, 128256, "q8f16_1")
    assert name == "int8_gemv_fp16x2" and str(f.attrs["edgellm.gemv"]) == "h2_w{}r{}u{}k{}_q8o128".format(
        *cuda_gemv.int8_gemv_config(2048, 128256))
    # `in` not a multiple of 64: the first tensor-core GEMM decodes the offset-7 grid only
    assert _pick(cuda, None, 96, 64, "q4f16_1")[0] == "int4_gemm_mma_half2"
    assert _pick(cuda, None, 96, 64, "q4f16_0")[0] == "gemm_simt"
    assert _pick(cuda, None, 96, 64, "q4f16_2")[0] == "gemm_simt"
    # fp32 activations: the TE GEMV's offset-7 trick only for q4f32_1
    assert _pick(cuda, 1, 4096, 64, "q4f32_1")[0] == "int4_gemv_te"
    assert _pick(cuda, 1, 4096, 64, "q4f32_0")[0] == "gemv_te_gpu"
    assert _pick(cuda, 1, 4096, 64, "q4f32_3")[0] == "gemv_te_gpu"
    for target in (metal, android):
        for row in ("q4f16_0", "q4f16_2", "q8f16_1"):
            assert _pick(target, 1, 128, 64, row)[0] == "gemv_te_gpu"


def test_te_linear_decodes_every_grid():
    """The generic kernels (Metal, OpenCL, WebGPU, and CUDA's fallbacks) on the new rows against numpy, run on the
    host CPU unscheduled."""
    import tvm

    from edgellm.kernels import te_linear

    rng = np.random.default_rng(2)
    in_f, out_f = 96, 24
    for row in ("q4f16_0", "q4f32_0", "q4f16_2", "q4f32_3"):
        scheme = get_scheme(row)
        act = scheme.act_dtype
        parts = ref.quantize(rng.standard_normal((out_f, in_f)).astype(np.float32), scheme)
        x = rng.standard_normal((3, in_f)).astype(act)
        qm = parts[2] if scheme.zero_point else None
        expect = x.astype(np.float64) @ ref.dequantize(parts[0], parts[1], in_f, scheme, qm).astype(np.float64).T
        func = te_linear.linear(3, in_f, out_f, scheme, act, False)
        mod = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
        dev = tvm.cpu()
        out = tvm.runtime.tensor(np.zeros((3, out_f), act), dev)
        mod["main"](*[tvm.runtime.tensor(a, dev) for a in [x, *parts]], out)
        tol = 2e-3 if act == "float16" else 1e-5
        np.testing.assert_allclose(out.numpy().astype(np.float64), expect, rtol=tol, atol=tol * np.abs(expect).max())


@needs_nvcc
@pytest.mark.parametrize("preset", ["cuda-sm80", "cuda-sm90"])
def test_grid_kernels_build(preset):
    from edgellm.kernels import cuda_gemm, cuda_gemv
    from edgellm.kernels.schedule_gpu import h2_gemv_config

    funcs = {}
    for tag, off, zp in (("o8", 8, False), ("zp", 7, True)):
        funcs[f"v_{tag}"] = cuda_gemv.int4_gemv_h2(4096, 6144, False, *h2_gemv_config(4096, 6144), offset=off,
                                                   zero_point=zp)
        funcs[f"vt_{tag}"] = cuda_gemv.int4_gemv_h2(576, 77, True, 4, 2, 1, 1, offset=off, zero_point=zp)
        funcs[f"xs_{tag}"] = cuda_gemv.int4_gemv_h2(14336, 4096, True, 8, 2, 2, 2, offset=off, zero_point=zp,
                                                    xsmem=True, fold_shift=True)
        funcs[f"g_{tag}"] = cuda_gemm.int4_gemm_tc2(4096, 1024, False, *cuda_gemm.tc2_choice(4096, 1024),
                                                    offset=off, zero_point=zp)
        funcs[f"gb_{tag}"] = cuda_gemm.int4_gemm_tc2(576, 960, True, offset=off, zero_point=zp)
    funcs["q8_head"] = cuda_gemv.int8_gemv_h2(2048, 128256, False, *cuda_gemv.int8_gemv_config(2048, 128256))
    funcs["q8_short"] = cuda_gemv.int8_gemv_h2(576, 77, True)
    src = cuda_source(funcs, preset)
    assert "0x50085008u" in src and "0x40804080u" in src  # each grid's constant (the Q4_1 grid centred at 8)
    assert "0x28002800u" in src  # the sum of x / 32 for the min term
    assert "0xC080C080u" in src  # the folded-shift decode's -(2 + 8/32) (both grids centre at 8 there)
    assert "1, 8, false>" in src and "1, 0, true>" in src  # the GEMM's template arguments
    assert all(f" {name}_kernel(" in src for name in funcs)


@pytest.fixture(scope="module")
def grid_ggufs(tmp_path_factory, checkpoints):
    import gguf
    from gguf_writer import write_gguf

    root = tmp_path_factory.mktemp("grids")

    def encoder(layer: str):
        def encode(name, arr):
            if arr.ndim != 2:
                return None
            t = gguf.GGMLQuantizationType["Q8_0" if "embed_tokens" in name else layer]
            return gguf.quants.quantize(arr, t), t
        return encode

    return {t: write_gguf(checkpoints["llama"], root / f"{t}.gguf", encode=encoder(t)) for t in ("Q4_1", "Q4_0")}


@needs_nvcc
@pytest.mark.parametrize("layer,preset,row,gemv", [
    ("Q4_1", "cuda-sm90", "q4f16_2", "int4_gemv_fp16x2_smem_min"),
    ("Q4_0", "cuda-sm80", "q4f16_0", "int4_gemv_fp16x2_smem_o8"),
    ("Q4_0", "metal", "q4f16_0", "gemv_te_gpu"),
    # Vulkan's Q4_1 -> q4f32_3: the real SmolLM2 GGUF compiles into it (tests/test_vulkan_target.py)
])
def test_gguf_compiles_into_its_grid(grid_ggufs, tmp_path, layer, preset, row, gemv):
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions

    res = compile_model(CompileArgs(model=str(grid_ggufs[layer]), output=tmp_path / "art", target=preset,
                                    runtime=RuntimeOptions(context_window=128, prefill_chunk=64)))
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert m["quant"]["scheme"] == row and m["quant"]["choice"]["scheme"] == row
    assert m["quant"]["choice"]["source_layer_types"] == {layer: 14}
    assert f"scheme: {row} (source layers {layer} x 14" in res.summary()
    chosen = m["kernels"]["chosen"]
    assert gemv in chosen["linear_gemv"]
    if preset.startswith("cuda"):  # the untied head, from Q4 layers' row; the Q8_0 embedding stays 8-bit
        assert m["quant"]["precision"]["embedding"] == "q8f16_1"
