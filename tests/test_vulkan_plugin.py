"""The WebGPU runtime plugin (edgellm.runtime.webgpu_plugin) on a Vulkan device: lavapipe in CI.

Kernels are built by TVM's webgpu codegen (WGSL), exported into a native .so and loaded back, so every test runs
the real path: ffi.Module.load_from_bytes.webgpu, device_api.webgpu, wgpu-native on Vulkan. Tests that need a
device skip only when wgpu-native finds no Vulkan adapter.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgellm.runtime import webgpu_plugin
from edgellm.runtime.webgpu_plugin import PluginError

pytestmark = pytest.mark.vulkan


@pytest.fixture(scope="module")
def c():
    from edgellm._tvm import compiler

    return compiler()


def export_and_load(executable, tmp_path, name="k"):
    """The artifact path: a native .so with the webgpu module inside, loaded by the plugin's loader."""
    from edgellm._tvm import load_module

    path = tmp_path / f"{name}.so"
    executable.export_library(str(path))
    return load_module(path)


def build_primfunc(c, func, rules=None, tmp_path=None):
    target = c.Target("webgpu", host="llvm")
    mod = c.tvm.IRModule({"main": func})
    if rules:
        with target:
            mod = c.dlight.ApplyDefaultSchedule(*rules)(mod)
    return export_and_load(c.tvm.compile(mod, target=target), tmp_path)


# -- errors without a device -----------------------------------------------------------------------------------


