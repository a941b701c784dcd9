"""edgellm's own paged KV cache for CUDA (`--opt cuda_kv=owned`, kernels/owned_kv.py, device_runners/kv_pages.py).

Here, without a GPU: the host page bookkeeping against TVM's PagedKVCache on the same operations (pages per sequence
while prefilling and decoding, remove, re-add, the pool running out), fork, the RoPE table against transformers',
and the CUDA build: decode is ONE captured CUDA graph (every kernel of the step inside it), the functions take the
cache's tensors, and the option is refused where it cannot apply. The kernels' numbers (against transformers fp16
and the TVM-cache build, on an H200) come from bench/gpu_graph.py: docs/benchmarks/h200-graph.md."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from edgellm.device_runners.kv_pages import PAGE, CacheFullError, PagePool

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CUDA toolkit)")


def _pages(n_tokens: int) -> int:
    return -(-n_tokens // PAGE)


def test_pool_grows_a_page_at_a_time_and_rows_point_at_scratch():
    pool = PagePool(total=10, max_pages=4)
    pool.add(7)
    row = np.full(4, -1, np.int32)
    for n, pages in ((1, 1), (15, 1), (1, 2), (16, 3), (31, 4)):  # cumulative 1, 16, 17, 33, 64 tokens
        pool.append(7, n)
        assert len(pool.pages(7)) == pages
    assert pool.length(7) == 64 and pool.free == 6
    pool.row(7, row)
    assert row.tolist() == pool.pages(7) and len(set(row.tolist())) == 4
    with pytest.raises(CacheFullError, match="over the 64"):
        pool.append(7, 1)  # the page table of a sequence is full
    pool.add(8)
    pool.append(8, 3)
    pool.row(8, row)
    assert row[0] == pool.pages(8)[0] and (row[1:] == pool.scratch).all() and pool.scratch == 10
    with pytest.raises(ValueError, match="already in the KV cache"):
        pool.add(8)
    with pytest.raises(ValueError, match="not in the KV cache"):
        pool.append(9, 1)


def test_pool_runs_out_then_remove_gives_pages_back():
    pool = PagePool(total=5, max_pages=8)
    pool.add(0)
    pool.append(0, 48)  # 3 pages
    pool.add(1)
    with pytest.raises(CacheFullError, match="needs 3 more KV pages and 2 are free"):
        pool.append(1, 40)
    assert pool.length(1) == 0 and pool.free == 2  # a refused append changes nothing
    pool.remove(0)
    assert pool.free == 5
    pool.append(1, 40)
    assert pool.free == 2


def test_fork_shares_full_pages_and_copies_the_partial_one():
    pool = PagePool(total=8, max_pages=8)
    pool.add(0)
    pool.append(0, 40)  # pages a b c, c holds 8 slots
    a, b, c = pool.pages(0)
    src, dst, slots = pool.fork(0, 1)
    assert (src, slots) == (c, 8) and pool.pages(1) == [a, b, dst] and pool.length(1) == 40 and pool.free == 4
    pool.append(1, 10)  # the child writes into its own copy of the partial page, then a new one
    assert pool.pages(1)[:3] == [a, b, dst] and pool.pages(0) == [a, b, c]
    pool.remove(0)  # a and b stay: the child still holds them
    assert pool.free == 8 - 4 and pool.pages(1)[:2] == [a, b]
    pool.remove(1)
    assert pool.free == 8
    pool.add(2)
    pool.append(2, 32)
    assert pool.fork(2, 3) is None and pool.pages(3) == pool.pages(2)  # page-aligned: nothing to copy


def test_pool_counts_pages_as_tvms_cache_does(compiled):
    """The same operations on TVM's PagedKVCache (a CPU artifact) and on PagePool: pages in use agree after each."""
    from edgellm.device_runners.engine import Engine

    eng = Engine(compiled("llama", "q0f32"), threads=1)
    pool = PagePool(total=eng.total_pages, max_pages=_pages(eng.context_window))
    rng = np.random.default_rng(0)
    seqs = {}
    for step, (op, n) in enumerate([("add", 17), ("add", 16), ("decode", 0), ("add", 1), ("remove", 1),
                                    ("decode", 0), ("add", 40), ("remove", 0), ("decode", 0), ("add", 33)]):
        if op == "add":
            s = eng.add_sequence()
            pool.add(s)
            eng.prefill(s, [int(x) for x in rng.integers(3, 300, n)])
            pool.append(s, n)
            seqs[s] = n
        elif op == "remove":
            s = sorted(seqs)[n]
            eng.remove_sequence(s)
            pool.remove(s)
            del seqs[s]
        else:  # one token for every live sequence: some cross a page boundary (16 -> 17, 32 -> 33)
            for _ in range(17):
                ss = sorted(seqs)
                eng.decode(ss, [5] * len(ss), batched=False)
                for s in ss:
                    pool.append(s, 1)
        assert eng.pages_in_use() == pool.total - pool.free, f"step {step} ({op})"
    for s in list(seqs):
        eng.remove_sequence(s)
    assert eng.pages_in_use() == 0


