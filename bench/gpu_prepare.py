"""Prepare what a CUDA GPU machine needs to run edgellm artifacts, in under 64 MiB: `.device/`.

  .device/site/tvm       the TVM runtime only (no libtvm_compiler.so, no 3rdparty/include/src)
  .device/site/tvm_ffi   apache-tvm-ffi unpacked from the wheel for the GPU machine's Python (3.12 by default)
  .device/art/*          artifacts built here for the GPU's arch: tiny models with weights (correctness), and the
                         SmolLM2-135M, Llama-3.2-1B and Llama-3-8B shapes built with shapes only (no weights: the
                         runner generates random ones on the GPU machine, an explicit benchmark-only mode)
  .device/ckpt/*         tiny HF checkpoints for the transformers reference on the GPU; config.json of each shape
  .device/kernels.so     standalone INT4 GEMV and prefill GEMM kernels at Llama-3-8B shapes (the defaults and
                         the previous ones), checked against numpy and timed one by one on the GPU

Usage: python bench/gpu_prepare.py [--arch sm_90] [--python 3.12]; then run bench/gpu_run.py there with
PYTHONPATH=.device/site:. (see docs/benchmarks/h100.md).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / ".device"
sys.path.insert(0, str(REPO / "tests"))


def copy_runtime_tvm(dst: Path) -> None:
    import tvm

    src = Path(tvm.__file__).parent
    shutil.copytree(src, dst / "tvm", ignore=shutil.ignore_patterns(
        "libtvm_compiler.so", "3rdparty", "include", "src", "__pycache__", "*.pyc"))


def fetch_tvm_ffi(dst: Path, python: str) -> None:
    import tvm_ffi

    version = tvm_ffi.__version__
    pyv = python.replace(".", "")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", python, "--implementation", "cp", "--abi", f"cp{pyv}",
                        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                        "--platform", "manylinux2014_x86_64", "-d", tmp, f"apache-tvm-ffi=={version}"], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith("tvm_ffi/") and "/include/" not in name and "/src/" not in name:
                    z.extract(name, dst)


def new_bundle(dst: Path, python: str = "3.12") -> None:
    """Start `dst` afresh with `site/`: the runtime-only TVM and tvm_ffi for the GPU machine's Python (what every
    bench bundle carries: this one and the kernel sweeps' .device-*/)."""
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "site").mkdir(parents=True)
    copy_runtime_tvm(dst / "site")
    fetch_tvm_ffi(dst / "site", python)


def check_bundle_size(dst: Path, limit_mib: int = 60) -> float:
    """Print the bundle's size; stop if it leaves too little of the 64 MiB a device call carries."""
    total = sum(p.stat().st_size for p in dst.rglob("*") if p.is_file()) / 2**20
    print(f"{dst}: {total:.1f} MiB")
    if total > limit_mib:
        raise SystemExit(f"{dst} is {total:.1f} MiB, over {limit_mib} MiB: too close to the 64 MiB a device call "
                         "carries; drop an artifact or a kernel variant")
    return total


# Hugging Face config.json of each benchmarked shape (the published models' configs; weights are never needed)
_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", rms_norm_eps=1e-5,
              bos_token_id=1, eos_token_id=2, attention_bias=False, torch_dtype="bfloat16")
SHAPES = {
    "smollm2-135m": dict(_LLAMA, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "llama-3.2-1b": dict(_LLAMA, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                         tie_word_embeddings=True, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3-8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False,
                       max_position_embeddings=8192),
}
TINY64 = {"model_type": "llama", "hidden_size": 384, "intermediate_size": 256, "num_hidden_layers": 2,
          "num_attention_heads": 6, "num_key_value_heads": 2, "tie_word_embeddings": False}
# decode GEMVs of Llama-3-8B (in, out): qkv, o, gate_up, down, lm_head
GEMV_SHAPES = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (4096, 128256)]


