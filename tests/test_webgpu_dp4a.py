"""The integer-dot decode GEMV for WGSL (`--opt webgpu_gemv=dp4a`, kernels/webgpu_linear.int4_gemv_dp4a) on a
Vulkan device (lavapipe in CI): against a numpy model of exactly its arithmetic (int8 activations with a scale per
packed word of 8, or per group of 32, integer dot products, one float product per scale), against the float GEMV
within the bound that the activation rounding allows, with the decode fusions, and the registry's picks (GPU-free).
"""

from __future__ import annotations

import numpy as np
import pytest


def dp4a_model(x: np.ndarray, qw: np.ndarray, qs: np.ndarray, act_group: int = 8):
    """numpy model of int4_gemv_dp4a: per `act_group` activations (8: a packed word's, 32: a group's) d = max|x| /
    127 and q = rint(x * (127 / max|x|)) in float32 (round half to even, as WGSL's round); per row and act group
    the exact integer sum(nib * q) - 7 sum(q) times d, times the group's scale; the float sums in float64 (the
    kernel's float32 order differs: the comparison allows the fp16 output's rounding). Returns (out [out_f]
    float64, d [in / act_group])."""
    out_f, words = qw.shape
    n = words * 8 // act_group
    hv = x.astype(np.float32).reshape(n, act_group)
    am = np.abs(hv).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(am > 0, np.float32(127) / am, np.float32(0)).astype(np.float32)
    q = np.rint(hv * inv[:, None]).astype(np.int64)
    assert np.abs(q).max() <= 127
    d = (am * np.float32(1 / 127)).astype(np.float32)
    nib = ((qw[:, :, None] >> (np.arange(8, dtype=np.uint32) * 4)) & 15).astype(np.int64).reshape(out_f, n, act_group)
    isum = (nib * q[None]).sum(-1) - 7 * q.sum(-1)[None]
    scale = np.repeat(qs.astype(np.float64), 32 // act_group, axis=1)  # each act group's weight scale
    return (isum * d[None].astype(np.float64) * scale).sum(-1), d


def _bound(deq: np.ndarray, d: np.ndarray) -> np.ndarray:
    """|sum_i w_i (x_i - q_i d)| <= sum_i |w_i| d / 2 per row (d per act group)."""
    return (np.abs(deq).reshape(len(deq), len(d), -1) * (d[None, :, None].astype(np.float64) / 2)).sum((-1, -2))


def _run(c, webgpu_dev, tmp_path, func, args, name):
    from edgellm._tvm import load_module, runtime

    path = tmp_path / f"{name}.so"
    c.tvm.compile(c.tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                  target=c.Target("webgpu", host="llvm")).export_library(str(path))
    mod = load_module(path)
    assert "dot4I8Packed" in mod.imports[0].inspect_source()
    tensors = [runtime.tensor(a, webgpu_dev) for a in args]
    mod["main"](*tensors)
    return [t.numpy() for t in tensors]


def _check(got, model, ref, deq, d, dtype):
    """got within the output's rounding of the model; the model within the activation-rounding bound of the float
    GEMV: |sum_i w_i (x_i - q_i d)| <= sum_i |w_i| d / 2 per row, plus that rounding."""
    ulp = np.spacing(np.abs(model).astype(dtype)).astype(np.float64)
    assert (np.abs(got - model) <= ulp * 0.5 + 1e-5 * np.abs(model).max()).all()  # + float32 sums' order
    bound = _bound(deq, d)
    assert (np.abs(got - ref) <= bound + ulp).all()
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("in_f,out_f,bias,dtype,cfg,st,passes,ag", [
    (2048, 600, False, "float16", (8, 2, 1), None, None, 8),  # 64 groups: 2 steps (double-buffered loads); clamped rows
    (2048, 600, False, "float16", (8, 2, 1), None, None, 32),  # the same with a d per group of 32
    (4096, 40, False, "float16", (4, 1, 2), None, None, 8),   # 2 groups a lane a step
    (2048, 4096, False, "float16", (8, 2, 2), None, None, 8),  # 8 warps x 2 rows x 2 groups
    (288, 70, True, "float32", None, None, None, 8),          # 9 groups (lanes past them idle), bias, fp32 activations
    (288, 70, True, "float32", None, None, None, 32),
    (4160, 72, False, "float16", None, None, None, 8),        # `in` over 4096: one staging thread a group (130 groups)
    (4160, 72, False, "float16", None, None, None, 32),
    (2048, 600, True, "float32", (1, 2, 2), 1, None, 8),      # one staging thread a group, asked: 2 rounds, bias, fp32
    (2048, 600, True, "float16", (8, 2, 1), None, 3, 8),      # 3 row blocks a workgroup: 13 workgroups, the last short
    (4160, 72, False, "float16", (2, 2, 1), None, 2, 8),      # one staging thread a group, 2 row blocks a workgroup
])
def test_dp4a_gemv_matches_its_model_and_the_float_bound(webgpu_dev, tmp_path, in_f, out_f, bias, dtype, cfg, st,
                                                         passes, ag):
    from edgellm._tvm import compiler
    from edgellm.kernels.webgpu_linear import int4_gemv_dp4a
    from edgellm.quant import get_scheme
    from edgellm.quant.reference import dequantize, quantize

    scheme = get_scheme("q4f16_1" if dtype == "float16" else "q4f32_1")
    rng = np.random.default_rng(in_f + out_f)
    qw, qs = quantize(rng.standard_normal((out_f, in_f)).astype(np.float32), scheme)
    qs = qs.astype(scheme.scale_dtype)
    x = (rng.standard_normal((1, in_f)) * 3).astype(dtype)
    x[0, 32:64] = 0  # an all-zero group: d = 0, q = 0
    x[0, 64:96] *= 1000  # a group far larger than the rest
    x[0, 96:104] *= 100  # one word of a group larger than its other three
    b = rng.standard_normal(out_f).astype(dtype)
    func = int4_gemv_dp4a(in_f, out_f, bias, *(cfg or ()), x_dtype=dtype, scale_dtype=scheme.scale_dtype,
                          out_dtype=dtype, stage_threads=st, passes=passes, act_group=ag)
    one_thread = st == 1 or in_f > 4096  # x staged as two 16-byte words and one sum a group, else four and four
    per_group = 1 if one_thread and ag == 32 else 4  # 7 * sum(q) entries a group
    script = str(func.script())
    assert f'xz = T.alloc_shared(({in_f // 32 * per_group},), "int32")' in script
    assert f'xd = T.alloc_shared(({in_f // 32 * (4 if ag == 8 else 1)},))' in script  # float32
    args = [x, qw, qs] + ([b] if bias else []) + [np.zeros((1, out_f), dtype)]
    got = _run(compiler(), webgpu_dev, tmp_path, func, args, f"dp4a_{in_f}")[-1][0].astype(np.float64)
    model, d = dp4a_model(x[0], qw, qs, ag)
    deq = dequantize(qw, qs.astype(np.float32), in_f, scheme).astype(np.float64)
    extra = b.astype(np.float64) if bias else 0
    ref = x[0].astype(np.float64) @ deq.T + extra
    rel = _check(got, model + extra, ref, deq, d, dtype)
    assert rel < 2e-2  # measured 2-5e-3 (the bound above is the test; this catches a gross error the bound allows)


@pytest.mark.parametrize("in_f,out_f,fuse,passes,ag", [(1024, 4096, "norm", None, 8), (512, 384, "silu", None, 8),
                                                      (544, 400, "norm+silu", None, 8), (544, 400, "norm+silu", 3, 8),
                                                      (544, 400, "norm+silu", None, 32)])
def test_dp4a_gemv_fusions_match_the_model(webgpu_dev, tmp_path, in_f, out_f, fuse, passes, ag):
    """rms_norm(x + delta) staged and quantized by the GEMV (x + delta written by workgroup 0, exactly), silu(gate)
    * up in its epilogue: the model applied to the fp16 norm output (the kernel's rsqrt may differ in the last bit,
    so a rounding step of the int8 activations may move: compared within the activation-rounding bound)."""
    from edgellm._tvm import compiler
    from edgellm.kernels.webgpu_linear import int4_gemv_dp4a
    from edgellm.quant import get_scheme
    from edgellm.quant.reference import dequantize, quantize

    norm, silu, eps = "norm" in fuse, "silu" in fuse, 1e-5
    scheme = get_scheme("q4f16_1")
    rng = np.random.default_rng(in_f)
    qw, qs = quantize(rng.standard_normal((out_f, in_f)).astype(np.float32), scheme)
    qs = qs.astype(np.float16)
    x, dl = (rng.standard_normal((2, 1, in_f)) * 2).astype(np.float16)
    w = (rng.random(in_f) + 0.5).astype(np.float16)
    s = (x.astype(np.float32) + dl.astype(np.float32)).astype(np.float16)
    h = x
    if norm:
        s32 = s.astype(np.float32)
        h = (s32 / np.sqrt((s32 * s32).mean() + eps) * w.astype(np.float32)).astype(np.float16)
    y, d = dp4a_model(h[0], qw, qs, ag)
    deq = dequantize(qw, qs.astype(np.float32), in_f, scheme).astype(np.float64)
    bound = _bound(deq, d)
    ref = h[0].astype(np.float64) @ deq.T
    if silu:
        g, u = (y[: out_f // 2].astype(np.float16).astype(np.float64),
                y[out_f // 2:].astype(np.float16).astype(np.float64))
        y = g / (1 + np.exp(-g)) * u
        gr, ur = ref[: out_f // 2], ref[out_f // 2:]
        ref = gr / (1 + np.exp(-gr)) * ur
    func = int4_gemv_dp4a(in_f, out_f, False, norm_eps=eps if norm else None, silu=silu, passes=passes,
                          act_group=ag)
    args = ([x, dl, w] if norm else [x]) + [qw, qs, np.zeros((1, len(y)), np.float16)]
    args += [np.zeros((1, in_f), np.float16)] if norm else []
    outs = _run(compiler(), webgpu_dev, tmp_path, func, args, f"dp4a_fuse_{in_f}")
    got = outs[len(args) - (2 if norm else 1)][0].astype(np.float64)
    scale = np.abs(y).max()
    if norm:  # x + delta exactly; the output within one activation rounding step of the model
        assert np.array_equal(outs[-1], s)
        assert np.abs(got - y).max() / scale < 2e-3
    else:
        assert np.abs(got - y).max() / scale < 1e-3  # the fp16 rounding of gate, up and the output
    if not silu:
        assert (np.abs(got - ref) <= bound + np.spacing(np.abs(y).astype(np.float16))).all()
    assert np.abs(got - ref).max() / np.abs(ref).max() < 2e-2


def test_registry_picks_dp4a_by_default_and_h2_when_asked():
    from edgellm.kernels import KernelOptions, KernelRegistry
    from edgellm.quant import get_scheme
    from edgellm.targets import resolve

    target = resolve("vulkan").tvm()
    q4, q4f32, q8 = get_scheme("q4f16_1"), get_scheme("q4f32_1"), get_scheme("q8f16_1")
    for opts, gemv in ((KernelOptions(webgpu_gemv="h2"), "int4_gemv_h2_webgpu"),
                       (KernelOptions(), "int4_gemv_dp4a_webgpu"),
                       (KernelOptions(webgpu_gemv="dp4a"), "int4_gemv_dp4a_webgpu")):
        reg = KernelRegistry(target, opts)
        reg.linear(1, 4096, 512, q4, "float16", False)
        reg.linear(1, 4096, 1024, q8, "float16", False)  # the 8-bit head keeps the fp16x2 kernel
        assert reg.chosen["linear_gemv"] == {gemv, "int8_gemv_h2_webgpu"}
        fused = reg.fused_gemv(4096, 1024, q4, "float16", False, 1e-5, True)
        assert fused is not None and reg.chosen["linear_gemv"] >= {gemv + "_norm_silu"}
    reg = KernelRegistry(target, KernelOptions(webgpu_gemv="dp4a"))
    reg.linear(1, 14336, 4096, q4, "float16", False)  # the 8B's down: one staging thread a group fits 32 KiB
    assert reg.chosen["linear_gemv"] == {"int4_gemv_dp4a_webgpu"}
    assert reg.fused_gemv(14336, 4096, q4, "float16", False, 1e-5, False) is None  # four a group (norm) do not
    reg = KernelRegistry(target, KernelOptions(webgpu_gemv="dp4a"))
    reg.linear(1, 128, 256, q4f32, "float32", False)  # fp32 activations too (no shader-f16 needed)
    assert reg.chosen["linear_gemv"] == {"int4_gemv_dp4a_webgpu"}
    assert reg.fused_gemv(2048, 1024, q4f32, "float32", False, None, True) is not None
