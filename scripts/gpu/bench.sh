#!/usr/bin/env bash
# `attnplan bench --device cuda` on the GPU machine: our stages at 8K, 32K, 128K and 256K, then the
# baselines on the same inputs (PyTorch SDPA cuDNN and FA2; MInference's Triton kernel when
# .cuda-carry/minference/pit_v2.py exists). Results land in $OUT: bench.txt (the table), bench.json
# (every figure), env.log (GPU, clocks, torch).
# usage (on the GPU machine, repo root, .cuda-carry carried): [BIN=...] scripts/gpu/bench.sh [OPTIONS]
#   BIN defaults to .cuda-carry/attnplan (`cargo build --release -p calibrate --features cuda`);
#   OPTIONS go to `attnplan bench`, e.g. --lengths 8K,32K --reps 5 --no-baselines.
set -uo pipefail
BIN=${BIN:-.cuda-carry/attnplan}
OUT=${OUT:-/tmp/attnplan-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/env.log"
python3 -c "import torch; print('torch', torch.__version__)" 2>&1 | tee -a "$OUT/env.log"
timeout 540 "$BIN" bench --device cuda --json "$OUT/bench.json" "$@" | tee "$OUT/bench.txt"
rc=${PIPESTATUS[0]}
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv | tee -a "$OUT/env.log"
exit "$rc"
