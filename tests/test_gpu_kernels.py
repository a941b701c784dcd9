"""The CUDA kernels' arithmetic and schedules, without a GPU.

* kernels/cuda_gemv.py's INT4 GEMV (float trick for `nib - 7`, scale once per group) runs unscheduled on the host
  CPU and must match the numpy reference on the dequantized weights;
* the CUDA schedules (decode GEMV, tiled prefill GEMM) build to a fatbin for sm_80 and sm_90;
* the pipeline picks the GEMV variant only where it computes the same function (4-bit, group 32, no zero point);
* the fp16x2 GEMV (kernels/cuda_gemv.int4_gemv_h2, CUDA only): its decode identities exactly, a numpy model of its
  fp16 arithmetic against float64 (random and outlier activations), and its builds;
* a CUDA build of `decode` replays captured CUDA graphs (vm.builtin.cuda_graph.run_or_capture in its VM code).
The numbers on a real GPU (numpy checks of every kernel at Llama-3-8B shapes, timings) come from bench/gpu_run.py.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from edgellm.quant import reference as ref
from edgellm.quant.schemes import get_scheme

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA builds need nvcc")


def cuda_source(funcs: dict, preset: str = "cuda-sm90") -> str:
    """Build PrimFuncs (name -> func) for a CUDA preset the way the pipeline does; the generated CUDA source."""
    import tvm

    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.targets import resolve

    target = resolve(preset).tvm()
    prepare_cuda_build()
    with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        lib = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}), target=target)
    return lib.mod.imports[0].inspect_source()


@pytest.mark.parametrize("act,in_f,out_f,bias", [("float16", 96, 40, True), ("float16", 64, 7, False),
                                                 ("float32", 320, 33, False), ("float32", 32, 5, True)])
def test_int4_gemv_matches_numpy(act, in_f, out_f, bias):
    import tvm

    from edgellm.kernels import cuda_gemv as gpu_kernels

    scheme = get_scheme("q4f16_1" if act == "float16" else "q4f32_1")
    rng = np.random.default_rng(in_f * 7 + out_f)
    func = gpu_kernels.int4_gemv(in_f, out_f, act, scheme.scale_dtype, act, bias)
    mod = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    x = rng.standard_normal((1, in_f)).astype(act)
    w = rng.standard_normal((out_f, in_f)).astype(np.float32)
    b = rng.standard_normal(out_f).astype(act)
    qw, qs = ref.quantize(w, scheme)[:2]
    expect = x.astype(np.float64) @ ref.dequantize(qw, qs, in_f, scheme).astype(np.float64).T
    expect += b.astype(np.float64) if bias else 0
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.full((1, out_f), np.nan, act), dev)
    mod["main"](*[tvm.runtime.tensor(a, dev) for a in [x, qw, qs] + ([b] if bias else [])], out)
    tol = 2e-3 if act == "float16" else 1e-5
    np.testing.assert_allclose(out.numpy().astype(np.float64), expect, rtol=tol, atol=tol * np.abs(expect).max())


def test_centered_nibble_trick_is_exact():
    """float(0x4B000000 | nib) - (2^23 + 7) == nib - 7 for every nibble (the identity the GEMV relies on)."""
    from edgellm.kernels.cuda_gemv import MAGIC, QMAX

    nib = np.arange(16, dtype=np.uint32)
    got = (nib | np.uint32(MAGIC)).view(np.float32) - np.float32(2**23 + QMAX)
    np.testing.assert_array_equal(got, nib.astype(np.float32) - QMAX)


def _pick(target, rows, in_f, out_f, scheme_name, bias=False, **options):
    """(kernel name, scheduled PrimFunc) the registry gives a linear of this shape and scheme."""
    from edgellm.kernels import KernelOptions, KernelRegistry

    reg = KernelRegistry(target, KernelOptions(**options))
    s = get_scheme(scheme_name)
    func = reg.linear(rows, in_f, out_f, s, s.act_dtype, bias)
    (name,) = reg.chosen["linear_gemv" if rows == 1 else "linear"]
    return name, func


def test_te_int4_gemv_only_where_it_is_the_same_function():
    from edgellm.targets import resolve

    cuda, metal = resolve("cuda-sm90").tvm(), resolve("metal").tvm()
    assert _pick(cuda, 1, 128, 64, "q4f16_1", cuda_gemv="te")[0] == "int4_gemv_te"
    assert _pick(cuda, 1, 128, 64, "q4f16_1", bias=True, cuda_gemv="te")[0] == "int4_gemv_te"
    assert _pick(metal, 1, 128, 64, "q4f16_1")[0] == "gemv_te_gpu"  # CUDA only
    assert _pick(cuda, 1, 80, 64, "q4f16_1")[0] == "gemv_te_gpu"  # `in` padded to whole groups
    assert _pick(cuda, 1, 128, 64, "q0f16")[0] == "gemv_te_gpu"  # dense weight
    assert _pick(cuda, None, 128, 64, "q4f16_1", cuda_gemm="simt")[0] == "gemm_simt"  # not a GEMV


@needs_nvcc
@pytest.mark.parametrize("preset", ["cuda-sm80", "cuda-sm90"])
def test_cuda_schedules_build(preset):
    import tvm

    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.targets import resolve

    target = resolve(preset).tvm()
    shapes = {  # decode GEMVs (one row, two rows per warp, bias, small `in`) and prefill GEMMs (INT4, dense)
        "gemv_a": (1, 4096, 6144, "q4f16_1"), "gemv_b": (1, 576, 1536, "q4f16_1", True),
        "gemv_c": (1, 2048, 128, "q4f32_1"), "gemm_a": (None, 4096, 1024, "q4f16_1"),
        "gemm_b": (None, 256, 320, "q0f16", True), "gemm_c": (None, 64, 128, "q0f32"),
        "gemm_d": (None, 4096, 1024, "q4f32_1"),
    }
    scheduled = {}
    for name, shape in shapes.items():
        _, s = _pick(target, *shape)
        assert s is not None and s.attrs["tirx.is_scheduled"]
        scheduled[name] = s.with_attr("global_symbol", name)
    assert str(scheduled["gemv_a"].attrs["edgellm.gemv"]).startswith("dp4a_")  # fp16, `in` 4096: int8 activations
    assert str(scheduled["gemv_b"].attrs["edgellm.gemv"]).startswith("h2_")  # fp16, `in` 576: the fp16x2 GEMV
    assert "group_dot" in scheduled["gemv_c"].script()  # fp32 activations: the TE INT4 GEMV and its schedule
    assert str(scheduled["gemm_a"].attrs["edgellm.gemm"]).startswith(  # fp16 INT4: tensor cores (wgmma on sm_90)
        "wgmma" if preset == "cuda-sm90" else "tc2_cp_async")
    assert 'scope="shared"' in scheduled["gemm_d"].script()  # fp32 INT4: the FMA tiled GEMM, tiles in shared memory
    prepare_cuda_build()
    with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        tvm.compile(tvm.IRModule(scheduled), target=target)


@needs_nvcc
def test_cuda_decode_replays_a_cuda_graph(cuda_tiny_build):
    """The CUDA backend's RewriteCUDAGraph captures decode's static-shape kernel runs between attention calls."""
    text = cuda_tiny_build()  # the defaults (tests/test_cuda_pdl.py checks the same build's kernels)
    decode = text["vm"].split("@decode:")[1].split("\n@")[0]
    layers = 2  # the tiny llama checkpoint
    assert decode.count("vm.builtin.cuda_graph.run_or_capture") == layers + 1
    assert decode.count("vm.builtin.attention_kv_cache_attention_with_fused_qkv") == layers  # outside the graphs
    # the residual add and the next norm go into the next GEMV (--opt cuda_fuse=auto at this hidden size: gate_up of
    # each layer, qkv of layer 1; layer 0's qkv stages its norm of the embedding, no add), silu(gate) * up into
    # gate_up's epilogue; the final norm before the 8-bit head is gpu_math.add_rms_norm_gpu (the 8-bit GEMV has no
    # norm prologue), nothing else adds or norms; prefill keeps the separate kernels; the artifact exports the
    # device argmax the Engine's greedy decode uses
    decode_and_graphs = text["vm"].split("@decode:")[1].split("\n@prefill:")[0]
    assert decode_and_graphs.count("call  linear_gemv_norm") == 2 * layers
    assert decode_and_graphs.count("call  add_rms_norm") == 1
    assert decode_and_graphs.count("call  rms_norm") == 0
    assert decode_and_graphs.count("call  silu_mul") == 0
    prefill = text["vm"].split("@prefill:")[1].split("\n@")[0]
    assert "linear_gemv_norm" not in prefill
    from edgellm.artifact import Artifact

    m = Artifact.open(text["out"]).manifest
    assert "argmax" in m["functions"]
    fused = {"int4_gemv_fp16x2_smem_norm_silu", "int4_gemv_fp16x2_smem_norm", "int4_gemv_fp16x2_smem_norm_noadd"}
    assert fused <= set(m["kernels"]["chosen"]["linear_gemv"]) and m["kernels"]["options"]["cuda_fuse"] == "auto"


@needs_nvcc
def test_cuda_decode_with_a_4bit_head(cuda_tiny_build):
    """With a 4-bit head (--head q4: the rows of a pure Q4_0 GGUF) the one-token decode is the default's but for the
    head's GEMV: layer 0's qkv stages its norm, the final add + norm stays add_rms_norm_gpu (staged by the 8B's head
    GEMV instead it cost 23 us a token: docs/benchmarks/h200-pdl.md run 26); prefill keeps its kernels. On the GPU:
    bench/gpu_pdl.py's tiny owned-hq4 against numpy."""
    text = cuda_tiny_build(head="q4", cuda_pdl="off")  # the decode's calls are the same with PDL (test_cuda_pdl.py)
    layers = 2
    body = text["vm"].split("@decode:")[1].split("\n@prefill:")[0]
    assert body.count("call  linear_gemv_norm") == 2 * layers  # qkv x 2, gate_up x 2
    assert body.count("call  add_rms_norm") == 1 and body.count("call  rms_norm") == 0
    prefill = text["vm"].split("@prefill:")[1].split("\n@")[0]
    assert "linear_gemv_norm" not in prefill and "add_rms_norm" in prefill


