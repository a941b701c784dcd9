"""The CUDA decode fusions (--opt cuda_fuse; kernels/cuda_gemv.int4_gemv_h2's norm_eps / silu), without a GPU.

* a numpy model of the fused norm prologue (the GEMV block's staging rounds) against add_rms_norm_gpu's arithmetic
  followed by the GEMV's x staging: the same residual and the same staged words, bit for bit;
* the generated CUDA: the prologue and the silu epilogue are add_rms_norm_gpu's and silu_mul_gpu's statements
  (same expressions, so the same roundings), x + delta read in 16-byte loads, block 0 writes the residual;
* the registry: which builds fuse (CUDA, the 4-bit GEMV with x in shared memory, cuda_fuse); what a decode step
  calls with the default is in tests/test_gpu_kernels.py::test_cuda_decode_replays_a_cuda_graph.
On the GPU (bench/gpu_fusion.py): fused vs unfused logits, the tiny models vs numpy, tok/s.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from edgellm.kernels import cuda_gemv
from edgellm.kernels.cuda_gemv import GROUP, NORM_VEC

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA builds need nvcc")
f16, f32, f64 = np.float16, np.float32, np.float64


def _chunk_sums(s: np.ndarray) -> np.ndarray:
    """Per 16-byte chunk, `acc + v * v` over its 8 values in order (one rounding each: the FMA nvcc makes)."""
    v = s.astype(f64).reshape(-1, NORM_VEC)
    acc = np.zeros(len(v), f32)
    for e in range(NORM_VEC):
        acc = (acc.astype(f64) + v[:, e] * v[:, e]).astype(f32)
    return acc


def _butterfly(vals: np.ndarray) -> f32:
    """A warp's xor butterfly (offsets 1, 2, 4, 8, 16), every lane ends with the same value."""
    v = vals.astype(f32).copy()
    for m in (1, 2, 4, 8, 16):
        v = (v + v[np.arange(32) ^ m]).astype(f32)
    return v[0]


def _normalize(s, total, hidden, eps, w):
    rs = f32(1 / np.sqrt(f64(f32(f32(total) / f32(hidden) + f32(eps)))))
    return ((s.astype(f32) * rs).astype(f32) * w.astype(f32)).astype(f16)


