"""cuBLAS fp16 (torch.nn.functional.linear, what transformers runs) at the harness's shapes: median of CUDA-event
timings over reps, three weight sets rotated. Prints one line per shape (us, TFLOP/s)."""
import sys

import torch

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
shapes = [("8B.qkv", 512, 4096, 6144), ("8B.o", 512, 4096, 4096), ("8B.gate_up", 512, 4096, 28672),
          ("8B.down", 512, 14336, 4096), ("8B.qkv", 128, 4096, 6144), ("8B.o", 128, 4096, 4096),
          ("8B.gate_up", 128, 4096, 28672), ("8B.down", 128, 14336, 4096), ("1B.qkv", 512, 2048, 3072),
          ("1B.o", 512, 2048, 2048), ("1B.gate_up", 512, 2048, 16384), ("1B.down", 512, 8192, 2048)]
for name, m, k, n in shapes:
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02 for _ in range(3)]
    for w in ws:
        torch.nn.functional.linear(x, w)
    ts = []
    for r in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        torch.nn.functional.linear(x, ws[r % 3])
        e1.record()
        e1.synchronize()
        ts.append(e0.elapsed_time(e1))
    ts.sort()
    us = ts[len(ts) // 2] * 1e3
    print(f"{name:<11} {m:5d} {k:6d} {n:6d} cublas_fp16     {us:8.1f} {2 * m * k * n / us / 1e6:8.1f}", flush=True)