@needs_nvcc
def test_gpu_math_kernels_build():
    """gpu_math's add_rms_norm (hidden not a multiple of the block: SmolLM2's 576), silu_mul and argmax (a
    vocabulary not a multiple of the block) compile for sm_90; 16-byte vectors where the width allows."""

    from edgellm.kernels.cuda_math import add_rms_norm_gpu, argmax_final_gpu, argmax_partial_gpu, silu_mul_gpu

    funcs = {"arn": add_rms_norm_gpu(576, 1e-5, "float16"), "arn32": add_rms_norm_gpu(4096, 1e-6, "float32"),
             "arn_odd": add_rms_norm_gpu(100, 1e-5, "float16"), "am1": argmax_partial_gpu(49152 + 5),
             "am2": argmax_final_gpu(49152 + 5),
             "sm": silu_mul_gpu(14336, "float16"), "sm_odd": silu_mul_gpu(100, "float16")}
    src = cuda_source(funcs)
    for name in funcs:
        assert f"{name}_kernel(" in src
    # argmax: a tree of 8 levels (256 threads) per slice, then 6 (64 slices), two barriers per level
    assert src.split("am1_kernel(")[-1].split("extern")[0].count("__syncthreads()") == 1 + 2 * 8
    assert src.split("am2_kernel(")[-1].split("extern")[0].count("__syncthreads()") == 1 + 2 * 6
    arn = src.split("arn_kernel(")[-1].split("extern")[0]
    assert "*(uint4*)(x_ptr" in arn and "__shfl_xor_sync" in arn  # 16-byte loads (8 fp16), warp-shuffle sums
    assert "uint4" not in src.split("arn_odd_kernel(")[-1].split("extern")[0]  # 100 fp16: element by element
    assert "*(uint4*)(x_ptr" in src.split("sm_kernel(")[-1].split("extern")[0]
    with pytest.raises(ValueError, match="power of two"):
        add_rms_norm_gpu(576, 1e-5, "float16", threads=96)
    with pytest.raises(ValueError, match="warp size"):
        add_rms_norm_gpu(576, 1e-5, "float16", threads=16)


