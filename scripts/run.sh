#!/usr/bin/env bash
# The main job (README): calibrate a sparse-attention plan for the default model (SmolLM2-135M-Instruct,
# fetched once into the cache) on synthetic passkey data, validate it against the model, and show it.
# Extra arguments go to `attnplan calibrate` (e.g. --seq-len 8192 --samples 6).
set -euo pipefail
cd "$(dirname "$0")/.."
model=$(scripts/fetch-model.sh)
cargo build --release --quiet
out=${ATTNPLAN_OUT:-out}
mkdir -p "$out"
target/release/attnplan calibrate --out "$out/plan.yaml" --report "$out/report.json" "$@"
target/release/attnplan validate "$out/plan.yaml" --model "$model"
target/release/attnplan inspect "$out/plan.yaml"
