#!/usr/bin/env bash
# One Nsight Compute profile of the first sparse attention launch of `cuda_bench bench` at NCU_N tokens
# (default 131072; NCU_SKIP=1: the first dense launch instead), with warp-state and per-instruction
# stall sampling (kernels built with -lineinfo).
# Writes $OUT/profile.ncu-rep, $OUT/profile-details.txt and $OUT/profile-source.csv (SASS and CUDA
# lines with their stall samples; scripts/gpu/stalls.py sums them by line and by part of the kernel).
# usage (on the GPU machine, repo root): [ATTNPLAN_ATTN=ws] [NCU_ARGS="--hq 9 --hkv 3 --d 64"] scripts/gpu/profile.sh [BIN]
#   NCU_ARGS: more `cuda_bench bench` options (the layer shape, budgets)
set -uo pipefail
BIN=${1:-.cuda-carry/cuda_bench}
OUT=${OUT:-/tmp/attnplan-out}; mkdir -p "$OUT"
export ATTNPLAN_NVRTC_LINEINFO=1
timeout 300 ncu --clock-control none --kernel-name "regex:attn_fwd" --launch-skip "${NCU_SKIP:-0}" --launch-count 1 \
  --section SpeedOfLight --section WarpStateStats --section SourceCounters \
  --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section LaunchStats \
  -o "$OUT/profile" -f "$BIN" bench /tmp/profile-in --n "${NCU_N:-131072}" ${NCU_ARGS:-} --reps 1 > "$OUT/profile-run.log" 2>&1
echo "ncu rc=$?"
ncu -i "$OUT/profile.ncu-rep" --page details > "$OUT/profile-details.txt" 2>&1
ncu -i "$OUT/profile.ncu-rep" --page source --csv --print-source sass,cuda > "$OUT/profile-source.csv" 2>&1 \
  || ncu -i "$OUT/profile.ncu-rep" --page source --csv --print-source sass > "$OUT/profile-source.csv" 2>&1
ls -la "$OUT"