# ---- the fp16x2 decode GEMV (int4_gemv_h2) -------------------------------------------------------------------


def test_h2_decode_identities_are_exact():
    """(0x5000 | nib) as fp16 minus (32 + 7/32) is (nib - 7) / 32 exactly; `(w >> 4s) & 0x000F000F` holds nibbles s
    and s + 4 of w; the two permutes per pair build (x[s], x[s + 4]) from the 16 bytes x[0..7]."""
    from edgellm.kernels.cuda_gemv import H2_BASE_BITS, H2_SHIFT, QMAX

    nib = np.arange(16, dtype=np.uint16)
    base = np.uint16(H2_BASE_BITS & 0xFFFF)
    got = (nib | base).view(np.float16) - np.float16(32 + QMAX / 32)
    np.testing.assert_array_equal(got.astype(np.float64), (nib.astype(np.float64) - QMAX) / 2**H2_SHIFT)
    assert np.float16(32 + QMAX / 32).view(np.uint16) == 0x5007  # the constant H2_FMA_SUB subtracts
    rng = np.random.default_rng(0)
    w = rng.integers(0, 2**32, 1000, dtype=np.uint64).astype(np.uint32)
    for s in range(4):
        pair = (w >> np.uint32(4 * s)) & np.uint32(0x000F000F)
        np.testing.assert_array_equal(pair & 0xF, (w >> np.uint32(4 * s)) & 0xF)
        np.testing.assert_array_equal(pair >> 16, (w >> np.uint32(4 * s + 16)) & 0xF)
    x = rng.standard_normal(8).astype(np.float16)
    xv = x.view(np.uint32)  # (x0, x1) (x2, x3) (x4, x5) (x6, x7), low half first
    xp = [(xv[0] & 0xFFFF) | (xv[2] << 16), (xv[0] >> 16) | (xv[2] & 0xFFFF0000),
          (xv[1] & 0xFFFF) | (xv[3] << 16), (xv[1] >> 16) | (xv[3] & 0xFFFF0000)]
    for s in range(4):
        np.testing.assert_array_equal(np.array([xp[s]], np.uint32).view(np.float16), [x[s], x[s + 4]])


