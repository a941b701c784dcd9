"""The tensor-core prefill GEMM (quant/gpu_gemm.py) without a GPU: where the pipeline picks it, and that it builds
to mma.sync for sm_80/sm_90. Its numbers on a GPU (numpy checks at Llama-3-8B shapes, timings) come from
bench/gpu_run.py."""

from __future__ import annotations

import pytest
from test_gpu_kernels import _linear, needs_nvcc  # pytest puts tests/ on sys.path


def test_tc_gemm_only_where_it_is_the_same_function(monkeypatch):
    """The tensor-core prefill GEMM replaces the FMA tiled GEMM for fp16 INT4 (group 32) linears on sm_80+ only;
    EDGELLM_CUDA_GEMM=fma keeps the FMA kernel everywhere."""
    from edgellm.compile import gpu_schedules
    from edgellm.compile.gpu_schedules import _int4_gemm_tc_variant, schedule_gpu_kernel
    from edgellm.targets import resolve

    sm90, sm72 = resolve("cuda-sm90").tvm(), resolve("jetson-xavier").tvm()
    assert _int4_gemm_tc_variant(_linear(None, 4096, 6144, "q4f16_1"), sm90) is not None
    assert _int4_gemm_tc_variant(_linear(None, 576, 960, "q4f16_1", bias=True), sm90) is not None  # ragged `out`
    assert _int4_gemm_tc_variant(_linear(None, 4096, 6144, "q4f16_1"), sm72) is None  # no m16n8k16 f16 before sm_80
    assert _int4_gemm_tc_variant(_linear(None, 80, 64, "q4f16_1"), sm90) is None  # `in` padded to whole groups
    assert _int4_gemm_tc_variant(_linear(None, 128, 64, "q4f32_1"), sm90) is None  # fp32 activations
    assert _int4_gemm_tc_variant(_linear(None, 128, 64, "q0f16"), sm90) is None  # dense weight
    assert _int4_gemm_tc_variant(_linear(1, 128, 64, "q4f16_1"), sm90) is None  # a GEMV
    f = _linear(None, 4096, 1024, "q4f16_1")
    monkeypatch.setenv("EDGELLM_CUDA_GEMM", "tc")
    assert "tc_mma" in str(schedule_gpu_kernel("gemm", f, sm90).attrs.get("edgellm.gemm", ""))
    monkeypatch.setenv("EDGELLM_CUDA_GEMM", "fma")
    assert "edgellm.gemm" not in schedule_gpu_kernel("gemm", f, sm90).attrs
    assert gpu_schedules.cuda_gemm_mode() == "fma"


@needs_nvcc
@pytest.mark.parametrize("preset", ["cuda-sm80", "cuda-sm90"])
def test_tc_gemm_builds(preset):
    """The tensor-core GEMM (with and without bias, whole and ragged `out`, both weight decodes, with and without
    the register prefetch) compiles to mma.sync for sm_80/sm_90.
    Its numbers on a GPU come from bench/gpu_run.py (tc_* kernels vs numpy)."""
    import tvm

    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.quant import gpu_gemm
    from edgellm.targets import resolve

    target = resolve(preset).tvm()
    funcs = {"tc_a": gpu_gemm.int4_gemm_tc(4096, 1024, False), "tc_b": gpu_gemm.int4_gemm_tc(576, 960, True),
             "tc_c": gpu_gemm.int4_gemm_tc(4096, 1024, False, half2=True),  # fp16x2 weight decode (the default)
             "tc_d": gpu_gemm.int4_gemm_tc(576, 960, True, prefetch=False)}
    prepare_cuda_build()
    mod = tvm.IRModule({n: f.with_attr("global_symbol", n) for n, f in funcs.items()})
    with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        lib = tvm.compile(mod, target=target)
    src = lib.mod.imports[0].inspect_source()
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src
