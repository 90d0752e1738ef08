#!/usr/bin/env bash
# One device session: smoke test, SASS check, correctness suite, benchmark at 8K..256K with all baselines
# in the same run. Results land in $OUT (logs, check.json, results.json).
# usage (on the GPU machine, repo root): scripts/gpu/run-all.sh [BIN]   (default .cuda-carry/cuda_bench)
set -uo pipefail
BIN=${1:-.cuda-carry/cuda_bench}
OUT=${OUT:-/tmp/attnplan-out}; mkdir -p "$OUT"
LENS=${LENS:-"8192 32768 131072 262144"}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/env.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/env.log"
timeout 60 "$BIN" smoke 2>&1 | tee "$OUT/smoke.log"
# SASS of the kernels as the driver would build them: HGMMA = warpgroup MMA, HMMA = mma.sync
"$BIN" compile /tmp/ptx >/dev/null && for f in /tmp/ptx/*.ptx; do
  ptxas -arch=sm_90a "$f" -o "${f%.ptx}.cubin" && echo "$(basename "$f"): HGMMA $(cuobjdump -sass "${f%.ptx}.cubin" | grep -c HGMMA), HMMA $(cuobjdump -sass "${f%.ptx}.cubin" | grep -c HMMA)"
done 2>&1 | tee -a "$OUT/smoke.log"
timeout 240 scripts/gpu/device-tests.sh "$BIN" "$OUT" > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -12 "$OUT/tests.log"
# ATTNPLAN_ATTN picks the attention kernel (see exec/cuda/mod.rs); FALLBACK is benchmarked when the
# chosen one fails the suite ("default" = the library's default choice).
if [ $tests_rc -ne 0 ]; then
  fb=${FALLBACK:-mma}
  echo "kernels '${ATTNPLAN_ATTN:-default}' failed the suite: benchmarking '$fb' instead"
  if [ "$fb" = default ]; then unset ATTNPLAN_ATTN; else export ATTNPLAN_ATTN=$fb; fi
fi
# the library's default kernels at two lengths, for comparison with a variant under test
if [ -n "${COMPARE_DEFAULT:-}" ] && [ -n "${ATTNPLAN_ATTN:-}" ]; then
  for n in $COMPARE_DEFAULT; do
    ATTNPLAN_ATTN= timeout 200 "$BIN" bench "/tmp/d$n" --n "$n" --reps 10 2>&1 | sed 's/^/[default] /' | tee -a "$OUT/bench.log"
  done
fi
dirs=()
for n in $LENS; do
  timeout 200 "$BIN" bench "/tmp/b$n" --n "$n" --reps 10 --write-inputs 2>&1 | tee -a "$OUT/bench.log"
  dirs+=("/tmp/b$n")
done
REPS=5 timeout 300 python3 scripts/gpu/baselines.py "$OUT/results.json" "${dirs[@]}" 2>&1 | tee -a "$OUT/bench.log"
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv | tee -a "$OUT/env.log"
