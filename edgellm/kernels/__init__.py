"""Every hand-written or scheduled kernel of edgellm, one module per kernel family, chosen by one registry.

  registry.py            (operation, scheme, target, KernelOptions) -> kernel, built once; what was picked
  options.py             KernelOptions (`edgellm compile --opt NAME=VALUE`), recorded in the manifest
  te_linear.py           tensor-expression linear / embedding (any scheme), scheduled by:
  schedule_cpu.py        ... the CPU schedules (rfactor over `in`, parallel output tiles)
  schedule_gpu.py        ... the GPU schedules (warp GEMV, tiled GEMM, INT4 GEMV schedule)
  cuda_gemv.py           CUDA INT4 decode GEMV (fp16x2 kernel; TE kernel for the warp schedule)
  cuda_gemm.py           CUDA INT4 prefill GEMM on tensor cores (mma.sync, wgmma on sm_90; cp.async pipelines in cuda/*.cu)
  cuda_attention.py      CUDA ragged prefill attention (FlashAttention-2 on mma.sync, cuda/*.cu)
  cuda_math.py           CUDA add + RMSNorm, silu * mul, two-stage argmax
  kv_cache.py            TVM's PagedKVCache with the registry's attention / RoPE kernels swapped in
  cpu_*                  CPU int8 linear (q4f32_2), attention, RoPE, add + RMSNorm, silu

The numpy definition of every kernel lives in quant/reference.py and models/reference.py; tests compare against it.
"""

from .options import KernelOptionError, KernelOptions
from .registry import KernelRegistry

__all__ = ["KernelOptionError", "KernelOptions", "KernelRegistry"]
