#!/bin/bash
# On the GPU machine (device tool, carrying .gl and the bundle folder): NVIDIA's Vulkan driver for wgpu, then the
# GEMV variants alone (bench/vulkan_kernels.py) and the side-by-side run (bench/vulkan_gpu.py); results in $OUT.
#   bash bench/vulkan_device.sh BUNDLE [kernels] [models] [submit]   (BUNDLE: e.g. .device-vk, made by `prepare`
#   here; submit: bench/vulkan_submit.py, whose BUNDLE/art.tar.xz is unpacked first)
set -o pipefail
B=$(cd "$1" && pwd); shift
for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig
ICD='{"file_format_version":"1.0.0","ICD":{"library_path":"libEGL_nvidia.so.0","api_version":"1.3.0"}}'
printf '%s' "$ICD" > /tmp/nv_icd.json
[ -f "$B/art.tar.xz" ] && tar -xJf "$B/art.tar.xz" -C "$B"
SRC=$B/src; [ -d "$SRC" ] || SRC=$(pwd)  # the bundle's copy of the sources, else the working tree
export VK_ICD_FILENAMES=/tmp/nv_icd.json XDG_RUNTIME_DIR=/tmp PYTHONPATH=$B/site:$SRC PYTHONUNBUFFERED=1
cd "$SRC" || exit 1
for stage in "$@"; do
  case $stage in
    kernels) REPS=${KREPS:-100} timeout ${KTIME:-150} python3 bench/vulkan_kernels.py run "$B/gemv" 2>&1 \
               | grep -v XDG_RUNTIME | tee "$OUT/kernels.log" ;;
    models) VK_DEV=$B REPS=${REPS:-2} python3 bench/vulkan_gpu.py run 2>&1 | grep -v XDG_RUNTIME \
              | tee "$OUT/models.log" ;;
    submit) python3 bench/vulkan_submit.py run "$B" 2>&1 | grep -v XDG_RUNTIME | tee "$OUT/submit.log" ;;
  esac
done
