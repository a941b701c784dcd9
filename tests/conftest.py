from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TVM_NUM_THREADS", str(min(os.cpu_count() or 1, 2)))

from tiny_models import make_checkpoint  # noqa: E402


@pytest.fixture
def host_emu(tmp_path):
    """host_emu({file name: CUDA source}, main) -> tmp_path holding ./emu: the sources, tests/cuda_host_emu.h and
    `main` (main.cpp) compiled with g++ -std=c++20, to run kernels/cuda/*.cu on the host (no "asm" in a source:
    the emulation compiles none)."""
    import shutil
    import subprocess

    def build(sources: dict[str, str], main: str) -> Path:
        for name, src in sources.items():
            assert "asm" not in src, name
            (tmp_path / name).write_text(src)
        shutil.copy(Path(__file__).parent / "cuda_host_emu.h", tmp_path)
        (tmp_path / "main.cpp").write_text(main)
        subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "main.cpp", "-o", "emu"], cwd=tmp_path, check=True)
        return tmp_path

    return build


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: make_checkpoint(root / name, name) for name in ("llama", "llama3", "qwen2")}


@pytest.fixture(scope="session")
def compiled(tmp_path_factory, checkpoints):
    """compiled(model_name, scheme) -> artifact path, built once per session."""
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions

    root = tmp_path_factory.mktemp("art")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, scheme: str) -> Path:
        if (name, scheme) not in cache:
            out = root / f"{name}-{scheme}"
            src = None if name == "smollm2" else str(checkpoints[name])
            rt = RuntimeOptions(context_window=1024 if name == "smollm2" else 256, prefill_chunk=128)
            compile_model(CompileArgs(model=src, output=out, quant=scheme, runtime=rt))
            cache[(name, scheme)] = out
        return cache[(name, scheme)]

    return get


@pytest.fixture(scope="session")
def preset_build(checkpoints, compiled, tmp_path_factory):
    """preset_build(preset) -> the tiny Qwen2 (q/k/v bias, `in` padded to whole groups) compiled for a target preset in
    its default scheme (context 128, prefill chunk 32; host: the `compiled` fixture's build, context 256), once per
    session: the target matrix, the packaging tests, the Pi-under-qemu tests and the emulated fleet device share these
    builds."""
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.targets import PRESETS

    root = tmp_path_factory.mktemp("preset")
    cache: dict[str, Path] = {}

    def build(preset: str) -> Path:
        if preset == "host":
            return compiled("qwen2", PRESETS["host"].default_quant)
        if preset not in cache:
            out = root / preset
            compile_model(CompileArgs(model=str(checkpoints["qwen2"]), output=out, target=preset,
                                      quant=PRESETS[preset].default_quant, runtime=RuntimeOptions(128, 32)))
            cache[preset] = out
        return cache[preset]

    return build


@pytest.fixture(scope="session")
def smollm2_path():
    from edgellm.loaders import SourceError, default_model_path

    try:
        return default_model_path()
    except SourceError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def smollm2_source():
    """edgellm's loader on the default GGUF (open_model(None): parsing its metadata costs ~2-3 s), once per session;
    the tensors load lazily, read-only."""
    from edgellm.loaders import open_model

    return open_model(None)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' fp32 model + tokenizer loaded from the same GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = str(smollm2_path.parent), smollm2_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def webgpu_dev():
    """Device 0 of edgellm's WebGPU plugin (the first Vulkan adapter: lavapipe in CI); skips where there is none."""
    from edgellm.runtime.webgpu_plugin import PluginError, load_plugin

    try:
        load_plugin()
    except PluginError as e:
        if e.reason == "vulkan":
            pytest.skip(f"no Vulkan adapter: {e}")
        raise
    from edgellm._tvm import runtime

    return runtime.device("webgpu", 0)


def _modules(mod):
    for m in mod.imports:
        yield m
        yield from _modules(m)


@pytest.fixture(scope="session")
def cuda_tiny_build(tmp_path_factory, checkpoints):
    """cuda_tiny_build(head=None, **kernel options) -> {"out": artifact folder, "vm": the executable's text, "cuda":
    its CUDA source}: the tiny Llama compiled for cuda-sm90 in q4f16_1 (context 128, prefill chunk 32; `head`:
    CompileArgs.head), once per options in a session (needs nvcc)."""
    cache: dict[tuple, dict] = {}

    def get(head: str | None = None, **options) -> dict:
        key = (head, *sorted(options.items()))
        if key not in cache:
            from edgellm.compile import CompileArgs, compile_model, pipeline
            from edgellm.config import RuntimeOptions
            from edgellm.kernels import KernelOptions

            kept: dict = {"out": tmp_path_factory.mktemp("cuda-tiny") / "a"}
            build = pipeline.build

            def keep(*args, **kwargs):
                ex = build(*args, **kwargs)
                kept["vm"] = ex.as_text()
                kept["cuda"] = "".join(m.inspect_source() for m in _modules(ex.mod) if m.kind == "cuda")
                return ex

            pipeline.build = keep
            try:
                compile_model(CompileArgs(model=str(checkpoints["llama"]), output=kept["out"], target="cuda-sm90",
                                          quant="q4f16_1", runtime=RuntimeOptions(128, 32), head=head,
                                          kernel_options=KernelOptions(**options)))
            finally:
                pipeline.build = build
            cache[key] = kept
        return cache[key]

    return get
