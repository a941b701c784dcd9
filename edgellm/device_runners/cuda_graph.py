"""Whole-call CUDA graphs for the owned KV cache's decode (device_runners/engine.py), through the driver API.

The compiled decode is already one CUDA graph inside (RewriteCUDAGraph, kernels/owned_kv.py), but each call still
runs the Relax VM's instructions on the host first: unpacking ~300 parameters, building the capture function's
argument tuple, the output allocation, the logits cast. This captures one whole VM call on TVM's stream (the
environment stream tvm_ffi sets) into a graph of our own, once TVM's inner graph exists, and replays it with one
cuGraphLaunch on the default stream. Every input of the call is a fixed buffer (the Engine copies the step's ids,
positions and page rows into them first) and the output tensor the capture returned is kept alive, so the pool
never hands its memory to anything else: each replay writes the same tensor.

libcuda.so.1 is the driver's own library: present wherever a CUDA artifact can run (no CUDA toolkit needed).
"""

from __future__ import annotations

import ctypes

CU_STREAM_CAPTURE_MODE_RELAXED = 2  # the VM may allocate from its pool (cudaMalloc) while capturing


class CudaGraphError(RuntimeError):
    pass


class DriverGraphs:
    def __init__(self, dev):
        self.dev = dev
        self.cu = ctypes.CDLL("libcuda.so.1")
        self.stream = ctypes.c_void_p()
        self._check(self.cu.cuStreamCreate(ctypes.byref(self.stream), 0), "cuStreamCreate")

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            name = ctypes.c_char_p()
            self.cu.cuGetErrorName(rc, ctypes.byref(name))
            raise CudaGraphError(f"{what} failed: {name.value.decode() if name.value else rc}")

    def capture(self, fn):
        """(graph exec, fn's result): fn() runs with TVM's stream set to ours, under stream capture (nothing
        executes: launch the graph to run it)."""
        import tvm_ffi

        self._check(self.cu.cuStreamBeginCapture_v2(self.stream, CU_STREAM_CAPTURE_MODE_RELAXED),
                    "cuStreamBeginCapture")
        graph = ctypes.c_void_p()
        try:
            with tvm_ffi.use_raw_stream(self.dev, self.stream.value):
                result = fn()
        finally:
            rc = self.cu.cuStreamEndCapture(self.stream, ctypes.byref(graph))
        self._check(rc, "cuStreamEndCapture")
        exe = ctypes.c_void_p()
        try:
            self._check(self.cu.cuGraphInstantiateWithFlags(ctypes.byref(exe), graph, ctypes.c_ulonglong(0)),
                        "cuGraphInstantiate")
        finally:
            self.cu.cuGraphDestroy(graph)
        return exe, result

    def launch(self, exe) -> None:
        """Replay on the legacy default stream (TVM's stream), after whatever the host queued there before."""
        self._check(self.cu.cuGraphLaunch(exe, None), "cuGraphLaunch")
