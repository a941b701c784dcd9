"""The tensor-core ragged prefill attention for CUDA (kernels/cuda_attention.py): it builds for sm_80 and sm_90 with
mma in it, and paged_kv_cache swaps it in only where it applies. Its numbers (against numpy and TVM's kernel) come
from an H100: bench/gpu_attn_tune.py, docs/benchmarks/h100-attn.json."""

from __future__ import annotations

import pytest

from edgellm._tvm import compiler

c = compiler()
tvm = c.tvm
HOST = c.Target({"kind": "llvm"})


needs_nvcc = pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="needs nvcc (CUDA toolkit)")


def _cuda(arch: str):
    return c.Target({"kind": "cuda", "arch": arch}, host=HOST)


@needs_nvcc
@pytest.mark.parametrize("preset", ["cuda-sm80", "cuda-sm90"])
def test_kernel_builds_with_mma(preset):
    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.kernels.cuda_attention import _SRC, attention_prefill_ragged_cuda
    from edgellm.targets import resolve

    target = resolve(preset).tvm()
    funcs = {f"attn_{h}_{kv}_{d}": attention_prefill_ragged_cuda(kv, h, d, "float16")
             for h, kv, d in ((32, 8, 128), (9, 3, 64))}
    assert "mma.sync.aligned.m16n8k16" in _SRC and "ldmatrix.sync.aligned.m8n8.x4.trans" in _SRC
    for f in funcs.values():
        assert "edgellm_attn_prefill_ragged" in f.script()
    prepare_cuda_build()
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        lib = tvm.compile(mod, target=target)
    cuda = [m for m in lib.mod.imports if m.kind == "cuda"]
    assert cuda and cuda[0].inspect_source("cu") == ""  # a fatbin (nvcc ran), no source left


def test_kernel_refuses_unsupported_shapes():
    from edgellm.kernels.cuda_attention import attention_prefill_ragged_cuda

    for kv, h, d, dtype in ((2, 4, 96, "float16"), (2, 4, 64, "float32"), (3, 4, 64, "float16")):
        with pytest.raises(ValueError, match="keep TVM's kernel"):
            attention_prefill_ragged_cuda(kv, h, d, dtype)


def test_supports_only_where_it_applies():
    from edgellm.kernels.cuda_attention import supports

    assert supports(_cuda("sm_90"), "float16", 128, 128, "mha", False)
    assert supports(_cuda("sm_80"), "float16", 64, 64, "mha", False)
    assert supports(_cuda("sm_120"), "float16", 64, 64, "mha", False)
    assert not supports(_cuda("sm_75"), "float16", 64, 64, "mha", False)  # no m16n8k16 fp32-accumulate path kept
    assert not supports(_cuda("sm_90"), "float32", 64, 64, "mha", False)
    assert not supports(_cuda("sm_90"), "float16", 16, 16, "mha", False)
    assert not supports(_cuda("sm_90"), "float16", 128, 64, "mha", False)
    assert not supports(_cuda("sm_90"), "float16", 64, 64, "mla", False)
    assert not supports(_cuda("sm_90"), "float16", 64, 64, "mha", True)  # inline RoPE: TVM's kernel does it
    assert not supports(HOST, "float16", 64, 64, "mha", False)
    assert not supports(c.Target({"kind": "metal"}, host=HOST), "float16", 64, 64, "mha", False)


def _export(target, scheme: str, heads: int, kv: int, hidden: int, **options) -> dict:
    from edgellm.config import ModelConfig
    from edgellm.kernels import KernelOptions, KernelRegistry
    from edgellm.models.llama import LlamaForCausalLM
    from edgellm.quant.schemes import SCHEMES

    cfg = ModelConfig.from_hf({"model_type": "llama", "hidden_size": hidden, "intermediate_size": 128,
                                   "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": kv,
                                   "vocab_size": 256, "rms_norm_eps": 1e-5, "max_position_embeddings": 256})
    model = LlamaForCausalLM(cfg, SCHEMES[scheme], KernelRegistry(target, KernelOptions(**options)))
    with target:
        mod, _ = model.export_tvm(spec=model.export_spec())
    return {gv.name_hint: f for gv, f in mod.functions_items()}  # named by global symbol after export


def test_cuda_cache_swaps_prefill_ragged_where_it_applies():
    # fp16, head_dim 64, GQA 3: ours, under TVM's global symbol (the runtime calls it positionally); TVM's cache
    # asked for (--opt cuda_kv=auto takes the owned cache at this hidden size on sm_90)
    fn = _export(_cuda("sm_90"), "q4f16_1", 6, 2, 384, cuda_kv="tvm")
    assert "edgellm_attn_prefill_ragged" in fn["batch_prefill_ragged_kv"].script()
    assert "edgellm" not in fn["batch_decode_paged_kv"].script()  # decode and paged prefill stay TVM's
    # sm_75, fp32 activations, head_dim 16: TVM's kernel stays; and --opt cuda_attention=tvm keeps it where ours
    # would apply. Asked of the registry, whose answer the export above turns into the cache's kernels (an export
    # costs ~15 s of CI: these four were exported until CI time asked for less)
    from edgellm.kernels import KernelOptions, KernelRegistry

    shape = dict(heads=6, kv_heads=2, head_dim=64, v_head_dim=64, dtype="float16", attn_kind="mha", rope_inline=False,
                 rope=None)
    assert set(KernelRegistry(_cuda("sm_90")).kv_cache_kernels(**shape)) == {"tir_attention_prefill_ragged"}
    assert KernelRegistry(_cuda("sm_75")).kv_cache_kernels(**shape) == {}
    assert KernelRegistry(_cuda("sm_90")).kv_cache_kernels(**{**shape, "dtype": "float32"}) == {}
    assert KernelRegistry(_cuda("sm_90")).kv_cache_kernels(**{**shape, "head_dim": 16, "v_head_dim": 16}) == {}
    tvm_only = KernelRegistry(_cuda("sm_90"), KernelOptions(cuda_attention="tvm"))
    assert tvm_only.kv_cache_kernels(**shape) == {} and tvm_only.chosen["attention_prefill"] == {"attention_prefill_tvm"}
    # CPU keeps its own kernels: tests/test_kv_cache_kernels.py (test_cpu_cache_swaps_kernels_and_gpu_cache_does_not)
    # checks an llvm export's batch_prefill_ragged_kv for them
