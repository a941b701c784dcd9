"""edgellm's own paged KV cache for CUDA (`--opt cuda_kv=owned`, kernels/owned_kv.py, device_runners/kv_pages.py).

Here, without a GPU: the host page bookkeeping against TVM's PagedKVCache on the same operations (pages per sequence
while prefilling and decoding, remove, re-add, the pool running out), fork, what the Engine's owned-cache forward
feeds each call (positions, page rows, ids; all-or-nothing when the pool is full; a fake VM records it), the RoPE
table against transformers', and the CUDA build: decode is ONE captured CUDA graph (every kernel of the step inside it), the functions take the
cache's tensors, and the option is refused where it cannot apply. The kernels' numbers (against transformers fp16
and the TVM-cache build, on an H200) come from bench/gpu_graph.py: docs/benchmarks/h200-graph.md."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgellm.device_runners.kv_pages import PAGE, CacheFullError, PagePool
from edgellm.kernels import cuda_pdl, owned_kv

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


def test_decode_attn_auto_takes_the_warps_kernel_where_measured(monkeypatch):
    """DECODE_ATTN "auto": the warps kernel up to 4 q heads per kv head (SmolLM2, Llama-3.2-1B, Llama-3-8B: the
    fastest on the H200, run 16); beyond, the merge in the attention kernel's last block where a kv head's output
    G * D is at most 256 values, else a merge kernel (run 15)."""
    from edgellm.kernels import owned_kv

    assert owned_kv.DECODE_ATTN == "auto"
    assert owned_kv.decode_attn_mode(9, 3, 64) == "warps"  # SmolLM2-135M
    assert owned_kv.decode_attn_mode(32, 8, 64) == "warps"  # Llama-3.2-1B
    assert owned_kv.decode_attn_mode(32, 8, 128) == "warps"  # Llama-3-8B
    assert owned_kv.decode_attn_mode(28, 4, 128) == "fused"  # Qwen2.5-7B: G 7, not measured with warps
    assert owned_kv.decode_attn_mode(14, 2, 64) == "fused"  # Qwen2.5-0.5B: G 7, 448 values
    assert owned_kv.decode_attn_mode(12, 2, 16) == "fused_merge"  # G 6, 96 values
    monkeypatch.setattr(owned_kv, "DECODE_ATTN", "fused")
    assert owned_kv.decode_attn_mode(9, 3, 64) == "fused"  # a mode set by hand is kept


def _d64_checkpoint(tmp_path):
    """A head_dim-64 tiny Llama (2 layers, 2 q heads on 1 kv head): the owned cache applies to it."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny_models

    tiny_models.SPECS["llama_d64"] = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 128,
                                      "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                                      "tie_word_embeddings": False}
    try:
        return tiny_models.make_checkpoint(tmp_path / "ckpt", "llama_d64")
    finally:
        del tiny_models.SPECS["llama_d64"]


