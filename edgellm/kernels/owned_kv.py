"""edgellm's own paged KV cache for CUDA (`--opt cuda_kv=owned`): the cache is ordinary tensors that the model
functions take as inputs, so a decode step has no packed call into TVM's C++ cache object and RewriteCUDAGraph
captures all of it (embedding, every layer's RoPE, KV append, attention, norms, GEMVs, the head) as one CUDA graph.

Tensors (the Engine owns them; device_runners/kv_pages.py keeps the page bookkeeping on the host):
  pages       [L, P, 2, KV, 16, D] fp16: layer, page, K|V, kv head, slot, dim; page P - 2 is scratch, page P - 1
              of layer 0 the control page (int32 words for the decode kernels, zero whenever no kernel runs:
              device_runners/kv_pages.py control_words)
  page_table  [b, max_pages] int32: row r's i-th page; the token at position p is in slot p % 16 of page
              page_table[r, p // 16]
  pos0        [b] int32: the position of row r's first new token (= tokens already cached)
A forward of b rows with s new tokens each (decode: s = 1; prefill: b = 1) runs per layer:
  kv_append      RoPE on q and k (rotate-half, float32 angles from a constant inv_freq table), K and V into the
                 rows' pages in place (call_tir_inplace on `pages`), rotated q / k and v out for the chunk;
  decode:        RoPE, the append and paged attention over [0, pos + 1) in one kernel (decode_attn_mode). Up to
                 4 q heads per kv head ("warps", the default's pick): a warp a 32-key tile, one block per (token,
                 kv head) up to 256 keys, above that up to SPLITS_DECODE blocks, the last to finish (counted in
                 the control page) merging them. Beyond 4: split over SPLITS_DECODE blocks, merged in the kernel's
                 last block where a kv head's G * D output is small ("fused_merge"), else by a merge kernel;
  prefill:       the chunk among itself on tensor cores (cuda/attention_prefill_ragged.cu, causal) and the chunk
                 over the cached history [0, pos0) (paged, split over SPLITS_PREFILL), merged by lse (log2 domain).
Page table, positions and ids are the only inputs that change between decode steps; the Engine keeps one buffer
of each per batch size and copies into it before the replay (RewriteCUDAGraph's graphs replay on the addresses
they were captured with: compile/pipeline.py marks every input of decode/decode_greedy/batch_decode static).
`decode_greedy` (models/llama.py) advances its own ids and pos0 on the device, so a greedy chain copies only a new
page row between steps.
"""

from __future__ import annotations

import math

import numpy as np

from .._tvm import compiler
from .cuda import cuda_source

