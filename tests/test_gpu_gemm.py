"""The tensor-core prefill GEMM (quant/gpu_gemm.py) without a GPU: where the pipeline picks it, and that it builds
to mma.sync for sm_80/sm_90. Its numbers on a GPU (numpy checks at Llama-3-8B shapes, timings) come from
bench/gpu_run.py."""

from __future__ import annotations

import pytest
from test_gpu_kernels import (  # pytest puts tests/ on sys.path
    _linear,
    cuda_source,
    needs_nvcc,
)


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
    from edgellm.quant import gpu_gemm

    picked = str(schedule_gpu_kernel("gemm", f, sm90).attrs.get("edgellm.gemm", ""))
    assert picked.startswith("tc2_cp_async" if gpu_gemm.TC2_IS_DEFAULT else "tc_mma")
    monkeypatch.setenv("EDGELLM_CUDA_GEMM", "fma")
    assert "edgellm.gemm" not in schedule_gpu_kernel("gemm", f, sm90).attrs
    assert gpu_schedules.cuda_gemm_mode() == "fma"


@needs_nvcc
@pytest.mark.parametrize("preset", ["cuda-sm80", "cuda-sm90"])
def test_tc_gemm_builds(preset):
    """The tensor-core GEMM (with and without bias, whole and ragged `out`, both weight decodes, with and without
    the register prefetch) compiles to mma.sync for sm_80/sm_90.
    Its numbers on a GPU come from bench/gpu_run.py (tc_* kernels vs numpy)."""

    from edgellm.quant import gpu_gemm

    funcs = {"tc_a": gpu_gemm.int4_gemm_tc(4096, 1024, False), "tc_b": gpu_gemm.int4_gemm_tc(576, 960, True),
             "tc_c": gpu_gemm.int4_gemm_tc(4096, 1024, False, half2=True),  # fp16x2 weight decode (the default)
             "tc_d": gpu_gemm.int4_gemm_tc(576, 960, True, prefetch=False)}
    src = cuda_source(funcs, preset)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src


def test_tc2_gemm_choice(monkeypatch):
    """EDGELLM_CUDA_GEMM=tc2 picks int4_gemm_tc2 where `in` is a multiple of 64 (else the first tensor-core kernel),
    tc1 always the first one; "tc" follows gpu_gemm.TC2_IS_DEFAULT."""
    from edgellm.compile.gpu_schedules import schedule_gpu_kernel
    from edgellm.quant import gpu_gemm
    from edgellm.targets import resolve

    sm90 = resolve("cuda-sm90").tvm()

    def picked(in_f: int, out_f: int) -> str:
        return str(schedule_gpu_kernel("gemm", _linear(None, in_f, out_f, "q4f16_1"), sm90).attrs.get("edgellm.gemm"))

    monkeypatch.setenv("EDGELLM_CUDA_GEMM", "tc2")
    assert picked(4096, 1024).startswith("tc2_cp_async")
    assert picked(96, 64) == "tc_mma_m16n8k16"  # 3 groups: not whole 64-wide stages
    monkeypatch.setenv("EDGELLM_CUDA_GEMM", "tc1")
    assert picked(4096, 1024) == "tc_mma_m16n8k16"
    monkeypatch.setenv("EDGELLM_CUDA_GEMM", "tc")
    assert picked(4096, 1024).startswith("tc2_cp_async" if gpu_gemm.TC2_IS_DEFAULT else "tc_mma")
    with pytest.raises(ValueError, match="multiple of 64"):
        gpu_gemm.int4_gemm_tc2(96, 64, False)


@needs_nvcc
@pytest.mark.parametrize("preset", ["cuda-sm80", "cuda-sm90"])
def test_tc2_gemm_builds(preset):
    """int4_gemm_tc2 (every tile config; with and without bias, whole and ragged `out`) compiles for sm_80/sm_90 to
    a kernel with cp.async, mma.sync and the launch bounds it asks for. Its numbers on a GPU come from
    bench/gpu_gemm_tune.py (numpy checks and timings at Llama-3-8B shapes)."""

    from edgellm.quant import gpu_gemm

    funcs = {f"t_{c.replace('x', '_')}": gpu_gemm.int4_gemm_tc2(4096, 1024, False, c) for c in gpu_gemm.TC2_CONFIGS}
    funcs["t_bias"] = gpu_gemm.int4_gemm_tc2(576, 960, True)
    src = cuda_source(funcs, preset)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src
    assert "cp.async.cg.shared.global" in src and "cp.async.wait_group" in src
    assert src.count("#ifndef EDGELLM_Q4GEMM_TC2") == src.count("#define EDGELLM_Q4GEMM_TC2") >= 1
    assert "__launch_bounds__(256, 2)" in src