def shape_folder(name: str) -> Path:
    """config.json + a small tokenizer + an empty safetensors: what the HF loader needs for a shapes-only build."""
    import json

    from safetensors.numpy import save_file
    from tiny_models import _tokenizer

    folder = OUT / "ckpt" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(SHAPES[name], indent=1))
    save_file({}, str(folder / "model.safetensors"))
    _tokenizer(folder, 320)
    return folder


def build_artifacts(arch: str, shapes: list[str], head_q4: tuple[str, ...] = ()) -> None:
    import tiny_models
    from tiny_models import make_checkpoint

    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions

    preset = f"cuda-{arch.replace('_', '')}"
    ckpt = make_checkpoint(OUT / "ckpt" / "llama", "llama")
    for scheme in ("q0f16", "q4f16_1", "q0f32"):
        compile_model(CompileArgs(model=str(ckpt), output=OUT / "art" / f"tiny-{scheme}", target=preset, quant=scheme,
                                  runtime=RuntimeOptions(256, 128, 16, 4)))
    # head_dim 64, 6 q heads over 2 kv heads, `in` a multiple of 64: every CUDA kernel of the big shapes applies
    # (tensor-core prefill attention and GEMM, fp16x2 GEMV, gpu_math), which the head_dim-16 tiny model misses
    tiny_models.SPECS["llama_d64"] = TINY64
    ckpt64 = make_checkpoint(OUT / "ckpt" / "llama64", "llama_d64")
    for scheme in ("q0f16", "q4f16_1"):
        compile_model(CompileArgs(model=str(ckpt64), output=OUT / "art" / f"tiny64-{scheme}", target=preset,
                                  quant=scheme, runtime=RuntimeOptions(256, 256, 16, 4)))
    # shapes only: the runner generates random weights there (explicit benchmark mode); max_batch 32 for
    # gpu_run.bench_batched (1, 8 and 32 sequences in flight)
    # and those in `head_q4` again with `--head q4` (-hq4: the embedding / head in q4f16_1 like the layers, the bytes a
    # token of llama.cpp's pure Q4_0 GGUFs of the side-by-side; the default keeps them 8-bit), tg128 at equal bytes
    for name in shapes:
        for head, suffix in ((None, ""), ("q4", "-hq4"))[:2 if name in head_q4 else 1]:
            compile_model(CompileArgs(model=str(shape_folder(name)), output=OUT / "art" / f"{name}-q4f16_1{suffix}",
                                      target=preset, quant="q4f16_1", runtime=RuntimeOptions(1024, 512, 16, 32),
                                      shapes_only=True, head=head))


def build_ab_shapes(dst: Path, arch: str, option: str, modes: tuple[str, ...], shape: str = "llama-3-8b") -> None:
    """`shape` built with shapes only once per value of the kernel option `option` (an A/B of two kernels in
    whole-model runs): dst/art/{shape}-{mode}."""
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.kernels import KernelOptions

    global OUT
    OUT, saved = dst, OUT  # shape_folder writes under OUT/ckpt
    try:
        folder = shape_folder(shape)
    finally:
        OUT = saved
    for mode in modes:
        compile_model(CompileArgs(model=str(folder), output=dst / "art" / f"{shape}-{mode}",
                                  target=f"cuda-{arch.replace('_', '')}", quant="q4f16_1",
                                  runtime=RuntimeOptions(1024, 512, 16, 1), shapes_only=True,
                                  kernel_options=KernelOptions(**{option: mode})))


