#!/usr/bin/env bash
# Boots the default guest: installs missing packages, builds (or reuses the cached) guest kernel
# and initramfs and the ember binary, then runs `ember run` with any extra arguments given here.
set -euo pipefail
cd "$(dirname "$0")/.."

resources/install-deps.sh
resources/build-guest.sh
cargo build --release --quiet
exec target/x86_64-unknown-linux-gnu/release/ember run "$@"