@pytest.mark.parametrize("scaling", [None, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                     {"rope_type": "linear", "factor": 4.0}])
def test_rope_table_matches_transformers(scaling):
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from edgellm.kernels.owned_kv import rope_inv_freq

    cfg = LlamaConfig(hidden_size=2048, num_attention_heads=32, rope_theta=500000.0, rope_scaling=scaling,
                      max_position_embeddings=131072)
    kind = (scaling or {}).get("rope_type", "default")
    ref, _ = ROPE_INIT_FUNCTIONS[kind](cfg, torch.device("cpu")) if kind != "default" else (
        1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64)), 1.0)
    got = rope_inv_freq(64, 500000.0, scaling)
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6)
    assert rope_inv_freq(64, 1e4, {"rope_type": "yarn", "factor": 2.0}) is None  # -> TVM's cache


def test_owned_option_refused_where_it_cannot_apply(checkpoints, tmp_path):
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.kernels import KernelOptions

    with pytest.raises(ValueError, match="cuda_kv=owned needs CUDA sm_80"):
        compile_model(CompileArgs(model=str(checkpoints["llama"]), output=tmp_path / "x", quant="q0f32",
                                  kernel_options=KernelOptions(cuda_kv="owned")))
    assert not (tmp_path / "x").exists()


@needs_nvcc
def test_cuda_decode_is_one_graph(tmp_path):
    """A head_dim-64 tiny Llama with the owned cache: decode's body is one `run_or_capture` whose capture function
    holds every kernel of the step (embedding, per layer norm / qkv / append / attention / merge / o / norm / MLP, the
    head); outside it only the float32 cast of the logits runs. batch_decode and prefill take the same tensors."""
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_models
    from tiny_models import make_checkpoint

    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.kernels import KernelOptions

    tiny_models.SPECS["llama_d64"] = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 128,
                                      "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                                      "tie_word_embeddings": False}
    try:
        ckpt = make_checkpoint(tmp_path / "ckpt", "llama_d64")
    finally:
        del tiny_models.SPECS["llama_d64"]
    compile_model(CompileArgs(model=str(ckpt), output=tmp_path / "art", target="cuda-sm90", quant="q4f16_1",
                              runtime=RuntimeOptions(256, 64, 16, 2), kernel_options=KernelOptions(cuda_kv="owned"),
                              dump_ir=tmp_path / "ir"))
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert "create_tir_paged_kv_cache" not in manifest["functions"] and manifest["kernels"]["options"]["cuda_kv"] == "owned"
    assert "owned_append" in manifest["kernels"]["chosen"]["kv_append"]
    text = (tmp_path / "ir" / "phase6_finalize.py").read_text()
    funcs = dict(re.findall(r"\n    def (\w+)\((.*?)\n(?=    @|\Z)", text, re.S))
    decode = funcs["decode"]
    assert decode.count("vm.builtin.cuda_graph.run_or_capture") == 1
    outside = re.findall(r"cls\.(\w+)\(", decode)
    assert outside == ["fused_reshape25_cast1"] or (len(outside) == 1 and "cast" in outside[0]), outside
    capture = funcs["decode_cuda_graph_capture"]
    inside = re.findall(r"cls\.(\w+)\(", capture)
    assert sum("kv_append" in k for k in inside) == 2 and sum("paged_attn" in k for k in inside) == 4
    assert any("embedding" in k for k in inside) and len(inside) >= 2 * 9 + 3
    for name in ("batch_decode", "prefill", "prefill_logits"):
        assert re.search(rf"def {name}\(ids: [^\n]*cache: [^\n]*page_table: [^\n]*pos0: ", text), name
