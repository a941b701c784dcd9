"""Our CPU kernels (kernels/cpu_attention.py: paged-KV-cache attention and RoPE; kernels/cpu_math.py) against numpy and
against TVM's own kernels."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm._tvm import compiler

c = compiler()
tvm = c.tvm
P = 16  # page size of TVM's cache kernels
HOST = c.Target({"kind": "llvm"})


def _build(func):
    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=HOST)["main"]


def _t(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


def _paged(rng, lens, kv, d):
    """A shuffled page pool holding one cache per sequence; page table in TVM's (indptr, values, last_len) form."""
    npages = [(n + P - 1) // P for n in lens]
    pool = rng.standard_normal((sum(npages) + 2, 2, kv, P, d)).astype("float32")
    pool[-2:] = np.nan  # pages no sequence owns: must never be read
    values = rng.permutation(sum(npages)).astype("int32")
    indptr = np.concatenate([[0], np.cumsum(npages)]).astype("int32")
    last = np.array([n - (m - 1) * P for n, m in zip(lens, npages)], "int32")
    for b, n in enumerate(lens):  # rows past each sequence's end hold garbage too
        pool[values[indptr[b + 1] - 1], :, :, last[b]:] = np.nan
    return pool, indptr, values, last


def _attention_np(q, pool, indptr, values, last, sm_scale):
    b_, h, d = q.shape
    kv = pool.shape[2]
    out, lse = np.zeros((b_, h, d)), np.zeros((b_, h))
    for b in range(b_):
        pages = values[indptr[b] : indptr[b + 1]]
        n = (len(pages) - 1) * P + last[b]
        k = pool[pages, 0].transpose(1, 0, 2, 3).reshape(kv, -1, d)[:, :n].astype(np.float64)
        v = pool[pages, 1].transpose(1, 0, 2, 3).reshape(kv, -1, d)[:, :n].astype(np.float64)
        for i in range(h):
            s = k[i // (h // kv)] @ q[b, i] * sm_scale
            e = np.exp(s - s.max())
            out[b, i] = e @ v[i // (h // kv)] / e.sum()
            lse[b, i] = (s.max() + np.log(e.sum())) / np.log(2)  # TVM's convention: log2 domain
    return out, lse


@pytest.mark.parametrize("heads,kv,d", [(9, 3, 64), (4, 1, 16), (2, 2, 128)])
@pytest.mark.parametrize("lens", [[1], [16], [17], [300], [5, 1, 48, 33]])
def test_decode_attention_matches_numpy(heads, kv, d, lens):
    from edgellm.kernels.cpu_attention import attention_decode_cpu

    rng = np.random.default_rng(len(lens) * 1000 + sum(lens) + d)
    pool, indptr, values, last = _paged(rng, lens, kv, d)
    q = (rng.standard_normal((len(lens), heads, d)) * 2).astype("float32")
    zeros = np.zeros(len(lens), "int32")
    out, lse = _t(np.zeros((len(lens), heads, d), "float32")), _t(np.zeros((len(lens), heads), "float32"))
    f = _build(attention_decode_cpu(kv, heads, d, "float32"))
    f(_t(q), _t(pool), _t(indptr), _t(values), _t(last), _t(zeros), _t(zeros), out, lse, 0, 1.0, 1e4, d**-0.5)
    want_out, want_lse = _attention_np(q, pool, indptr, values, last, d**-0.5)
    np.testing.assert_allclose(out.numpy(), want_out, rtol=0, atol=2e-5)
    np.testing.assert_allclose(lse.numpy(), want_lse, rtol=0, atol=2e-5)


def test_fast_exp2_relative_error():
    from edgellm.kernels.cpu_math import fast_exp2

    x = np.concatenate([np.linspace(-126, 20, 20011), [-0.5, 0.0, 0.5, -1e4, -5e4]]).astype("float32")
    te = c.te
    a = te.placeholder((len(x),), "float32", "a")
    y = te.compute(a.shape, lambda i: fast_exp2(a[i]), name="y")
    f = _build(te.create_prim_func([a, y]))
    out = _t(np.zeros_like(x))
    f(_t(x), out)
    want = np.exp2(x.astype(np.float64))
    got = out.numpy().astype(np.float64)
    normal = want > 2.0**-125
    assert np.max(np.abs(got[normal] / want[normal] - 1)) < 5e-7
    assert np.all(got[x < -127] == 0)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("rope_scaling", [{}, LLAMA3], ids=["plain", "llama3"])
@pytest.mark.parametrize("tokens", [1, 5, 40])
@pytest.mark.parametrize("apply_rope", [1, 0])
def test_split_rotary_equals_tvm_kernel(rope_scaling, tokens, apply_rope):
    from edgellm.kernels.cpu_attention import split_rotary_cpu

    h, kv, d = 9, 3, 64
    rng = np.random.default_rng(tokens)
    qkv = rng.standard_normal((tokens, h + 2 * kv, d)).astype("float32")
    pos = rng.integers(0, 9000, tokens).astype("int32")
    results = []
    for func in (split_rotary_cpu(5e5, 1.0, d, h, kv, "float32", rope_scaling, d),
                 c.llm_rope.llama_rope_with_position_map(5e5, 1.0, d, h, kv, "float32", rope_scaling, d)):
        outs = [_t(np.zeros((tokens, n, d), "float32")) for n in (h, kv, kv)]
        _build(func)(_t(qkv), _t(pos), *outs, apply_rope)
        results.append([o.numpy() for o in outs])
    for ours, theirs in zip(*results):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


def test_cpu_cache_swaps_kernels_and_gpu_cache_does_not():
    """paged_kv_cache replaces TVM's decode/prefill attention and split_rotary only for llvm targets."""
    from edgellm.config import ModelConfig
    from edgellm.kernels import KernelRegistry
    from edgellm.models.llama import LlamaForCausalLM
    from edgellm.quant.schemes import SCHEMES

    cfg = ModelConfig.from_hf(dict(model_type="llama", hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=256, rms_norm_eps=1e-5, max_position_embeddings=256))
    for target, ours in ((HOST, True), (c.Target({"kind": "cuda", "arch": "sm_80"}, host=HOST), False)):
        model = LlamaForCausalLM(cfg, SCHEMES["q4f32_1"], KernelRegistry(target))
        with target:
            mod, _ = model.export_tvm(spec=model.export_spec())
        fn = {gv.name_hint: f for gv, f in mod.functions_items()}  # named by global symbol after export
        rope = fn["fused_rope"].script()
        if ours:
            assert "edgellm CPU decode attention" in fn["batch_decode_paged_kv_cpu"].script()
            assert "edgellm CPU prefill attention" in fn["batch_prefill_ragged_kv"].script()
            assert "T.parallel" in rope and "T.vectorized" in rope
        else:
            assert "batch_decode_paged_kv_cpu" not in fn and "batch_decode_paged_kv" in fn
            assert "edgellm" not in fn["batch_prefill_ragged_kv"].script()
            assert "T.vectorized" not in rope


def test_cpu_silu_matches_numpy():
    from edgellm.kernels.cpu_math import silu

    x = np.concatenate([np.linspace(-100, 100, 40001), [-1e4, 1e4, 0.0]]).astype("float32")
    te = c.te
    a = te.placeholder((len(x),), "float32", "a")
    f = _build(te.create_prim_func([a, te.compute(a.shape, lambda i: silu(a[i]), name="y")]))
    out = _t(np.zeros_like(x))
    f(_t(x), out)
    want = x.astype(np.float64) / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(out.numpy(), want, rtol=2e-6, atol=1e-12)  # float32 range reduction: |x| log2e


@pytest.mark.parametrize("qlens,kvlens,causal", [([1], [1], 1), ([40], [40], 1), ([7, 20, 1], [7, 20, 1], 1),
                                                  ([3], [30], 1), ([17], [17], 0), ([130], [130], 1)])
def test_prefill_ragged_attention_equals_tvm_kernel(qlens, kvlens, causal):
    from edgellm.kernels.cpu_attention import attention_prefill_ragged_cpu

    h, kv, d = 9, 3, 64
    rng = np.random.default_rng(sum(qlens) + causal)
    q = rng.standard_normal((sum(qlens), h, d)).astype("float32") * 2
    k, v = (rng.standard_normal((sum(kvlens), kv, d)).astype("float32") for _ in range(2))
    q_indptr, kv_indptr = (np.concatenate([[0], np.cumsum(n)]).astype("int32") for n in (qlens, kvlens))
    results = []
    for func in (attention_prefill_ragged_cpu(kv, h, d, "float32"),
                 c.llm_kv_cache._attention_prefill_ragged_cpu(kv, h, d, d, "float32", {})):
        out, lse = _t(np.zeros(q.shape, "float32")), _t(np.zeros(q.shape[:2], "float32"))
        _build(func)(_t(q), _t(q_indptr), _t(k), _t(v), _t(kv_indptr), _t(np.zeros(len(q), "int32")),
                     _t(np.zeros(len(qlens), "int32")), out, lse, causal, 0, 1.0, 1e4, d**-0.5)
        results.append((out.numpy(), lse.numpy()))
    (o1, l1), (o2, l2) = results
    np.testing.assert_allclose(o1, o2, rtol=0, atol=1e-5)
    np.testing.assert_allclose(l1, l2, rtol=0, atol=1e-5)
    # and numpy for one row: the last query of the first sequence sees every key of it (causal)
    n = kvlens[0]
    s = k[:n, 0] @ q[qlens[0] - 1, 0].astype(np.float64) * d**-0.5
    e = np.exp(s - s.max())
    np.testing.assert_allclose(o1[qlens[0] - 1, 0], e @ v[:n, 0] / e.sum(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("n,hidden", [(1, 576), (5, 64), (40, 80)])
def test_add_rms_norm_matches_numpy(n, hidden):
    from edgellm.kernels.cpu_math import add_rms_norm_cpu

    rng = np.random.default_rng(n)
    x, y = (rng.standard_normal((n, hidden)).astype("float32") * 3 for _ in range(2))
    w = rng.standard_normal(hidden).astype("float32")
    s, out = _t(np.zeros((n, hidden), "float32")), _t(np.zeros((n, hidden), "float32"))
    _build(add_rms_norm_cpu(hidden, 1e-5, "float32"))(_t(x), _t(y), _t(w), s, out)
    want = x.astype(np.float64) + y
    np.testing.assert_array_equal(s.numpy(), x + y)
    np.testing.assert_allclose(out.numpy(), want / np.sqrt((want**2).mean(-1, keepdims=True) + 1e-5) * w,
                               rtol=0, atol=2e-6)
