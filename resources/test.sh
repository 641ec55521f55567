#!/usr/bin/env bash
# Runs every test: installs missing packages, builds (or reuses the cached) guest kernel and
# initramfs, then `cargo test` over the workspace, which boots the micro-guests and the Linux guest.
set -euo pipefail
cd "$(dirname "$0")/.."

resources/install-deps.sh
resources/build-guest.sh
# One test thread per core at most: guests are slow to boot here and tests time them out.
cargo test --workspace --release -- --test-threads="$(nproc)"
# The real-TAP unit tests create interfaces, so they run in a network namespace of their own.
unshare --net --map-root-user cargo test --release -p ember-devices --lib -- --ignored
