"""The tensor-core prefill GEMM (kernels/cuda_gemm.py) without a GPU: where the pipeline picks it, and that it builds
to mma.sync for sm_80/sm_90. Its numbers on a GPU (numpy checks at Llama-3-8B shapes, timings) come from
bench/gpu_run.py."""

from __future__ import annotations

import pytest
from edgellm.kernels import KernelOptions, KernelRegistry
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

    assert name(sm90, None, 4096, 6144, "q4f16_1").startswith("int4_gemm_wgmma")
    assert name(sm90, None, 576, 960, "q4f16_1", True).startswith("int4_gemm_wgmma")  # ragged `out`
    assert name(sm72, None, 4096, 6144, "q4f16_1") == "gemm_simt"  # no m16n8k16 f16 before sm_80
    assert name(sm90, None, 80, 64, "q4f16_1") == "gemm_simt"  # `in` padded to whole groups
    assert name(sm90, None, 128, 64, "q4f32_1") == "gemm_simt"  # fp32 activations
    assert name(sm90, None, 128, 64, "q0f16") == "gemm_simt"  # dense weight
    assert name(sm90, 1, 128, 64, "q4f16_1") != "gemm_simt"  # a GEMV
    assert str(_pick(sm90, None, 4096, 1024, "q4f16_1")[1].attrs["edgellm.gemm"]).startswith("wgmma")
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

    for opt in ("mma-pipelined",):  # (auto on sm_90 is the wgmma GEMM: test_wgmma_choice)
        assert picked(4096, 1024, cuda_gemm=opt, cuda_gemm_small="gemm") == ("int4_gemm_mma_pipelined",
                                                     str(gpu_gemm.int4_gemm_tc2(4096, 1024, False, *gpu_gemm.tc2_choice(
                                                         4096, 1024)).attrs["edgellm.gemm"]))
    for opt in ("auto", "mma-pipelined", "wgmma"):
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


def test_wgmma_choice():
    """auto picks the wgmma GEMM on sm_90 only (the configs of cuda_gemm.wgmma_choice: 6144-wide outputs in 192-feature
    blocks, others from 3072 on in 128 x 128, narrower ones and up to 256 rows in 128 x 64); other sm_80+ keep tc2;
    --opt cuda_gemm=wgmma off sm_90 is refused in one line naming the fix."""
    from edgellm.kernels import KernelOptionError
    from edgellm.kernels import cuda_gemm as gpu_gemm
    from edgellm.targets import resolve

    sm90, sm80 = resolve("cuda-sm90").tvm(), resolve("cuda-sm80").tvm()
    for in_f, out_f, big, small in ((4096, 28672, "wg2_r128_s4b2", "wg2_r128_s4b2"),
                                    (4096, 6144, "wg3_r128_s4", "wg2_r64_s4b2"),
                                    (14336, 4096, "wg2_r128_s4", "wg2_r64_s4b2"),
                                    (2048, 3000, "wg2_r64_s4b2", "wg2_r64_s4b2"),
                                    (2048, 9000, "wg2_r128_s4", "wg2_r64_s4b2")):  # 9000: not whole 192-blocks
        assert gpu_gemm.wgmma_choice(in_f, out_f) == (big, small)
        for opt in ("auto", "wgmma"):
            name, f = _pick(sm90, None, in_f, out_f, "q4f16_1", cuda_gemm=opt, cuda_gemm_small="gemm")
            assert (name, str(f.attrs["edgellm.gemm"])) == ("int4_gemm_wgmma", f"wgmma_{big}/{small}@256")
        name, f = _pick(sm80, None, in_f, out_f, "q4f16_1", cuda_gemm_small="gemm")
        assert name == "int4_gemm_mma_pipelined" and str(f.attrs["edgellm.gemm"]).startswith("tc2_cp_async")
    assert _pick(sm90, None, 4096, 6144, "q4f16_0", cuda_gemm_small="gemm")[0] == "int4_gemm_wgmma_o8"
    with pytest.raises(KernelOptionError) as exc:
        _pick(sm80, None, 4096, 6144, "q4f16_1", cuda_gemm="wgmma")
    assert "\n" not in str(exc.value) and "sm_80" in str(exc.value) and "mma-pipelined" in str(exc.value)
    with pytest.raises(KernelOptionError, match="sm_80"):  # at the registry's construction: before a model is traced
        KernelRegistry(sm80, KernelOptions(cuda_gemm="wgmma"))
    with pytest.raises(KernelOptionError, match="did you mean wgmma"):
        KernelOptions.parse(["cuda_gemm=wgmm"])


