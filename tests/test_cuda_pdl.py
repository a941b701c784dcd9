"""Programmatic dependent launch (--opt cuda_pdl, kernels/cuda_pdl.py), without a GPU.

* the source patch: every kernel TVM emits gets `griddepcontrol.wait` before its first statement unless it places
  its own; declarations, `__launch_bounds__`, braces inside inline-asm strings are handled; an unknown signature
  fails the build instead of leaving a kernel unpatched;
* the launch mark: the PDL tag reaches TVM's launch parameters of every kernel of a CUDA build, and none of an
  `off` build;
* the decode GEMV's own placement: its first weight loads before the wait, every read of x / the residual and
  every store after it;
* which builds use it (sm_90+ CUDA; `on` elsewhere is one error line).
On the GPU (bench/gpu_pdl.py): logits bit-equal to the `off` build, tok/s.
"""

from __future__ import annotations

import re
import shutil

import pytest

from edgellm.kernels import KernelOptions, KernelRegistry, cuda_gemv, cuda_pdl
from edgellm.targets import resolve

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA builds need nvcc")

SOURCE = '''
extern "C" __global__ void __launch_bounds__(128) a_kernel(float* __restrict__ x);
extern "C" __global__ void __launch_bounds__(128) a_kernel(float* __restrict__ x) {
  asm volatile("{ .reg .pred p; }");  // a brace in a string: } {
  if (threadIdx.x == 0) { x[0] = 1.f; }
}
/* __global__ in a comment is not a kernel: } */
extern "C" __global__ void b_kernel(float* y) {
  []() { asm volatile("griddepcontrol.wait;" ::: "memory"); }();
  y[0] = 2.f;
}
extern "C" __global__ void __launch_bounds__(64) c_kernel(int n, float* z) { z[n] = 3.f; }
'''


def test_patch_source_waits_in_every_kernel_once():
    bodies = cuda_pdl.kernel_bodies(SOURCE)
    assert [b[0] for b in bodies] == ["a_kernel", "b_kernel", "c_kernel"]  # the declaration has no body
    assert cuda_pdl.unwaited_kernels(SOURCE) == ["a_kernel", "c_kernel"]
    code, patched = cuda_pdl.patch_source(SOURCE)
    assert patched == ["a_kernel", "c_kernel"]
    assert cuda_pdl.unwaited_kernels(code) == []
    for name, open_, close in cuda_pdl.kernel_bodies(code):
        body = code[open_ + 1:close]
        assert body.count("griddepcontrol.wait") == 1, name
        if name != "b_kernel":  # the prologue opens the body: the wait, then launch_dependents (TRIGGER_FIRST off)
            assert body.lstrip().startswith('asm volatile("griddepcontrol.wait;"'), name
            assert body.index("griddepcontrol.wait") < body.index("griddepcontrol.launch_dependents")
            assert body.index("griddepcontrol.launch_dependents") \
                < body.index(";", body.index("griddepcontrol.launch_dependents") + 25) \
                < body.index("x[0]" if name == "a_kernel" else "z[n]")  # before the kernel's own statements
    assert code.replace(cuda_pdl.prologue(), "") == SOURCE  # nothing else changed
    assert cuda_pdl.patch_source(code) == (code, [])  # idempotent


def test_patch_source_leaves_skipped_functions_alone():
    code, patched = cuda_pdl.patch_source(SOURCE, {"a"})
    assert patched == ["c_kernel"] and cuda_pdl.unwaited_kernels(code, {"a"}) == []
    assert cuda_pdl.unwaited_kernels(code) == ["a_kernel"]
    assert cuda_pdl.skipped_kernel("linear2_kernel_5", {"linear2"})
    assert not cuda_pdl.skipped_kernel("linear21_kernel", {"linear2"}) and not cuda_pdl.skipped_kernel("linear2", {"linear2"})


def test_patch_source_refuses_an_unknown_signature():
    with pytest.raises(ValueError, match="unexpected kernel signature"):
        cuda_pdl.kernel_bodies('extern "C" __global__ int weird(float* x) { }')


def test_mark_function_adds_the_tag_once():
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def f(a: T.Buffer((4,), "float32")):
        a[0] = T.float32(1)

    marked = cuda_pdl.mark_function(f)
    assert [str(t) for t in marked.attrs[cuda_pdl.LAUNCH_PARAMS_ATTR]] == [cuda_pdl.PDL_TAG]
    assert cuda_pdl.mark_function(marked).attrs[cuda_pdl.LAUNCH_PARAMS_ATTR] == marked.attrs[
        cuda_pdl.LAUNCH_PARAMS_ATTR]
    other = f.with_attr(cuda_pdl.LAUNCH_PARAMS_ATTR, ["tirx.use_cooperative_launch"])
    assert [str(t) for t in cuda_pdl.mark_function(other).attrs[cuda_pdl.LAUNCH_PARAMS_ATTR]] == [
        "tirx.use_cooperative_launch", cuda_pdl.PDL_TAG]