def _h2_model(x: np.ndarray, qw: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """int4_gemv_h2's arithmetic in numpy: per row and group, two fp16x2 accumulators (even and odd words) updated
    by fp16 FMAs (one rounding each) in the kernel's order, then fp32 per group times the scale."""
    out_f, words = qw.shape
    groups = words // 4
    xg = x.reshape(groups, 4, 8).astype(np.float64)  # [group, word, element]
    w = qw.reshape(out_f, groups, 4)
    acc = np.zeros((2, out_f, groups, 2), np.float16)  # [word parity, row, group, half]
    for q in range(4):
        for s in range(4):
            nib = np.stack([(w[:, :, q] >> np.uint32(4 * s)) & 0xF, (w[:, :, q] >> np.uint32(4 * s + 16)) & 0xF], -1)
            h = (nib.astype(np.float64) - 7) / 32  # exact in fp16 (test above)
            xs = np.stack([xg[:, q, s], xg[:, q, s + 4]], -1)[None]
            acc[q % 2] = (h * xs + acc[q % 2].astype(np.float64)).astype(np.float16)
    a = acc.astype(np.float32)
    dot = (a[0, ..., 0] + a[0, ..., 1]) + (a[1, ..., 0] + a[1, ..., 1])
    return (dot * (qs.astype(np.float32) * np.float32(32))).astype(np.float64).sum(1)


def _xs_model(x: np.ndarray, qw: np.ndarray, qs: np.ndarray, offset: int = 7) -> np.ndarray:
    """int4_gemv_h2(xsmem=True, fold_shift=True) in numpy: x staged as the kernel stages it (word j = 4g + q of x
    -> slot q * G + g, its pairs (x0,x4) (x1,x5) (x2,x6) (x3,x7)), read back per (group, word); nibble pairs
    (2h, 2h+4) decoded as `((w >> 8h) & 0x000F000F | 0x5000) - c` and (2h+1, 2h+5) as
    `fma((w >> 8h) & 0x00F000F0 | 0x5000, 1/16, c16)`, with the constants taken from the kernel's own PTX strings,
    each fp16 op rounded once."""
    import re

    from edgellm.kernels.cuda_gemv import H2_BASE_BITS, h2_fma_sub, h2_fma_sub16

    def consts(src):
        return [np.array([int(c, 16) & 0xFFFF], np.uint16).view(np.float16)[0] for c in re.findall(r"0x([0-9A-F]{8})u",
                                                                                                   src)]

    (c,) = consts(h2_fma_sub(0x50005000 + offset * 0x10001))
    mul16, c16 = consts(h2_fma_sub16(offset))
    out_f, words = qw.shape
    groups = words // 4
    x32 = x.astype(np.float16).view(np.uint32)  # (x0, x1) pairs
    xsh = np.zeros((4 * groups, 4), np.uint32)
    for j in range(4 * groups):  # the staging loop
        a = x32[4 * j: 4 * j + 4]
        xsh[(j % 4) * groups + j // 4] = [(a[0] & 0xFFFF) | (a[2] << 16), (a[0] >> 16) | (a[2] & 0xFFFF0000),
                                          (a[1] & 0xFFFF) | (a[3] << 16), (a[1] >> 16) | (a[3] & 0xFFFF0000)]
    base = np.uint32(H2_BASE_BITS)
    w = qw.reshape(out_f, groups, 4)
    acc = np.zeros((2, out_f, groups, 2), np.float16)
    f64 = np.float64
    for q in range(4):
        xp = xsh[q * groups: (q + 1) * groups].view(np.float16).reshape(groups, 4, 2).astype(f64)  # [g, pair, half]
        for h in range(2):
            wh = w[:, :, q] >> np.uint32(8 * h)
            lo = (((wh & np.uint32(0x000F000F)) | base)[..., None].view(np.float16)).astype(f64)
            hi = (((wh & np.uint32(0x00F000F0)) | base)[..., None].view(np.float16)).astype(f64)
            d_lo = (lo - f64(c)).astype(np.float16).astype(f64)
            d_hi = (hi * f64(mul16) + f64(c16)).astype(np.float16).astype(f64)
            acc[q % 2] = (d_lo * xp[None, :, 2 * h] + acc[q % 2].astype(f64)).astype(np.float16)
            acc[q % 2] = (d_hi * xp[None, :, 2 * h + 1] + acc[q % 2].astype(f64)).astype(np.float16)
    a = acc.astype(np.float32)
    dot = (a[0, ..., 0] + a[0, ..., 1]) + (a[1, ..., 0] + a[1, ..., 1])
    return (dot * (qs.astype(np.float32) * np.float32(32))).astype(np.float64).sum(1)


def _gemv_inputs(rng, in_f: int, out_f: int, outliers: bool):
    """Random packed q4f16_1 weights (any nibbles), scales in [0.001, 0.021) and fp16 x, with 8 activation outliers
    of +-2000 when asked: the inputs of the GEMV arithmetic models' tests."""
    qw = rng.integers(0, 2**32, size=(out_f, in_f // 8), dtype=np.uint64).astype(np.uint32)
    qs = (rng.random((out_f, in_f // 32)) * 0.02 + 0.001).astype(np.float16)
    x = rng.standard_normal(in_f).astype(np.float16)
    if outliers:
        x[rng.choice(in_f, 8, replace=False)] = rng.choice([-2000.0, 2000.0], 8)
    return qw, qs, x


@pytest.mark.parametrize("outliers", [False, True])
def test_xs_fold_model_equals_h2_and_numpy(outliers):
    """The shared-memory kernel's staging and folded-shift decode compute the fp16x2 kernel's values exactly (same
    roundings in the same order: the model outputs are equal bit for bit), and stay within 1e-3 of float64; the Q4_0
    grid's constant (offset 8) too."""
    rng = np.random.default_rng(11)
    in_f, out_f = 512, 64
    qw, qs, x = _gemv_inputs(rng, in_f, out_f, outliers)
    got = _xs_model(x, qw, qs)
    np.testing.assert_array_equal(got, _h2_model(x, qw, qs))
    expect = ref.dequantize(qw, qs, in_f, get_scheme("q4f16_1")).astype(np.float64) @ x.astype(np.float64)
    assert np.linalg.norm(got - expect) / np.linalg.norm(expect) < 1e-3
    expect8 = ref.dequantize(qw, qs, in_f, get_scheme("q4f16_0")).astype(np.float64) @ x.astype(np.float64)
    got8 = _xs_model(x, qw, qs, offset=8)
    assert np.linalg.norm(got8 - expect8) / np.linalg.norm(expect8) < 1e-3


@pytest.mark.parametrize("outliers", [False, True])
def test_h2_arithmetic_error_within_tolerance(outliers):
    """The fp16x2 model against numpy float64 on the dequantized weights: relative error under 1e-3 (4.6-5.0e-4 on
    the H100), also with activation outliers of +-2000 (no fp16 overflow: the weights are scaled by 1/32)."""
    scheme = get_scheme("q4f16_1")
    rng = np.random.default_rng(3)
    in_f, out_f = 1024, 256
    qw, qs, x = _gemv_inputs(rng, in_f, out_f, outliers)
    expect = ref.dequantize(qw, qs, in_f, scheme).astype(np.float64) @ x.astype(np.float64)
    got = _h2_model(x, qw, qs)
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - expect) / np.linalg.norm(expect) < 1e-3
    # worst case for the fp16 accumulator: every nibble 15 ((15 - 7) / 32 = 1/4), x at 16000 with one sign
    qmax = np.full((1, in_f // 8), 0xFFFFFFFF, np.uint32)
    got = _h2_model(np.full(in_f, 16000, np.float16), qmax, np.full((1, in_f // 32), 1, np.float16))
    np.testing.assert_allclose(got, [16000 * 8 * in_f], rtol=1e-3)


def test_h2_rejects_what_it_does_not_cover():
    from edgellm.kernels import cuda_gemv as gpu_kernels

    assert not gpu_kernels.h2_supports(4096, "float32", "float32", "float32")
    assert not gpu_kernels.h2_supports(80, "float16", "float16", "float16")
    with pytest.raises(ValueError, match="multiple of 32"):
        gpu_kernels.int4_gemv_h2(80, 16, False)
    with pytest.raises(ValueError, match="multiple of ksplit"):
        gpu_kernels.int4_gemv_h2(128, 16, False, warps=6, ksplit=4)
    with pytest.raises(ValueError, match="unroll must be >= 1"):
        gpu_kernels.int4_gemv_h2(128, 16, False, unroll=0)


def test_registry_picks_fp16x2_gemv_only_for_fp16():
    from edgellm.kernels import KernelOptionError
    from edgellm.kernels import schedule_gpu as gs
    from edgellm.targets import resolve

    from edgellm.kernels.cuda_gemv import prefetches_l2, xs_gemv_config

    cuda, metal = resolve("cuda-sm90").tvm(), resolve("metal").tvm()
    for in_f, out_f in ((4096, 6144), (4096, 28672), (14336, 4096), (4096, 128256), (576, 960)):
        name, h2 = _pick(cuda, 1, in_f, out_f, "q4f16_1", bias=True)  # the default: x staged in shared memory
        w, r, u, k, fold = xs_gemv_config(in_f, out_f)
        assert name == "int4_gemv_fp16x2_smem"
        assert str(h2.attrs["edgellm.gemv"]) == f"h2_w{w}r{r}u{u}k{k}_xs" + ("_fs" if fold else "") + (
            "_pf" if prefetches_l2(in_f, out_f) else "")  # PDL: its rows into L2 before the wait, up to 16 MB
        assert "griddepcontrol.wait" in h2.script()  # sm_90: programmatic dependent launch (--opt cuda_pdl=auto)
        assert len(h2.params) == 5  # x, q_weight, q_scale, bias, out: the signature of the function it replaces
    name, h2 = _pick(cuda, 1, 4096, 6144, "q4f16_1", bias=True, cuda_gemv="fp16x2")  # the previous default
    assert name == "int4_gemv_fp16x2"
    assert str(h2.attrs["edgellm.gemv"]) == "h2_w{}r{}u{}k{}".format(*gs.h2_gemv_config(4096, 6144))
    assert len(h2.params) == 5
    assert _pick(cuda, 1, 4096, 64, "q4f32_1")[0] == "int4_gemv_te"  # fp32 activations
    assert _pick(metal, 1, 128, 64, "q4f16_1")[0] == "gemv_te_gpu"  # CUDA only
    assert _pick(cuda, 1, 80, 64, "q4f16_1")[0] == "gemv_te_gpu"  # `in` padded to whole groups
    name, te = _pick(cuda, 1, 4096, 6144, "q4f16_1", cuda_gemv="te")
    assert name == "int4_gemv_te" and "group_dot" in te.script()
    with pytest.raises(KernelOptionError, match="cuda_gemv=fast .*fp16x2"):
        _pick(cuda, 1, 4096, 6144, "q4f16_1", cuda_gemv="fast")


@needs_nvcc
@pytest.mark.parametrize("preset", ["cuda-sm80", "cuda-sm90"])
def test_h2_gemv_builds(preset):
    """Every config the pipeline picks for the Llama-3-8B shapes, plus the awkward ones: a tail step (`in` not a
    whole number of steps), an `out` no block tiles evenly, a bias, a short `in` (18 groups), a 4-warp K split."""

    from edgellm.kernels.schedule_gpu import h2_gemv_config
    from edgellm.kernels.cuda_gemv import int4_gemv_h2

    funcs = {f"pick_{k}_{n}": int4_gemv_h2(k, n, False, *h2_gemv_config(k, n))
             for k, n in [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256)]}
    funcs.update(tail=int4_gemv_h2(14336, 4096, False, 4, 2, 4, 1), odd=int4_gemv_h2(4096, 1000, True, 8, 4, 2, 2),
                 short=int4_gemv_h2(576, 77, True, 4, 2, 1, 1), ks4=int4_gemv_h2(2048, 64, False, 8, 1, 2, 4),
                 nofence=int4_gemv_h2(4096, 512, False, fence=False))
    from edgellm.kernels.cuda_gemv import xs_gemv_config

    xs = {f"xs_{k}_{n}": int4_gemv_h2(k, n, False, *xs_gemv_config(k, n)[:4], xsmem=True,
                                      fold_shift=xs_gemv_config(k, n)[4])
          for k, n in [(4096, 6144), (4096, 28672), (14336, 4096), (2048, 3072), (8192, 2048)]}
    xs.update(xs_tail=int4_gemv_h2(14336, 4096, False, 4, 2, 4, 1, xsmem=True, fold_shift=True),
              xs_odd=int4_gemv_h2(4096, 1000, True, 8, 4, 2, 2, xsmem=True),
              xs_short=int4_gemv_h2(576, 77, True, 4, 2, 1, 1, xsmem=True, fold_shift=True))
    funcs.update(xs)
    src = cuda_source(funcs, preset)
    bodies = {part.split("_kernel(")[0].split()[-1]: part for part in src.split('extern "C" __global__')[1:]}
    assert set(bodies) == set(funcs)
    for body in bodies.values():
        assert "fma.rn.f16x2" in body and "sub.rn.f16x2" in body  # the fp16x2 arithmetic, as PTX
    assert "shr.b32" in bodies["tail"] and "shr.b32" not in bodies["nofence"]  # the load fence (whole steps only)
    assert "__hfma2" not in src and "__hsub(" not in src  # no per-lane scalar fp16 fallback
    for name in xs:  # x staged once per block: [4 words][groups] of 16-byte pairs, in_f * 2 bytes of shared memory
        k = int(name.split("_")[1]) if name.count("_") == 2 else {"xs_tail": 14336, "xs_odd": 4096,
                                                                    "xs_short": 576}[name]
        body = bodies[name]
        assert f"__shared__ alignas(64) uint4 xsh_ptr[{k // 8}];" in body
        staged, rest = body.split("__syncthreads();", 1)
        assert "x32_ptr" in staged and "x32_ptr" not in rest  # no warp reads x from global memory after staging
    folded = [n for n in xs if "_fs" in str(funcs[n].attrs["edgellm.gemv"])]
    assert folded and all("0x2C002C00u" in bodies[n] and "0xC070C070u" in bodies[n] for n in folded)
    assert "0x2C002C00u" not in bodies["xs_odd"]