def _add_rms_norm_model(x, d, w, eps):
    """cuda_math.add_rms_norm_gpu for one row (threads = one chunk each, the power of two >= chunks)."""
    hidden = len(x)
    s = (x.astype(f32) + d.astype(f32)).astype(f16)
    chunks = hidden // NORM_VEC
    threads = min(1024, max(32, 1 << (chunks - 1).bit_length()))
    lane = np.zeros(threads, f32)
    lane[:chunks] = _chunk_sums(s)
    total = f32(0)
    for k in range(threads // 32):
        total = f32(total + _butterfly(lane[32 * k: 32 * k + 32]))
    return s, _normalize(s, total, hidden, eps, w)


def _stage_x(h: np.ndarray) -> np.ndarray:
    """The GEMV's x staging (the plain xsmem path): word j = 4g + q -> slot q G + g, pairs (x0,x4) .. (x3,x7)."""
    groups = len(h) // GROUP
    x32 = h.astype(f16).view(np.uint32)
    xsh = np.zeros((4 * groups, 4), np.uint32)
    for j in range(4 * groups):
        a = x32[4 * j: 4 * j + 4]
        xsh[(j % 4) * groups + j // 4] = [(a[0] & 0xFFFF) | (a[2] << 16), (a[0] >> 16) | (a[2] & 0xFFFF0000),
                                          (a[1] & 0xFFFF) | (a[3] << 16), (a[1] >> 16) | (a[3] & 0xFFFF0000)]
    return xsh


def _fused_stage_model(x, d, w, eps, warps):
    """int4_gemv_h2(norm_eps=...)'s prologue: thread (ty, tx) of round i takes chunk t = i W 32 + 32 ty + tx; the
    rounds' warp sums go to slot i W + ty, summed in slot order; the normalized halves go to slot
    ((t % 4) G + t / 4) as [x0, x4, x1, x5, x2, x6, x3, x7] (hv[(e % 4) 2 + e / 4])."""
    hidden = len(x)
    groups, chunks = hidden // GROUP, hidden // NORM_VEC
    rounds = (groups * 4 + warps * 32 - 1) // (warps * 32)
    nvw = (chunks + 31) // 32
    s = np.zeros(hidden, f16)
    nred = np.zeros(rounds * warps, f32)
    for i in range(rounds):
        for ty in range(warps):
            lane = np.zeros(32, f32)
            for tx in range(32):
                t = i * warps * 32 + ty * 32 + tx
                if t < chunks:
                    c = slice(t * NORM_VEC, (t + 1) * NORM_VEC)
                    s[c] = (x[c].astype(f32) + d[c].astype(f32)).astype(f16)
                    lane[tx] = _chunk_sums(s[c])[0]
            nred[i * warps + ty] = _butterfly(lane)
    total = f32(0)
    for k in range(nvw):
        total = f32(total + nred[k])
    h = _normalize(s, total, hidden, eps, w)
    xsh16 = np.zeros(hidden, f16)
    for t in range(chunks):
        hv = np.zeros(NORM_VEC, f16)
        for e in range(NORM_VEC):
            hv[(e % 4) * 2 + e // 4] = h[t * NORM_VEC + e]
        slot = (t % 4) * groups + t // 4
        xsh16[slot * NORM_VEC: (slot + 1) * NORM_VEC] = hv
    return s, xsh16.view(np.uint32).reshape(-1, 4)


@pytest.mark.parametrize("hidden,out_f", [(576, 192), (2048, 3072), (4096, 6144), (4096, 28672)])
def test_fused_norm_prologue_equals_add_rms_norm_then_staging(hidden, out_f):
    """For the configs the registry picks (SmolLM2, Llama-3.2-1B, Llama-3-8B qkv and gate_up), with outliers in x."""
    rng = np.random.default_rng(hidden + out_f)
    x = (rng.standard_normal(hidden) * 3).astype(f16)
    x[rng.choice(hidden, 4, replace=False)] = [900, -1200, 300, -40]
    d = rng.standard_normal(hidden).astype(f16)
    w = (0.5 + rng.random(hidden)).astype(f16)
    warps = cuda_gemv.xs_gemv_config(hidden, out_f)[0]
    s_ref, h_ref = _add_rms_norm_model(x, d, w, 1e-5)
    s, xsh = _fused_stage_model(x, d, w, 1e-5, warps)
    np.testing.assert_array_equal(s.view(np.uint16), s_ref.view(np.uint16))
    np.testing.assert_array_equal(xsh, _stage_x(h_ref))
    assert cuda_gemv.fused_norm_supports(hidden)


def test_fused_gemv_rejects_what_it_does_not_cover():
    assert not cuda_gemv.fused_norm_supports(16384)  # add_rms_norm_gpu gives a thread 2 chunks there
    with pytest.raises(ValueError, match="need xsmem"):
        cuda_gemv.int4_gemv_h2(256, 64, False, norm_eps=1e-5)
    with pytest.raises(ValueError, match="silu needs no bias"):
        cuda_gemv.int4_gemv_h2(256, 64, True, xsmem=True, silu=True)
    with pytest.raises(ValueError, match="even"):
        cuda_gemv.int4_gemv_h2(256, 64, False, rows=3, xsmem=True, silu=True)


def _body(src: str, name: str) -> str:
    return src.split(f"{name}_kernel(")[-1].split('extern "C"')[0]


def _norm_names(stmt: str) -> str:
    """A statement with the buffers renamed to their role, so two kernels' statements compare."""
    for pat, rep in ((r"nacc_ptr\[0\]|acc_ptr\[0\]", "ACC"), (r"xa_ptr|xv_ptr", "X"), (r"ya_ptr|yv_ptr", "Y"),
                     (r"gq_ptr\[0\]|g_ptr\[\d\]", "G"), (r"gq_ptr\[1\]|u_ptr\[\d\]", "U")):
        stmt = re.sub(pat, rep, stmt)
    return stmt


@needs_nvcc
def test_fused_kernels_repeat_the_unfused_arithmetic():
    from test_gpu_kernels import cuda_source

    from edgellm.kernels.cuda_math import add_rms_norm_gpu, silu_mul_gpu

    w, r, u, k, fold = cuda_gemv.xs_gemv_config(2048, 16384)
    funcs = {"gu": cuda_gemv.int4_gemv_h2(2048, 16384, False, w, r, u, k, xsmem=True, fold_shift=fold,
                                          norm_eps=1e-5, silu=True),
             "qkv": cuda_gemv.int4_gemv_h2(2048, 3072, True, *cuda_gemv.xs_gemv_config(2048, 3072)[:4], xsmem=True,
                                           norm_eps=1e-5),
             "ks2": cuda_gemv.int4_gemv_h2(2048, 512, False, 8, 2, 4, 2, xsmem=True, silu=True),
             "res": cuda_gemv.int4_gemv_h2(8192, 2048, False, *cuda_gemv.xs_gemv_config(8192, 2048)[:4], xsmem=True,
                                           res_in=True),
             "res1": cuda_gemv.int4_gemv_h2(576, 576, False, 4, 2, 1, 1, xsmem=True, res_in=True),
             "noadd": cuda_gemv.int4_gemv_h2(2048, 16384, False, w, r, u, k, xsmem=True, fold_shift=fold,
                                             norm_eps=1e-5, silu=True, norm_add=False),
             "arn": add_rms_norm_gpu(2048, 1e-5, "float16"), "sm": silu_mul_gpu(8192, "float16")}
    src = cuda_source(funcs)
    gu, qkv, arn, sm = (_body(src, n) for n in ("gu", "qkv", "arn", "sm"))
    # the residual add and the sum of squares, the rsqrt: add_rms_norm_gpu's statements
    add = re.search(r"sv_ptr\[0\] = \(\(half\)\(\(\(float\)xv_ptr\[0\]\) \+ \(\(float\)yv_ptr\[0\]\)\)\);", arn)
    assert add and "sv_ptr[0] = ((half)(((float)xa_ptr[0]) + ((float)ya_ptr[0])));" in gu
    rsq = re.search(r"rsqrtf\(.*\);", arn).group(0)
    assert _norm_names(rsq) in [_norm_names(m) for m in re.findall(r"rsqrtf\(.*\);", gu)]
    norm_out = "(((float)sv_ptr[0]) * nacc_ptr[0]) * ((float)nv_ptr[0])"  # nv: the norm weight, in registers
    assert norm_out in gu and norm_out in qkv
    assert "(v_ptr[0] * acc_ptr[0]) * ((float)xv_ptr[0])" in arn  # the same product order there
    assert [int(m) for m in re.findall(r"__shfl_xor_sync\(\(uint\)4294967295, nacc_ptr\[0\], (\d+), 32\)", gu)] \
        == [1, 2, 4, 8, 16] * (len(re.findall("nacc_ptr\\[0\\], 1, 32", gu)))
    # silu(gate) * up: silu_mul_gpu's expression on the two rows rounded to fp16
    silu = re.search(r"\(\(half\)\(\(\(\(float\)g_ptr\[0\]\).*\);", sm).group(0)
    assert _norm_names(silu) in _norm_names(gu) and _norm_names(silu) in _norm_names(_body(src, "ks2"))
    assert "gq_ptr[0] = ((half)" in gu and "gq_ptr[1] = ((half)" in gu
    # 16-byte loads of x, delta and the norm weight; block 0 writes x + delta; one barrier more than the GEMV
    for buf in ("x_ptr", "dl_ptr", "nw_ptr"):
        assert f"*(uint4*)({buf} +" in gu
    assert "if (((int)blockIdx.x) == 0) {" in gu and "*(uint4*)(s_out_ptr +" in gu
    assert gu.count("__syncthreads()") == 2 and qkv.count("__syncthreads()") == 3  # qkv: ksplit's barrier
    assert "s_out_ptr" in qkv and "expf" not in qkv
    # the residual epilogue (o / down): x + the GEMV output rounded to fp16, add_rms_norm_gpu's add; x read up front
    for name, stores in (("res", 1), ("res1", 2)):  # ksplit 2: lane r stores row r; ksplit 1: lane 0 both rows
        body = _body(src, name)
        adds = re.findall(r"\(\(half\)\(\(\(float\)xr_ptr\[\d\]\) \+ \(\(float\)gq_ptr\[0\]\)\)\)", body)
        assert len(adds) == stores and body.index("xres_ptr[") < body.index("__syncthreads()")
    noadd = _body(src, "noadd")  # its consumer: the norm of x itself, no delta, no residual written
    assert "dl_ptr" not in noadd and "s_out_ptr" not in noadd and "rsqrtf" in noadd
    # the norm weight, a parameter, loaded before x and delta: the staging is one L2 round trip, not two (with PDL
    # before the wait, with the first step's weights)
    for body in (gu, qkv):
        assert body.index("*(uint4*)(nw_ptr +") < min(body.index("*(uint4*)(x_ptr +"), body.index("*(uint4*)(dl_ptr +"))
    pdl = _body(cuda_source({"qkv_pdl": cuda_gemv.int4_gemv_h2(4096, 6144, True, 16, 2, 4, 2, xsmem=True,
                                                               norm_eps=1e-5, pdl=True)}), "qkv_pdl")
    assert pdl.index("*(uint4*)(nw_ptr +") < pdl.index("griddepcontrol.wait") < pdl.index("*(uint4*)(x_ptr +")


def test_registry_fuses_only_cuda_4bit_smem():
    from edgellm.kernels import KernelOptions, KernelRegistry
    from edgellm.quant.schemes import get_scheme
    from edgellm.targets import resolve

    cuda, host = resolve("cuda-sm90").tvm(), resolve("host").tvm()

    def reg(target, **opt):
        return KernelRegistry(target, KernelOptions(**opt))

    q4, q0 = get_scheme("q4f16_1"), get_scheme("q0f16")
    assert reg(cuda).decode_fusion == "all" and reg(cuda, cuda_fuse="off").decode_fusion == "off"
    assert reg(host, cuda_fuse="all").decode_fusion == "off"  # CPU keeps its kernels
    r = reg(cuda, cuda_fuse="all")
    f = r.fused_gemv(2048, 16384, q4, "float16", False, norm_eps=1e-5, silu=True)
    assert str(f.attrs["edgellm.gemv"]).removesuffix("_pf").endswith("_norm_silu")  # _pf: the L2 prefetch (PDL)
    assert [p.name for p in f.params] == ["x", "dl", "nw", "qw", "qs", "out", "s_out"]  # s_out: x + delta
    g = r.fused_gemv(2048, 3072, get_scheme("q4f16_2"), "float16", True, norm_eps=1e-5, silu=False)
    assert [p.name for p in g.params] == ["x", "dl", "nw", "qw", "qs", "qm", "bias_buf", "out", "s_out"]
    assert r.fused_gemv(2048, 3072, q0, "float16", False, norm_eps=1e-5, silu=False) is None  # dense
    assert r.fused_gemv(16384, 3072, q4, "float16", False, norm_eps=1e-5, silu=False) is None  # > 1024 chunks
    assert reg(cuda, cuda_fuse="all", cuda_gemv="fp16x2").fused_gemv(2048, 3072, q4, "float16", False,
                                                                       norm_eps=1e-5, silu=False) is None
    s = reg(cuda, cuda_fuse="silu")
    assert s.fused_gemv(2048, 3072, q4, "float16", False, norm_eps=1e-5, silu=False) is None
    assert str(s.fused_gemv(2048, 16384, q4, "float16", False, norm_eps=None, silu=True).attrs[
        "edgellm.gemv"]).removesuffix("_pf").endswith("_xs_fs_silu")
    assert reg(cuda).residual_gemv(4096, 4096, q4, "float16") is None  # the residual add in o / down: `all` only
    a = reg(cuda)  # auto: every fusion (gate_up's norm up to `in` 2048); the norm at 4096: 2x the warps (same sums)
    w, r, u, k, _ = cuda_gemv.xs_gemv_config(4096, 6144)
    f = a.fused_gemv(4096, 6144, q4, "float16", False, norm_eps=1e-5, silu=False)
    assert str(f.attrs["edgellm.gemv"]).startswith(f"h2_w{2 * w}r{r}u{u}k{k}_xs")
    w, r, u, k, _ = cuda_gemv.xs_gemv_config(4096, 28672)  # gate_up at 4096: the silu epilogue, not the norm
    f = a.fused_gemv(4096, 28672, q4, "float16", False, norm_eps=None, silu=True)
    assert str(f.attrs["edgellm.gemv"]).startswith(f"h2_w{w}r{r}u{u}k{k}_xs")
    assert a.fused_gemv(4096, 28672, q4, "float16", False, norm_eps=1e-5, silu=True) is None
    assert reg(cuda, cuda_fuse="all").fused_gemv(4096, 28672, q4, "float16", False, norm_eps=1e-5, silu=True)
    assert a.fused_gemv(2048, 16384, q4, "float16", False, norm_eps=1e-5, silu=True) is not None


def test_residual_epilogue_pick():
    from edgellm.kernels import KernelOptions, KernelRegistry
    from edgellm.quant.schemes import get_scheme
    from edgellm.targets import resolve

    cuda, q4 = resolve("cuda-sm90").tvm(), get_scheme("q4f16_1")
    r = KernelRegistry(cuda, KernelOptions(cuda_fuse="all"))
    f = r.residual_gemv(14336, 4096, q4, "float16")
    assert [p.name for p in f.params] == ["x", "qw", "qs", "xres", "out"]
    w, rows, u, k, fold = cuda_gemv.xs_gemv_config(14336, 4096)  # the plain pick's config: the same sums
    assert str(f.attrs["edgellm.gemv"]) == f"h2_w{w}r{rows}u{u}k{k}_xs" + ("_fs" if fold else "") + "_res"
    g = r.fused_gemv(4096, 6144, q4, "float16", True, norm_eps=1e-5, silu=False, add=False)
    assert [p.name for p in g.params] == ["x", "nw", "qw", "qs", "bias_buf", "out"]
    assert KernelRegistry(cuda, KernelOptions(cuda_fuse="silu")).residual_gemv(14336, 4096, q4, "float16") is None