def test_missing_compiler_is_one_line(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    with pytest.raises(PluginError) as e:
        webgpu_plugin.plugin_path()
    assert e.value.reason == "compiler" and "\n" not in str(e.value) and "/nonexistent/c++" in str(e.value)


def test_missing_wgpu_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wgpu" else real(name, *a))
    with pytest.raises(PluginError) as e:
        webgpu_plugin.plugin_path()
    assert e.value.reason == "wgpu" and "\n" not in str(e.value) and "edgellm[vulkan]" in str(e.value)


def test_no_vulkan_driver_is_one_line(webgpu_dev):
    """With the driver hidden (VK_ICD_FILENAMES to nowhere), a fresh process gets the `vulkan` reason."""
    code = ("from edgellm.runtime.webgpu_plugin import load_plugin, PluginError\n"
            "try:\n    load_plugin()\nexcept PluginError as e:\n    print('REASON', e.reason, e)\n")
    env = {**os.environ, "VK_ICD_FILENAMES": "/nonexistent/icd.json", "VK_DRIVER_FILES": "/nonexistent/icd.json"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    line = out.stdout.strip()
    assert line.startswith("REASON vulkan ") and "\n" not in line and "Vulkan" in line, out.stdout + out.stderr


def test_cache_key_follows_the_sources(monkeypatch, tmp_path):
    path, _ = webgpu_plugin.plugin_path()
    assert path.parent.parent == webgpu_plugin.cache_root()
    (tmp_path / "x.cc").write_text("// changed\n")
    monkeypatch.setattr(webgpu_plugin, "_sources", lambda: [tmp_path / "x.cc"])
    assert webgpu_plugin.plugin_path()[0] != path


# -- device and memory ------------------------------------------------------------------------------------------


def test_adapter_is_reported(webgpu_dev):
    info = webgpu_plugin.adapters()[0]
    assert webgpu_dev.exist and info["backend"] == "vulkan"
    assert webgpu_dev.device_name == info["name"] and info["name"]
    assert info["max_compute_workgroups_per_dimension"] >= 65535


@pytest.mark.parametrize("dtype,shape", [("float32", (1000,)), ("float16", (3, 7)), ("int8", (13,)),
                                         ("uint8", (1,)), ("int32", (2, 3, 5)), ("int64", (9,))])
def test_tensor_round_trip(webgpu_dev, dtype, shape):
    from edgellm._tvm import runtime

    x = (np.random.default_rng(0).standard_normal(shape) * 50).astype(dtype)
    t = runtime.tensor(x, device=webgpu_dev)
    assert t.device == webgpu_dev
    np.testing.assert_array_equal(t.numpy(), x)


def test_device_copies(webgpu_dev):
    from edgellm._tvm import runtime

    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 33)).astype("float32")
    a = runtime.tensor(x, device=webgpu_dev)
    b = runtime.empty(x.shape, "float32", webgpu_dev)
    a.copyto(b)  # device to device, whole buffer
    np.testing.assert_array_equal(b.numpy(), x)
    b.copyfrom(x[::-1].copy())  # host to device into an existing buffer
    np.testing.assert_array_equal(b.numpy(), x[::-1])

    raw = rng.integers(0, 255, 101, dtype="uint8")
    r = runtime.tensor(raw, device=webgpu_dev)
    view = r._create_view((5,), "uint8", relative_byte_offset=3)  # unaligned offset and length
    np.testing.assert_array_equal(view.numpy(), raw[3:8])
    dst = runtime.tensor(np.zeros(101, "uint8"), device=webgpu_dev)
    dview = dst._create_view((5,), "uint8", relative_byte_offset=50)
    view.copyto(dview)  # device to device, unaligned on both sides
    expect = np.zeros(101, "uint8")
    expect[50:55] = raw[3:8]
    np.testing.assert_array_equal(dst.numpy(), expect)
    dview.copyfrom(np.array([1, 2, 3, 4, 5], "uint8"))  # host to device, unaligned: the neighbours survive
    expect[50:55] = [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(dst.numpy(), expect)


# -- kernels ----------------------------------------------------------------------------------------------------


def scale_add_func(c):
    T = c.T

    @T.prim_func
    def scale_add(a: T.handle, b: T.handle, n: T.int32, s: T.float32):
        A = T.match_buffer(a, (n,), "float32")
        B = T.match_buffer(b, (n,), "float32")
        for i0 in T.thread_binding((n + 63) // 64, thread="blockIdx.x"):
            for i1 in T.thread_binding(64, thread="threadIdx.x"):
                if i0 * 64 + i1 < n:
                    B[i0 * 64 + i1] = A[i0 * 64 + i1] * s + T.float32(1)

    return scale_add


@pytest.mark.parametrize("n", [1000, 65537 * 64 + 5])  # the second needs more than 65535 workgroups in x
def test_elementwise_with_scalars(webgpu_dev, c, tmp_path, n):
    from edgellm._tvm import runtime

    lib = build_primfunc(c, scale_add_func(c), tmp_path=tmp_path)
    x = np.random.default_rng(2).standard_normal(n).astype("float32")
    b = runtime.empty((n,), "float32", webgpu_dev)
    lib["main"](runtime.tensor(x, device=webgpu_dev), b, n, 2.5)
    np.testing.assert_allclose(b.numpy(), x * np.float32(2.5) + 1, rtol=1e-6, atol=1e-6)


def test_submit_batches_grow_after_a_wait(webgpu_dev, c, tmp_path):
    """After the host waits for the queue the first submit comes after `flush_first` dispatches, then batches double
    up to the flush interval (the GPU starts early in a decode step); spinning or blocking waits, same results."""
    from edgellm import _tvm
    from edgellm._tvm import runtime

    g = _tvm.get_global_func
    stats = g("edgellm.webgpu.stats")
    lib = build_primfunc(c, scale_add_func(c), tmp_path=tmp_path)
    x = np.arange(64, dtype="float32")
    bufs = [runtime.tensor(x, device=webgpu_dev), runtime.empty((64,), "float32", webgpu_dev)]

    def chain(n: int) -> tuple[np.ndarray, dict]:
        stats(0, 1)
        for i in range(n):  # y <- y * 0.5 + 1, ping-ponging between the two buffers
            lib["main"](bufs[i % 2], bufs[1 - i % 2], 64, 0.5)
        out = bufs[n % 2].numpy()
        return out, json.loads(str(stats(0, 1)))

    ref, before = x.copy(), json.loads(str(stats(0, 0)))
    try:
        g("edgellm.webgpu.set_flush_every")(0, 16)
        g("edgellm.webgpu.set_flush_first")(0, 2)
        for spin in (5000, 0):
            g("edgellm.webgpu.set_spin_wait")(0, spin)
            for _ in range(2):  # the second chain starts small again: the read waited for the queue
                out, s = chain(40)
                for _ in range(40):
                    ref = ref * np.float32(0.5) + np.float32(1)
                np.testing.assert_array_equal(out, ref)
                # batches of 2, 4, 8, 16 dispatches, then the last 10 with the read's copy
                assert (s["dispatches"], s["submits"], s["reads"]) == (40, 5, 1)
                assert s["flush_first"] == 2 and s["spin_us"] == spin
    finally:
        g("edgellm.webgpu.set_flush_every")(0, before["flush_every"])
        g("edgellm.webgpu.set_flush_first")(0, before["flush_first"])
        g("edgellm.webgpu.set_spin_wait")(0, before["spin_us"])


def test_grid_folding_runs_each_block_once(webgpu_dev, c, tmp_path):
    """A grid past the per-dimension limit is folded into z; the padding block must not run."""
    from edgellm._tvm import runtime

    T = c.T
    limit = webgpu_plugin.adapters()[0]["max_compute_workgroups_per_dimension"]
    if limit > 1 << 20:
        pytest.skip(f"adapter allows {limit} workgroups per dimension: no folding to test")
    blocks = limit + 2  # folds to ceil(blocks/2) x 2 = blocks + 1 launched

    @T.prim_func
    def mark(a: T.handle, n: T.int32):
        A = T.match_buffer(a, (n,), "int32")
        for bx in T.thread_binding(n - 8, thread="blockIdx.x"):
            for tx in T.thread_binding(1, thread="threadIdx.x"):
                A[bx + tx] = A[bx + tx] + 1  # no bounds check: an extra block would write A[n - 8]

    lib = build_primfunc(c, mark, tmp_path=tmp_path)
    out = runtime.tensor(np.zeros(blocks + 8, "int32"), device=webgpu_dev)
    lib["main"](out, blocks + 8)
    got = out.numpy()
    assert (got[:blocks] == 1).all() and (got[blocks:] == 0).all()


def test_dlight_reduction(webgpu_dev, c, tmp_path):
    from edgellm._tvm import runtime

    te, dl = c.te, c.dlight.gpu
    n, m = te.var("n"), 300
    A = te.placeholder((n, m), "float32", name="A")
    k = te.reduce_axis((0, m), "k")
    B = te.compute((n,), lambda i: te.sum(A[i, k], axis=k), name="B")
    lib = build_primfunc(c, te.create_prim_func([A, B]), [dl.Reduction(), dl.GeneralReduction(), dl.Fallback()],
                         tmp_path)
    x = np.random.default_rng(3).random((37, m), dtype="float32")
    b = runtime.empty((37,), "float32", webgpu_dev)
    lib["main"](runtime.tensor(x, device=webgpu_dev), b)
    np.testing.assert_allclose(b.numpy(), x.sum(1), rtol=1e-5)


def test_dlight_matmul(webgpu_dev, c, tmp_path):
    from edgellm._tvm import runtime

    te, dl = c.te, c.dlight.gpu
    M, K, N = 128, 96, 72
    A = te.placeholder((M, K), "float32", name="A")
    B = te.placeholder((K, N), "float32", name="B")
    k = te.reduce_axis((0, K), "k")
    C = te.compute((M, N), lambda i, j: te.sum(A[i, k] * B[k, j], axis=k), name="C")
    lib = build_primfunc(c, te.create_prim_func([A, B, C]), [dl.Matmul(), dl.Fallback()], tmp_path)
    assert "var<workgroup>" in lib.imports[0].inspect_source()  # the dlight schedule, not the fallback
    rng = np.random.default_rng(4)
    xa, xb = rng.standard_normal((M, K)).astype("float32"), rng.standard_normal((K, N)).astype("float32")
    out = runtime.empty((M, N), "float32", webgpu_dev)
    lib["main"](runtime.tensor(xa, device=webgpu_dev), runtime.tensor(xb, device=webgpu_dev), out)
    np.testing.assert_allclose(out.numpy(), xa @ xb, rtol=1e-4, atol=1e-4)


def test_relax_vm_matmul_softmax(webgpu_dev, c, tmp_path):
    """A Relax module (dynamic rows) through gpu_generic's pipeline (dlight GPU rules), run by the Relax VM."""
    from edgellm._tvm import runtime

    relax, tirx = c.relax, c.tirx
    n = tirx.Var("n", "int64")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((n, 64), "float32"))
    w = relax.Var("w", relax.TensorType((64, 48), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, w))
            out = bb.emit_output(bb.emit(relax.op.nn.softmax(y, axis=-1)))
        bb.emit_func_output(out)
    target = c.Target("webgpu", host="llvm")
    ex = c.tvm.compile(bb.get(), target=target, relax_pipeline=relax.get_default_pipeline(target))
    vm = relax.VirtualMachine(export_and_load(ex, tmp_path, "softmax"), webgpu_dev)
    rng = np.random.default_rng(5)
    wa = (rng.standard_normal((64, 48)) * 0.2).astype("float32")
    for rows in (1, 7, 33):
        xa = rng.standard_normal((rows, 64)).astype("float32")
        got = vm["main"](runtime.tensor(xa, device=webgpu_dev), runtime.tensor(wa, device=webgpu_dev)).numpy()
        y = xa @ wa
        e = np.exp(y - y.max(-1, keepdims=True))
        np.testing.assert_allclose(got, e / e.sum(-1, keepdims=True), rtol=1e-5, atol=1e-6)


# -- TVM's paged KV cache ---------------------------------------------------------------------------------------

H, KV, D, LAYERS = 4, 2, 32, 2  # GQA: two query heads per KV head; page size 16 below


def kv_cache_module(c):
    """TVM's TIRPagedKVCache (its kernels built for webgpu, as web-llm does) and one attention layer over it."""
    nn, relax = c.nn, c.relax

    class Attention(nn.Module):
        def forward(self, qkv, cache):  # qkv [b, s, H + 2 KV, D] -> [b, s, H, D]
            return cache.attention_with_fused_qkv(1, qkv, H, sm_scale=D**-0.5), cache

        def create_tir_paged_kv_cache(self, max_batch_size, max_total_seq_len, prefill_chunk_size, page_size,
                                      support_sliding_window):
            return c.TIRPagedKVCache(
                attn_kind="mha", max_batch_size=max_batch_size, max_total_seq_len=max_total_seq_len,
                prefill_chunk_size=prefill_chunk_size, page_size=page_size,
                support_sliding_window=support_sliding_window, layer_partition=relax.ShapeExpr([0, LAYERS]),
                num_hidden_layers=LAYERS, num_attention_heads=H, num_key_value_heads=KV, qk_head_dim=D,
                v_head_dim=D, mla_original_qk_head_dim=0, mla_original_v_head_dim=0, rope_mode=c.RopeMode.NONE,
                rope_scale=1, rope_theta=10000, rope_scaling={}, rope_ext_factors=relax.prim_value(0),
                rotary_dim=D, enable_disaggregation=False, dtype="float32", target=c.Target.current())

    plain = {"param_mode": "none", "effect_mode": "none"}
    spec = {"forward": {"qkv": nn.spec.Tensor(["b", "s", H + 2 * KV, D], "float32"),
                        "cache": nn.spec.Object(object_type=c.PagedKVCache), "$": plain},
            "create_tir_paged_kv_cache": {"max_batch_size": int, "max_total_seq_len": int, "prefill_chunk_size": int,
                                          "page_size": int, "support_sliding_window": int, "$": plain}}
    target = c.Target("webgpu", host="llvm")
    with target:
        mod, _ = Attention().export_tvm(spec=spec)
    return c.tvm.compile(mod, target=target, relax_pipeline=c.relax.get_default_pipeline(target))


def causal_attention_np(q, k, v, start):
    """q [s, H, D] at positions start.., against k, v [n, KV, D] (the whole history) -> [s, H, D]."""
    out = np.zeros(q.shape, np.float64)
    for t in range(q.shape[0]):
        n = start + t + 1
        for h in range(H):
            s = k[:n, h // (H // KV)].astype(np.float64) @ q[t, h] * D**-0.5
            e = np.exp(s - s.max())
            out[t, h] = e @ v[:n, h // (H // KV)] / e.sum()
    return out


def test_paged_kv_cache_two_sequences(webgpu_dev, c, tmp_path):
    from edgellm._tvm import get_global_func, runtime

    vm = c.relax.VirtualMachine(export_and_load(kv_cache_module(c), tmp_path, "kv"), webgpu_dev)
    S = runtime.ShapeTuple
    cache = vm["create_tir_paged_kv_cache"](S([4]), S([512]), S([64]), S([16]), S([0]))
    add, begin, end = (get_global_func(f"vm.builtin.kv_state_{n}")
                       for n in ("add_sequence", "begin_forward", "end_forward"))
    rng = np.random.default_rng(6)
    history = {0: [], 1: []}  # per sequence: the qkv rows appended so far

    def forward(seqs, lens):
        begin(cache, S(seqs), S(lens))
        shape = (1, lens[0]) if len(seqs) == 1 else (len(seqs), 1)
        qkv = rng.standard_normal((*shape, H + 2 * KV, D)).astype("float32")
        got = vm["forward"](runtime.tensor(qkv, device=webgpu_dev), cache)[0].numpy()
        end(cache)
        for i, seq in enumerate(seqs):
            start = sum(len(x) for x in history[seq])
            history[seq].append(qkv[i])
            rows = np.concatenate(history[seq])
            want = causal_attention_np(qkv[i, :, :H], rows[:, H:H + KV], rows[:, H + KV:], start)
            np.testing.assert_allclose(got[i], want, rtol=0, atol=2e-5, err_msg=f"sequence {seq}, lens {lens}")

    add(cache, 0)
    forward([0], [5])  # prefill within one page
    add(cache, 1)
    forward([1], [37])  # prefill over three pages
    for _ in range(3):
        forward([0, 1], [1, 1])  # batch decode of both sequences
    forward([0], [20])  # a second prefill chunk: attends to the cached pages and itself
    forward([1], [1])


def test_binding_over_the_limit_is_one_error_and_the_device_recovers(webgpu_dev, c, tmp_path):
    from edgellm._tvm import runtime

    limit = webgpu_plugin.adapters()[0]["max_storage_buffer_binding_size"]
    if limit >= 1 << 30:
        pytest.skip(f"binding limit {limit} bytes: a buffer over it is too big for a unit test")
    lib = build_primfunc(c, scale_add_func(c), tmp_path=tmp_path)
    big = runtime.empty((limit // 4 + 1024,), "float32", webgpu_dev)  # allocates (maxBufferSize is larger), cannot bind
    small = runtime.tensor(np.arange(8, dtype="float32"), device=webgpu_dev)
    with pytest.raises(Exception, match="over maxStorageBufferBindingSize"):
        lib["main"](big._create_view((8,), "float32"), small, 8, 2.0)  # a view binds its whole buffer
    out = runtime.empty((8,), "float32", webgpu_dev)
    lib["main"](small, out, 8, 2.0)  # the queue is still usable
    np.testing.assert_array_equal(out.numpy(), np.arange(8, dtype="float32") * 2 + 1)


# -- edgellm's own webgpu kernels --------------------------------------------------------------------------------


@pytest.mark.parametrize("in_f,out_f,bias,dtype", [
    (576, 100, True, "float32"),    # 72 words: the last unrolled step is partial (guard on k); 1 row a warp
    (1024, 6144, False, "float16"),  # 4 rows a warp; fp16 activations, scales and output
    (4096, 4096, False, "float16"),  # 2 rows a warp, 16 steps
])
def test_coalesced_int4_gemv_matches_numpy(webgpu_dev, c, tmp_path, in_f, out_f, bias, dtype):
    from edgellm.kernels.webgpu_linear import int4_gemv_coalesced
    from edgellm.quant import get_scheme
    from edgellm.quant.reference import dequantize, quantize

    scheme = get_scheme("q4f32_1" if dtype == "float32" else "q4f16_1")
    rng = np.random.default_rng(in_f + out_f)
    qw, qs = quantize(rng.standard_normal((out_f, in_f)).astype(np.float32), scheme)
    x = rng.standard_normal((1, in_f)).astype(dtype)
    b = rng.standard_normal(out_f).astype(dtype)
    ref = x.astype(np.float32) @ dequantize(qw, qs, in_f, scheme).T + (b.astype(np.float32) if bias else 0)
    func = int4_gemv_coalesced(in_f, out_f, dtype, scheme.scale_dtype, dtype, bias)
    mod = export_and_load(c.tvm.compile(c.tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                                        target=c.Target("webgpu", host="llvm")), tmp_path)
    from edgellm._tvm import runtime

    args = [x, qw, qs.astype(scheme.scale_dtype)] + ([b] if bias else []) + [np.zeros((1, out_f), dtype)]
    tensors = [runtime.tensor(a, webgpu_dev) for a in args]
    mod["main"](*tensors)
    got = tensors[-1].numpy().astype(np.float32)
    assert np.abs(got - ref).max() / np.abs(ref).max() < (1e-5 if dtype == "float32" else 2e-3)


def _h2_model(x16: np.ndarray, qw: np.ndarray, qs16: np.ndarray) -> np.ndarray:
    """numpy model of int4_gemv_h2's fp16x2 arithmetic (kernels/webgpu_linear.py): per lane-group, two fp16
    accumulators (even / odd words), each step `fma((32 + nib/32) - (32 + 7/32), x, acc)` rounded to fp16 (the
    difference is exact); per group float32 `acc += (sum of the 4 halves) * (scale * 32)`; float32 across groups."""
    out_f, words = qw.shape
    groups = words // 4
    shifts = np.arange(8, dtype=np.uint32) * 4
    nib = ((qw[:, :, None] >> shifts) & 15).astype(np.float32)  # [out, word, e]
    d = ((nib + 1024) / 32 - np.float32(32 + 7 / 32)).astype(np.float16).astype(np.float32)  # (nib - 7) / 32
    x = x16.astype(np.float32).reshape(groups, 4, 8)  # [g, q, e]
    d = d.reshape(out_f, groups, 4, 8)
    acc = np.zeros((out_f, groups, 2, 8), np.float16)  # [.., q % 2, e] (e and e+4: the two halves of a pair)
    for q in range(4):
        for s in range(4):
            for e in (s, s + 4):
                a = acc[:, :, q % 2, e].astype(np.float32)
                acc[:, :, q % 2, e] = (d[:, :, q, e] * x[None, :, q, e] + a).astype(np.float16)
    a = acc.astype(np.float32)
    t = ((a[:, :, 0, :4] + a[:, :, 0, 4:]) + (a[:, :, 1, :4] + a[:, :, 1, 4:])).sum(-1)
    return (t * (qs16.astype(np.float32) * 32)).sum(-1, dtype=np.float32)


@pytest.mark.parametrize("in_f,out_f,bias,h2,vec4,cfg", [
    (2048, 600, False, True, True, (8, 2, 1)),  # 64 groups: 2 steps (the next step's loads double-buffered); 600
                                                # rows: the last block's rows clamped
    (4096, 40, False, True, True, (4, 1, 2)),   # 128 groups: 2 steps of 2 groups a lane
    (288, 70, True, True, False, None),         # 9 groups (lanes past them idle), bias, 1 row a warp; plain loads
    (288, 70, True, False, True, None),         # the float32 twin (adapters without shader-f16): same layout
    (2048, 300, False, True, True, (4, 2, 1, 8)),  # 8-bit rows (the head's q8f16_1): two vec4 loads a group
    (288, 70, False, False, True, (4, 1, 1, 8)),   # 8-bit, float32 twin
    (4096, 72, False, True, True, (4, 2, 1, 4, 2)),  # ksplit 2: teams of 2 warps, 2 steps, 4 rows a workgroup
    (288, 70, True, True, True, (4, 1, 1, 4, 2)),    # ksplit 2 over 9 groups (the second warp's lanes past them)
    (2048, 300, False, True, True, (8, 2, 2, 8, 4)),  # 8-bit rows, ksplit 4: one step of 2 groups a lane
    (4096, 72, False, "f32", True, (4, 2, 1, 4, 1)),  # xf32: float32 staging and arithmetic, 4 steps
    (288, 70, True, "f32", True, (4, 1, 2, 4, 2)),    # xf32 with bias and ksplit over 9 groups
    (4096, 72, False, "f32", True, (4, 2, 1, 4, 1, 4)),  # xf32, 4 chains (one sum a word)
    (2048, 600, False, True, True, (8, 2, 1, 4, 1, 4)),  # h2, 4 chains (one fp16x2 accumulator a word)
    (2048, 300, False, True, True, (4, 2, 1, 8, 1, 4)),  # 8-bit rows, 4 chains
    (2048, 600, True, True, True, (8, 2, 1, 4, 1, None, 3)),  # 3 row blocks a workgroup on one staging, bias
    (4096, 72, False, True, True, (4, 2, 1, 4, 2, None, 2)),  # 2 row blocks a workgroup, ksplit 2
])
def test_h2_int4_gemv_matches_numpy(webgpu_dev, c, tmp_path, monkeypatch, in_f, out_f, bias, h2, vec4, cfg):
    from edgellm._tvm import runtime
    from edgellm.kernels.webgpu_linear import int4_gemv_h2
    from edgellm.quant import get_scheme
    from edgellm.quant.reference import dequantize, quantize

    if h2 and not json.loads(str(_adapters()))[0].get("shader_f16"):
        pytest.skip("adapter has no shader-f16")
    xf32, h2 = h2 == "f32", bool(h2)
    monkeypatch.setenv("EDGELLM_WEBGPU_VEC4", "1" if vec4 else "0")
    bits = cfg[3] if cfg and len(cfg) > 3 else 4
    ks = cfg[4] if cfg and len(cfg) > 4 else None
    chains = cfg[5] if cfg and len(cfg) > 5 else None
    passes = cfg[6] if cfg and len(cfg) > 6 else None
    scheme = get_scheme("q4f16_1" if bits == 4 else "q8f16_1")
    rng = np.random.default_rng(in_f + out_f)
    qw, qs = quantize(rng.standard_normal((out_f, in_f)).astype(np.float32), scheme)
    qs16 = qs.astype(np.float16)
    dt = "float16" if h2 else "float32"
    x = (rng.standard_normal((1, in_f)) * 3).astype(np.float16).astype(dt)
    b = rng.standard_normal(out_f).astype(dt)
    ref = x.astype(np.float64) @ dequantize(qw, qs16.astype(np.float32), in_f, scheme).T.astype(np.float64)
    ref = ref[0] + (b.astype(np.float64) if bias else 0)
    func = int4_gemv_h2(in_f, out_f, bias, *(cfg or ())[:3], h2=h2, x_dtype=dt, out_dtype=dt, bits=bits, ksplit=ks,
                        xf32=xf32, chains=chains, passes=passes)
    mod = export_and_load(c.tvm.compile(c.tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                                        target=c.Target("webgpu", host="llvm")), tmp_path,
                          f"h2_{in_f}_{h2}_{vec4}_{bits}_{ks}_{xf32}_{chains}_{passes}")
    assert ("array<vec4<u32>>" in mod.imports[0].inspect_source()) == vec4  # the plugin's rewrite applied or not
    args = [x, qw, qs16] + ([b] if bias else []) + [np.zeros((1, out_f), dt)]
    tensors = [runtime.tensor(a, webgpu_dev) for a in args]
    mod["main"](*tensors)
    got = tensors[-1].numpy()[0].astype(np.float64)
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() / scale < (1e-3 if h2 else 1e-5)  # h2: ~5e-4, half of it the fp16 output
    if xf32:  # float32 sums: only the fp16 output's rounding (2^-11 of the value) is left
        assert np.all(np.abs(got - ref) <= np.abs(ref) * 2.0**-11 + scale * 1e-5)
    elif h2 and bits == 4 and not chains:
        # the fp16 arithmetic step by step (lavapipe keeps f16 intermediates in f32: not bit for bit)
        model = _h2_model(x[0], qw, qs16) + (b.astype(np.float32) if bias else 0)
        assert np.abs(model - ref).max() / scale < 5e-4 and np.abs(got - model).max() / scale < 1e-3


def _adapters():
    from edgellm._tvm import get_global_func

    return get_global_func("edgellm.webgpu.adapters")()


def test_vec4_rewrite_of_wgsl_text(webgpu_dev):
    """The plugin's one WGSL edit (module.cc RewriteVec4Loads): a `_vec4` u32 buffer read only through aligned
    vec4 loads becomes an array<vec4<u32>> with one load each; any other access leaves the source as it was."""
    from edgellm._tvm import get_global_func

    rewrite = get_global_func("edgellm.webgpu.rewrite_wgsl")
    decl = "@group(0) @binding(1) var<storage, read> w_vec4_ptr : array<u32>;\n"
    other = "@group(0) @binding(0) var<storage, read> q_ptr : array<u32>;\n"
    load = "vec4<u32>(w_vec4_ptr[v__3 + 0], w_vec4_ptr[v__3 + 1], w_vec4_ptr[v__3 + 2], w_vec4_ptr[v__3 + 3])"
    qload = "vec4<u32>(q_ptr[v__3 + 0], q_ptr[v__3 + 1], q_ptr[v__3 + 2], q_ptr[v__3 + 3])"
    src = other + decl + f"fn f() {{\n  a = {load};\n  b = {qload};\n  c = {load.replace('v__3', '(i * 8i)')};\n}}\n"
    want = other + decl.replace("array<u32>", "array<vec4<u32>>") + (
        f"fn f() {{\n  a = w_vec4_ptr[(v__3) / 4i];\n  b = {qload};\n  c = w_vec4_ptr[((i * 8i)) / 4i];\n}}\n")
    assert str(rewrite(src)) == want
    scalar = src.replace("}\n", "  d = w_vec4_ptr[7];\n}\n")  # a scalar access: left alone
    assert str(rewrite(scalar)) == scalar
    assert str(rewrite(src.replace("w_vec4_ptr[v__3 + 2]", "w_vec4_ptr[v__3 + 5]", 1))) == \
        src.replace("w_vec4_ptr[v__3 + 2]", "w_vec4_ptr[v__3 + 5]", 1)  # not a vec4 load: left alone
    half = src.replace("w_vec4_ptr : array<u32>", "w_vec4_ptr : array<f16>").replace("vec4<u32>(w_", "vec4<f16>(w_")
    assert str(rewrite(half)) == want.replace("w_vec4_ptr : array<vec4<u32>>", "w_vec4_ptr : array<vec4<f16>>")
    wide = src.replace("w_vec4_ptr : array<u32>", "w_vec4_ptr : array<vec2<u32>>")  # not a scalar array: alone
    assert str(rewrite(wide)) == wide


@pytest.mark.parametrize("in_f,out_f,fuse,ks,passes", [(1024, 4096, "norm", None, None), (512, 384, "silu", None, None),
                                                       (544, 400, "norm+silu", None, None),
                                                       (1024, 400, "norm+silu", 2, None),
                                                       (544, 400, "norm+silu", None, 3)])
def test_h2_int4_gemv_fusions_match_numpy(webgpu_dev, c, tmp_path, in_f, out_f, fuse, ks, passes):
    """registry.fused_gemv's webgpu kernels: rms_norm(x + delta) staged by the GEMV (and x + delta written by
    workgroup 0, exactly), silu(gate) * up in its epilogue; against numpy float64 of the separate steps."""
    from edgellm._tvm import runtime
    from edgellm.kernels.webgpu_linear import int4_gemv_h2
    from edgellm.quant import get_scheme
    from edgellm.quant.reference import dequantize, quantize

    if not json.loads(str(_adapters()))[0].get("shader_f16"):
        pytest.skip("adapter has no shader-f16")
    norm, silu, eps = "norm" in fuse, "silu" in fuse, 1e-5
    scheme = get_scheme("q4f16_1")
    rng = np.random.default_rng(in_f)
    qw, qs = quantize(rng.standard_normal((out_f, in_f)).astype(np.float32), scheme)
    qs16 = qs.astype(np.float16)
    x, d = (rng.standard_normal((2, 1, in_f)) * 2).astype(np.float16)
    w = (rng.random(in_f) + 0.5).astype(np.float16)
    s = (x.astype(np.float32) + d.astype(np.float32)).astype(np.float16)
    if norm:
        s32 = s.astype(np.float32)
        h = (s32 / np.sqrt((s32 * s32).mean() + eps) * w.astype(np.float32)).astype(np.float16)
    else:
        h = x
    y = (h.astype(np.float64) @ dequantize(qw, qs16.astype(np.float32), in_f, scheme).T.astype(np.float64))[0]
    if silu:
        g, u = y[: out_f // 2], y[out_f // 2:]
        y = g / (1 + np.exp(-g)) * u
    func = int4_gemv_h2(in_f, out_f, False, norm_eps=eps if norm else None, silu=silu, ksplit=ks, passes=passes)
    mod = export_and_load(c.tvm.compile(c.tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                                        target=c.Target("webgpu", host="llvm")), tmp_path,
                          f"fuse_{in_f}_{ks}_{passes}")
    args = ([x, d, w] if norm else [x]) + [qw, qs16, np.zeros((1, len(y)), np.float16)]
    args += [np.zeros((1, in_f), np.float16)] if norm else []
    tensors = [runtime.tensor(a, webgpu_dev) for a in args]
    mod["main"](*tensors)
    out = tensors[len(args) - (2 if norm else 1)].numpy()[0].astype(np.float64)
    assert np.abs(out - y).max() / np.abs(y).max() < 2e-3
    if norm:
        assert np.array_equal(tensors[-1].numpy(), s)
