#!/bin/bash
# The integer-dot decode GEMV (--opt webgpu_gemv=dp4a) against the fp16x2 one (h2, the default) and CUDA, in one
# device call: per-kernel GPU time at the Llama-3-8B shapes (plain and fused, weights rotated through HBM), then
# Vulkan h2 / Vulkan dp4a vs CUDA logits (tiny q4 model, and the SmolLM2 / 1B / 8B shapes with random weights) and
# pp128 / pp512 / tg128 of each shape on the three paths (docs/benchmarks/vulkan-h200.md, run 8).
#   here:  bash bench/vulkan_dp4a.sh prepare [BUNDLE]    (BUNDLE default .device-vkdp; its site/ is copied from
#          .device-vk/site, the runtime-only TVM + tvm_ffi + wgpu bundle of bench/vulkan_gpu.py)
#   there: bash bench/vulkan_dp4a.sh run [BUNDLE]        (the device tool, carrying BUNDLE and .gl): $OUT/gemv.json,
#          $OUT/kernels.log, $OUT/vulkan.json, $OUT/models.log
set -eo pipefail
cmd=$1
B=${2:-.device-vkdp}
# device time (run 8): the sweep ~20 s, the models ~160 s for all three shapes (the 8B first, ~70 s), plus start-up
export VK_PATHS=${VK_PATHS:-dp4a:webgpu_gemv=dp4a} AB=${AB:-} SHAPES=${SHAPES:-llama-3-8b,llama-3.2-1b,smollm2-135m}
case $cmd in
  prepare)
    [ -d "$B/site" ] || { mkdir -p "$B"; cp -al .device-vk/site "$B/site" || {
      echo "no $B/site and no .device-vk/site to copy: make one with bench/gpu_prepare.new_bundle + the wgpu package"
      exit 1; }; }
    rm -rf "$B/art/tiny-q0f32-"*  # not a GEMV question, and the bundle must stay under the 64 MiB a call carries
    DP4A=1 python bench/vulkan_kernels.py prepare "$B/gemv"
    TINY_SCHEMES=q4f16_1 VK_DEV=$B python bench/vulkan_gpu.py prepare
    rm -rf "$B/src"  # the device runs the working tree's sources
    du -sh "$B" ;;
  run)
    KTIME=${KTIME:-120} bash bench/vulkan_device.sh "$B" kernels models ;;
  *) echo "usage: bash bench/vulkan_dp4a.sh prepare|run [BUNDLE]"; exit 2 ;;
esac