PAGE = 16
SPLITS_DECODE = 32  # blocks along the keys per (token, kv head) in decode: split-K over pages
SPLITS_PREFILL = 1  # a prefill chunk over the cached history: its n x KV blocks are parallel enough
THREADS = 128
HEAD_DIMS = (64, 128)
APPEND_HEADS = 4  # kv_append: q / k / v heads per block, one after the other (fewer, longer blocks)
MERGE_ROWS = 8  # the prefill merge: (token, head) entries per block
# the decode attention per layer: "fused_merge" = decode_attn_merge_func (RoPE, the append, split-K attention and,
# in the last block per (token, kv head), the merge: one kernel); "fused" = decode_attn_func + paged_attn_merge;
# "split" = kv_append + paged_attn + merge (the prefill path's kernels). The same results bit for bit ("fused" and
# "split" on the H200, bench/gpu_pdl.py: docs/benchmarks/h200-pdl.md; "fused_merge" against "fused" in the host
# emulation, tests/test_owned_kv_cache.py). The merge kernel cost ~1.8-2.2 us a layer on the H200 (h200-pdl.md).
# "warps" = decode_attn_warps_func: the same inputs and outputs as "fused_merge", a shorter chain of dependent round
# trips (owned_kv.cu edgellm_decode_attn_warps: DECODE_WARPS warps a block, a 32-key tile a warp, K and V loaded at
# once, one block per (token, kv head) up to DECODE_WARPS * 32 keys); not bit-equal to the other modes (another
# summation order: within an fp16 ulp in the host emulation, 0.016-0.063 on logits of ~10-40 on the H200).
# "auto" (the default, decode_attn_mode) takes "warps" up to WARPS_AUTO_MAX_G q heads per kv head (the shapes
# measured; ptxas spilled 40-148 bytes at G 7-8, D 128, in a bare instantiation), else the run-15 rule: "fused_merge" where a (token, kv head)'s output, G * D values, is at most MERGE_IN_BLOCK_MAX, "fused"
# above. H200 tg128, same call (h200-pdl.md run 16): "warps" against the run-15 rule SmolLM2 2,321 -> 2,774 tok/s,
# Llama-3.2-1B 1,929 -> 2,109, Llama-3-8B 524.4 -> 550.9 (attention a layer 5.7 -> 3.9, 7.0 -> 4.7, 10.0 -> 8.2 us).
# Run 15: SmolLM2 (G * D 192) 1,814 -> 2,336 tok/s with the merge in the last block, Llama-3.2-1B (256) 1,916 ->
# 1,930, Llama-3-8B (512) 524.9 -> 518.8: one block merging 4 heads x 128 dims of 5 splits is slower than 32 merge
# blocks in parallel.
DECODE_ATTN = "auto"
DECODE_ATTN_MODES = ("auto", "fused_merge", "fused", "split", "warps")
MERGE_IN_BLOCK_MAX = 256
# "warps": warps a block. 8: a block covers 256 keys with one tile a warp, so every tg128 context (~130 keys) is one
# block per (token, kv head) writing `out` itself (4 would split contexts of 129+ in two blocks and a merge), and
# 32 splits of 8 tiles cover 8,192 keys before a warp takes a second tile. K (D / 8 uint4) and V (32 keys x D / 32
# dims) of a tile are in registers at once: 64 / 128 of them at D 64 / 128. ptxas -v on the generated module of a
# tiny model of each G / D (nvcc 13, sm_90a, TVM's flags: __launch_bounds__(256), --use_fast_math,
# --register-usage-level=10, the PDL prologue): G 4 / D 128 (Llama-3-8B) 183 registers, G 4 / D 64 (Llama-3.2-1B)
# 143, no spill; G 3 / D 64 (SmolLM2) 128 and 32 bytes of spill stores (ptxas stops at 128 there). A bare
# instantiation (another kv head count) spilled 40 / 44 / 148 bytes at G 4 / 7 / 8, D 128 (255 registers).
DECODE_WARPS = 8
WARPS_AUTO_MAX_G = 4
# "warps" with PDL: the page table, pos0 and the first tile's K / V (all written by earlier steps) loaded before the
# kernel's wait for the one before it (owned_kv.cu EARLY), so they overlap the qkv GEMV's tail. H200 tg128, same
# call (docs/benchmarks/h200-pdl.md run 18): SmolLM2 2,896 -> 3,170 tok/s, Llama-3.2-1B 2,168 -> 2,278, Llama-3-8B
# 555 -> 581; attention a layer (kernel end to end) 3.9 -> 3.1, 5.0 -> 3.8, 8.1 -> 6.0 us. Bit-equal to False.
WARPS_EARLY = True
# "warps": blocks per (token, kv head), each taking G / this of its q heads (the largest divisor of G up to it): the
# chain of a block's arithmetic (scores, p x V: G heads a lane) shortens, the kv head's K / V is read by each block.
# The same values bit for bit (each head's arithmetic does not change). "auto": D / 64 q heads a block (head_dim 64:
# a block per q head; 128: two). H200 tg128, same call (docs/benchmarks/h200-pdl.md run 33), tok/s at 1 / 2 / up to
# 4 groups: Llama-3-8B (G 4, D 128) 598.8 / 620.2 / 607.3, Llama-3.2-1B (G 4, D 64) 2,364 / 2,410 / 2,433,
# SmolLM2 (G 3, D 64) 3,334 / - / 3,411 (3 groups); attention a layer 6.1 -> 4.6 us (8B), 3.6 -> 3.0 (1B).
WARPS_HEAD_GROUPS: int | str = "auto"
# The groups serve the one-sequence decode (decode, decode_greedy: n = 1 fixed when the graph is built); batch_decode
# (n sequences, dynamic) keeps one block per (token, kv head): in run 34 the groups lost 3-14% of batched decode at 8
# and 32 sequences (8B x8 1,170 against 1,203 tok/s; 1B x32 7,288 against 8,304) and gained at 1. One kernel holding
# both calls, chosen by n at run time, made the attention 2-3.5x slower (run 35: its two inlined bodies), so the two
# are separate kernels.
STATIC_SMEM_FLOATS = 48 * 1024 // 4  # a kernel's static shared memory limit


