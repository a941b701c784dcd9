"""TVM's paged KV cache (TIRPagedKVCache) with the registry's attention and RoPE kernels put in place of TVM's.

On CPU: edgellm's decode attention (split-KV), ragged prefill attention and per-token RoPE; on CUDA (sm_80+, fp16,
head_dim 64/128, RoPE before the cache): the tensor-core ragged prefill attention; on webgpu: TVM's decode attention
rebuilt with one query head a workgroup (kernels/webgpu_attention.py). Elsewhere TVM's kernels as they are.
"""

from __future__ import annotations

from .._tvm import compiler
from .registry import KernelRegistry


def paged_kv_cache(kernels: KernelRegistry, **kwargs):
    """`TIRPagedKVCache(**kwargs)` with `kernels.kv_cache_kernels(...)` swapped in.

    Must run inside the BlockBuilder of `export_tvm` (as TIRPagedKVCache does): it replaces the functions that
    TIRPagedKVCache added, by name, keeping their global symbols.
    """
    c = compiler()
    cache = c.TIRPagedKVCache(**kwargs, target=kernels.target)
    scaling = c.llm_kv_cache._prepare_yarn_rope_scaling(kwargs["rope_scaling"], kwargs["rope_theta"])  # as TVM's
    rope = None
    if kernels.kind == "llvm" and kwargs["rope_mode"] == c.RopeMode.NORMAL:
        rope = {"theta": kwargs["rope_theta"], "scale": kwargs["rope_scale"], "rotary_dim": kwargs["rotary_dim"],
                "scaling": scaling}
    _swap(kernels.kv_cache_kernels(
        heads=kwargs["num_attention_heads"], kv_heads=kwargs["num_key_value_heads"], head_dim=kwargs["qk_head_dim"],
        v_head_dim=kwargs["v_head_dim"], dtype=kwargs["dtype"], attn_kind=kwargs["attn_kind"],
        rope_inline=kwargs["rope_mode"] == c.RopeMode.INLINE, rope=rope, rope_scaling=scaling))
    return cache


def _swap(ours: dict) -> None:
    """Replace the functions TIRPagedKVCache added under these names, keeping their global symbols (the cache
    runtime finds them by position, the module by symbol)."""
    ours = dict(ours)
    bb = compiler().relax.BlockBuilder.current()
    for gv, func in bb.get().functions_items():
        if gv.name_hint in ours:
            new = ours.pop(gv.name_hint)
            symbol = func.attrs.get("global_symbol") if func.attrs else None
            bb.update_func(gv, new if symbol is None else new.with_attr("global_symbol", symbol))
    if ours:
        raise RuntimeError(f"TIRPagedKVCache no longer adds {sorted(ours)}; edgellm's cache kernels need updating")
