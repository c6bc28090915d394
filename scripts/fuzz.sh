#!/usr/bin/env bash
# Long fuzz run of the stable-Rust mutation fuzzer (tests/fuzz.rs): safetensors reader and
# metadata, image decoding + preprocessing, config parsing and validation.
#   scripts/fuzz.sh 1000000 [SEED]
# Prints cases/s and the number of crashes; crashing inputs are saved in target/fuzz-crashes/.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/inception-target}"
FUZZ_CASES="${1:-1000000}" FUZZ_SEED="${2:-61474}" \
  cargo test --release --test fuzz -- --nocapture 2>&1 | grep -E "^fuzz:|panics on|test result"
