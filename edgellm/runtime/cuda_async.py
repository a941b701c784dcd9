"""Stream-ordered copies and events on the CUDA stream TVM launches on, for a decode loop that keeps one step queued
ahead of the host (device_runners/engine.Engine.greedy_chain).

TVM's own copies (`Tensor.copyfrom`, `.numpy()`) synchronize the whole stream, so a loop built on them leaves the
GPU idle from the end of step n until the host has read step n's token and launched step n + 1: ~80 us of every
decode step on an H200 (docs/benchmarks/h200-pdl.md, "(between steps)" in the timelines). These are the few CUDA
runtime calls that remove that wait: asynchronous copies from and to page-locked host memory, and events to wait
for one step's token while the next step runs.

The calls go to the CUDA runtime library that TVM's CUDA runtime (libtvm_runtime_cuda.so) loaded, found in the
process's memory map, so they share its context. TVM launches kernels and CUDA graphs on the legacy default stream
(stream 0) unless a stream is set, and edgellm never sets one: every call here uses stream 0 too, so copies, graph
replays and kernels run in the order they were queued.
"""

from __future__ import annotations

import ctypes
import weakref
from pathlib import Path

import numpy as np

_H2D, _D2H, _D2D = 1, 2, 3  # cudaMemcpyKind
_EVENT_DISABLE_TIMING = 2
_HOST_ALLOC_MAPPED = 2  # cudaHostAllocMapped
_STREAM = ctypes.c_void_p(0)  # the legacy default stream: TVM's unless one is set


class CudaAsyncError(RuntimeError):
    pass


def _loaded_cudart() -> str | None:
    """Path of the libcudart already mapped into this process (loaded by TVM's CUDA runtime), or None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return None
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        if "/libcudart.so" in path:
            return path
    return None


class CudaAsync:
    """Asynchronous copies and events on stream 0 of CUDA device `index` (see the module docstring).
    `available()` says whether this process has a CUDA runtime to use; the constructor raises CudaAsyncError
    otherwise."""

    def __init__(self, index: int = 0, lib_path: str | None = None):
        path = lib_path or _loaded_cudart()
        if path is None:
            raise CudaAsyncError("no CUDA runtime library is loaded in this process (TVM's CUDA runtime loads it)")
        self.lib = lib = ctypes.CDLL(path)
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        lib.cudaMemcpyAsync.argtypes = [vp, vp, sz, ctypes.c_int, vp]
        lib.cudaHostAlloc.argtypes = [ctypes.POINTER(vp), sz, ctypes.c_uint]
        lib.cudaFreeHost.argtypes = [vp]
        lib.cudaHostGetDevicePointer.argtypes = [ctypes.POINTER(vp), vp, ctypes.c_uint]
        lib.cudaEventCreateWithFlags.argtypes = [ctypes.POINTER(vp), ctypes.c_uint]
        lib.cudaEventRecord.argtypes = [vp, vp]
        lib.cudaEventSynchronize.argtypes = [vp]
        lib.cudaEventDestroy.argtypes = [vp]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        self.index = index
        self._owned: list[tuple[str, int]] = []  # (kind, pointer) to free at close
        self._finalizer = weakref.finalize(self, CudaAsync._free_all, lib, self._owned)

    @staticmethod
    def available() -> bool:
        return _loaded_cudart() is not None

    def _check(self, err: int, what: str) -> None:
        if err != 0:
            raise CudaAsyncError(f"{what} failed: CUDA error {err} ({self.lib.cudaGetErrorString(err).decode()})")

    def set_device(self) -> None:
        self._check(self.lib.cudaSetDevice(self.index), f"cudaSetDevice({self.index})")

    def _host_array(self, shape: tuple[int, ...], dtype, flags: int) -> tuple[np.ndarray, ctypes.c_void_p]:
        """A zeroed numpy array in page-locked host memory (cudaHostAlloc with `flags`, freed with this object) and
        its host pointer."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        n = max(count * dtype.itemsize, 1)
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaHostAlloc(ctypes.byref(ptr), n, flags), f"cudaHostAlloc({n}, flags {flags})")
        self._owned.append(("host", ptr.value))
        arr = np.frombuffer((ctypes.c_char * n).from_address(ptr.value), dtype=dtype, count=count).reshape(shape)
        arr[...] = 0
        return arr, ptr

    def pinned(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """A zeroed numpy array in page-locked host memory (freed with this object)."""
        return self._host_array(shape, dtype, 0)[0]

    def mapped(self, shape: tuple[int, ...], dtype) -> tuple[np.ndarray, int]:
        """A zeroed numpy array in page-locked host memory that kernels can write (cudaHostAllocMapped), and the
        device address they write it through (freed with this object). Read it after waiting for an event recorded
        behind the writing kernel."""
        arr, ptr = self._host_array(shape, dtype, _HOST_ALLOC_MAPPED)
        dptr = ctypes.c_void_p()
        self._check(self.lib.cudaHostGetDevicePointer(ctypes.byref(dptr), ptr, 0), "cudaHostGetDevicePointer")
        return arr, int(dptr.value)

    def event(self):
        ev = ctypes.c_void_p()
        self._check(self.lib.cudaEventCreateWithFlags(ctypes.byref(ev), _EVENT_DISABLE_TIMING), "cudaEventCreate")
        self._owned.append(("event", ev.value))
        return ev

    def to_device(self, dst, src: np.ndarray) -> None:
        """Queue a copy of pinned `src` into device tensor `dst` (`src` must stay unchanged until it has run)."""
        self._check(self.lib.cudaMemcpyAsync(dst.data_ptr(), src.ctypes.data, src.nbytes, _H2D, _STREAM),
                    "cudaMemcpyAsync (to the device)")

    def on_device(self, dst, src, nbytes: int) -> None:
        """Queue a copy of `nbytes` from device tensor `src` into device tensor `dst`."""
        self._check(self.lib.cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), nbytes, _D2D, _STREAM),
                    "cudaMemcpyAsync (on the device)")

    def to_host(self, dst: np.ndarray, src) -> None:
        """Queue a copy of device tensor `src` into pinned `dst` (read it after waiting for a later event)."""
        self._check(self.lib.cudaMemcpyAsync(dst.ctypes.data, src.data_ptr(), dst.nbytes, _D2H, _STREAM),
                    "cudaMemcpyAsync (to the host)")

    def record(self, ev) -> None:
        self._check(self.lib.cudaEventRecord(ev, _STREAM), "cudaEventRecord")

    def wait(self, ev) -> None:
        self._check(self.lib.cudaEventSynchronize(ev), "cudaEventSynchronize")

    @staticmethod
    def _free_all(lib, owned: list) -> None:
        for kind, ptr in reversed(owned):
            if kind == "host":
                lib.cudaFreeHost(ctypes.c_void_p(ptr))
            else:
                lib.cudaEventDestroy(ctypes.c_void_p(ptr))
        owned.clear()

    def close(self) -> None:
        self._finalizer()