@pytest.mark.parametrize("preset,opt,expected", [("cuda-sm90", "auto", True), ("cuda-sm90", "on", True),
                                                 ("cuda-sm90", "off", False), ("jetson-orin", "auto", False),
                                                 ("cuda-sm80", "auto", False), ("vulkan", "auto", False)])
def test_registry_uses_pdl_on_hopper_only(preset, opt, expected):
    assert KernelRegistry(resolve(preset).tvm(), KernelOptions(cuda_pdl=opt)).pdl is expected


@pytest.mark.parametrize("preset", ["jetson-orin", "cuda-sm80", "host"])
def test_pdl_on_refused_below_sm90(preset):
    with pytest.raises(ValueError, match=r"--opt cuda_pdl=on needs a CUDA target of sm_90") as e:
        KernelRegistry(resolve(preset).tvm(), KernelOptions(cuda_pdl="on"))
    assert "\n" not in str(e.value)


def _order(script: str, pattern: str) -> list[int]:
    return [m.start() for m in re.finditer(pattern, script)]


@pytest.mark.parametrize("kw", [{}, {"norm_eps": 1e-5, "silu": True}, {"res_in": True},
                                {"norm_eps": 1e-5, "norm_add": False}, {"ksplit": 2}])
def test_gemv_loads_weights_before_its_wait(kw):
    """In statement order: the first step's weight (and scale) loads and the norm weight, the wait, launch_dependents
    (cuda_pdl's order, TRIGGER_FIRST off), then x / delta / residual reads and stores. Without pdl the kernel has no griddepcontrol."""
    out_f = 512 if kw.get("silu") else 256
    kw = dict(kw)
    ks = kw.pop("ksplit", 1)  # 2: no whole step (32 groups over 64 lanes), the lone guarded one loaded first
    func = cuda_gemv.int4_gemv_h2(1024, out_f, False, 2 * ks, 2, 1, ks, xsmem=True, pdl=True, **kw)
    script = func.script()
    wait = _order(script, r"griddepcontrol\.wait")
    assert len(wait) == 1 and len(_order(script, r"griddepcontrol\.launch_dependents")) == 1
    w = wait[0]
    assert _order(script, r"\bqw\[")[0] < w  # the first step's weights are in flight before the wait
    assert (_order(script, r"griddepcontrol\.launch_dependents")[0] > w) is (not cuda_pdl.TRIGGER_FIRST)
    for reads in (r"\bx32\[", r"\bx\[", r"\bdl\[", r"\bxres\["):
        assert all(i > w for i in _order(script, reads)), reads
    # the norm weight, a parameter like the weights, in flight before the wait too (cuda_gemv.NORM_WEIGHT early)
    nw = _order(script, r"\bnw\[")
    assert all(i < w for i in nw) and bool(nw) is ("norm_eps" in kw)
    assert all(i > w for i in _order(script, r"\b(out|s_out)\[[^\]]*\] ="))
    plain = cuda_gemv.int4_gemv_h2(1024, out_f, False, 2 * ks, 2, 1, ks, xsmem=True, **kw).script()
    assert "griddepcontrol" not in plain


