"""Does TVM's inline RoPE (RopeMode.INLINE) cut a dispatch from the webgpu decode? (issue 15, run 11) No.

  python bench/vulkan_rope_inline.py [WORKDIR]    # here, on lavapipe (any Vulkan adapter): ~20 s

Builds the tiny Llama (tests/tiny_models.py) q0f32 for `--target vulkan` twice, with the model's cache call patched
to RopeMode.NORMAL (the default) and INLINE, and prints for each: the largest logit difference from the host build
over a prefill and 7 decode steps, and the dispatches and kernels of one greedy decode step (the plugin's profile).

Measured 2026-12-01 on lavapipe: both builds 1.5e-7 from the host build and bit-equal to each other (q0f32: the
same rotation formula in float32, in the split kernel or in the attention kernel), and both run the same 25
dispatches a step, fused_rope_kernel included. TVM's PagedKVCache (src/runtime/vm/paged_kv_cache.cc,
AttentionWithFusedQKV) calls f_split_rotary in both modes, to split the fused qkv into q, k and v; INLINE only
passes apply_rope=0 and makes every decode-attention step rotate each cached key again. So the webgpu target keeps
NORMAL: the per-layer RoPE dispatch (6.2 us a call in the H200 8B profile, near the ~5.6 us of a dispatch timed
alone) goes only with a kernel that splits, rotates and appends in one (a change to the cache runtime or an
edgellm-owned cache, as on CUDA).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
PROMPT = [1, 5, 7, 100, 42, 9, 33, 250, 17, 64, 3, 201, 88]


def main(work: Path) -> None:
    from tiny_models import make_checkpoint

    import edgellm.models.llama as llama
    from edgellm import _tvm
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.device_runners.engine import Engine
    from edgellm.runtime import webgpu_plugin

    work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(work / "ckpt", "llama")
    rt = RuntimeOptions(context_window=256, prefill_chunk=128)
    compile_model(CompileArgs(model=str(ckpt), output=work / "host", quant="q0f32", runtime=rt))
    orig = llama.paged_kv_cache

    def build(mode: str) -> Path:
        def patched(kernels, **kw):
            kw["rope_mode"] = getattr(llama.c.RopeMode, mode)
            return orig(kernels, **kw)

        llama.paged_kv_cache = patched
        try:
            compile_model(CompileArgs(model=str(ckpt), output=work / mode, target="vulkan", quant="q0f32", runtime=rt))
        finally:
            llama.paged_kv_cache = orig
        return work / mode

    webgpu_plugin.load_plugin()
    g = _tvm.get_global_func
    host = Engine(work / "host")
    toks = list(host.generate_ids(PROMPT, 8))

    def steps(eng: Engine) -> np.ndarray:
        with eng.sequence() as seq:
            return np.stack([seq.prefill(PROMPT)] + [seq.decode(t) for t in toks[:-1]])

    ref, got = steps(host), {}
    for mode in ("NORMAL", "INLINE"):
        eng = Engine(build(mode))
        got[mode] = steps(eng)
        with eng.sequence() as seq:
            tok = seq.decode_greedy(int(seq.prefill(PROMPT).argmax()))  # warm: pipelines, bind groups
            g("edgellm.webgpu.set_profile")(0, 1)
            g("edgellm.webgpu.stats")(0, 1)
            try:
                seq.decode_greedy(tok)
                st = json.loads(str(g("edgellm.webgpu.stats")(0, 1)))
            finally:
                g("edgellm.webgpu.set_profile")(0, 0)
        print(f"{mode}: max |logit - host| {np.abs(got[mode] - ref).max():.2e}, {st['dispatches']:.0f} dispatches a "
              f"decode step: {', '.join(sorted(st['kernels']))}", flush=True)
    print("NORMAL and INLINE bit-equal:", bool(np.array_equal(got["NORMAL"], got["INLINE"])))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/vulkan_rope_inline"))