@needs_nvcc
@pytest.mark.parametrize("mode", ["auto", "fused", "split"])  # auto is "warps" here (asserted): one build less
def test_cuda_decode_step_is_captured_in_a_chain_of_graphs(tmp_path, monkeypatch, mode):
    """A head_dim-64 tiny Llama with the owned cache: every kernel of a decode step (embedding, per layer norm / qkv /
    attention (with RoPE, append and merge) / o / norm / MLP, the head) is inside CUDA graphs; outside them only the
    float32 cast of the logits runs. With the split lowered to this model's size (pieces of 2 and 4 kernels, then
    the rest; a real model's first pieces are 8 and 32), the step is three graphs replayed in order, each given the
    packed parameters whole (so a replay unpacks no weight) and the tensors an earlier piece wrote. batch_decode
    and prefill take the same tensors. For the default decode attention (one kernel a layer, the merge in it) and
    for the A/B modes "fused" (its kernel, then the merge kernel), "split" and "warps" (one kernel a layer, a warp
    a tile)."""
    import json

    from edgellm.compile import CompileArgs, compile_model, pipeline
    from edgellm.config import RuntimeOptions
    from edgellm.kernels import KernelOptions

    assert owned_kv.DECODE_ATTN == "auto" and mode in owned_kv.DECODE_ATTN_MODES
    monkeypatch.setattr(owned_kv, "DECODE_ATTN", mode)
    resolved = owned_kv.decode_attn_mode(2, 1, 64)  # this model's G is 2: "auto" takes the warps kernel
    assert resolved == ("warps" if mode == "auto" else mode)  # so "auto" covers the "warps" mode
    mode = resolved
    monkeypatch.setattr(pipeline, "GRAPH_PIECES", (2, 4))
    monkeypatch.setattr(pipeline, "SPLIT_MIN_KERNELS", 8)
    ckpt = _d64_checkpoint(tmp_path)
    sources, build = [], pipeline.build

    def keep(*args, **kwargs):
        ex = build(*args, **kwargs)
        sources.extend(m.inspect_source() for m in _modules(ex.mod) if m.kind == "cuda")
        return ex

    monkeypatch.setattr(pipeline, "build", keep)
    compile_model(CompileArgs(model=str(ckpt), output=tmp_path / "art", target="cuda-sm90", quant="q4f16_1",
                              runtime=RuntimeOptions(256, 64, 16, 2), kernel_options=KernelOptions(cuda_kv="owned"),
                              dump_ir=tmp_path / "ir"))
    if mode == "warps":  # the default's kernel (WARPS_EARLY on): its loads before its own wait
        _check_early_warps("".join(sources))
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert "create_tir_paged_kv_cache" not in manifest["functions"] and manifest["kernels"]["options"]["cuda_kv"] == "owned"
    assert "owned_append" in manifest["kernels"]["chosen"]["kv_append"]
    text = (tmp_path / "ir" / "phase6_finalize.py").read_text()
    funcs = dict(re.findall(r"\n    def (\w+)\((.*?)\n(?=    @|\Z)", text, re.S))
    decode = funcs["decode"]
    # the pieces in the order decode replays them, each with the packed parameters first
    # (pipeline._whole_params_to_graphs) and its own entry index
    calls = re.findall(r"run_or_capture\", \(cls\.(decode_cuda_graph_capture\w*), \((\w+), [^)]*\), (\d+), ", decode)
    assert [c[0] for c in calls] == ["decode_cuda_graph_capture_part0", "decode_cuda_graph_capture_part1",
                                     "decode_cuda_graph_capture"], calls
    assert all(c[1] == "packed_params" for c in calls) and len({c[2] for c in calls}) == 3, calls
    assert "packed_params[" not in decode and re.search(r"= graph_part0\[0\]\n", decode), decode
    outside = re.findall(r"cls\.(\w+)\(", decode)
    assert outside == ["fused_reshape25_cast1"] or (len(outside) == 1 and "cast" in outside[0]), outside
    pieces = [re.findall(r"cls\.(\w+)\(", funcs[c[0]]) for c in calls]
    assert [len(p) for p in pieces[:2]] == [2, 4], pieces
    # a piece receives what an earlier one wrote (part1's input `alloc..` is part0's output), never a weight
    assert all(funcs[c[0]].startswith("packed_params: R.Tuple(") for c in calls)
    assert funcs[calls[0][0]].count("= packed_params[") == 25  # the first piece checks every parameter
    for c in calls[1:]:
        assert 0 < funcs[c[0]].count("= packed_params[") < 25
    inside = [k for p in pieces for k in p]
    # decode attention per layer (owned_kv.DECODE_ATTN): "fused_merge" (the default) RoPE + append + split-K
    # attention + the merge in one kernel; "fused" the same without the merge, then the merge kernel; "split"
    # kv_append + paged attention + merge (what prefill keeps)
    attn = {"fused_merge": 1, "fused": 2, "split": 3, "warps": 1}[mode]
    assert sum("decode_attn" in k for k in inside) == (0 if mode == "split" else 2), inside
    assert sum("decode_attn_merge" in k for k in inside) == (2 if mode == "fused_merge" else 0), inside
    assert sum("decode_attn_warps" in k for k in inside) == (2 if mode == "warps" else 0), inside
    assert sum("kv_append" in k for k in inside) == (2 if mode == "split" else 0), inside
    assert sum("paged_attn" in k for k in inside) == 2 * (attn - 1), inside  # (partial and) merge
    assert manifest["kernels"]["chosen"]["attention_decode"] == {
        "fused_merge": ["owned_decode_fused_merge"], "fused": ["owned_decode_fused", "owned_merge"],
        "split": ["owned_decode", "owned_merge"], "warps": ["owned_decode_warps", "owned_decode_warps_grouped"]}[mode]
    if mode == "warps":  # G 2, head_dim 64: decode takes a block per q head (WARPS_HEAD_GROUPS), batch_decode one per kv head
        code = "".join(sources)
        bodies = {n.removesuffix("_kernel"): code[o:c + 1] for n, o, c in cuda_pdl.kernel_bodies(code)
                  if "decode_attn_warps" in n}
        grouped = {n for n, b in bodies.items() if re.search(r"edgellm_decode_attn_warps<64, 1, \d+, \d+, true, 2>", b)}
        plain = {n for n, b in bodies.items() if re.search(r"edgellm_decode_attn_warps<64, 2, \d+, \d+, true>", b)}
        assert grouped and plain and {k for k in inside if "decode_attn_warps" in k} <= grouped, (bodies.keys(), inside)
        assert any(re.search(rf"\b{n}\b", text) for n in plain) and not any(
            re.search(rf"\b{n}\b", funcs["decode"]) for n in plain)
    # per layer: attention (1, 2 or 3 kernels), o, gate_up with the residual add + norm and silu (--opt cuda_fuse),
    # down; layer 1's qkv with the norm; embedding, layer 0's qkv staging its norm, the final add_rms_norm and the
    # (8-bit) head
    assert any("embedding" in k for k in inside) and len(inside) == 2 * (attn + 3) + 1 + 4, inside
    assert not any(k.startswith("rms_norm") for k in inside), inside
    assert sum("linear_gemv_norm" in k for k in inside) == 4 and not any("silu_mul" in k for k in inside), inside
    for name in ("batch_decode", "prefill", "prefill_logits"):
        assert re.search(rf"def {name}\(ids: [^\n]*cache: [^\n]*page_table: [^\n]*pos0: ", text), name
    # decode_greedy: the same step with the argmax and the advance of ids / pos0 inside its graph, no kernel
    # outside the graphs (decode's cast and the argmax function's two kernels are not run), ids handed back
    assert "decode_greedy" in manifest["functions"] and manifest["kernels"]["chosen"]["greedy_step"] == ["greedy_advance"]
    greedy = funcs["decode_greedy"]
    assert re.search(r"def decode_greedy\(ids: [^\n]*cache: [^\n]*page_table: [^\n]*pos0: [^\n]*sink: ", text)
    gcalls = re.findall(r"run_or_capture\", \(cls\.(decode_greedy_cuda_graph_capture\w*), ", greedy)
    # one graph (pipeline.GREEDY_GRAPH_PIECES: it runs queued ahead, where the launches' host time is hidden)
    assert gcalls == ["decode_greedy_cuda_graph_capture"] and re.findall(r"cls\.(\w+)\(", greedy) == [], greedy
    last = re.findall(r"cls\.(\w+)\(", funcs[gcalls[-1]])
    assert last[-2].startswith("argmax_partial") and last[-1] == "greedy_advance" and not any("cast" in k for k in last)
    assert re.search(r"= R\.call_packed\(\"vm\.builtin\.copy\", \w+, ty_args=\(R\.Tensor\(\(1, 1\), dtype=\"int32\"\),\)\)\n"
                     r"        return \w+\n", greedy), greedy[-600:]


