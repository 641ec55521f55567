#!/usr/bin/env bash
# Runs every test: installs missing packages, checks formatting and lints, builds (or reuses the cached) guest kernel and
# initramfs, then `cargo test` over the workspace, which boots the micro-guests and the Linux guest.
set -euo pipefail
cd "$(dirname "$0")/.."

resources/install-deps.sh
# The habits the project keeps, checked before anything slow: formatting and lints.
cargo fmt --all --check
cargo clippy --workspace --all-targets --release --features ember/test-hooks -- -D warnings
resources/build-guest.sh
# One test thread per core at most: guests are slow to boot here and tests time them out.
cargo test --workspace --release --features ember/test-hooks -- --test-threads="$(nproc)"
# The real-TAP unit tests create interfaces, so they run in a network namespace of their own.
unshare --net --map-root-user cargo test --release -p ember-devices --lib -- --ignored
