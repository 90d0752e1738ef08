#!/usr/bin/env bash
# Device correctness run (on the GPU machine): `cuda_bench check` cases with fresh random inputs and a
# NaN-poisoned output, then scripts/gpu/check.py against an f64 reference restricted to the same cells.
# usage: scripts/gpu/device-tests.sh [BIN] [RESULT_DIR]   (defaults: .cuda-carry/cuda_bench, $OUT)
set -uo pipefail
BIN=${1:-.cuda-carry/cuda_bench}
RES=${2:-${OUT:-/tmp}}
W=${CASE_DIR:-/tmp/attnplan-cases}
rm -rf "$W"; mkdir -p "$W"
# n hq hkv d index v s [options]  (GQA groups 1, 3, 4, 8; head_dim 64 and 128; odd lengths; 9 3 64
# is SmolLM2-135M's layer; cpu-vs-shared: heads 2p and 2p+1 share an index, which the warp-specialized
# kernels compute as one CTA per pair; gpu-bs / gpu-ts: block-sparse / token-select indexes built on
# the GPU)
cases=(
  "1023 8 8 64 dense 0 0"
  "1023 8 8 128 cpu-vs 100 200"
  "1023 32 4 128 gpu-vs 100 200"
  "4097 32 8 128 dense 0 0"
  "4097 32 4 64 gpu-vs 300 600"
  "4097 8 8 128 gpu-vs 300 600"
  "4097 32 8 64 cpu-vs 300 600"
  "33000 32 8 128 gpu-vs 1000 6096"
  "33000 32 4 128 dense 0 0"
  "33000 8 8 64 cpu-vs 1000 3000"
  "1023 8 2 128 cpu-vs-shared 100 200"
  "33000 32 8 128 cpu-vs-shared 1000 6096"
  "4097 9 3 64 gpu-vs 300 600"
  "33000 9 3 64 dense 0 0"
  "1023 8 2 64 cpu-vs-shared 100 200"
  "33000 32 8 64 cpu-vs-shared 1000 6096"
  "1023 9 3 64 gpu-bs 0 0 --topk 4 --cover 0.8"
  "4097 8 4 64 gpu-bs 0 0 --topk 16 --cover 0.9"
  "33000 32 8 128 gpu-bs 0 0 --topk 64 --cover 0.95"
  "4097 9 3 64 gpu-ts 0 256 --topk 8"
  "33000 32 8 128 gpu-ts 0 1024 --topk 8"
)
dirs=()
fail=0
for i in "${!cases[@]}"; do
  read -r n hq hkv d ix v s extra <<<"${cases[$i]}"
  dir="$W/case$i"
  seed=$(( (RANDOM << 15) | RANDOM ))
  if ! "$BIN" check "$dir" --n "$n" --hq "$hq" --hkv "$hkv" --d "$d" --index "$ix" --v "$v" --s "$s" --seed "$seed" ${extra:-}; then
    echo "case $i failed to run"; fail=1; continue
  fi
  dirs+=("$dir")
done
python3 scripts/gpu/check.py "$RES/check.json" "${dirs[@]}" || fail=1
exit $fail
