#!/usr/bin/env bash
# Builds the release flick binary, linked statically (glibc included), and prints its path.
# A static binary starts faster and maps no shared libraries, which keeps its resident set small.
# (Static linking needs an explicit --target so that build scripts and proc-macros stay dynamic.)
set -euo pipefail
cd "$(dirname "$0")/.."
target=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
    cargo build --release --quiet --target "$target" >&2
echo "$PWD/target/$target/release/flick"
