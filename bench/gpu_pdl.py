"""Programmatic dependent launch (--opt cuda_pdl) and the owned cache's one-kernel decode attention, A/B in one GPU
call: checks, profiles, tg128, pp128 and pp512.

  python bench/gpu_pdl.py prepare --out .device-pdl     # here: nvcc builds every artifact (~50 MiB with the runtime)
  # GPU machine, carry .device-pdl:
  PYTHONPATH=.device-pdl/site:. python3 bench/gpu_pdl.py run --dev .device-pdl
  # docs/benchmarks/h200-pdl.md's runs 5 and 6: --no-tiny --shapes llama-3-8b(,llama-3.2-1b) --variants off,on

The bundle holds, per variant (VARIANTS: kernel options and the module knobs MODE / TRIGGER / SKIP_GEMM / WHOLE /
PIECES set for that build; the same code otherwise):
  tiny64-llama-q4f16_1-{variant}   the head_dim-64 tiny Llama with weights (norm weights drawn in [0.5, 1.5])
  {shape}-{variant}                SmolLM2-135M, Llama-3.2-1B, Llama-3-8B shapes, q4f16_1, shapes only
Run (each step reports and goes on when another fails):
  1. tiny model: each variant's prefill + 50 decode steps vs the numpy model on the dequantized weights, its
     logits vs the first variant's (bit-equal expected for the pairs in EXACT: PDL on / off, owned fused / split;
     within 1e-3 of the largest logit otherwise), greedy 40 equal;
  2. per shape, random weights (seed 0, the same in every build; max_batch 32): decode logits vs the first variant
     over 8 steps, greedy 32-token chains, the owned builds against each other bit for bit and each again for
     PASSES more passes (the run-ahead race of h200-pdl.md showed there), a CUPTI profile and timeline of 24
     decode steps (kernels per token, GPU busy, span, the idle between steps; with PDL "busy" includes the time a
     launched kernel waits for its predecessor), the host time of a decode call, then tg128 (5 reps) of every
     variant and the first two again (drift check), the prefill kernel table of the first two variants, batched
     decode at 1 / 8 / 32 sequences, pp128 and pp512 (3 reps) of every variant.
Writes $OUT/pdl.json (docs/benchmarks/h200-pdl-run*.json).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
SHAPE_NAMES = ("smollm2-135m", "llama-3.2-1b", "llama-3-8b")
# variant -> kernel options; the first variant of a list is the reference of its comparisons
VARIANTS = {
    "off": {"cuda_pdl": "off", "cuda_kv": "tvm"},
    "on": {"cuda_pdl": "on", "cuda_kv": "tvm"},
    "on-tf": {"cuda_pdl": "on", "cuda_kv": "tvm"},  # launch_dependents before the wait (cuda_pdl.TRIGGER_FIRST)
    "on-gemm": {"cuda_pdl": "on"},  # the prefill GEMMs launched with PDL too (cuda_pdl.SKIP_GEMM = False)
    "owned": {"cuda_pdl": "on", "cuda_kv": "owned"},  # edgellm's KV cache: one CUDA graph per decode step
    "owned-split": {"cuda_pdl": "on", "cuda_kv": "owned"},  # same, decode attention in three kernels (before)
    "all": {"cuda_pdl": "on", "cuda_fuse": "all"},  # the residual add in o / down too: fewer kernels
    # the owned cache with TVM's per-weight graph arguments (compile/pipeline.py WHOLE_PARAMS = False): the host
    # unpacks every weight and builds the graph's argument tuple before each replay
    "owned-unpacked": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # the owned cache's decode step as one CUDA graph (compile/pipeline.py GRAPH_PIECES = ()), and in pieces of 4,
    # 16 and 64 kernels then the rest (the default: 8, 32, the rest)
    "owned-1graph": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-4": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-tf": {"cuda_pdl": "on", "cuda_kv": "owned"},  # with launch_dependents before the wait (the race)
    # decode attention with the merge kernel after it (owned_kv.DECODE_ATTN = "fused"), and with the merge in the
    # last block of each (token, kv head) ("fused_merge"); the default "auto" picks one per shape
    "owned-fused": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-merge": {"cuda_pdl": "on", "cuda_kv": "owned"},  # the merge in the kernel whatever the shape
    # DECODE_ATTN "warps": a warp a 32-key tile, K and V loaded at once, one block per (token, kv head) up to 256 keys
    # (not bit-equal to the other owned builds: another summation order)
    "owned-warps": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # the decode GEMVs' L2 prefetch before their wait (cuda_gemv.PREFETCH_L2_MAX): off, and up to 64 MB matrices
    "owned-nopf": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-pf64": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-pf20": {"cuda_pdl": "on", "cuda_kv": "owned"},  # up to 20 MB: Llama-3.2-1B's gate_up (18.9 MB) too
    "owned-pfpart": {"cuda_pdl": "on", "cuda_kv": "owned"},  # and the first 16 MB / rows bytes of larger ones
    # the warps decode attention's loads of pos0, the page table and its first tile before its PDL wait
    # (owned_kv.WARPS_EARLY, the default from run 18); the same arithmetic, bit-equal to "owned"
    "owned-early": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-late": {"cuda_pdl": "on", "cuda_kv": "owned"},  # WARPS_EARLY off (the default before run 18)
    # decode_greedy in the pieces of decode (pipeline.GREEDY_GRAPH_PIECES = GRAPH_PIECES; one graph from run 20)
    "owned-gp": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # o and down add their output to the residual stream, the next GEMV takes the norm of it (--opt cuda_fuse=all)
    "owned-all": {"cuda_pdl": "on", "cuda_kv": "owned", "cuda_fuse": "all"},
    # Llama-3.2-1B's gate_up with the norm: 2 and 4 times the warps a block (cuda_gemv.FUSED_GATE_UP_WIDEN), and
    # unfused (add_rms_norm, then gate_up with the silu epilogue: FUSED_NORM_SILU_AUTO_MAX below 2048)
    "owned-gw2": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-gw4": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-gu": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # the down GEMV's config (`in` >= 8192, cuda_gemv.LONG_IN_CONFIG (warps, rows, unroll, ksplit, fold); default
    # (8, 2, 2, 2)): 4 groups a step, 4 rows a team, `in` over 4 warps of 16
    "owned-dnu4": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-dnr4": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-dnk4": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # the owned cache with a 4-bit head (--head q4: the head's rows in q4f16_1 like the layers, as llama.cpp's pure
    # Q4_0 GGUFs of the side-by-side have it) instead of the default 8-bit one: half the head's bytes
    "owned-hq4": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # the silu GEMV (gate_up) with 4 rows a team: a warp takes two outputs (cuda_gemv.SILU_CONFIG), and down in
    # blocks of 16 warps (half the blocks staging x); bit-equal to "owned"
    "owned-sr4": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-sr4w8": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-dnw16": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # down in blocks of 32 warps; down in 16 and the 8B's gate_up in blocks of 8 / 16 warps (fewer blocks staging x)
    "owned-dnw32": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-dnw16-su8": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-dnw16-su16": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-dnw16-hq4": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # qkv with its norm (cuda_gemv.NORM_CONFIG): 4 rows a team (8B: 192 blocks of 16 warps staging the norm instead
    # of 384; 1B: 16 warps), or `in` on one warp (ksplit 1: another summation order)
    "owned-qr4": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-qk1": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # the fused norm's weight loaded after the sum of squares (cuda_gemv.NORM_WEIGHT late: before run 32)
    "owned-nwlate": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # the warps decode attention in 2 / up to 4 / 1 blocks per (token, kv head), each with its share of the q heads
    # (owned_kv.WARPS_HEAD_GROUPS; auto from run 34); bit-equal to "owned"
    "owned-hg2": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-hg4": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-hg1": {"cuda_pdl": "on", "cuda_kv": "owned"},  # one block per (token, kv head): before run 34
    # the device argmax's blocks meeting by the shared-memory tree (before: 17 + 13 barriers a token) instead of
    # warp shuffles (--opt cuda_argmax, default warp); the same logits and tokens
    "owned-argtree": {"cuda_pdl": "on", "cuda_kv": "owned", "cuda_argmax": "tree"},
    "owned-hq4-argtree": {"cuda_pdl": "on", "cuda_kv": "owned", "cuda_argmax": "tree"},
    # the plain decode GEMVs (o, down) and gate_up + silu with int8 activations and dp4a (--opt cuda_gemv=dp4a; a
    # scale per 8 activations, as the Vulkan default): not bit-equal, within the tolerance
    "owned-dp4a": {"cuda_pdl": "on", "cuda_kv": "owned", "cuda_gemv": "dp4a"},
    # fp16 activations in every GEMV (--opt cuda_gemv=fp16x2-smem; auto's pick before run 47, where auto took dp4a for
    # `in` >= 2048)
    "owned-fp16": {"cuda_pdl": "on", "cuda_kv": "owned", "cuda_gemv": "fp16x2-smem"},
    # the plain dp4a GEMVs in other work splits (cuda_gemv_dp4a.PLAIN_CONFIG): the 1B's down (8192 -> 2048) with a
    # lane's groups in one step (all its loads before the wait) in 128 blocks of 16 warps (u4w16) or 256 of 8 (u4),
    # in 256 blocks of 16 warps of 4-warp teams (k4); the 1B's o (2048 -> 2048) in 256 blocks of 4 warps (o4) or 128
    # blocks of 4 warps of 4 rows (o4r4)
    "owned-u4w16": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-u4": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-k4": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-o4": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-o4r4": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # the long-`in` dp4a GEMVs (down) with 2 groups a step, as before run 48 (cuda_gemv_dp4a.LONG_IN_UNROLL); the 8B's
    # gate_up + silu (the chain's) with its 4 groups a lane in one step (QOUT_SILU_CONFIG (4, 4, 4, 1))
    "owned-lu2": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-gu4": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # the 8B's down (the chain's, 14,336 -> 4096) with 4-warp teams, a lane's 4 groups in one step: blocks of 8 / 16
    # warps (cuda_gemv_dp4a.PLAIN_CONFIG)
    "owned-dk4w8": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-dk4w16": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # the 8B's gate_up and / or down with their weights through the cp.async ring (cuda_gemv_dp4a.ASYNC_DEPTH)
    "owned-cp2": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-cpdn2": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-cpdn3": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-cpdn4": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-cpgu2": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # ... and the 8B's down without it (the default before run 53), in other splits and depths
    "owned-cpoff": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-cpdn4u1": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-cpdn3u1": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-cpdn2w8": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # the 8B's gate_up one group a step (QOUT_SILU_CONFIG (4, 4, 1, 1)): in registers, through a ring 2 / 3 deep;
    # down through the ring 2 deep of one group
    "owned-gu1": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-cpgu2u1": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-cpgu3u1": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-cpdn2u1": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # the 8B's gate_up + silu (the chain's) in 4 warps of 8 rows a step of one group (QOUT_SILU_CONFIG (4, 8, 1, 1):
    # 896 blocks, one wave); the 8B's o with `in` on one warp, its 4 groups a lane in one step (PLAIN_CONFIG (4, 2,
    # 4, 1): no K-split partials through shared memory); both
    "owned-gu8r1": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-o41": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-gu8r1-o41": {"cuda_pdl": "on", "cuda_kv": "owned"},
    # gate_up (8, 8, 1, 1): 448 blocks of 8 warps, half as many staging x; o (16, 2, 4, 2): 256 blocks of 16 warps,
    # half as many quantizing x
    "owned-gu8w8": {"cuda_pdl": "on", "cuda_kv": "owned"},
    "owned-o16": {"cuda_pdl": "on", "cuda_kv": "owned"},  # the default on sm_90 since run 60 (WIDE_MIN_BLOCKS)
    "owned-o8": {"cuda_pdl": "on", "cuda_kv": "owned"},  # o in blocks of 8 warps: the default before run 60
    # ... with gate_up + silu in blocks of 8 / 16 warps (cuda_gemv_dp4a.SILU_CONFIG): fewer blocks quantizing x
    "owned-dp4a-w8": {"cuda_pdl": "on", "cuda_kv": "owned", "cuda_gemv": "dp4a"},
    "owned-dp4a-w16": {"cuda_pdl": "on", "cuda_kv": "owned", "cuda_gemv": "dp4a"},
    # the quantized MLP chain also where gate_up stages the norm (the 1B: cuda_gemv_dp4a.CHAIN_MIN_HIDDEN), and its
    # gate_up in blocks of 8 warps of 2 rows (QOUT_SILU_CONFIG (8, 2, 4, 1), the first version; the default since
    # run 44: 4 warps of 4 rows, still 8 outputs a block)
    "owned-dp4a-chain": {"cuda_pdl": "on", "cuda_kv": "owned", "cuda_gemv": "dp4a"},
    "owned-dp4a-q4r4": {"cuda_pdl": "on", "cuda_kv": "owned", "cuda_gemv": "dp4a"},
    "owned-dp4a-q8r2": {"cuda_pdl": "on", "cuda_kv": "owned", "cuda_gemv": "dp4a"},
}
HEAD = {"owned-hq4": "q4", "owned-hq4-argtree": "q4", "owned-dnw16-hq4": "q4"}  # CompileArgs.head of the build (else the default); its logits differ from the others'

MODE = {"owned-split": "split", "owned-fused": "fused", "owned-merge": "fused_merge",
        "owned-warps": "warps"}  # owned_kv.DECODE_ATTN of the build (else its default)
TRIGGER = {"on-tf": True, "owned-tf": True}  # cuda_pdl.TRIGGER_FIRST of the build (else its default)
SKIP_GEMM = {"on-gemm": False}  # cuda_pdl.SKIP_GEMM of the build (else its default)
WHOLE = {"owned-unpacked": False}  # pipeline.WHOLE_PARAMS of the build (else its default)
PREFETCH = {"owned-nopf": 0, "owned-pf64": 64 << 20, "owned-pf20": 20 << 20}  # cuda_gemv.PREFETCH_L2_MAX of the build (else its default)
PARTIAL = {"owned-pfpart": True}  # cuda_gemv.PREFETCH_PARTIAL of the build (else its default)
EARLY = {"owned-early": True, "owned-late": False}  # owned_kv.WARPS_EARLY of the build (else its default)
WIDEN = {"owned-gw2": 2, "owned-gw4": 4}  # cuda_gemv.FUSED_GATE_UP_WIDEN of the build (else its default)
NORM_SILU_MAX = {"owned-gu": 1024}  # cuda_gemv.FUSED_NORM_SILU_AUTO_MAX of the build (else its default)
LONG_IN = {"owned-dnu4": (8, 2, 4, 2, True), "owned-dnr4": (8, 4, 2, 2, True),
           "owned-dnk4": (16, 2, 2, 4, True), "owned-dnw16": (16, 2, 2, 2, True),
           "owned-dnw32": (32, 2, 2, 2, True), "owned-dnw16-su8": (16, 2, 2, 2, True),
           "owned-dnw16-su16": (16, 2, 2, 2, True), "owned-dnw16-hq4": (16, 2, 2, 2, True)}  # cuda_gemv.LONG_IN_CONFIG of the build (else its default)
PIECES = {"owned-unpacked": (), "owned-1graph": (), "owned-4": (4, 16, 64)}  # pipeline.GRAPH_PIECES (else default)
SILU = {"owned-sr4": {2048: (4, 4, 2, 1, True), 4096: (4, 4, 2, 1, True)},
        "owned-sr4w8": {2048: (8, 4, 2, 1, True), 4096: (4, 4, 4, 1, True)},
        "owned-dnw16-su8": {4096: (8, 2, 4, 1, True)}, "owned-dnw16-su16": {4096: (16, 2, 4, 1, True)}}  # cuda_gemv.SILU_CONFIG (else {})
NORM = {"owned-qr4": {4096: (16, 4, 2, 2, False), 2048: (16, 2, 4, 2, False)},
        "owned-qk1": {4096: (16, 2, 4, 1, False), 2048: (8, 2, 2, 1, False)}}  # cuda_gemv.NORM_CONFIG (else {})
NORM_W = {"owned-nwlate": "late"}
HEAD_GROUPS = {"owned-hg2": 2, "owned-hg4": 4, "owned-hg1": 1}  # owned_kv.WARPS_HEAD_GROUPS of the build (else its default)  # cuda_gemv.NORM_WEIGHT of the build (else its default)
DP4A_SILU = {"owned-dp4a-w8": {4096: (8, 2, 4, 1), 2048: (8, 2, 4, 1)},
             "owned-dp4a-w16": {4096: (16, 2, 4, 1), 2048: (16, 2, 4, 1)}}  # cuda_gemv_dp4a.SILU_CONFIG (else {})
DP4A_CHAIN = {"owned-dp4a-chain": 256}  # cuda_gemv_dp4a.CHAIN_MIN_HIDDEN (else its default)
DP4A_QOUT = {"owned-dp4a-q4r4": (4, 4, 2, 1), "owned-dp4a-q8r2": (8, 2, 4, 1), "owned-gu4": (4, 4, 4, 1),
             "owned-gu1": (4, 4, 1, 1), "owned-cpgu2u1": (4, 4, 1, 1), "owned-cpgu3u1": (4, 4, 1, 1),
             "owned-gu8r1": (4, 8, 1, 1), "owned-gu8r1-o41": (4, 8, 1, 1), "owned-gu8w8": (8, 8, 1, 1)}  # cuda_gemv_dp4a.QOUT_SILU_CONFIG (else its default)
DP4A_PLAIN = {"owned-u4w16": {(8192, 2048): (16, 2, 4, 2)}, "owned-u4": {(8192, 2048): (8, 2, 4, 2)},
              "owned-k4": {(8192, 2048): (16, 2, 2, 4)}, "owned-o4": {(2048, 2048): (4, 2, 2, 1)},
              "owned-o4r4": {(2048, 2048): (4, 4, 2, 1)}, "owned-dk4w8": {(14336, 4096): (8, 2, 4, 4)},
              "owned-dk4w16": {(14336, 4096): (16, 2, 4, 4)}, "owned-cpdn4u1": {(14336, 4096): (16, 2, 1, 2)},
              "owned-cpdn3u1": {(14336, 4096): (16, 2, 1, 2)},
              "owned-cpdn2w8": {(14336, 4096): (8, 2, 2, 2)},
              "owned-cpdn2u1": {(14336, 4096): (16, 2, 1, 2)}, "owned-o41": {(4096, 4096): (4, 2, 4, 1)},
              "owned-gu8r1-o41": {(4096, 4096): (4, 2, 4, 1)}, "owned-o16": {(4096, 4096): (16, 2, 4, 2)},
              "owned-o8": {(4096, 4096): (8, 2, 4, 2)}}  # cuda_gemv_dp4a.PLAIN_CONFIG (else {})
DP4A_LONG_UNROLL = {"owned-lu2": 2}  # cuda_gemv_dp4a.LONG_IN_UNROLL (else its default)
GU8B, DN8B = (4096, 28672), (14336, 4096)
ASYNC = {"owned-cp2": {GU8B: 2, DN8B: 2}, "owned-cpdn2": {DN8B: 2}, "owned-cpdn3": {DN8B: 3},
         "owned-cpdn4": {DN8B: 4}, "owned-cpgu2": {GU8B: 2}, "owned-cpoff": {DN8B: 0}, "owned-cpdn4u1": {DN8B: 4},
         "owned-cpdn3u1": {DN8B: 3}, "owned-cpdn2w8": {DN8B: 2}, "owned-cpgu2u1": {GU8B: 2},
         "owned-cpgu3u1": {GU8B: 3}, "owned-cpdn2u1": {DN8B: 2}, "owned-gu1": {}}  # cuda_gemv_dp4a.ASYNC_DEPTH (else {})
GREEDY_PIECES = {"owned-gp": (8, 32)}  # pipeline.GREEDY_GRAPH_PIECES of the build (else its default)
OWNED = ("owned", "owned-split", "owned-unpacked", "owned-1graph", "owned-4", "owned-tf", "owned-fused",
         "owned-merge", "owned-nopf", "owned-pf64", "owned-pfpart", "owned-warps", "owned-early", "owned-late",
         "owned-gw2", "owned-gw4", "owned-gu", "owned-dnu4", "owned-dnr4", "owned-dnk4", "owned-gp",
         "owned-pf20", "owned-all", "owned-hq4", "owned-argtree", "owned-hq4-argtree", "owned-sr4", "owned-sr4w8",
         "owned-dnw16", "owned-dnw32", "owned-dnw16-su8", "owned-dnw16-su16", "owned-dnw16-hq4",
         "owned-qr4", "owned-qk1", "owned-nwlate", "owned-hg2", "owned-hg4", "owned-hg1", "owned-dp4a",
         "owned-dp4a-w8", "owned-dp4a-w16", "owned-dp4a-chain", "owned-dp4a-q4r4",
         "owned-dp4a-q8r2", "owned-fp16", "owned-u4w16", "owned-u4", "owned-k4", "owned-o4",
         "owned-o4r4", "owned-lu2", "owned-gu4", "owned-dk4w8", "owned-dk4w16", "owned-gu8r1", "owned-o41",
         "owned-gu8r1-o41", "owned-gu8w8", "owned-o16", "owned-o8", *ASYNC)  # and owned-pA-B...
NOT_EXACT = ("owned-warps", "owned-dnr4", "owned-dnk4", "owned-all", "owned-qk1", "owned-dp4a", "owned-dp4a-w8",
             "owned-dp4a-w16", "owned-dp4a-chain", "owned-dp4a-q4r4", "owned-dp4a-q8r2", "owned-fp16", "owned-u4w16",
             "owned-u4", "owned-k4", "owned-o4", "owned-o4r4", "owned-dk4w8", "owned-dk4w16", "owned-o41", "owned-gu8r1-o41")  # owned builds compared to the others within the tolerance (each to itself bit for bit)
EXACT = {("off", "on"), ("off", "on-tf"), ("off", "on-gemm")} | {  # pairs expected bit-equal
    (a, b) for a in OWNED for b in OWNED if a == b or (a not in NOT_EXACT and b not in NOT_EXACT)}
SHAPE_VARIANTS = {shape: ("on", "owned") for shape in SHAPE_NAMES}
QUICK = False  # run --quick: checks, profiles and tg128 only
BATCH = 32  # the shapes' max_batch: batched decode at 1, 8 and 32 sequences (serve's case)
PASSES = 8  # repeated decode passes of each owned build (the run-ahead race showed in 4 of 12)
# owned-warps: its kernel against numpy on the GPU too; owned-hq4: the final norm staged by the 4-bit head's GEMV
TINY_VARIANTS = ("off", "on", "owned", "owned-warps", "owned-hq4")


def _knobs() -> list[tuple[object, str, dict]]:
    """(module, constant, {variant: the build's value}) of every module knob a variant sets (else its default)."""
    from edgellm.compile import pipeline
    from edgellm.kernels import cuda_gemv, cuda_gemv_dp4a, cuda_pdl, owned_kv

    return [(owned_kv, "DECODE_ATTN", MODE), (cuda_pdl, "TRIGGER_FIRST", TRIGGER), (cuda_pdl, "SKIP_GEMM", SKIP_GEMM),
            (pipeline, "WHOLE_PARAMS", WHOLE), (pipeline, "GRAPH_PIECES", PIECES),
            (cuda_gemv, "PREFETCH_L2_MAX", PREFETCH), (cuda_gemv, "PREFETCH_PARTIAL", PARTIAL),
            (owned_kv, "WARPS_EARLY", EARLY), (cuda_gemv, "FUSED_GATE_UP_WIDEN", WIDEN),
            (cuda_gemv, "FUSED_NORM_SILU_AUTO_MAX", NORM_SILU_MAX), (cuda_gemv, "LONG_IN_CONFIG", LONG_IN),
            (pipeline, "GREEDY_GRAPH_PIECES", GREEDY_PIECES), (cuda_gemv, "SILU_CONFIG", SILU),
            (cuda_gemv, "NORM_CONFIG", NORM), (cuda_gemv, "NORM_WEIGHT", NORM_W),
            (owned_kv, "WARPS_HEAD_GROUPS", HEAD_GROUPS), (cuda_gemv_dp4a, "SILU_CONFIG", DP4A_SILU),
            (cuda_gemv_dp4a, "CHAIN_MIN_HIDDEN", DP4A_CHAIN),
            (cuda_gemv_dp4a, "QOUT_SILU_CONFIG", DP4A_QOUT), (cuda_gemv_dp4a, "PLAIN_CONFIG", DP4A_PLAIN),
            (cuda_gemv_dp4a, "LONG_IN_UNROLL", DP4A_LONG_UNROLL), (cuda_gemv_dp4a, "ASYNC_DEPTH", ASYNC)]


def _compile(args_kw: dict, variant: str) -> None:
    from edgellm.compile import CompileArgs, compile_model, pipeline
    from edgellm.kernels import KernelOptions

    knobs = _knobs()
    saved = [getattr(m, name) for m, name, _ in knobs]
    for (m, name, values), default in zip(knobs, saved):
        setattr(m, name, values.get(variant, default))
    pieces = re.fullmatch(r"owned-p(\d+(?:-\d+)*)", variant)
    if pieces:  # owned-pA-B...: the owned cache with graph pieces of A, B, ... kernels
        pipeline.GRAPH_PIECES = tuple(int(k) for k in pieces.group(1).split("-"))
    options = VARIANTS.get(variant, VARIANTS["owned"] if pieces else None)
    try:
        if options is None:
            raise SystemExit(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)} or owned-pA-B...")
        compile_model(CompileArgs(**args_kw, kernel_options=KernelOptions(**options), head=HEAD.get(variant)))
    finally:
        for (m, name, _), value in zip(knobs, saved):
            setattr(m, name, value)


def prepare(out: Path, arch: str, shapes: list[str], tiny: bool = True) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import gpu_prepare as gp
    import tiny_models
    from edgellm.config import RuntimeOptions

    gp.new_bundle(out)
    preset = f"cuda-{arch.replace('_', '')}"
    if tiny:
        tiny_models.SPECS["llama_d64"] = dict(gp.TINY64)
        ckpt = tiny_models.make_checkpoint(out / "ckpt" / "llama_d64", "llama_d64")
        model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(0.5 + torch.rand(p.shape, generator=g))
        model.save_pretrained(ckpt, safe_serialization=True)
        for v in TINY_VARIANTS:
            _compile(dict(model=str(ckpt), output=out / "art" / f"tiny64-llama-q4f16_1-{v}", target=preset,
                          quant="q4f16_1", runtime=RuntimeOptions(256, 256, 16, 4)), v)
        shutil.rmtree(ckpt)  # the artifacts carry the weights the numpy reference reads
    saved, gp.OUT = gp.OUT, out  # shape_folder writes under OUT/ckpt
    try:
        for shape in shapes:
            folder = gp.shape_folder(shape)
            for v in SHAPE_VARIANTS[shape]:
                _compile(dict(model=str(folder), output=out / "art" / f"{shape}-{v}", target=preset, quant="q4f16_1",
                              runtime=RuntimeOptions(1024, 512, 16, BATCH), shapes_only=True), v)
    finally:
        gp.OUT = saved
    gp.check_bundle_size(out)


results: dict = {"variants": VARIANTS, "checks": {}, "profiles": {}, "bench": [], "errors": []}


def _decode_logits(eng, prompt: list[int], feed: list[int]) -> np.ndarray:
    with eng.sequence() as seq:
        steps = [seq.prefill(prompt)] + [seq.decode(t) for t in feed]
    return np.stack([np.asarray(s, np.float32).reshape(-1) for s in steps])


def _greedy(eng, prompt: list[int], n: int) -> list[int]:
    return [int(t) for t in eng.generate_ids(prompt, n)]


def _exact(a: str, b: str) -> bool:
    """Whether builds a and b must agree bit for bit (EXACT; an owned-pA-B build counts as "owned")."""
    def base(v: str) -> str:
        return "owned" if re.fullmatch(r"owned-p\d+(?:-\d+)*", v) else v

    return (base(a), base(b)) in EXACT


# builds with int8 activations (--opt cuda_gemv=dp4a): compared to the fp16 ones within 5e-3 of the largest logit
# (each activation rounded to 8 bits within its word; run 40 saw 0.049 on SmolLM2's logits of ~11, greedy equal)
INT8_ACT_REL = 5e-3


def _rel(*variants: str) -> float:
    """The tolerance of a comparison between these builds, relative to the largest logit: INT8_ACT_REL where they
    differ in --opt cuda_gemv (auto takes int8 activations for `in` >= 2048, fp16x2-smem none) or one is dp4a."""
    gemv = {VARIANTS.get(v, {}).get("cuda_gemv", "auto") for v in variants}
    return INT8_ACT_REL if len(gemv) > 1 or "dp4a" in gemv else 1e-3


def _compare(label: str, a: np.ndarray, b: np.ndarray, ga: list[int], gb: list[int], exact: bool,
             rel: float = 1e-3) -> None:
    diff = float(np.abs(a - b).max())
    close = diff <= rel * float(np.abs(a).max())
    results["checks"][label] = {"max_abs_diff": diff, "bit_equal": bool(np.array_equal(a, b)),
                                "greedy_equal": ga == gb, "ok": (bool(np.array_equal(a, b)) if exact else close)
                                and ga == gb}


def check_tiny(dev: Path) -> None:
    import gpu_run
    from edgellm.device_runners.engine import Engine

    gpu_run.DEV = dev
    gpu_run.results = results
    long = [int(x) for x in np.random.default_rng(5).integers(3, 320, 150)]
    art = "tiny64-llama-q4f16_1"
    variants = [v for v in TINY_VARIANTS if (dev / "art" / f"{art}-{v}").is_dir()]
    for v in variants:
        gpu_run.check_q4_vs_numpy(f"{art}-{v} vs numpy, decode 50 steps after 100", f"{art}-{v}", long, 100)
    ref, rest = variants[0], [v for v in variants[1:] if v not in HEAD]  # another head: numpy's check only
    e0 = Engine(dev / "art" / f"{art}-{ref}")
    gpu_run.check_argmax(e0)  # the registry's device argmax (warp shuffles on CUDA) vs numpy: ties, ends, -inf
    a, ga = _decode_logits(e0, long[:100], long[100:]), _greedy(e0, long[:20], 40)
    got = {}
    for v in rest:
        e = Engine(dev / "art" / f"{art}-{v}")
        got[v] = (_decode_logits(e, long[:100], long[100:]), _greedy(e, long[:20], 40))
        _compare(f"{art}-{v} vs {ref}: decode logits (51 steps), greedy 40", a, got[v][0], ga, got[v][1],
                 exact=(ref, v) in EXACT)
    for v in ("owned",):
        if v in got and "owned-split" in got:
            _compare(f"{art}-{v} vs owned-split: decode logits (51 steps), greedy 40", got["owned-split"][0],
                     got[v][0], got["owned-split"][1], got[v][1], exact=True)


def timeline(trace: Path, steps: int = 24, top: int = 14) -> dict:
    """From a CUPTI chrome trace of decode steps: per kernel name, the mean duration, and the mean gap from the end
    of the kernel before it to its start (negative: it started before its predecessor ended, i.e. PDL let it
    launch early and it waited inside). The steps' median time from the first kernel to the last kernel's end."""
    events = [e for e in json.loads(trace.read_text())["traceEvents"]
              if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy")]
    events.sort(key=lambda e: e["ts"])
    stats: dict = {}
    prev_end = None
    for e in events:
        if e.get("cat") == "kernel":
            d = stats.setdefault(e["name"][:60], {"n": 0, "dur": 0.0, "gap": 0.0})
            d["n"] += 1
            d["dur"] += e["dur"]
            d["gap"] += (e["ts"] - prev_end) if prev_end is not None else 0.0
        prev_end = e["ts"] + e["dur"]
    rows = sorted(stats.items(), key=lambda kv: -kv[1]["dur"])[:top]
    out = {name: {"per_token": d["n"] / steps, "us_per_call": d["dur"] / d["n"], "gap_us": d["gap"] / d["n"],
                  "us_per_token": d["dur"] / steps} for name, d in rows}
    # between steps: from the last kernel's end of one step to the first kernel of the next (host work: the token
    # read back, the Engine's copies, the VM up to the first launch); a step starts with the trace's first kernel
    kernels = [e for e in events if e.get("cat") == "kernel"]
    if kernels:
        first, idle, end = kernels[0]["name"], [], None
        for e in kernels:
            if e["name"] == first and end is not None:
                idle.append(e["ts"] - end)
            end = max(end or 0.0, e["ts"] + e["dur"])
        if idle:
            out["(between steps)"] = {"per_token": 1.0, "us_per_call": float(np.median(idle)), "gap_us": 0.0,
                                      "us_per_token": float(np.median(idle))}
    return out


def host_call_us(eng, steps: int = 50) -> dict:
    """Median host time of a greedy decode step's `decode` call (the VM up to its last graph launch) and of the
    whole step (with the device argmax and its 4 bytes back), without a profiler."""
    import time

    call, step = [], []
    with eng.sequence() as seq:
        tok = int(np.argmax(seq.prefill([5, 6, 7])))
        for i in range(steps + 5):
            t0 = time.perf_counter()
            out = eng._forward("decode", [seq.id], [tok])
            t1 = time.perf_counter()
            tok = int(eng._argmax(out).numpy().reshape(-1)[0])
            eng._lengths[seq.id] += 1
            if i >= 5:
                call.append(t1 - t0)
                step.append(time.perf_counter() - t0)
    return {"call_us": float(np.median(call)) * 1e6, "step_us": float(np.median(step)) * 1e6}


def _control_page_check(shape: str, owned: list[str], engines: dict) -> None:
    """The owned cache's control page (device_runners/kv_pages.py: the words the decode attention counts its
    blocks with) must be all zero between steps."""
    from edgellm.device_runners.kv_pages import control_page

    for v in owned:
        page = control_page(engines[v]._tvm, engines[v].kv).numpy()
        results["checks"][f"{shape}-{v}: control page zero between steps"] = {
            "nonzero_words": int(np.count_nonzero(page)), "ok": not page.any()}


def bench_shape(dev: Path, shape: str, bw: float) -> None:
    import gpu_run
    from edgellm.device_runners.bench import run_bench
    from edgellm.device_runners.engine import Engine

    variants = [v for v in SHAPE_VARIANTS[shape] if (dev / "art" / f"{shape}-{v}").is_dir()]
    engines = {v: Engine(dev / "art" / f"{shape}-{v}", random_weights=0) for v in variants}
    prompt = [7, 8, 9]
    first = variants[0]
    ref = _greedy(engines[first], prompt, 32)
    a = _decode_logits(engines[first], prompt, ref[:8])
    gpu_run.results = results
    logits = {first: a}
    for v, e in engines.items():
        if v != first:
            logits[v] = _decode_logits(e, prompt, ref[:8])
        if v != first and v not in HEAD:  # another head: other logits, nothing to compare with
            _compare(f"{shape}-{v} vs {first}: decode logits (8 steps), greedy 32 (random weights)", a, logits[v],
                     ref, _greedy(e, prompt, 32), exact=(first, v) in EXACT, rel=_rel(first, v))
        trace = Path(os.environ.get("OUT", ".")) / "trace.json"
        gpu_run.profile_decode(e, f"{shape}-{v}", trace=trace, chain=True)
        results.setdefault("timelines", {})[f"{shape}-{v}"] = timeline(trace)
        trace.unlink()
    owned = [v for v in variants if v in OWNED or v.startswith("owned-p")]
    for v in [v for v in owned[1:] if v not in HEAD]:  # the owned builds differ in graph pieces / kernel count
        _compare(f"{shape}-{v} vs {owned[0]}: decode logits (8 steps)", logits[owned[0]], logits[v], ref, ref,
                 exact=_exact(owned[0], v), rel=_rel(owned[0], v))
    for v in owned:  # the same engine again, PASSES times (its graphs captured now): the same bits every time
        again = [_decode_logits(engines[v], prompt, ref[:8]) for _ in range(PASSES)]
        worst = max(again, key=lambda x: float(np.abs(x - logits[v]).max()))
        _compare(f"{shape}-{v} again x{PASSES}: decode logits (8 steps)", logits[v], worst, ref, ref, exact=True)
    if owned:  # a context of ~1,000 tokens: all 32 decode splits hold keys
        long = [int(x) for x in np.random.default_rng(3).integers(3, 1000, 1000)]
        base = _decode_logits(engines[owned[0]], long, ref[:8])
        for v in [v for v in owned[1:] if v not in HEAD]:
            _compare(f"{shape}-{v} vs {owned[0]}: decode logits (8 steps) after 1,000 tokens", base,
                     _decode_logits(engines[v], long, ref[:8]), ref, ref, exact=_exact(owned[0], v),
                     rel=_rel(owned[0], v))
    for v in owned:  # greedy_chain with one step queued ahead (what tg and generate run) = the step-by-step chain;
        # queued ahead through decode_greedy (the argmax and the next step's inputs in its graph) and through decode
        # + copies between steps; each twice, the second on a prompt 100 tokens longer (other page rows)
        for p in (prompt, prompt + [int(x) for x in np.random.default_rng(5).integers(3, 1000, 100)]):
            engines[v].decode_ahead = False
            step = _greedy(engines[v], p, 32)
            engines[v].decode_ahead = True
            for in_graph in (True, False):
                engines[v].decode_in_graph = in_graph
                how = "in its graph" if in_graph and engines[v].has_decode_greedy else "copies between steps"
                _compare(f"{shape}-{v} greedy 32 after {len(p)}: one step queued ahead ({how}) vs step by step",
                         np.zeros(1), np.zeros(1), _greedy(engines[v], p, 32), step, exact=True)
            engines[v].decode_in_graph = True
    for v in variants:  # host time of one decode call (returns once its graphs are launched), unprofiled
        results.setdefault("host_call", {})[f"{shape}-{v}"] = host_call_us(engines[v])
    name = gpu_run.torch_device_name()
    read = {v: gpu_run.read_bytes_per_token(e) for v, e in engines.items()}  # per build: the head's rows differ
    # tg128 of every variant, the first two again (drift); each owned build queued ahead with decode + copies
    # between steps (decode_in_graph off: VARIANT-copies) and step by step (decode_ahead off: the GPU waits for
    # the host between steps, VARIANT-step)
    runs = [(v, "ahead") for v in variants + variants[:2]] + [(v, "copies") for v in owned
                                                              if engines[v].has_decode_greedy]
    runs += [(v, "step") for v in owned]
    for v, how in runs:
        engines[v].decode_ahead, engines[v].decode_in_graph = how != "step", how == "ahead"
        label = v if how == "ahead" else f"{v}-{how}"
        for r in run_bench(engines[v], 0, 128, reps=5, warmup=1, device_name=name):
            results["bench"].append({"shape": shape, "variant": label, "test": r.test, "avg_ts": r.avg_ts,
                                     "stddev_ts": r.stddev_ts, "samples_ts": r.samples_ts,
                                     "read_bytes_per_token": read[v], "bandwidth_fraction": read[v] * r.avg_ts / bw,
                                     "copy_bandwidth_gbs": bw / 1e9})
            print(f"{shape:<14} {label:<6} {r.test} {r.avg_ts:9.1f} tok/s +- {r.stddev_ts:.1f}", flush=True)
        engines[v].decode_ahead, engines[v].decode_in_graph = True, True
    _control_page_check(shape, owned, engines)
    if QUICK:  # checks, profiles and tg128 only
        return
    for v in variants[:2]:  # where prefill goes on the two caches (TVM's and the owned one, on 1B and 8B)
        results.setdefault("prefill_tables", {})[f"{shape}-{v}"] = gpu_run.prefill_kernel_table(engines[v], 512, 25)
    for v in variants:  # aggregate tok/s with 1, 8 and 32 sequences decoding together
        for r in gpu_run.bench_batched(engines[v], f"{shape}-{v}"):
            results.setdefault("batched", []).append(r)
            print(f"{shape:<14} {v:<6} batched x{r['sequences']:<3} {r['aggregate_ts']:9.1f} tok/s", flush=True)
    for v, n in [(v, n) for n in (128, 512) for v in variants]:
        for r in run_bench(engines[v], n, 0, reps=3, warmup=1, device_name=name):
            results["bench"].append({"shape": shape, "variant": v, "test": r.test, "avg_ts": r.avg_ts,
                                     "stddev_ts": r.stddev_ts, "samples_ts": r.samples_ts})
            print(f"{shape:<14} {v:<6} {r.test} {r.avg_ts:9.1f} tok/s +- {r.stddev_ts:.1f}", flush=True)
    _control_page_check(shape, owned, engines)  # after batch_decode too


def run(dev: Path, shapes: list[str]) -> int:
    import gpu_run
    from bench_steps import print_summary, run_steps

    results["device"] = gpu_run.torch_device_name()
    results["copy_bandwidth_gbs"] = gpu_run.copy_bandwidth() / 1e9
    bw = results["copy_bandwidth_gbs"] * 1e9
    tiny = any((dev / "art" / f"tiny64-llama-q4f16_1-{v}").is_dir() for v in TINY_VARIANTS)
    steps = [("tiny checks", lambda: check_tiny(dev))] if tiny else []
    steps += [(shape, lambda s=shape: bench_shape(dev, s, bw)) for shape in shapes]
    run_steps(steps, results, Path(os.environ.get("OUT", ".")) / "pdl.json")
    for label, rows in results.get("timelines", {}).items():
        print(label)
        for name, d in rows.items():
            print(f"    {d['us_per_call']:7.2f} us/call, gap {d['gap_us']:6.2f} us, {d['per_token']:5.1f}x  {name}")
    return print_summary(results)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["prepare", "run"])
    ap.add_argument("--out", default=str(REPO / ".device-pdl"))
    ap.add_argument("--dev", default=str(REPO / ".device-pdl"))
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--shapes", default=",".join(SHAPE_NAMES))
    ap.add_argument("--no-tiny", action="store_true", help="prepare: skip the tiny model")
    ap.add_argument("--variants", default="", help="these variants for every shape (e.g. off,on; SHAPE:VARIANT for one shape), at prepare and run")
    ap.add_argument("--quick", action="store_true", help="run: checks, profiles and tg128 only")
    args = ap.parse_args()
    global QUICK
    QUICK = args.quick
    shapes = [s for s in args.shapes.split(",") if s]
    if args.variants:  # prepare and run: the same list for every shape (run: where the bundle has them)
        items = [v for v in args.variants.split(",") if v]
        for shape in SHAPE_VARIANTS:
            SHAPE_VARIANTS[shape] = tuple(v.split(":", 1)[-1] for v in items
                                          if ":" not in v or v.split(":", 1)[0] == shape)
    if args.what == "prepare":
        prepare(Path(args.out).resolve(), args.arch, shapes, not args.no_tiny)
        return 0
    return run(Path(args.dev).resolve(), shapes)


if __name__ == "__main__":
    sys.exit(main())