def _check_early_warps(code: str) -> None:
    """owned_kv.WARPS_EARLY (the default): the warps decode attention's kernel has no PDL prologue; it instantiates
    the device function with EARLY, whose wait and launch_dependents come after the loads of pos0, the page table and
    the first tile and before anything reads qkv or writes."""

    assert owned_kv.WARPS_EARLY
    warps = [(n, o, c) for n, o, c in cuda_pdl.kernel_bodies(code) if "decode_attn_warps" in n]
    unwaited = cuda_pdl.unwaited_kernels(code)  # the prefill GEMMs (cuda_pdl.SKIP_GEMM) alone
    assert warps and unwaited and all(re.fullmatch(r"linear\d*_kernel(_\d+)?", n) for n in unwaited), unwaited
    for name, o, c in warps:
        body = code[o:c + 1]
        assert cuda_pdl.PROLOGUE_MARK not in body and "griddepcontrol" not in body, name  # no prologue
        assert re.search(r"edgellm_pdl_waits_inside\(\);.*edgellm_decode_attn_warps<\d+, \d+, \d+, \d+, true(, \d+)?>", body,
                         re.S), name
    device = code[code.index("void edgellm_decode_attn_warps("):]
    device = device[:device.index("\n}\n")]
    early = device.index("if constexpr (EARLY)")
    wait = device.index("cudaGridDependencySynchronize();", early)
    assert device.index("load_v();\n  }") < early < wait \
        < device.index("cudaTriggerProgrammaticLaunchCompletion();", early) < device.index("edgellm_rope_q<")
    first_write = min(device.index(w) for w in ("dk[j] =", "snew[j] =", "out[", "o_part["))
    assert wait < first_write


def _modules(mod):
    for m in mod.imports:
        yield m
        yield from _modules(m)



class _FakeTensor:
    """Stands in for a device tensor: keeps the host copy and counts the copies into it."""

    def __init__(self, array):
        self.data, self.copies, self.from_device = np.array(array), 0, False

    def copyfrom(self, array):
        self.from_device = isinstance(array, _FakeTensor)  # a device-to-device copy
        self.data[...] = array.data if self.from_device else array
        self.copies += 1


class _FakeTvm:
    @staticmethod
    def tensor(array, dev):
        return _FakeTensor(array)


def _owned_engine(calls: list, total: int = 6, max_pages: int = 4):
    """An Engine on the owned-cache path with a fake VM that records what each call would see on the device."""
    from edgellm.device_runners.engine import Engine, _DeviceTokens

    eng = object.__new__(Engine)
    eng.owned_kv, eng._tvm, eng.dev, eng.kv, eng.params = True, _FakeTvm, None, "pages", "params"
    eng._pool, eng._max_pages, eng._aux, eng._fns = PagePool(total, max_pages), max_pages, {}, {}
    eng.context_window, eng.chunk, eng.batch_min, eng.has_batch_decode = max_pages * PAGE, 16, 2, True
    eng._lengths, eng._next_seq, eng._shapes = {}, 0, {}
    eng.total_pages = total
    eng._last_tokens = _DeviceTokens()
    eng.vocab_size = 100

    class Out:
        def __init__(self, b):
            self.b = b

        def numpy(self):
            return np.zeros((self.b, 1, 5), np.float32)

    def fn(name):
        def call(ids, pages, pt, pos, params):
            assert pages == "pages" and params == "params"
            calls.append((name, ids.data.copy(), pt.data.copy(), pos.data.copy(), pt, ids.from_device))
            return Out(pos.data.shape[0])
        return call

    eng.vm = {name: fn(name) for name in ("prefill", "prefill_logits", "decode", "batch_decode")}
    return eng


