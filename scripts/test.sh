#!/usr/bin/env bash
# The test command (README): fetches the default model once (cached), then runs every test of the
# workspace in the release profile (the numerics tests need optimized code; the profile is shared
# with `cargo build --release`, so nothing is compiled twice).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-model.sh >/dev/null
cargo test --workspace --release "$@"