def decode_attn_mode(H: int, KV: int, D: int) -> str:
    """The decode attention this shape is built with: DECODE_ATTN, with "auto" resolved (see there)."""
    if DECODE_ATTN not in DECODE_ATTN_MODES:
        raise ValueError(f"owned_kv.DECODE_ATTN is {DECODE_ATTN!r}; use one of {', '.join(DECODE_ATTN_MODES)}")
    if DECODE_ATTN != "auto":
        return DECODE_ATTN
    if H // KV <= WARPS_AUTO_MAX_G and _warps_smem(H // KV, D) <= STATIC_SMEM_FLOATS:
        return "warps"
    return "fused_merge" if H // KV * D <= MERGE_IN_BLOCK_MAX else "fused"
_SRC = cuda_source("owned_kv.cu")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray | None:
    """inv_freq[j] = theta^(-2j/d) (float64 math, float32 out), with llama3 or linear scaling; None for a rope
    scaling this cache does not implement (then the TVM cache is used)."""
    inv = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if not scaling or kind == "default":
        return inv.astype(np.float32)
    if kind == "linear":
        return (inv / float(scaling["factor"])).astype(np.float32)
    if kind == "llama3":
        factor, low, high = (float(scaling[k]) for k in ("factor", "low_freq_factor", "high_freq_factor"))
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - low) / (high - low)
        out = np.where(wavelen < old / high, inv,
                       np.where(wavelen > old / low, inv / factor, (1 - smooth) * inv / factor + smooth * inv))
        return out.astype(np.float32)
    return None


def supports(kernels, cfg, dtype: str) -> bool:
    """Where the owned cache applies: CUDA sm_80+ (the tensor-core chunk attention), fp16, head_dim 64/128, q heads a
    multiple of kv heads, and a rope scaling rope_inv_freq implements."""
    if kernels.kind != "cuda" or kernels.sm < 80 or dtype != "float16":
        return False
    if cfg.head_dim not in HEAD_DIMS or cfg.num_attention_heads % cfg.num_key_value_heads:
        return False
    return rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling) is not None


# --opt cuda_kv=auto takes the owned cache wherever it applies on Hopper with PDL. H200, one call (bench/gpu_pdl.py,
# docs/benchmarks/h200-pdl.md run 10), owned against TVM's cache: decode +5.5% (Llama-3-8B 504 vs 477 tok/s), +4%
# (Llama-3.2-1B 1,654 vs 1,589), SmolLM2 +15-30% (1,414-1,597 vs 905-1,229); prefill -1.5% (8B), -4% (1B), -13%
# (SmolLM2). A step is one chain of CUDA graphs with the weights passed whole (compile/pipeline.py), where TVM's
# cache leaves and re-enters a graph at every layer's attention. (Until then it was taken up to hidden 1024 only:
# the one-graph step waited ~160 us a token for its own launch.)
def auto_owned(kernels, cfg, dtype: str) -> bool:
    """The rule of --opt cuda_kv=auto: the owned cache where it applies and PDL is on (Hopper)."""
    return kernels.pdl and supports(kernels, cfg, dtype)