def test_engine_owned_path_feeds_positions_and_page_rows():
    """The Engine's owned-cache forward (device_runners/engine._forward_owned): each call gets the tokens already
    cached as pos0, the row's pages (scratch past them), the ids in the fixed per-batch-size buffer, and the page
    table is copied only when a row changed (once per 16 tokens)."""
    calls: list = []
    eng = _owned_engine(calls)
    sc = eng._pool.scratch
    a = eng.add_sequence()
    eng.prefill(a, list(range(3, 23)))  # 20 tokens: chunks of 16 and 4
    (n1, ids1, pt1, pos1, *_), (n2, ids2, pt2, pos2, *_) = calls
    assert (n1, n2) == ("prefill", "prefill") and ids1.tolist() == [list(range(3, 19))] and pos1.tolist() == [0]
    pa = eng._pool.pages(a)
    assert pt1.tolist() == [[pa[0], sc, sc, sc]] and pos2.tolist() == [16] and pt2.tolist() == [[pa[0], pa[1], sc, sc]]
    calls.clear()
    for t in (7, 8):
        eng.decode([a], [t])
    assert [c[0] for c in calls] == ["decode", "decode"] and [c[1].tolist() for c in calls] == [[[7]], [[8]]]
    assert [c[3].tolist() for c in calls] == [[20], [21]] and calls[1][4].copies == 2  # rows unchanged: 1 copy
    assert not any(c[5] for c in calls)  # ids from the host
    # a greedy step's next id is the device argmax's output: copied into the fixed buffer on the device
    eng._last_tokens.values, eng._last_tokens.tensor = (9,), _FakeTensor([[9]])
    eng.decode([a], [9])
    assert calls[-1][1].tolist() == [[9]] and calls[-1][5] and calls[-1][3].tolist() == [22]
    eng.decode([a], [6])  # another id than the argmax's: from the host again
    assert calls[-1][1].tolist() == [[6]] and not calls[-1][5]
    calls[:] = calls[:2]
    b = eng.add_sequence()
    eng.prefill(b, [1] * 16)
    calls.clear()
    eng.decode([a, b], [4, 5])  # batch_decode: both rows; b crosses into its second page
    name, ids, pt, pos, *_ = calls[0]
    assert name == "batch_decode" and ids.tolist() == [[4], [5]] and pos.tolist() == [24, 16]
    assert pt.tolist() == [eng._pool.pages(a) + [sc] * 2, eng._pool.pages(b) + [sc] * 2]
    assert eng.sequence_length(a) == 25 and eng.sequence_length(b) == 17 and eng.pages_in_use() == 4
    eng.remove_sequence(b)
    assert eng.pages_in_use() == 2
    c, d = eng.add_sequence(), eng.add_sequence()
    eng.prefill(c, [1] * 48)  # 3 of the 4 free pages
    eng.prefill(d, [1] * 16)  # the last one
    n = len(calls)
    with pytest.raises(CacheFullError, match="needs 1 more KV pages and 0 are free"):
        eng.prefill(d, [1])  # nothing runs, nothing changes
    with pytest.raises(CacheFullError, match="needs 2 more KV pages and 0 are free"):
        eng.decode([a, c, d], [1, 1, 1])  # a fits its pages, c and d would each take one: none advances
    assert len(calls) == n and [eng._pool.length(s) for s in (a, c, d)] == [25, 48, 16]
    assert [eng.sequence_length(s) for s in (a, c, d)] == [25, 48, 16]


