#!/usr/bin/env bash
# One device call: edgellm (bench/gpu_run.py: checks, pp128/pp512/tg128, transformers fp16) and llama.cpp's
# llama-bench on random-weight Q4_0 GGUFs of the same shapes (the kit copied from ../shared/gpu-anchor into
# BUNDLE/gpu-anchor), one after the other so neither times the other's CPU load (llama.cpp's build runs last).
#
# Here:   python bench/gpu_prepare.py --out .device && cp -r ../shared/gpu-anchor .device/gpu-anchor
#         (or with --head-q4 llama-3.2-1b,llama-3-8b --no-kernels: those shapes' --head q4 builds timed too)
# There:  bash bench/gpu_side_by_side.sh .device          (results under $OUT: gpu.json, llamacpp/*.json)
# Here:   tar -xzf OUT/llamacpp.tgz -C OUT && python bench/gpu_report.py OUT/gpu.json --name h200 --llamacpp OUT/llamacpp
# (llama.cpp's outputs come back as one archive: the device tool returns a limited number of files)
set -u
BUNDLE=${1:-.device}
shift || true
OUT=${OUT:-./out}
mkdir -p "$OUT/llamacpp"
OUT=$(cd "$OUT" && pwd)
PYTHONPATH="$BUNDLE/site:." python3 bench/gpu_run.py --dev "$BUNDLE" "$@" 2>&1 | tail -60
if [ -d "$BUNDLE/gpu-anchor" ]; then
  (cd "$BUNDLE/gpu-anchor" && OUT="$OUT/llamacpp" BUDGET_S=${ANCHOR_BUDGET_S:-330} bash run.sh 2>&1 | tail -25)
fi
if [ -d "$OUT/llamacpp" ]; then
  tar -czf "$OUT/llamacpp.tgz" -C "$OUT" llamacpp && rm -rf "$OUT/llamacpp"
fi
