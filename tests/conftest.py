from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TVM_NUM_THREADS", str(min(os.cpu_count() or 1, 2)))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # a worker per core (scripts/test.sh): TVM's pool keeps its 2 threads (the parallel kernels stay exercised) but
    # sleeps instead of spinning while the other worker needs the core (also in the qemu processes, which inherit
    # it), and torch / OpenMP take one thread
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    os.environ.setdefault("OMP_NUM_THREADS", "1")

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


def _run_root(tmp_path_factory) -> Path:
    """The test run's temporary root, shared by its pytest-xdist workers (each worker's own base temp is a child
    of it); without xdist, the session's base temp."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, key: str, build) -> Path:
    """The folder `key` under the run's root, made by `build(folder)` by the first worker to ask for it; a worker
    asking while it is being made waits for it (a file lock), one asking later finds it. `build` writes into a
    temporary folder renamed into place on success, so a failed build leaves nothing and the next asker retries:
    the session fixtures' builds (checkpoints, artifacts) are made once per run, not once per worker."""
    import shutil

    from filelock import FileLock

    root = _run_root(tmp_path_factory) / "shared"
    root.mkdir(exist_ok=True)
    out = root / key
    with FileLock(str(root / f"{key}.lock")):
        if not out.exists():
            tmp = root / f"{key}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            build(tmp)
            tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    return {name: built_once(tmp_path_factory, f"ckpt-{name}", lambda out, n=name: make_checkpoint(out, n))
            for name in ("llama", "llama3", "qwen2")}


@pytest.fixture(scope="session")
def compiled(tmp_path_factory, checkpoints):
    """compiled(model_name, scheme) -> artifact path, built once per test run (built_once)."""
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions

    def get(name: str, scheme: str) -> Path:
        src = None if name == "smollm2" else str(checkpoints[name])
        rt = RuntimeOptions(context_window=1024 if name == "smollm2" else 256, prefill_chunk=128)
        return built_once(tmp_path_factory, f"art-{name}-{scheme}",
                          lambda out: compile_model(CompileArgs(model=src, output=out, quant=scheme, runtime=rt)))

    return get


@pytest.fixture(scope="session")
def preset_build(checkpoints, compiled, tmp_path_factory):
    """preset_build(preset) -> the tiny Qwen2 (q/k/v bias, `in` padded to whole groups) compiled for a target preset in
    its default scheme (context 128, prefill chunk 32; host: the `compiled` fixture's build, context 256), once per
    test run: the target matrix, the packaging tests, the Pi-under-qemu tests and the emulated fleet device share these
    builds."""
    from edgellm.compile import CompileArgs, compile_model
    from edgellm.config import RuntimeOptions
    from edgellm.targets import PRESETS

    def build(preset: str) -> Path:
        if preset == "host":
            return compiled("qwen2", PRESETS["host"].default_quant)
        return built_once(tmp_path_factory, f"preset-{preset}", lambda out: compile_model(CompileArgs(
            model=str(checkpoints["qwen2"]), output=out, target=preset, quant=PRESETS[preset].default_quant,
            runtime=RuntimeOptions(128, 32))))

    return build


@pytest.fixture(scope="session")
def matrix(preset_build):
    """matrix(preset) -> the tiny Qwen2 built for the preset (preset_build): the target matrix's builds, which
    tests/test_targets.py checks and tests/test_targets_emulated.py runs under qemu."""
    return preset_build


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
    CompileArgs.head), once per options in a test run (built_once; needs nvcc)."""

    def get(head: str | None = None, **options) -> dict:
        from edgellm.compile import CompileArgs, compile_model, pipeline
        from edgellm.config import RuntimeOptions
        from edgellm.kernels import KernelOptions

        def make(folder: Path) -> None:
            build = pipeline.build

            def keep(*args, **kwargs):
                ex = build(*args, **kwargs)
                folder.mkdir(parents=True, exist_ok=True)  # compile_model made it (the artifact's parent)
                (folder / "vm.txt").write_text(ex.as_text())
                (folder / "cuda.txt").write_text("".join(m.inspect_source() for m in _modules(ex.mod)
                                                         if m.kind == "cuda"))
                return ex

            pipeline.build = keep
            try:
                compile_model(CompileArgs(model=str(checkpoints["llama"]), output=folder / "a", target="cuda-sm90",
                                          quant="q4f16_1", runtime=RuntimeOptions(128, 32), head=head,
                                          kernel_options=KernelOptions(**options)))
            finally:
                pipeline.build = build

        key = "-".join(f"{k}={v}" for k, v in sorted(options.items()))
        folder = built_once(tmp_path_factory, f"cuda-tiny-head={head}-{key}", make)
        return {"out": folder / "a", "vm": (folder / "vm.txt").read_text(), "cuda": (folder / "cuda.txt").read_text()}

    return get