@pytest.mark.parametrize("preset,opts,hidden,heads,expected", [
    ("cuda-sm90", {}, 576, 9, True),  # the SmolLM2 shape
    ("cuda-sm90", {}, 2048, 32, True),  # Llama-3.2-1B: decode +4% on the owned cache
    ("cuda-sm90", {"cuda_pdl": "off"}, 576, 9, False),  # measured with PDL only
    ("cuda-sm80", {}, 576, 9, False),  # no PDL below sm_90
    ("cuda-sm90", {}, 256, 16, False),  # head_dim 16: the owned kernels do not apply
])
def test_cuda_kv_auto_takes_the_owned_cache_on_hopper(preset, opts, hidden, heads, expected):
    from types import SimpleNamespace

    from edgellm.kernels import KernelOptions, KernelRegistry, owned_kv
    from edgellm.targets import resolve

    kernels = KernelRegistry(resolve(preset).tvm(), KernelOptions(**opts))
    cfg = SimpleNamespace(hidden_size=hidden, head_dim=hidden // heads, num_attention_heads=heads,
                          num_key_value_heads=heads // (3 if heads % 3 == 0 else 4), rope_theta=1e4, rope_scaling=None)
    assert owned_kv.auto_owned(kernels, cfg, "float16") is expected
    assert not owned_kv.auto_owned(kernels, cfg, "float32")


_OWNED_EMU_MAIN = r"""
#include "cuda_host_emu.h"
#include "owned_kv.cu"
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#ifndef EMU_D  // the shape: D 64, G 2, KV 2 unless the test defines EMU_D / EMU_G / EMU_KV
#define EMU_D 64
#define EMU_G 2
#define EMU_KV 2
#endif
constexpr int D = EMU_D, G = EMU_G, KV = EMU_KV, H = G * KV, L = 2, SPLITS = 32, W = 8;
// one launch: blocks (bx, by) one after another (in order, or shuffled with `seed` > 0), `nt` threads each
// (fibers, tests/cuda_host_emu.h), `sm` floats of shared memory
void launch(int gx, int gy, int nt, int sm, const std::function<void(float*)>& body, unsigned seed = 0) {
  std::vector<float> smem(sm + 1);
  std::vector<std::pair<int, int>> order;
  for (int by = 0; by < gy; ++by)
    for (int bx = 0; bx < gx; ++bx) order.emplace_back(bx, by);
  if (seed) std::shuffle(order.begin(), order.end(), std::mt19937(seed));
  for (auto [bx, by] : order) emu_run_block(bx, by, nt, [&](int) { body(smem.data()); });
}
template <typename T> std::vector<T> read(FILE* f, size_t n) { std::vector<T> v(n); if (fread(v.data(), sizeof(T), n, f) != n) exit(2); return v; }
template <typename T> void write(FILE* f, const std::vector<T>& v) { fwrite(v.data(), sizeof(T), v.size(), f); }
// n maxp P layer steps in.bin out.bin mode seed: `steps` decode steps of n rows (row r at pos0[r] + step) through
// mode 0: kv_append + paged_attn_partial + merge, 1: decode_attn + merge, 2: decode_attn_merge, 3:
// decode_attn_warps with W warps, 4: the same with a block per q head (2-4: blocks shuffled with seed + step when
// seed > 0). in: qkv [steps, n,
// H + 2 KV, D], inv_freq, page table, pos0, pages; out: per step out [n, H, D] and the control page's int32 words,
// then the pages.
int main(int argc, char** argv) {
  const int n = atoi(argv[1]), maxp = atoi(argv[2]), layer = atoi(argv[4]), steps = atoi(argv[5]);
  const int mode = atoi(argv[8]), seed = atoi(argv[9]);
  const long long P = atoll(argv[3]);
  FILE* f = fopen(argv[6], "rb");
  auto qkv_all = read<half>(f, (size_t)steps * n * (H + 2 * KV) * D);
  auto freq = read<float>(f, D / 2);
  auto pt = read<int>(f, (size_t)n * maxp);
  auto pos0 = read<int>(f, n);
  auto pages = read<half>(f, (size_t)L * P * 2 * KV * 16 * D);
  fclose(f);
  const int sm = G * D + G * 32 + 3 * G;
  const int smw = G * D + D + 2 * W * G + W * G * D + 4;  // decode_attn_warps
  const float scale = 1.4426950408889634f / sqrtf((float)D);  // D^-0.5 log2(e)
  f = fopen(argv[7], "wb");
  for (int step = 0; step < steps; ++step) {
    const half* qkv = qkv_all.data() + (size_t)step * n * (H + 2 * KV) * D;
    // NaN scratch: a merge that read a split no block wrote this step would show
    std::vector<float> o((size_t)n * H * SPLITS * D, NAN), ml((size_t)n * H * SPLITS * 2, NAN);
    std::vector<half> out((size_t)n * H * D, half{0x7E00});
    if (mode == 3) {
      launch(n * KV, SPLITS, 32 * W, smw, [&](float* s) { edgellm_decode_attn_warps<D, G, SPLITS, W>(qkv, freq.data(),
          pt.data(), pos0.data(), pages.data(), o.data(), ml.data(), out.data(), maxp, P, layer, KV, scale, s); },
          seed > 0 ? seed + step : 0);
    } else if (mode == 4) {  // decode_attn_warps with the G heads of a kv head over G blocks of one head each
      launch(n * KV * G, SPLITS, 32 * W, smw, [&](float* s) { edgellm_decode_attn_warps<D, 1, SPLITS, W, false, G>(qkv,
          freq.data(), pt.data(), pos0.data(), pages.data(), o.data(), ml.data(), out.data(), maxp, P, layer, KV, scale,
          s); }, seed > 0 ? seed + step : 0);
    } else if (mode == 2) {
      launch(n * KV, SPLITS, 128, sm, [&](float* s) { edgellm_decode_attn_merge<D, G, SPLITS>(qkv, freq.data(), pt.data(),
          pos0.data(), pages.data(), o.data(), ml.data(), out.data(), maxp, P, layer, KV, scale, s); },
          seed > 0 ? seed + step : 0);
    } else if (mode == 1) {
      launch(n * KV, SPLITS, 128, sm, [&](float* s) { edgellm_decode_attn<D, G>(qkv, freq.data(), pt.data(),
          pos0.data(), pages.data(), o.data(), ml.data(), maxp, P, layer, KV, SPLITS, scale, s); });
    } else {
      std::vector<half> q((size_t)n * H * D), k((size_t)n * KV * D), v((size_t)n * KV * D);
      launch(n, (H + 2 * KV + 2) / 3, D / 2, 0, [&](float*) { edgellm_kv_append<D, 3>(qkv, freq.data(), pt.data(), pos0.data(),
          pages.data(), q.data(), k.data(), v.data(), 1, maxp, P, layer, H, KV); });
      launch(n * KV, SPLITS, 128, sm, [&](float* s) { edgellm_paged_attn_partial<D, G>(q.data(), pages.data(), pt.data(),
          pos0.data(), o.data(), ml.data(), 1, 1, maxp, P, layer, KV, SPLITS, scale, s); });
    }
    if (mode < 2)
      launch(n * H, 1, D, 0, [&](float*) { edgellm_paged_attn_merge_alone<D, SPLITS>(o.data(), ml.data(), out.data(), n * H); });
    write(f, out);
    std::vector<int> control(KV * 16 * D);  // page P - 1 of layer 0
    memcpy(control.data(), pages.data() + (P - 1) * 2 * KV * 16 * D, control.size() * 4);
    write(f, control);
    for (int r = 0; r < n; ++r) ++pos0[r];
  }
  write(f, pages);
  fclose(f);
}
"""


def _emu_decode(tmp_path, n, maxp, P, layer, qkv, freq, pt, pos0, pages, mode: int, seed: int = 0):
    """Run _OWNED_EMU_MAIN's ./emu (built in tmp_path): per step (out [n, H, D], control words), then the pages."""
    import subprocess

    steps, H, D = qkv.shape[0], qkv.shape[2] - 2 * pages.shape[3], pages.shape[-1]
    (tmp_path / "in.bin").write_bytes(qkv.tobytes() + freq.tobytes() + pt.tobytes() + pos0.tobytes() + pages.tobytes())
    subprocess.run(["./emu", str(n), str(maxp), str(P), str(layer), str(steps), "in.bin", "out.bin", str(mode),
                    str(seed)], cwd=tmp_path, check=True)
    raw, at, per_step = (tmp_path / "out.bin").read_bytes(), 0, []
    words = pages[0, 0].size // 2
    for _ in range(steps):
        out = np.frombuffer(raw[at:at + n * H * D * 2], np.float16).reshape(n, H, D)
        at += n * H * D * 2
        per_step.append((out, np.frombuffer(raw[at:at + words * 4], np.int32)))
        at += words * 4
    return per_step, np.frombuffer(raw[at:], np.float16).reshape(pages.shape)


def _rope_fp16(x, p: int, freq):
    """Rotate-half RoPE of x [..., D] at position p in float32, rounded to fp16 as the kernels round it."""
    D = x.shape[-1]
    ang = np.float32(p) * freq
    c, s = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    x0, x1 = x[..., :D // 2].astype(np.float32), x[..., D // 2:].astype(np.float32)
    return np.concatenate([x0 * c - x1 * s, x1 * c + x0 * s], -1).astype(np.float16)


def test_control_page_view_is_layer_0s_last_page():
    """kv_pages.control_page: the int32 view the Engine zeroes (and bench/gpu_pdl.py reads) covers exactly page
    P - 1 of layer 0 of the page tensor, where owned_kv.cu's counters live; nothing else changes."""
    from edgellm import _tvm
    from edgellm.device_runners.kv_pages import control_page, control_words

    shape = (3, 5, 2, 2, 16, 64)  # L, P (3 pool pages, scratch, control), K|V, KV, slot, D
    host = np.ones(shape, np.float16)
    pages = _tvm.tensor(host, _tvm.device("cpu"))
    control = control_page(_tvm, pages)
    assert tuple(control.shape) == (control_words(2, 64),) and control.dtype == "int32"
    control.copyfrom(np.zeros(control.shape, np.int32))
    want = host.copy()
    want[0, 4] = 0
    assert np.array_equal(pages.numpy(), want)


@pytest.mark.skipif(shutil.which("g++") is None, reason="the host emulation needs g++")
def test_decode_attention_kernels_on_the_host(tmp_path, host_emu):
    """kernels/cuda/owned_kv.cu itself, run on the host through tests/cuda_host_emu.h: one decode step of three rows
    (contexts 38, 6 and 1101: two one-tile splits, one, and 18 splits of two tiles each, the split size following
    the live context) through decode_attn_merge (the default: the merge in the last block), decode_attn + merge and
    kv_append + paged_attn_partial + merge: the same output and the same pages bit for bit, the new k (rotated) and
    v in their slots, nothing else written, the control page zero again, and the output within fp16 tolerance of
    numpy attention with RoPE."""
    from pathlib import Path

    from edgellm.kernels.owned_kv import rope_inv_freq

    D, G, KV, L, maxp, P, layer = 64, 2, 2, 2, 70, 78, 1
    H = G * KV
    src = (Path(__file__).parents[1] / "edgellm" / "kernels" / "cuda" / "owned_kv.cu").read_text()
    host_emu({"owned_kv.cu": src}, _OWNED_EMU_MAIN)
    rng = np.random.default_rng(11)
    pos0 = np.array([37, 5, 1100], np.int32)
    pt = np.full((3, maxp), 6, np.int32)  # page 6: scratch
    pt[0, :3], pt[1, 0], pt[2] = [2, 0, 5], 1, np.arange(7, 7 + maxp)
    qkv = rng.standard_normal((1, 3, H + 2 * KV, D)).astype(np.float16)
    freq = rope_inv_freq(D, 10000.0, None)
    pages = rng.standard_normal((L, P, 2, KV, 16, D)).astype(np.float16)
    pages[0, P - 1] = 0  # the control page, as the Engine allocates it
    outs = {}
    for mode in (0, 1, 2):
        [(out, control)], new_pages = _emu_decode(tmp_path, 3, maxp, P, layer, qkv, freq, pt, pos0, pages, mode)
        assert not control.any(), mode
        outs[mode] = (out, new_pages)
    for mode in (1, 2):
        assert np.array_equal(outs[0][0], outs[mode][0]) and np.array_equal(outs[0][1], outs[mode][1]), mode
    qkv = qkv[0]
    out, new_pages = outs[2]

    def rope(x, p):
        return _rope_fp16(x, p, freq)

    expect_pages = pages.copy()
    for r in range(3):
        p = int(pos0[r])
        page, slot = pt[r, p // 16], p % 16
        expect_pages[layer, page, 0, :, slot] = rope(qkv[r, H:H + KV], p)
        expect_pages[layer, page, 1, :, slot] = qkv[r, H + KV:]
        keys = np.stack([expect_pages[layer, pt[r, t // 16], 0, :, t % 16] for t in range(p + 1)], 1)  # [KV, T, D]
        vals = np.stack([expect_pages[layer, pt[r, t // 16], 1, :, t % 16] for t in range(p + 1)], 1)
        q = rope(qkv[r, :H], p).astype(np.float64)
        for h in range(H):
            score = keys[h // G].astype(np.float64) @ q[h] / np.sqrt(D)
            w = np.exp(score - score.max())
            ref = (w / w.sum()) @ vals[h // G].astype(np.float64)
            np.testing.assert_allclose(out[r, h].astype(np.float64), ref, atol=2e-3, rtol=2e-3)
    assert np.array_equal(new_pages, expect_pages)  # the two slots written, nothing else


@pytest.mark.skipif(shutil.which("g++") is None, reason="the host emulation needs g++")
def test_decode_attn_merge_equals_the_two_kernel_path_over_steps(tmp_path, host_emu):
    """decode_attn_merge (the merge in the last block per (token, kv head), counters in the control page) against
    decode_attn + paged_attn_merge over three consecutive decode steps of four rows, bit for bit: contexts 47-49
    (two active splits; the third step opens a new page), 31-33 (one active split, the merge without a count, then
    two), 1101-1103 (18 splits of two tiles) and 2047-2049 (all 32 splits, then 22 of three tiles); the blocks in
    launch order (the top active split merges) and shuffled (any split may be last). After every step every word of
    the control page is zero again, and the scratch partials start as NaN, so a merge reading a split no block
    wrote would show."""
    from pathlib import Path

    from edgellm.kernels.owned_kv import rope_inv_freq

    D, G, KV, L, layer, steps = 64, 2, 2, 2, 0, 3
    H = G * KV
    pos0 = np.array([46, 30, 1100, 2046], np.int32)
    maxp = -(-(int(pos0.max()) + steps) // 16)
    P = 4 + 4 + 70 + maxp + 2  # the rows' pages, scratch, control
    src = (Path(__file__).parents[1] / "edgellm" / "kernels" / "cuda" / "owned_kv.cu").read_text()
    host_emu({"owned_kv.cu": src}, _OWNED_EMU_MAIN)
    rng = np.random.default_rng(5)
    pt = np.full((4, maxp), P - 2, np.int32)
    perm = rng.permutation(P - 2).astype(np.int32)  # the rows' pages, scattered
    pt[0, :4], pt[1, :4], pt[2, :70], pt[3] = perm[:4], perm[4:8], perm[8:78], perm[78:]
    qkv = rng.standard_normal((steps, 4, H + 2 * KV, D)).astype(np.float16)
    freq = rope_inv_freq(D, 10000.0, None)
    pages = rng.standard_normal((L, P, 2, KV, 16, D)).astype(np.float16)
    pages[0, P - 1] = 0  # the control page, as the Engine allocates it (layer 0: this test's layer writes there too)
    ref_steps, ref_pages = _emu_decode(tmp_path, 4, maxp, P, layer, qkv, freq, pt, pos0, pages, 1)
    for seed in (0, 7):
        got_steps, got_pages = _emu_decode(tmp_path, 4, maxp, P, layer, qkv, freq, pt, pos0, pages, 2, seed)
        for step, ((ref, _), (out, control)) in enumerate(zip(ref_steps, got_steps)):
            assert not np.isnan(out).any() and np.array_equal(ref.view(np.uint16), out.view(np.uint16)), (seed, step)
            assert not control.any(), (seed, step, np.flatnonzero(control))
        assert np.array_equal(ref_pages.view(np.uint16), got_pages.view(np.uint16)), seed


def test_decode_attn_merge_counters_fit_the_control_page():
    """The control page ([2, KV, 16, D] fp16 of layer 0) holds a counter per (row, kv head) for the 64 rows a
    batch_decode is planned for, at both head dims; more than 32 splits (a lane each in the merge) are refused."""
    from edgellm.device_runners.kv_pages import GRAPH_BATCH_BOUND, control_words
    from edgellm.kernels import owned_kv

    for kv, d in ((1, 64), (8, 128)):
        assert control_words(kv, d) == np.zeros((2, kv, 16, d), np.float16).nbytes // 4
        assert GRAPH_BATCH_BOUND * kv <= control_words(kv, d)
    assert owned_kv.decode_attn_merge_func(32, 8, 128, 2, owned_kv.SPLITS_DECODE) is not None
    with pytest.raises(ValueError, match="at most 32 splits"):
        owned_kv.decode_attn_merge_func(32, 8, 128, 2, 64)


@pytest.mark.skipif(shutil.which("g++") is None, reason="the host emulation needs g++")
@pytest.mark.parametrize("D,G", [(64, 2), (64, 3), (128, 4)])
def test_decode_attn_warps_against_numpy_over_steps(tmp_path, host_emu, D, G):
    """DECODE_ATTN "warps" (owned_kv.cu edgellm_decode_attn_warps, 8 warps a block, a 32-key tile a warp) over three
    consecutive decode steps of five rows (six at D 128), against float64 numpy RoPE + attention and against decode_attn_merge (not
    bit-equal: another summation order; within an fp16 ulp): contexts 1-3, 31-33 (tile edges), 128-130 (tg128: one
    block, out written at once), 255-257 (256 = one block's 8 tiles; 257 takes two splits and the merge), 1101-1103
    (5 splits) and, at D 128, 8191-8193 (32 splits of one tile a warp, then 17 of two: a warp's second tile, its V
    loaded after the scores); page boundaries crossed (16 -> 17, 32 -> 33, 256 -> 257, 8192 -> 8193). Shapes:
    SmolLM2's G 3 / D 64, G 2 / D 64 and G 4 / D 128 (Llama-3-8B's). The pages bit-equal to decode_attn_merge's
    (the same RoPE and append), the control page zero after every step, blocks in launch order and shuffled; the
    slots past each row's context hold NaN (what a fresh page may hold), so a tile's read past its last key that
    leaked into the output would show. A block per q head (owned_kv.WARPS_HEAD_GROUPS) gives the same outputs and
    pages bit for bit, its counters (one per head group) zero after every step."""
    from pathlib import Path

    from edgellm.kernels.owned_kv import rope_inv_freq

    KV, L, layer, steps = 2, 2, 1, 3
    H = G * KV
    pos0 = np.array([0, 30, 127, 254, 1100] + ([8190] if D == 128 else []), np.int32)  # (8190: 45 s of emulation)
    n = len(pos0)
    need = [-(-(int(p) + steps) // 16) for p in pos0]
    maxp = max(need)
    P = sum(need) + 2  # the rows' pages, scratch, control
    src = (Path(__file__).parents[1] / "edgellm" / "kernels" / "cuda" / "owned_kv.cu").read_text()
    host_emu({"owned_kv.cu": src}, f"#define EMU_D {D}\n#define EMU_G {G}\n#define EMU_KV {KV}\n" + _OWNED_EMU_MAIN)
    rng = np.random.default_rng(D + G)
    pt = np.full((n, maxp), P - 2, np.int32)
    perm, at = rng.permutation(P - 2).astype(np.int32), 0  # the rows' pages, scattered
    for r in range(n):
        pt[r, :need[r]] = perm[at:at + need[r]]
        at += need[r]
    qkv = rng.standard_normal((steps, n, H + 2 * KV, D)).astype(np.float16)
    freq = rope_inv_freq(D, 10000.0, None)
    pages = rng.standard_normal((L, P, 2, KV, 16, D)).astype(np.float16)
    for r in range(n):  # past the context: NaN
        for t in range(int(pos0[r]), need[r] * 16):
            pages[layer, pt[r, t // 16], :, :, t % 16] = np.nan
    pages[0, P - 1] = 0  # the control page, as the Engine allocates it
    ref_steps, ref_pages = _emu_decode(tmp_path, n, maxp, P, layer, qkv, freq, pt, pos0, pages, 2)

    def rope(x, p):
        return _rope_fp16(x, p, freq)

    expect = pages.copy()
    ref64 = []
    for step in range(steps):
        outs = np.zeros((n, H, D))
        for r in range(n):
            p = int(pos0[r]) + step
            expect[layer, pt[r, p // 16], 0, :, p % 16] = rope(qkv[step, r, H:H + KV], p)
            expect[layer, pt[r, p // 16], 1, :, p % 16] = qkv[step, r, H + KV:]
            rows = [pt[r, t // 16] for t in range(p + 1)]
            keys = expect[layer, rows, 0, :, np.arange(p + 1) % 16].transpose(1, 0, 2).astype(np.float64)  # [KV, T, D]
            vals = expect[layer, rows, 1, :, np.arange(p + 1) % 16].transpose(1, 0, 2).astype(np.float64)
            q = rope(qkv[step, r, :H], p).astype(np.float64)
            for h in range(H):
                score = keys[h // G] @ q[h] / np.sqrt(D)
                w = np.exp(score - score.max())
                outs[r, h] = (w / w.sum()) @ vals[h // G]
        ref64.append(outs)
    for seed in (0, 7):
        got_steps, got_pages = _emu_decode(tmp_path, n, maxp, P, layer, qkv, freq, pt, pos0, pages, 3, seed)
        for step, ((old, _), (out, control)) in enumerate(zip(ref_steps, got_steps)):
            assert not np.isnan(out).any(), (seed, step)
            np.testing.assert_allclose(out.astype(np.float64), ref64[step], atol=2e-3, rtol=2e-3)
            # an fp16 ulp of |x| < 2 is at most 2^-10 (the old mode rounds the same float32 result otherwise summed)
            np.testing.assert_allclose(out.astype(np.float64), old.astype(np.float64), atol=1e-3, rtol=0)
            assert not control.any(), (seed, step, np.flatnonzero(control))
        assert np.array_equal(ref_pages.view(np.uint16), got_pages.view(np.uint16)), seed
        if seed == 7:  # a block per q head (owned_kv.WARPS_HEAD_GROUPS): the same outputs and pages bit for bit
            one_steps, one_pages = _emu_decode(tmp_path, n, maxp, P, layer, qkv, freq, pt, pos0, pages, 4, seed)
            for step, ((out, control), (one, one_control)) in enumerate(zip(got_steps, one_steps)):
                assert np.array_equal(out.view(np.uint16), one.view(np.uint16)), step
                assert not one_control.any(), step
            assert np.array_equal(got_pages.view(np.uint16), one_pages.view(np.uint16))
        # and numpy's RoPE (float32 cos / sin at positions up to 8,192 may differ from sincosf by an ulp, so a
        # rotated k by an fp16 ulp); the slots past the contexts still NaN
        written = ~np.isnan(expect)
        assert np.array_equal(np.isnan(got_pages), ~written), seed
        np.testing.assert_allclose(got_pages[written].astype(np.float32), expect[written].astype(np.float32),
                                   rtol=1e-3, atol=1e-4)


def test_decode_attn_warps_limits():
    """DECODE_ATTN "warps" (what "auto" takes on the measured shapes): at most 32 splits (a lane each in the merge); its shared memory (per warp G x D partial outputs) within the 48 KB static limit at
    the shapes it serves (G 8 / D 128: 37.9 KB), refused above (G 16 / D 128) with the way out named; head groups
    (WARPS_HEAD_GROUPS) divide the q heads and shrink a block's share."""
    from edgellm.kernels import owned_kv

    assert "warps" in owned_kv.DECODE_ATTN_MODES and owned_kv.decode_attn_mode(9, 3, 64) == "warps"
    assert owned_kv._warps_smem(8, 128) * 4 <= 48 * 1024
    assert owned_kv.decode_attn_warps_func(64, 8, 128, 2, owned_kv.SPLITS_DECODE) is not None
    with pytest.raises(ValueError, match="at most 32 splits"):
        owned_kv.decode_attn_warps_func(32, 8, 128, 2, 64)
    with pytest.raises(ValueError, match="static limit; lower owned_kv.DECODE_WARPS"):
        owned_kv.decode_attn_warps_func(128, 8, 128, 2, 32)  # batch_decode's kernel: all 16 heads a block
    assert owned_kv.decode_attn_warps_func(128, 8, 128, 2, 32, groups=8) is not None  # 2 heads a block fit
    with pytest.raises(ValueError, match="groups must divide the 16 q heads"):
        owned_kv.decode_attn_warps_func(128, 8, 128, 2, 32, groups=3)
