#!/bin/bash
# One device call: SASS check, harness (checks + timings), cuBLAS timings.
# Here: nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -o BIN bench/gpu_wgmma/harness.cu
# There: bash bench/gpu_wgmma/run.sh BIN [reps]   (writes under $OUT)
BIN=$(realpath "$1"); REPS=${2:-30}
cd "$(dirname "$0")"
OUT=${OUT:-/tmp/wgmma_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
cuobjdump -sass "$BIN" > "$OUT/harness.sass" 2>&1
echo "HGMMA in SASS: $(grep -c HGMMA "$OUT/harness.sass"), HMMA: $(grep -c 'HMMA' "$OUT/harness.sass")"
"$BIN" "$REPS" 2>&1 | tee "$OUT/harness.txt"
echo "harness rc=${PIPESTATUS[0]}"
python3 cublas.py "$REPS" 2>&1 | tee "$OUT/cublas.txt"
gzip -f "$OUT/harness.sass"
