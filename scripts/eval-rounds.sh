#!/usr/bin/env bash
# Many-case evaluation of a plan, in rounds: each round evaluates CASES cases of every task with a
# fresh seed, so the counts stay balanced across tasks whenever the run is stopped. The first round
# also measures head recall, KV-group sharing and the dense comparison; later rounds only answers and
# perplexity. Sum the rounds with scripts/eval-aggregate.py.
# usage: scripts/eval-rounds.sh PLAN OUTDIR [ROUNDS=5] [CASES=10] [SEQ_LEN=8150]
#   env: ATTNPLAN (binary), MODEL (--model; default the cached SmolLM2), ROUND0 (first round, default 0:
#   runs on several machines take disjoint round ranges, hence disjoint seeds), DENSE_CACHE (directory
#   for --dense-cache: evaluating another plan on the same rounds reuses the dense results)
set -euo pipefail
PLAN=$1; OUT=$2; ROUNDS=${3:-5}; CASES=${4:-10}; N=${5:-8150}
BIN=${ATTNPLAN:-target/release/attnplan}
R0=${ROUND0:-0}
opts=()
[ -n "${MODEL:-}" ] && opts+=(--model "$MODEL")
[ -n "${DENSE_CACHE:-}" ] && opts+=(--dense-cache "$DENSE_CACHE")
mkdir -p "$OUT"
for r in $(seq "$R0" $((R0 + ROUNDS - 1))); do
  for task in passkey kv-retrieval needle; do
    f="$OUT/r$r-$task.json"
    [ -s "$f" ] && continue
    extra=(--no-head-recall --compare-samples 0)
    [ "$r" = 0 ] && extra=(--compare-samples 1)
    "$BIN" eval "${opts[@]}" --plan "$PLAN" --data "synthetic:$task" --seq-len "$N" --samples "$CASES" \
      --seed $((1001 + 1000 * r)) --json "${extra[@]}" > "$f.tmp"
    mv "$f.tmp" "$f"
    echo "$(date +%T) round $r $task done"
  done
done