@pytest.mark.parametrize("kw,ranges", [({}, 2), ({"norm_eps": 1e-5, "silu": True}, 2), ({"zero_point": True}, 3)])
def test_gemv_prefetches_its_rows_into_l2_before_its_wait(kw, ranges, monkeypatch):
    """With PDL, one thread of each block asks L2 for the block's rows (weights, scales; mins; the up rows too with
    silu) before the wait, for matrices up to PREFETCH_L2_MAX bytes; without PDL or above the limit, nothing."""
    out_f = 512 if kw.get("silu") else 256
    script = cuda_gemv.int4_gemv_h2(1024, out_f, False, 2, 2, 1, 1, xsmem=True, pdl=True, **kw).script()
    pf, wait = _order(script, r"cp\.async\.bulk\.prefetch\.L2"), _order(script, r"griddepcontrol\.wait")
    assert len(pf) == ranges and max(pf) < wait[0]  # weights, scales (, mins): silu loops over gate and up rows
    assert bool(re.search(r"for part\w* in T.unroll\(2\)", script)) is bool(kw.get("silu"))
    assert cuda_gemv.prefetches_l2(1024, out_f)
    assert "prefetch" not in cuda_gemv.int4_gemv_h2(1024, out_f, False, 2, 2, 1, 1, xsmem=True, **kw).script()
    monkeypatch.setattr(cuda_gemv, "PREFETCH_L2_MAX", 1024 * out_f // 2 - 1)  # one byte short of the weights
    assert not cuda_gemv.prefetches_l2(1024, out_f)
    assert "prefetch" not in cuda_gemv.int4_gemv_h2(1024, out_f, False, 2, 2, 1, 1, xsmem=True, pdl=True,
                                                    **kw).script()


def test_gemv_prefetches_row_starts_above_the_limit_with_partial(monkeypatch):
    """PREFETCH_PARTIAL: a matrix over PREFETCH_L2_MAX gets the first PREFETCH_L2_MAX / rows bytes (16-byte units)
    of each row prefetched, one row a thread, before the wait; off by default, and not below PREFETCH_MIN_ROW."""
    monkeypatch.setattr(cuda_gemv, "PREFETCH_L2_MAX", 256 * 1024)  # 256 rows x 512 bytes (in 1024) = 128 KB
    assert cuda_gemv.partial_prefetch_row_bytes(2048, 256) == 0  # 256 KB: whole, not partial
    assert cuda_gemv.partial_prefetch_row_bytes(8192, 256) == 0  # PREFETCH_PARTIAL off
    monkeypatch.setattr(cuda_gemv, "PREFETCH_PARTIAL", True)
    assert cuda_gemv.partial_prefetch_row_bytes(2048, 256) == 0
    assert cuda_gemv.partial_prefetch_row_bytes(8192, 256) == 1024  # 4 KB rows: the first quarter
    assert cuda_gemv.partial_prefetch_row_bytes(8192, 4096) == 0  # 64 bytes a row: below PREFETCH_MIN_ROW
    func = cuda_gemv.int4_gemv_h2(8192, 256, False, 4, 2, 2, 2, xsmem=True, pdl=True)
    script = func.script()
    pf, wait = _order(script, r"cp\.async\.bulk\.prefetch\.L2"), _order(script, r"griddepcontrol\.wait")
    assert len(pf) == 1 and pf[0] < wait[0] and "T.uint32(1024)" in script
    assert func.attrs["edgellm.gemv"].endswith("_pf1024")


def test_gemv_pdl_needs_xsmem():
    with pytest.raises(ValueError, match="pdl .* needs xsmem"):
        cuda_gemv.int4_gemv_h2(1024, 256, False, pdl=True)


@needs_nvcc
@pytest.mark.parametrize("pdl", ["auto", "off"])
def test_cuda_build_marks_and_waits_in_every_kernel(cuda_tiny_build, pdl):
    from edgellm.artifact import Artifact

    # auto: the defaults' build; off: test_gpu_kernels.py's 4-bit head build, made without PDL (one build less)
    built = cuda_tiny_build() if pdl == "auto" else cuda_tiny_build(head="q4", cuda_pdl=pdl)
    out = built["out"]
    code = built["cuda"]
    kernels = cuda_pdl.kernel_bodies(code)
    assert len(kernels) > 50  # GEMVs, GEMMs, norms, TVM's cache kernels, argmax
    lib = (out / "lib" / "model.so").read_bytes()
    tags = lib.count(cuda_pdl.PDL_TAG.encode())
    manifest = Artifact.open(out).manifest
    if pdl == "off":
        assert "griddepcontrol" not in code and tags == 0
        assert manifest["kernels"]["options"]["cuda_pdl"] == "off"
        return
    waited = [n for n, o, c in kernels if "griddepcontrol.wait" in code[o:c + 1]]
    bare = [n for n, o, c in kernels if "griddepcontrol" not in code[o:c + 1]]
    assert tags == len(waited) == len(kernels) - len(bare)  # each launched with PDL carries the tag once
    # the tensor-core prefill GEMMs (cuda_pdl.SKIP_GEMM) keep ordinary launches and no prologue: PDL cost 20% of
    # Llama-3-8B pp128 on an H200
    assert bare and all(re.fullmatch(r"linear\d*_kernel(_\d+)?", n) for n in bare), bare
    # the decode GEMVs place their own wait (after the first weight loads); TVM's and the other kernels get the
    # prologue as their first statement
    own = [n for n, o, c in kernels if cuda_pdl.PROLOGUE_MARK not in code[o:c + 1] and n not in bare]
    assert own and all("gemv" in n for n in own)
    assert manifest["kernels"]["options"]["cuda_pdl"] == "auto"


def test_patch_source_counts_a_wait_in_a_device_function_it_marks():
    """A kernel calling cuda_pdl.WAITS_INSIDE() waits in the device function it calls (owned_kv.cu's early warps
    attention): no prologue; one that merely names it in a comment still gets one."""
    src = ('extern "C" __global__ void d_kernel(float* x) {\n  edgellm_pdl_waits_inside();\n  f(x);\n}\n'
           'extern "C" __global__ void e_kernel(float* x) {\n  /* edgellm_pdl_waits_inside */ f(x);\n}\n')
    assert cuda_pdl.unwaited_kernels(src) == ["e_kernel"]
    assert cuda_pdl.patch_source(src)[1] == ["e_kernel"]