def kv_append_func(heads: int, kv_heads: int, head_dim: int, layers: int):
    T = compiler().T
    H, KV, D, L = heads, kv_heads, head_dim, layers

    @T.prim_func(private=True, check_well_formed=False)
    def kv_append(var_qkv: T.handle, var_freq: T.handle, var_pt: T.handle, var_pos0: T.handle, var_pages: T.handle,
                  layer: T.int32, var_q: T.handle, var_k: T.handle, var_v: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        n, b, maxp, P = T.int64(), T.int64(), T.int64(), T.int64()
        qkv = T.match_buffer(var_qkv, (n, H + 2 * KV, D), "float16")
        freq = T.match_buffer(var_freq, (D // 2,), "float32")
        pt = T.match_buffer(var_pt, (b, maxp), "int32")
        pos0 = T.match_buffer(var_pos0, (b,), "int32")
        pages = T.match_buffer(var_pages, (L, P, 2, KV, PAGE, D), "float16")
        q = T.match_buffer(var_q, (n, H, D), "float16")
        k = T.match_buffer(var_k, (n, KV, D), "float16")
        v = T.match_buffer(var_v, (n, KV, D), "float16")
        with T.sblock("root"):
            T.reads()
            T.writes()
            T.launch_thread("blockIdx.x", n)
            T.launch_thread("blockIdx.y", (H + 2 * KV + APPEND_HEADS - 1) // APPEND_HEADS)
            T.launch_thread("threadIdx.x", D // 2)
            T.evaluate(T.cuda.func_call(
                f"edgellm_kv_append<{D}, {APPEND_HEADS}>", qkv.data, freq.data, pt.data, pos0.data, pages.data,
                q.data, k.data, v.data, T.Cast("int32", n // b), T.Cast("int32", maxp), P, layer, H, KV,
                source_code=_SRC))

    return kv_append.with_attr("edgellm.kernel", "owned_kv_append")


def _split_attn_consts(H: int, KV: int, D: int) -> tuple[int, int, float]:
    """(q heads per kv head G, shared-memory floats, softmax scale in the log2 domain) of owned_kv.cu's split-K
    attention (edgellm_attn_split: G * D + G * 32 + 3 * G floats), shared by paged_attn_partial and decode_attn."""
    G = H // KV
    return G, G * D + G * 32 + 3 * G, float(D ** -0.5 * 1.4426950408889634)


def paged_attn_partial_func(heads: int, kv_heads: int, head_dim: int, layers: int, splits: int, causal: bool):
    """Split-K attention of n query tokens over their rows' pages -> (o_part [n, H, splits, D], ml [n, H, splits,
    2]) float32. causal: a token sees positions <= its own (decode); else the history before pos0 (prefill)."""
    T = compiler().T
    H, KV, D, L = heads, kv_heads, head_dim, layers
    G, smem, scale_log2 = _split_attn_consts(H, KV, D)

    @T.prim_func(private=True, check_well_formed=False)
    def paged_attn_partial(var_q: T.handle, var_pages: T.handle, var_pt: T.handle, var_pos0: T.handle,
                           layer: T.int32, var_o: T.handle, var_ml: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        n, b, maxp, P = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(var_q, (n, H, D), "float16")
        pages = T.match_buffer(var_pages, (L, P, 2, KV, PAGE, D), "float16")
        pt = T.match_buffer(var_pt, (b, maxp), "int32")
        pos0 = T.match_buffer(var_pos0, (b,), "int32")
        o = T.match_buffer(var_o, (n, H, splits, D), "float32")
        ml = T.match_buffer(var_ml, (n, H, splits, 2), "float32")
        with T.sblock("root"):
            T.reads()
            T.writes()
            T.launch_thread("blockIdx.x", n * KV)
            T.launch_thread("blockIdx.y", splits)
            T.launch_thread("threadIdx.x", THREADS)
            sm = T.alloc_buffer((smem,), "float32", scope="shared")
            T.evaluate(T.cuda.func_call(
                f"edgellm_paged_attn_partial<{D}, {G}>", q.data, pages.data, pt.data, pos0.data, o.data, ml.data,
                T.Cast("int32", n // b), 1 if causal else 0, T.Cast("int32", maxp), P, layer, KV, splits,
                T.float32(scale_log2), sm.data, source_code=_SRC))

    return paged_attn_partial.with_attr("edgellm.kernel", f"owned_paged_attn_{'decode' if causal else 'history'}")


def decode_attn_func(heads: int, kv_heads: int, head_dim: int, layers: int, splits: int):
    """A decode step's RoPE, KV append and split-K attention for one layer in one kernel (owned_kv.cu
    edgellm_decode_attn). Inputs as kv_append's (qkv [n, H + 2 KV, D], inv_freq, page table, pos0, pages, layer),
    one new token per row; outputs pages (in place: the new k / v in their slots) and the splits' (o_part, ml) as
    paged_attn_partial's (causal), which paged_attn_merge_func's kernel merges."""
    T = compiler().T
    H, KV, D, L = heads, kv_heads, head_dim, layers
    G, smem, scale_log2 = _split_attn_consts(H, KV, D)

    @T.prim_func(private=True, check_well_formed=False)
    def decode_attn(var_qkv: T.handle, var_freq: T.handle, var_pt: T.handle, var_pos0: T.handle, var_pages: T.handle,
                    layer: T.int32, var_o: T.handle, var_ml: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        n, b, maxp, P = T.int64(), T.int64(), T.int64(), T.int64()
        qkv = T.match_buffer(var_qkv, (n, H + 2 * KV, D), "float16")
        freq = T.match_buffer(var_freq, (D // 2,), "float32")
        pt = T.match_buffer(var_pt, (b, maxp), "int32")
        pos0 = T.match_buffer(var_pos0, (b,), "int32")
        pages = T.match_buffer(var_pages, (L, P, 2, KV, PAGE, D), "float16")
        o = T.match_buffer(var_o, (n, H, splits, D), "float32")
        ml = T.match_buffer(var_ml, (n, H, splits, 2), "float32")
        with T.sblock("root"):
            T.reads()
            T.writes()
            T.launch_thread("blockIdx.x", n * KV)
            T.launch_thread("blockIdx.y", splits)
            T.launch_thread("threadIdx.x", THREADS)
            sm = T.alloc_buffer((smem,), "float32", scope="shared")
            T.evaluate(T.cuda.func_call(
                f"edgellm_decode_attn<{D}, {G}>", qkv.data, freq.data, pt.data, pos0.data, pages.data, o.data,
                ml.data, T.Cast("int32", maxp), P, layer, KV, splits, T.float32(scale_log2), sm.data,
                source_code=_SRC))

    return decode_attn.with_attr("edgellm.kernel", "owned_decode_attn")


def _merged_decode_func(name: str, H: int, KV: int, D: int, L: int, splits: int, call: str, threads: int,
                        smem: int, mark: str = "edgellm_noop", groups: int = 1):
    """The PrimFunc of a decode attention that merges its splits itself (decode_attn_merge, decode_attn_warps):
    inputs as decode_attn's (qkv [n, H + 2 KV, D], inv_freq, page table, pos0, pages, layer); outputs pages (in
    place), the splits' (o_part, ml) (scratch: only the kernel reads them) and out [n, H, D] fp16. Refuses more than
    32 splits (the merge takes a lane each) and batches whose counters (GRAPH_BATCH_BOUND rows x KV) overflow the
    control page. `groups`: blocks per (token, kv head) (decode_attn_warps_func)."""
    from ..device_runners.kv_pages import GRAPH_BATCH_BOUND, control_words

    T = compiler().T
    _, _, scale_log2 = _split_attn_consts(H, KV, D)
    if splits > 32:
        raise ValueError(f"{name} merges at most 32 splits (a lane each), got {splits}; lower "
                         "owned_kv.SPLITS_DECODE or take DECODE_ATTN 'fused'")
    if GRAPH_BATCH_BOUND * KV * groups > control_words(KV, D):
        raise ValueError(f"{name} needs {GRAPH_BATCH_BOUND} rows x {KV} kv heads x {groups} counters and the control "
                         f"page has {control_words(KV, D)} words (head_dim {D}); take DECODE_ATTN 'fused'")

    @T.prim_func(private=True, check_well_formed=False)
    def merged(var_qkv: T.handle, var_freq: T.handle, var_pt: T.handle, var_pos0: T.handle, var_pages: T.handle,
               layer: T.int32, var_o: T.handle, var_ml: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        n, b, maxp, P = T.int64(), T.int64(), T.int64(), T.int64()
        qkv = T.match_buffer(var_qkv, (n, H + 2 * KV, D), "float16")
        freq = T.match_buffer(var_freq, (D // 2,), "float32")
        pt = T.match_buffer(var_pt, (b, maxp), "int32")
        pos0 = T.match_buffer(var_pos0, (b,), "int32")
        pages = T.match_buffer(var_pages, (L, P, 2, KV, PAGE, D), "float16")
        o = T.match_buffer(var_o, (n, H, splits, D), "float32")
        ml = T.match_buffer(var_ml, (n, H, splits, 2), "float32")
        out = T.match_buffer(var_out, (n, H, D), "float16")
        with T.sblock("root"):
            T.reads()
            T.writes()
            T.launch_thread("blockIdx.x", n * KV * groups)
            T.launch_thread("blockIdx.y", splits)
            T.launch_thread("threadIdx.x", threads)
            sm = T.alloc_buffer((smem,), "float32", scope="shared")
            T.evaluate(T.call_extern("void", mark))
            T.evaluate(T.cuda.func_call(
                call, qkv.data, freq.data, pt.data, pos0.data, pages.data, o.data, ml.data, out.data,
                T.Cast("int32", maxp), P, layer, KV, T.float32(scale_log2), sm.data, source_code=_SRC))

    return merged.with_attr("edgellm.kernel", f"owned_{name}")


def decode_attn_merge_func(heads: int, kv_heads: int, head_dim: int, layers: int, splits: int):
    """decode_attn_func with the merge in its last block per (token, kv head) (owned_kv.cu edgellm_decode_attn_merge:
    a counter per (token, kv head) in the control page): one kernel a layer, no paged_attn_merge. Inputs and outputs
    as _merged_decode_func's; out is decode_attn + paged_attn_merge's output bit for bit."""
    H, KV, D, L = heads, kv_heads, head_dim, layers
    G, smem, _ = _split_attn_consts(H, KV, D)
    if G * 65 + 1 > smem:
        raise ValueError(f"decode_attn_merge's merge needs {G * 65 + 1} shared floats, the split has {smem}")
    return _merged_decode_func("decode_attn_merge", H, KV, D, L, splits, f"edgellm_decode_attn_merge<{D}, {G}, "
                               f"{splits}>", THREADS, smem)


def _warps_smem(G: int, D: int) -> int:
    """Shared floats of edgellm_decode_attn_warps: q [G][D], the new k / v (2 x D fp16), (m, l) per warp and head,
    per warp p [G][32] then o [G][D], and 4 to align the base to 16 bytes."""
    return G * D + D + 2 * DECODE_WARPS * G + DECODE_WARPS * G * D + 4


def decode_attn_warps_func(heads: int, kv_heads: int, head_dim: int, layers: int, splits: int, early: bool = False,
                           groups: int = 1):
    """DECODE_ATTN "warps": decode_attn_merge_func's inputs and outputs (pages in place, scratch (o_part, ml), out
    [n, H, D] fp16) through owned_kv.cu edgellm_decode_attn_warps: blocks of DECODE_WARPS warps, a 32-key tile a warp
    with its K and V loads issued together before the block's one sync; up to DECODE_WARPS * 32 keys one block per
    (token, kv head) writes out, longer contexts take up to `splits` blocks merged by the last one (the control
    page's counters, as decode_attn_merge's). Within an fp16 ulp of the other modes, not bit-equal. `early` (PDL
    builds only): its loads of what earlier steps wrote go before its own wait (WARPS_EARLY). `groups` (a divisor of
    the q heads per kv head): blocks per (token, kv head), each with its share of the heads (WARPS_HEAD_GROUPS)."""
    from .cuda_pdl import WAITS_INSIDE

    H, KV, D, L = heads, kv_heads, head_dim, layers
    G = H // KV
    if groups < 1 or G % groups:
        raise ValueError(f"decode_attn_warps: groups must divide the {G} q heads per kv head, got {groups}")
    smem = _warps_smem(G // groups, D)
    if smem > STATIC_SMEM_FLOATS:
        raise ValueError(f"decode_attn_warps needs {smem * 4} bytes of shared memory at {G // groups} q heads a block, "
                         f"over the {STATIC_SMEM_FLOATS * 4}-byte static limit; lower owned_kv.DECODE_WARPS "
                         f"({DECODE_WARPS}) or take DECODE_ATTN 'fused'")
    early_arg = str(early).lower()
    call = f"edgellm_decode_attn_warps<{D}, {G // groups}, {splits}, {DECODE_WARPS}, {early_arg}" + (
        f", {groups}>" if groups > 1 else ">")
    return _merged_decode_func("decode_attn_warps", H, KV, D, L, splits, call, 32 * DECODE_WARPS, smem,
                               WAITS_INSIDE if early else "edgellm_noop", groups)


def warps_head_groups(G: int, D: int) -> int:
    """The blocks per (token, kv head) of the "warps" decode attention: the largest divisor of G up to
    WARPS_HEAD_GROUPS ("auto": G / (D / 64))."""
    want = max(1, G // max(1, D // 64)) if WARPS_HEAD_GROUPS == "auto" else int(WARPS_HEAD_GROUPS)
    ng = max(1, min(want, G))
    while G % ng:
        ng -= 1
    return ng


def paged_attn_merge_func(heads: int, head_dim: int, splits: int, extra: bool):
    """Merge the splits (and, with `extra`, the chunk's own attention (o1, lse1)) -> out [n, H, D] fp16."""
    T = compiler().T
    H, D = heads, head_dim

    if extra:
        @T.prim_func(private=True, check_well_formed=False)
        def paged_attn_merge(var_o: T.handle, var_ml: T.handle, var_o1: T.handle, var_lse1: T.handle,
                             var_out: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
            n = T.int64()
            o = T.match_buffer(var_o, (n, H, splits, D), "float32")
            ml = T.match_buffer(var_ml, (n, H, splits, 2), "float32")
            o1 = T.match_buffer(var_o1, (n, H, D), "float16")
            lse1 = T.match_buffer(var_lse1, (n, H), "float32")
            out = T.match_buffer(var_out, (n, H, D), "float16")
            with T.sblock("root"):
                T.reads()
                T.writes()
                T.launch_thread("blockIdx.x", (n * H + MERGE_ROWS - 1) // MERGE_ROWS)
                T.launch_thread("threadIdx.x", D)
                T.evaluate(T.cuda.func_call(f"edgellm_paged_attn_merge<{D}, {splits}, {MERGE_ROWS}>", o.data,
                                            ml.data, o1.data, lse1.data, out.data, 1, n * H, source_code=_SRC))

        return paged_attn_merge.with_attr("edgellm.kernel", "owned_paged_attn_merge_lse")

    @T.prim_func(private=True, check_well_formed=False)
    def paged_attn_merge_alone(var_o: T.handle, var_ml: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True, "op_pattern": 8})
        n = T.int64()
        o = T.match_buffer(var_o, (n, H, splits, D), "float32")
        ml = T.match_buffer(var_ml, (n, H, splits, 2), "float32")
        out = T.match_buffer(var_out, (n, H, D), "float16")
        with T.sblock("root"):
            T.reads()
            T.writes()
            T.launch_thread("blockIdx.x", n * H)
            T.launch_thread("threadIdx.x", D)
            T.evaluate(T.cuda.func_call(f"edgellm_paged_attn_merge_alone<{D}, {splits}>", o.data, ml.data,
                                        out.data, n * H, source_code=_SRC))

    return paged_attn_merge_alone.with_attr("edgellm.kernel", "owned_paged_attn_merge")


def owned_kv_kernels(kernels, H: int, KV: int, D: int, L: int) -> dict[str, object]:
    """The cache's kernels for one shape, built once per registry (recorded in `kernels.chosen`)."""
    from .cuda_attention import attention_chunk_cuda

    key = ("owned_kv", H, KV, D, L)
    build = {
        "append": ("kv_append", lambda: kv_append_func(H, KV, D, L)),
        "history": ("attention_prefill", lambda: paged_attn_partial_func(H, KV, D, L, SPLITS_PREFILL, False)),
        "merge_lse": ("attention_prefill", lambda: paged_attn_merge_func(H, D, SPLITS_PREFILL, True)),
        "ragged": ("attention_prefill", lambda: attention_chunk_cuda(KV, H, D)),
    }
    mode = decode_attn_mode(H, KV, D)
    if mode == "fused_merge":
        build["decode_fused_merge"] = ("attention_decode", lambda: decode_attn_merge_func(H, KV, D, L, SPLITS_DECODE))
    elif mode == "warps":
        early = WARPS_EARLY and kernels.pdl
        build["decode_warps"] = ("attention_decode",
                                 lambda: decode_attn_warps_func(H, KV, D, L, SPLITS_DECODE, early))
        ng = warps_head_groups(H // KV, D)
        if ng > 1:
            build["decode_warps_grouped"] = ("attention_decode",
                                             lambda: decode_attn_warps_func(H, KV, D, L, SPLITS_DECODE, early, ng))
    else:
        if mode == "split":
            build["decode"] = ("attention_decode", lambda: paged_attn_partial_func(H, KV, D, L, SPLITS_DECODE, True))
        else:
            build["decode_fused"] = ("attention_decode", lambda: decode_attn_func(H, KV, D, L, SPLITS_DECODE))
        build["merge"] = ("attention_decode", lambda: paged_attn_merge_func(H, D, SPLITS_DECODE, False))
    return {name: kernels._once(key + (name,), op, f"owned_{name}", f) for name, (op, f) in build.items()}


class OwnedKVCache:
    """The model-side view of the owned cache for one forward: `attention_with_fused_qkv` has the signature of
    TVM's PagedKVCache method (models/llama.py calls it the same way); `pages` is threaded from layer to layer
    through the in-place appends."""

    def __init__(self, kernels, cfg, dtype: str, pages, page_table, pos0, decode: bool):
        c = compiler()
        self.nn, self.tirx = c.nn, c.tirx
        self.cfg, self.dtype, self.decode = cfg, dtype, decode
        self.pages, self.page_table, self.pos0 = pages, page_table, pos0
        self.H, self.KV, self.D, self.L = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                           cfg.num_hidden_layers)
        self.freq = c.nn.Tensor.from_const(rope_inv_freq(self.D, cfg.rope_theta, cfg.rope_scaling))
        self.k = owned_kv_kernels(kernels, self.H, self.KV, self.D, self.L)

    def attention_with_fused_qkv(self, layer_id: int, qkv, num_qo_heads: int, sm_scale: float):
        nn, H, KV, D = self.nn, self.H, self.KV, self.D
        if num_qo_heads != H or abs(sm_scale - D ** -0.5) > 1e-12:
            raise ValueError(f"owned KV cache: heads {num_qo_heads} / sm_scale {sm_scale} differ from the config's")
        b, s, _, _ = qkv.shape
        n = b * s
        layer = self.tirx.IntImm("int32", layer_id)
        ph = nn.Tensor.placeholder
        cache_in = [qkv.reshape(n, H + 2 * KV, D), self.freq, self.page_table, self.pos0, self.pages, layer]
        mode = decode_attn_mode(H, KV, D)
        if self.decode and mode in ("fused_merge", "warps"):  # all of it, the merge too, in one kernel
            key, name = ("decode_warps", "decode_attn_warps") if mode == "warps" else ("decode_fused_merge",
                                                                                     "decode_attn_merge")
            if key == "decode_warps" and isinstance(n, int) and n == 1 and "decode_warps_grouped" in self.k:
                key = "decode_warps_grouped"  # one sequence: the kv head's q heads over several blocks
            self.pages, _, _, out = nn.op.tensor_ir_inplace_op(
                self.k[key], name, cache_in, [4, -1, -1, -1],
                [ph(self.pages.shape, self.dtype), ph((n, H, SPLITS_DECODE, D), "float32"),
                 ph((n, H, SPLITS_DECODE, 2), "float32"), ph((n, H, D), self.dtype)])
            return out.reshape(b, s, H, D)
        if self.decode and mode == "fused":  # RoPE, the append and split-K attention in one kernel
            self.pages, o_part, ml = nn.op.tensor_ir_inplace_op(
                self.k["decode_fused"], "decode_attn", cache_in, [4, -1, -1],
                [ph(self.pages.shape, self.dtype), ph((n, H, SPLITS_DECODE, D), "float32"),
                 ph((n, H, SPLITS_DECODE, 2), "float32")])
        else:
            self.pages, q, k, v = nn.op.tensor_ir_inplace_op(
                self.k["append"], "kv_append", cache_in, [4, -1, -1, -1],
                [ph(self.pages.shape, self.dtype), ph((n, H, D), self.dtype), ph((n, KV, D), self.dtype),
                 ph((n, KV, D), self.dtype)])
            splits = SPLITS_DECODE if self.decode else SPLITS_PREFILL
            o_part, ml = nn.op.tensor_ir_op(
                self.k["decode" if self.decode else "history"], "paged_attn",
                [q, self.pages, self.page_table, self.pos0, layer],
                [ph((n, H, splits, D), "float32"), ph((n, H, splits, 2), "float32")])
        if self.decode:
            out = nn.op.tensor_ir_op(self.k["merge"], "paged_attn_merge", [o_part, ml], ph((n, H, D), self.dtype))
        else:
            def indptr(x):
                return compiler().te.compute((2,), lambda i: (i * x.shape[0]).astype("int32"), name="indptr")

            ptr = nn.op.tensor_expr_op(indptr, "chunk_indptr", [q])
            o1, lse1 = nn.op.tensor_ir_op(self.k["ragged"], "attn_chunk", [q, ptr, k, v],
                                          [ph((n, H, D), self.dtype), ph((n, H), "float32")])
            out = nn.op.tensor_ir_op(self.k["merge_lse"], "paged_attn_merge", [o_part, ml, o1, lse1],
                                     ph((n, H, D), self.dtype))
        return out.reshape(b, s, H, D)
