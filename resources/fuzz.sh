#!/usr/bin/env bash
# Structured random testing of what a guest controls, at scale: every fuzz target (the `fuzz_*`
# tests of ember-devices and ember-agent; see devices/src/fuzz.rs) runs CASES cases (default one
# million) from SEED (default: a new one, printed), in release mode, and reports cases per second.
# `cargo test` runs a fixed-seed sample of 2000 per target. A failure names its case seed: add it
# to devices/fuzz-corpus/TARGET to keep it as a regression test.
#
#   resources/fuzz.sh [CASES] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."

cases=${1:-1000000}
seed=${2:-$(printf '0x%016x' "$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')")}
echo "fuzz: $cases cases per target, seed $seed"
export EMBER_FUZZ_CASES=$cases EMBER_FUZZ_SEED=$seed
for crate in ember-devices ember-agent; do
    cargo test --release -q -p "$crate" fuzz_ -- --nocapture --test-threads=1 2>&1 |
        grep -oE 'fuzz [a-z_]+: .*|panicked.*|.*FAILED.*' || true
    test "${PIPESTATUS[0]}" -eq 0
done