def test_wgmma_configs_fit_hopper():
    """Each wgmma config's shared memory (the stages of [rows x 64] fp16 activations + [features x 64] INT4 weights
    + scales and minimums, each stage rounded up to the 128-byte swizzle's 1024-byte period; or the epilogue's
    [rows x (features + 8)] fp16 tile; + 1024 for alignment) fits its blocks per SM on an H100/H200 (227 KB a
    block, 228 KB an SM with 1 KB reserved per block), and its registers (255 a thread at most; a 64 x N fp32
    accumulator is N / 2 of them) leave room at the blocks per SM it asks for."""
    from edgellm.kernels import cuda_gemm as gpu_gemm

    for name, (nwg, rows, stages, blocks) in gpu_gemm.WGMMA_CONFIGS.items():
        assert rows in (64, 128, 256) and 1 <= nwg <= 3 and stages >= 3
        feats = 64 * nwg
        for zp in (False, True):
            smem = gpu_gemm.wgmma_smem_bytes(name, zp)
            stage = rows * 64 * 2 + feats * 64 // 2 + feats * 4 * (2 if zp else 1)
            assert smem >= stages * stage + 1024 and smem >= rows * (feats + 8) * 2 + 1024
            assert (smem - 1024) % 1024 == 0 or smem - 1024 == rows * (feats + 8) * 2
            assert smem <= 227 * 1024 and blocks * (smem + 1024) <= 228 * 1024, (name, zp, smem)
        assert 65536 // (128 * nwg * blocks) >= rows // 2 + 32, name  # accumulators + A fragments and addresses


def test_module_arch():
    """Only an sm_90 module with wgmma in it is built for sm_90a (its cubin runs on sm_90 devices only)."""
    from edgellm.compile.cuda import SM90A, module_arch

    assert module_arch("asm(wgmma.mma_async.sync.aligned.m64n64k16 ...)", "sm_90") == SM90A
    assert module_arch("mma.sync.aligned.m16n8k16", "sm_90") is None
    assert module_arch("wgmma.mma_async", "sm_80") is None and module_arch("wgmma.mma_async", None) is None


@needs_nvcc
def test_wgmma_builds_for_sm90a(monkeypatch, tmp_path):
    """Every wgmma config (with and without bias, the three grids) compiles through TVM for cuda-sm90: the module is
    built for sm_90a and its PTX has the warpgroup MMA with A from registers, the async-proxy fence and the launch
    bounds asked for. Its numbers on the H200 (every output checked against a float reference): bench/gpu_wgmma."""
    from edgellm.kernels import cuda_gemm as gpu_gemm

    monkeypatch.setenv("TVM_KERNEL_DUMP", str(tmp_path))  # TVM's nvcc hook keeps its PTX there
    funcs = {f"w_{c}": gpu_gemm.int4_gemm_tc2(4096, 1024, False, c) for c in gpu_gemm.WGMMA_CONFIGS}
    funcs["w_bias_o8"] = gpu_gemm.int4_gemm_tc2(576, 960, True, "wg3_r128_s4", "wg2_r64_s4b2", offset=8)
    funcs["w_min"] = gpu_gemm.int4_gemm_tc2(4096, 6144, False, *gpu_gemm.wgmma_choice(4096, 6144), zero_point=True)
    src = cuda_source(funcs, "cuda-sm90")
    assert "edgellm_q4gemm_wgmma<3, 128, 4, true, 8, false>" in src and "0, true>" in src
    ptx = (tmp_path / "tvm_kernels.ptx").read_text()
    assert ".target sm_90a" in ptx
    for n in (64, 128, 256):
        assert f"wgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16" in ptx
    assert "fence.proxy.async.shared::cta" in ptx and "wgmma.wait_group.sync.aligned" in ptx
    assert "mma.sync" not in ptx  # no tc2 kernel in this module