def build_gemv_kernels(arch: str) -> None:
    """kernels.so, for every GEMV_SHAPES entry (fp16 x and output, q4f16_1 weights), each callable as
    (x, q_weight, q_scale, out):
      new_IN_OUT   the decode GEMV the pipeline picks (kernels/cuda_gemv.int4_gemv_h2, fp16x2 arithmetic)
      te_IN_OUT    the previous default (kernels/cuda_gemv.int4_gemv with its schedule)
      old_IN_OUT   kernels.linear with the generic GPU schedule (the first one)
      gemm_IN_OUT  the FMA tiled prefill GEMM (symbolic rows)
      tc_IN_OUT    the first tensor-core prefill GEMM (kernels/cuda_gemm.int4_gemm_tc, fp16x2 weight decode)
      tc2_IN_OUT   the prefill GEMM the pipeline picks (int4_gemm_tc2, cp.async pipeline)
    Per-shape HBM-resident timings of the GEMV and GEMM variants: bench/gpu_gemv_tune.py, bench/gpu_gemm_tune.py."""
    import tvm

    from edgellm.compile.cuda import prepare_cuda_build
    from edgellm.kernels import KernelRegistry, te_linear
    from edgellm.kernels import cuda_gemm as gpu_gemm
    from edgellm.kernels import cuda_gemv as gpu_kernels
    from edgellm.kernels.schedule_gpu import schedule_gpu_int4_gemv, schedule_gpu_linear, schedule_gpu_tiled_gemm
    from edgellm.quant.schemes import get_scheme
    from edgellm.targets import resolve

    target = resolve(f"cuda-{arch.replace('_', '')}").tvm()
    scheme = get_scheme("q4f16_1")
    registry = KernelRegistry(target)  # the defaults, as a compile picks them
    kernels = te_linear
    funcs = {}
    for k, n in GEMV_SHAPES:
        funcs[f"new_{k}_{n}"] = registry.linear(1, k, n, scheme, "float16", False)
        funcs[f"tc2_{k}_{n}"] = registry.linear(None, k, n, scheme, "float16", False)
        funcs[f"te_{k}_{n}"] = schedule_gpu_int4_gemv(gpu_kernels.int4_gemv(k, n, "float16", "float16", "float16", False),
                                                      target)
        funcs[f"old_{k}_{n}"] = schedule_gpu_linear(kernels.linear(1, k, n, scheme, "float16", False), target, gemv=True)
        funcs[f"gemm_{k}_{n}"] = schedule_gpu_tiled_gemm(kernels.linear(None, k, n, scheme, "float16", False), target)
        funcs[f"tc_{k}_{n}"] = gpu_gemm.int4_gemm_tc(k, n, False, half2=True)
    # new_*: the default decode GEMV (int8 activations by dp4a from `in` 2048 on since run 47, else fp16x2)
    assert all(str(f.attrs["edgellm.gemv"]).startswith(("h2_", "dp4a_")) for n, f in funcs.items()
               if n.startswith("new_"))
    # tc2_*: the default prefill GEMM (the wgmma one on sm_90, with the batched GEMV for <= 16 rows since 73d910d)
    assert all(str(f.attrs["edgellm.gemm"]).startswith(("tc2", "wgmma")) for n, f in funcs.items()
               if n.startswith("tc2_"))
    prepare_cuda_build()
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    with target, tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):
        tvm.compile(mod, target=target).export_library(str(OUT / "kernels.so"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--python", default="3.12")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="model shapes to build (comma-separated)")
    ap.add_argument("--no-kernels", action="store_true", help="skip kernels.so (then run gpu_run.py --skip-checks)")
    ap.add_argument("--head-q4", default="", help="shapes also built with --head q4 (NAME-q4f16_1-hq4; comma-separated): "
                    "with the llama.cpp kit the bundle fits the 64 MiB a call carries for the 1B and 8B with "
                    "--no-kernels")
    ap.add_argument("--out", default=str(REPO / ".device"), help="bundle folder (default .device/; ignored names: .device-*/); "
                    "on the GPU machine pass the same name to gpu_run.py --dev")
    args = ap.parse_args()
    global OUT
    OUT = Path(args.out).resolve()
    new_bundle(OUT, args.python)
    build_artifacts(args.arch, [x for x in args.shapes.split(",") if x], tuple(x for x in args.head_q4.split(",") if x))
    if not args.no_kernels:
        build_gemv_kernels(args.arch)
    check_bundle_size(OUT)


if __name__ == "__main__":
    main()
