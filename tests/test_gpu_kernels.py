"""The CUDA kernels' arithmetic and schedules, without a GPU.

* quant/gpu_kernels.py's INT4 GEMV (float trick for `nib - 7`, scale once per group) runs unscheduled on the host
  CPU and must match the numpy reference on the dequantized weights;
* the CUDA schedules (decode GEMV, tiled prefill GEMM) build to a fatbin for sm_80 and sm_90;
* the pipeline picks the GEMV variant only where it computes the same function (4-bit, group 32, no zero point);
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


@pytest.mark.parametrize("act,in_f,out_f,bias", [("float16", 96, 40, True), ("float16", 64, 7, False),
                                                 ("float32", 320, 33, False), ("float32", 32, 5, True)])
def test_int4_gemv_matches_numpy(act, in_f, out_f, bias):
    import tvm

    from edgellm.quant import gpu_kernels

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
    from edgellm.quant.gpu_kernels import MAGIC, QMAX

    nib = np.arange(16, dtype=np.uint32)
    got = (nib | np.uint32(MAGIC)).view(np.float32) - np.float32(2**23 + QMAX)
    np.testing.assert_array_equal(got, nib.astype(np.float32) - QMAX)


def _linear(rows, in_f, out_f, scheme_name, bias=False):
    from edgellm.quant import kernels

    s = get_scheme(scheme_name)
    return kernels.linear(rows, in_f, out_f, s, s.act_dtype, bias)


def test_gemv_variant_only_where_it_is_the_same_function():
    from edgellm.compile.gpu_schedules import _int4_gemv_variant
    from edgellm.targets import resolve

    cuda, metal = resolve("cuda-sm90").tvm(), resolve("metal").tvm()
    assert _int4_gemv_variant(_linear(1, 128, 64, "q4f16_1"), cuda) is not None
    assert _int4_gemv_variant(_linear(1, 128, 64, "q4f16_1", bias=True), cuda) is not None
    assert _int4_gemv_variant(_linear(1, 128, 64, "q4f16_1"), metal) is None  # CUDA only
    assert _int4_gemv_variant(_linear(1, 80, 64, "q4f16_1"), cuda) is None  # `in` padded to whole groups
    assert _int4_gemv_variant(_linear(1, 128, 64, "q0f16"), cuda) is None  # dense weight
    assert _int4_gemv_variant(_linear(None, 128, 64, "q4f16_1"), cuda) is None  # not a GEMV


@needs_nvcc
@pytest.mark.parametrize("preset", ["cuda-sm80", "cuda-sm90"])
def test_cuda_schedules_build(preset, monkeypatch):
    import tvm

    monkeypatch.delenv("EDGELLM_CUDA_GEMM", raising=False)  # the default GEMM choice

    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.compile.gpu_schedules import schedule_gpu_kernel
    from edgellm.targets import resolve

    target = resolve(preset).tvm()
    funcs = {  # decode GEMVs (one row, two rows per warp, bias, small `in`) and prefill GEMMs (INT4, dense)
        "gemv_a": _linear(1, 4096, 6144, "q4f16_1"), "gemv_b": _linear(1, 576, 1536, "q4f16_1", bias=True),
        "gemv_c": _linear(1, 2048, 128, "q4f32_1"), "gemm_a": _linear(None, 4096, 1024, "q4f16_1"),
        "gemm_b": _linear(None, 256, 320, "q0f16", bias=True), "gemm_c": _linear(None, 64, 128, "q0f32"),
        "gemm_d": _linear(None, 4096, 1024, "q4f32_1"),
    }
    scheduled = {}
    for name, f in funcs.items():
        s = schedule_gpu_kernel(str(f.attrs["edgellm.kernel"]), f, target)
        assert s is not None and s.attrs["tir.is_scheduled"]
        scheduled[name] = s.with_attr("global_symbol", name)
    assert "group_dot" in scheduled["gemv_a"].script()  # the INT4 GEMV variant was chosen
    assert str(scheduled["gemm_a"].attrs["edgellm.gemm"]) == "tc_mma_m16n8k16"  # fp16 INT4: tensor cores
    assert 'scope="shared"' in scheduled["gemm_d"].script()  # fp32 INT4: the FMA tiled GEMM, tiles in shared memory
    prepare_cuda_build()
    with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        tvm.compile(tvm.IRModule(scheduled), target=target)


@needs_nvcc
def test_cuda_decode_replays_a_cuda_graph(checkpoints, tmp_path, monkeypatch):
    """The CUDA backend's RewriteCUDAGraph captures decode's static-shape kernel runs between attention calls."""
    import edgellm.compile.pipeline as pipeline
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions

    text = {}
    build = pipeline.build

    def keep_text(*args, **kwargs):
        ex = build(*args, **kwargs)
        text["vm"] = ex.as_text()
        return ex

    monkeypatch.setattr(pipeline, "build", keep_text)
    compile_model(CompileArgs(model=str(checkpoints["llama"]), output=tmp_path / "a", target="cuda-sm90",
                              quant="q4f16_1", runtime=RuntimeOptions(128, 32)))
    decode = text["vm"].split("@decode:")[1].split("\n@")[0]
    layers = 2  # the tiny llama checkpoint
    assert decode.count("vm.builtin.cuda_graph.run_or_capture") == layers + 1
    assert decode.count("vm.builtin.attention_kv_cache_attention_with_fused_qkv") == layers  # outside the graphs
    # the residual add and the next norm are one kernel (gpu_math.add_rms_norm_gpu): 2 per layer, nothing else
    # adds or norms; the artifact exports the device argmax the Engine's greedy decode uses
    decode_and_graphs = text["vm"].split("@decode:")[1].split("\n@prefill:")[0]
    assert decode_and_graphs.count("call  add_rms_norm") == 2 * layers
    assert decode_and_graphs.count("call  rms_norm") == 1  # layer 0's input norm has no residual to add
    from edgellm.artifact import Artifact

    assert "argmax" in Artifact.open(tmp_path / "a").manifest["functions"]


@needs_nvcc
def test_gpu_math_kernels_build():
    """gpu_math's add_rms_norm (hidden not a multiple of the block: SmolLM2's 576) and argmax (a vocabulary not a
    multiple of the block) compile for sm_90, with one block per row and shared-memory reductions."""
    import tvm

    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.models.gpu_math import add_rms_norm_gpu, argmax_gpu
    from edgellm.targets import resolve

    target = resolve("cuda-sm90").tvm()
    funcs = {"arn": add_rms_norm_gpu(576, 1e-5, "float16"), "arn32": add_rms_norm_gpu(4096, 1e-6, "float32"),
             "am": argmax_gpu(49152 + 5)}
    prepare_cuda_build()
    with target:
        lib = tvm.compile(tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()}), target=target)
    src = lib.mod.imports[0].inspect_source()
    for name in funcs:
        assert f"{name}_kernel(" in src
    assert src.count("__syncthreads()") >= 2 * 10  # argmax: 10 tree levels of 1024 threads, two barriers each
    with pytest.raises(ValueError, match="power of two"):
        add_rms_norm_gpu(576, 1e-5, "float16", threads=100)
