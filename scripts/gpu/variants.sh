#!/usr/bin/env bash
# Compares attention-kernel variants in one device session: for each ATTNPLAN_ATTN value in VARIANTS,
# the correctness suite (scripts/gpu/device-tests.sh) and the benchmark at LENS; optionally (NCU=1) one
# Nsight Compute profile of each variant's dense launch at NCU_N. Logs and JSON land in $OUT.
# usage (on the GPU machine, repo root): VARIANTS="ws wg3" LENS="32768 131072" scripts/gpu/variants.sh [BIN]
set -uo pipefail
BIN=${1:-.cuda-carry/cuda_bench}
OUT=${OUT:-/tmp/attnplan-out}; mkdir -p "$OUT"
VARIANTS=${VARIANTS:-"ws wg3"}
LENS=${LENS:-"32768 131072"}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/env.log"
for var in $VARIANTS; do
  export ATTNPLAN_ATTN=$var
  if [ -z "${SKIP_TESTS:-}" ]; then
    timeout ${TEST_TIMEOUT:-240} scripts/gpu/device-tests.sh "$BIN" "$OUT" > "$OUT/tests-$var.log" 2>&1
    echo "[$var] tests rc=$? $(tail -1 "$OUT/tests-$var.log")"
    cp "$OUT/check.json" "$OUT/check-$var.json" 2>/dev/null
  fi
  for n in $LENS; do
    timeout ${BENCH_TIMEOUT:-200} "$BIN" bench "/tmp/v-$var-$n" --n "$n" --reps 10 2>&1 | sed "s/^/[$var] /" | tee -a "$OUT/bench-variants.log"
  done
  if [ -n "${NCU:-}" ]; then
    timeout 200 ncu --clock-control none --kernel-name "regex:attn_fwd" --launch-skip 0 --launch-count 2 \
      --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis \
      --section MemoryWorkloadAnalysis --section Occupancy \
      "$BIN" bench "/tmp/ncu-$var" --n "${NCU_N:-131072}" --reps 1 > "$OUT/ncu-$var.txt" 2>&1
    echo "[$var] ncu rc=$?"
  fi
done
unset ATTNPLAN_ATTN
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv | tee -a "$OUT/env.log"
