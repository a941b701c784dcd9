"""Ahead-of-time CUDA builds on a machine without a GPU.

TVM embeds a fatbin in the exported library only when its CUDA runtime library loads; that library needs
libcuda.so.1 (the driver), which a build machine without a GPU lacks, and then TVM silently exports CUDA *source*.
We build a stub libcuda.so.1 from a few lines of C (every driver entry point the runtime references returns
CUDA_ERROR_NO_DEVICE), load it, then load TVM's CUDA runtime. Kernels are compiled by nvcc (fatbin for the
target's arch). On a machine with a real driver the stub is never built.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from .._tvm import cuda_runtime_lib
from ..kernels import cuda_pdl

log = logging.getLogger("edgellm")

CUDA_ERROR_NO_DEVICE = 100
_state: dict[str, bool] = {}


def _driver_symbols(lib: Path) -> list[str]:
    out = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    return sorted({line.split()[-1] for line in out.splitlines() if line.split() and line.split()[-1].startswith("cu")
                   and line.split()[-1][2:3].isupper()})


def build_stub_driver(out_dir: Path, lib: Path | None = None) -> Path:
    """Compile libcuda.so.1 exporting every cu* symbol `lib` needs; each returns CUDA_ERROR_NO_DEVICE."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("building CUDA artifacts without a GPU needs a C compiler (cc/gcc) for the stub driver")
    syms = _driver_symbols(lib or cuda_runtime_lib())
    src = out_dir / "cuda_stub.c"
    src.write_text("/* edgellm: stand-in CUDA driver for ahead-of-time builds on machines without a GPU */\n"
                   + "".join(f"int {s}(void) {{ return {CUDA_ERROR_NO_DEVICE}; }}\n" for s in syms))
    so = out_dir / "libcuda.so.1"
    subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(so), str(src)], check=True,
                   capture_output=True)
    return so


def nvcc_archs() -> list[str]:
    """The sm_XX values this nvcc can build (`nvcc --list-gpu-arch`)."""
    out = subprocess.run(["nvcc", "--list-gpu-arch"], capture_output=True, text=True, timeout=60).stdout
    return [f"sm_{x.split('_', 1)[1]}" for x in out.split() if x.startswith("compute_")]


def check_arch(arch: str) -> None:
    archs = nvcc_archs()
    if arch not in archs:
        version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        raise RuntimeError(
            f"this nvcc ({version}) cannot build {arch}; it builds {', '.join(archs)}. "
            + ("Jetson Xavier (sm_72, JetPack 5) needs a CUDA 11.4-12.x toolkit on PATH: CUDA 13 dropped sm_72."
               if arch == "sm_72" else "Install a CUDA toolkit that supports it.")
        )


SM90A = ["-gencode", "arch=compute_90a,code=sm_90a"]


def module_arch(code: str, arch: str | None) -> list[str] | None:
    """nvcc's arch flags for a generated CUDA module: sm_90a for an sm_90 module that contains wgmma (Hopper's
    architecture-specific instructions, rejected by a plain sm_90 build; such a cubin runs on sm_90 devices only,
    which is what the cuda-sm90 preset targets); None (TVM's default from the target) otherwise."""
    return SM90A if arch == "sm_90" and "wgmma.mma_async" in code else None


def _hook_sm90a() -> None:
    """Wrap TVM's tvm_callback_cuda_compile so that a module with wgmma is built for sm_90a (module_arch)."""
    import tvm_ffi
    from tvm.support import nvcc
    from tvm.target import Target

    if _state.get("sm90a_hook"):
        return
    default = tvm_ffi.get_global_func("tvm_callback_cuda_compile")

    def compile_module(code):
        target = Target.current(allow_none=True)
        arch = module_arch(code, str(getattr(target, "arch", "")) if target is not None else None)
        if arch is None:
            return default(code)
        return nvcc.compile_cuda(code, target_format="fatbin", arch=arch, compiler="nvcc")

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_module, override=True)
    _state["sm90a_hook"] = True


def _hook_pdl() -> None:
    """Register TVM's tvm_callback_cuda_postproc (the generated source, before nvcc; the module keeps the result as
    its source): inside `pdl_build()`, every kernel gets its griddepcontrol prologue (kernels/cuda_pdl.py)."""
    import tvm_ffi

    if _state.get("pdl_hook"):
        return
    previous = tvm_ffi.get_global_func("tvm_callback_cuda_postproc", allow_missing=True)

    def postproc(code, target=None):
        if previous is not None:
            code = previous(code, target)
        if not _state.get("pdl"):
            return code
        # every kernel not skipped gets the wait (kernel_bodies raises on a signature it cannot parse)
        code, _ = cuda_pdl.patch_source(code, _state.get("pdl_skipped", set()))
        return code

    tvm_ffi.register_global_func("tvm_callback_cuda_postproc", postproc, override=True)
    _state["pdl_hook"] = True


@contextlib.contextmanager
def pdl_build(on: bool):
    """Within it (on=True), the CUDA sources TVM generates get the PDL prologue; the build marks the launches
    (cuda_pdl.mark_module_pass(skipped) with the set this yields: the unmarked functions, whose kernels keep no
    prologue)."""
    if on:
        _hook_pdl()
    saved = _state.get("pdl", False), _state.get("pdl_skipped", set())
    skipped: set = set()
    _state["pdl"], _state["pdl_skipped"] = on, skipped
    try:
        yield skipped
    finally:
        _state["pdl"], _state["pdl_skipped"] = saved


def prepare_cuda_build() -> None:
    """Make TVM able to emit fatbins in this process (idempotent)."""
    if _state.get("ready"):
        return
    if shutil.which("nvcc") is None:
        raise RuntimeError("CUDA targets need nvcc on PATH (the CUDA toolkit) to build the fatbin ahead of time")
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    import tvm.support.nvcc  # noqa: F401  (registers tvm_callback_cuda_compile, TVM's nvcc hook)

    _hook_sm90a()

    lib = cuda_runtime_lib()
    try:
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        if "libcuda.so.1" not in str(exc):
            raise
        stub = build_stub_driver(Path(tempfile.mkdtemp(prefix="edgellm-cuda-stub-")))
        log.info("no CUDA driver here: built stub %s for the ahead-of-time build", stub)
        ctypes.CDLL(str(stub), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    _state["ready"] = True
