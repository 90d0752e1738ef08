#!/usr/bin/env bash
# The test command (README): fetches the default model once (cached), then runs every test of the
# workspace in the release profile (the numerics tests need optimized code; the profile is shared
# with `cargo build --release`). The `cuda` feature is on so that the CUDA tests run their real
# driver probe; without a GPU they print why they skip and pass.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh >/dev/null
# Cargo's target probe reads /dev/null; where that is a regular file (some sandboxes) the line above
# has just written to it. Empty it so the probe reads nothing (a no-op on the real device).
if [ -f /dev/null ]; then : >/dev/null; fi
cargo test --workspace --release --features runtime/cuda "$@"
