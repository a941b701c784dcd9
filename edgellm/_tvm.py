"""The one place edgellm imports TVM (pinned: apache-tvm==0.27.0.post1).

TVM's Python API moves between releases (tir -> tirx, dlight -> s_tir.dlight, NDArray -> Tensor, _ffi -> tvm_ffi);
every other module goes through the names here. Runtime-side helpers never touch the compiler library, so a device
with only libtvm_runtime can use them.
"""

from __future__ import annotations

import ctypes
import inspect
import os
import threading
from contextlib import contextmanager
from pathlib import Path

PINNED_TVM = "0.27.0.post1"

import tvm  # noqa: E402
import tvm_ffi  # noqa: E402
from tvm import runtime  # noqa: E402
from tvm.runtime import vm as _relax_vm  # noqa: E402  (runtime-side module; import it explicitly)

ShapeTuple = runtime.ShapeTuple


def tvm_version() -> str:
    return tvm.__version__


_QUICK = threading.Lock()
_quick_depth = 0
_outer_getmodule = inspect.getmodule  # what the outermost block found (and puts back)


@contextmanager
def quick_script_parsing():
    """Faster TVMScript parsing inside the block (kernel builds, the model's export).

    TVM's `@T.prim_func` walks the caller's whole stack with `inspect.stack()` for every kernel it parses. For each
    frame CPython's `inspect.getmodule` then scans all of `sys.modules` when the frame's file belongs to no loaded
    module. Such files: python -m's `<frozen runpy>`, a console script like `edgellm`. In a process holding a few
    thousand modules (pytest with torch, a server) that scan repeats for every frame of every kernel. Measured on a
    tiny Llama's `--target vulkan` compile under pytest: 16.8-18.8 s, against 12.4-13.3 s with the scan done once.
    Within the block, a file name that named no module for a frame or code object answers the same at once.
    Reentrant and thread-safe; outside the block `inspect` is as it was."""
    global _quick_depth, _outer_getmodule
    with _QUICK:
        if _quick_depth == 0:
            real = _outer_getmodule = inspect.getmodule
            misses: set[str] = set()

            def getmodule(obj, _filename=None):
                if _filename is None or hasattr(obj, "__module__"):  # functions, classes: their own fast path
                    return real(obj, _filename)
                if _filename in misses:
                    return None
                module = real(obj, _filename)
                if module is None:
                    misses.add(_filename)
                return module

            inspect.getmodule = getmodule
        _quick_depth += 1
    try:
        yield
    finally:
        with _QUICK:
            _quick_depth -= 1
            if _quick_depth == 0:
                inspect.getmodule = _outer_getmodule


def compiler_available() -> bool:
    """True when the full compiler (relax, tirx codegen) is importable, False for the runtime-only library."""
    try:
        import tvm.relax  # noqa: F401
    except Exception:  # runtime-only TVM raises on import of compiler modules
        return False
    return True


def get_global_func(name: str, allow_missing: bool = False):
    """TVM's global function `name`; None where it is missing and allow_missing is set."""
    return tvm_ffi.get_global_func(name, allow_missing=allow_missing)


def cuda_runtime_lib() -> Path:
    """TVM's CUDA runtime library (device API + CUDA module loader); it needs the driver, libcuda.so.1."""
    return Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"


def load_cuda_runtime() -> None:
    """Register the CUDA device API (needed before loading a module with a CUDA fatbin)."""
    lib = cuda_runtime_lib()
    if lib.exists():
        ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)


def device(kind: str, index: int = 0):
    return runtime.device(kind, index)


def load_module(path: str | os.PathLike):
    return runtime.load_module(str(path))


def vm(module, dev):
    return _relax_vm.VirtualMachine(module, dev)


def tensor(array, dev):
    return runtime.tensor(array, dev)


def view(t, shape: tuple[int, ...], dtype: str, byte_offset: int):
    """A view of tensor `t`'s memory from `byte_offset` (for copies into part of it; kernels refuse a view's
    byte_offset)."""
    return t._create_view(shape, dtype, relative_byte_offset=byte_offset)


def set_cpu_threads(n: int) -> int:
    """Size TVM's CPU thread pool to `n` threads sharing every core (no pinning), through the runtime's own
    configuration call; returns the pool's size. Any time, any import order (TVM_NUM_THREADS is read only once,
    when the pool first starts)."""
    import os

    cpus = [str(i) for i in range(os.cpu_count() or 1)]
    get_global_func("runtime.config_threadpool")(-3, int(n), cpus)  # -3: kSpecifyThreadShareAllCore
    return int(get_global_func("runtime.NumThreads")())


def array(items: list):
    """An FFI Array of `items`, made once: a Python list is converted on every call it is passed to."""
    return tvm_ffi.convert(list(items))


# ---- compiler side: imported on first use only -------------------------------------------------------------


def compiler():
    """Namespace with the compiler modules (raises a clear error on a runtime-only TVM)."""
    try:
        from types import SimpleNamespace

        from tvm import relax, s_tir, te, tirx
        from tvm.relax.frontend import nn
        from tvm.relax.frontend.nn.llm import kv_cache as llm_kv_cache
        from tvm.relax.frontend.nn.llm import position_embedding as llm_rope
        from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
        from tvm.s_tir import dlight
        from tvm.script import tirx as T
        from tvm.target import Target
    except Exception as exc:  # pragma: no cover - exercised only on runtime-only installs
        raise RuntimeError(
            "this TVM install has no compiler library (libtvm_compiler.so); compiling needs the full "
            f"`apache-tvm=={PINNED_TVM}` wheel: {exc}"
        ) from exc
    return SimpleNamespace(
        tvm=tvm, relax=relax, s_tir=s_tir, te=te, tirx=tirx, nn=nn, dlight=dlight, Target=Target,
        PagedKVCache=PagedKVCache, TIRPagedKVCache=TIRPagedKVCache, RopeMode=RopeMode,
        T=T, llm_kv_cache=llm_kv_cache, llm_rope=llm_rope,  # TVMScript (our kernels); TVM's KV-cache/RoPE builders
    )
