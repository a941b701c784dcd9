"""The tensor-core prefill GEMM (kernels/cuda_gemm.py) without a GPU: where the pipeline picks it, and that it builds
to mma.sync for sm_80/sm_90. Its numbers on a GPU (numpy checks at Llama-3-8B shapes, timings) come from
bench/gpu_run.py."""

from __future__ import annotations

import pytest
from test_gpu_kernels import (  # pytest puts tests/ on sys.path
    _pick,
    cuda_source,
    needs_nvcc,
)


def test_tc_gemm_only_where_it_is_the_same_function():
    """The tensor-core prefill GEMM replaces the FMA tiled GEMM for fp16 INT4 (group 32) linears on sm_80+ only;
    --opt cuda_gemm=simt keeps the FMA kernel everywhere."""
    from edgellm.targets import resolve

    sm90, sm72 = resolve("cuda-sm90").tvm(), resolve("jetson-xavier").tvm()

    def name(target, *shape, **opts):
        return _pick(target, *shape, **opts)[0]

    assert name(sm90, None, 4096, 6144, "q4f16_1").startswith("int4_gemm_mma")
    assert name(sm90, None, 576, 960, "q4f16_1", True).startswith("int4_gemm_mma")  # ragged `out`
    assert name(sm72, None, 4096, 6144, "q4f16_1") == "gemm_simt"  # no m16n8k16 f16 before sm_80
    assert name(sm90, None, 80, 64, "q4f16_1") == "gemm_simt"  # `in` padded to whole groups
    assert name(sm90, None, 128, 64, "q4f32_1") == "gemm_simt"  # fp32 activations
    assert name(sm90, None, 128, 64, "q0f16") == "gemm_simt"  # dense weight
    assert name(sm90, 1, 128, 64, "q4f16_1") != "gemm_simt"  # a GEMV
    assert str(_pick(sm90, None, 4096, 1024, "q4f16_1")[1].attrs["edgellm.gemm"]).startswith("tc2_cp_async")
    _, fma = _pick(sm90, None, 4096, 1024, "q4f16_1", cuda_gemm="simt")
    assert "edgellm.gemm" not in fma.attrs and 'scope="shared"' in fma.script()


@needs_nvcc
@pytest.mark.parametrize("preset", ["cuda-sm80", "cuda-sm90"])
def test_tc_gemm_builds(preset):
    """The tensor-core GEMM (with and without bias, whole and ragged `out`, both weight decodes, with and without
    the register prefetch) compiles to mma.sync for sm_80/sm_90.
    Its numbers on a GPU come from bench/gpu_run.py (tc_* kernels vs numpy)."""

    from edgellm.kernels import cuda_gemm as gpu_gemm

    funcs = {"tc_a": gpu_gemm.int4_gemm_tc(4096, 1024, False), "tc_b": gpu_gemm.int4_gemm_tc(576, 960, True),
             "tc_c": gpu_gemm.int4_gemm_tc(4096, 1024, False, half2=True),  # fp16x2 weight decode (the default)
             "tc_d": gpu_gemm.int4_gemm_tc(576, 960, True, prefetch=False)}
    src = cuda_source(funcs, preset)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src


def test_tc2_gemm_choice():
    """--opt cuda_gemm=mma-pipelined (and auto) picks int4_gemm_tc2 where `in` is a multiple of 64, else the
    single-stage tensor-core kernel; cuda_gemm=mma always the single-stage one, with cuda_gemm_decode choosing
    how it decodes weights."""
    from edgellm.kernels import cuda_gemm as gpu_gemm
    from edgellm.targets import resolve

    sm90 = resolve("cuda-sm90").tvm()

    def picked(in_f: int, out_f: int, **opts) -> tuple[str, str]:
        name, func = _pick(sm90, None, in_f, out_f, "q4f16_1", **opts)
        return name, str(func.attrs.get("edgellm.gemm"))

    for opt in ("auto", "mma-pipelined"):
        assert picked(4096, 1024, cuda_gemm=opt, cuda_gemm_small="gemm") == ("int4_gemm_mma_pipelined",
                                                     str(gpu_gemm.int4_gemm_tc2(4096, 1024, False, *gpu_gemm.tc2_choice(
                                                         4096, 1024)).attrs["edgellm.gemm"]))
        assert picked(96, 64, cuda_gemm=opt) == ("int4_gemm_mma_half2", "tc_mma_m16n8k16")  # 3 groups
    assert picked(4096, 1024, cuda_gemm="mma") == ("int4_gemm_mma_half2", "tc_mma_m16n8k16")
    assert picked(4096, 1024, cuda_gemm="mma", cuda_gemm_decode="float")[0] == "int4_gemm_mma_float"
    with pytest.raises(ValueError, match="multiple of 64"):
        gpu_gemm.int4_gemm_tc2(96, 64, False)


@needs_nvcc
@pytest.mark.parametrize("preset", ["cuda-sm80", "cuda-sm90"])
def test_tc2_gemm_builds(preset):
    """int4_gemm_tc2 (every tile config; with and without bias, whole and ragged `out`) compiles for sm_80/sm_90 to
    a kernel with cp.async, mma.sync and the launch bounds it asks for. Its numbers on a GPU come from
    bench/gpu_gemm_tune.py (numpy checks and timings at Llama-3-8B shapes)."""

    from edgellm.kernels import cuda_gemm as gpu_gemm

    funcs = {f"t_{c.replace('x', '_')}": gpu_gemm.int4_gemm_tc2(4096, 1024, False, c) for c in gpu_gemm.TC2_CONFIGS}
    funcs["t_bias"] = gpu_gemm.int4_gemm_tc2(576, 960, True)
    src = cuda_source(funcs, preset)
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src
    assert "cp.async.cg.shared.global" in src and "cp.async.wait_group" in src
    assert src.count("#ifndef EDGELLM_Q4GEMM_TC2") == src.count("#define EDGELLM_Q4GEMM_TC2") >= 1
    assert "__launch_bounds__(256, 2)" in src
