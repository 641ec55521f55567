#!/usr/bin/env bash
# Makes a Debian bookworm root as a tarball, once: `mmdebstrap --variant=minbase` plus
# python3-minimal (or the packages named), from Debian's mirror (no registry). The image tests and
# the README's CI example use it with `ember run --image`. Prints the tarball's path.
#
#   resources/debian-image.sh [OUT [PACKAGE,...]]
#       default OUT: ${XDG_CACHE_HOME:-~/.cache}/ember/test-images/debian-bookworm.tar
#
# Runs as root (mmdebstrap's root mode keeps the files' owners); as another user mmdebstrap
# needs a user namespace with subordinate IDs (/etc/subuid). Parallel callers wait for one build.
set -euo pipefail

out="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/ember/test-images/debian-bookworm.tar}"
include="${2:-python3-minimal}"
mkdir -p "$(dirname "$out")"
exec 9>"$out.lock"
flock 9
if [ ! -s "$out" ]; then
    command -v mmdebstrap >/dev/null || "$(dirname "$0")/install-deps.sh"
    echo "[debian-image] mmdebstrap --variant=minbase bookworm -> $out (about a minute, once)" >&2
    tmp="$out.partial"
    rm -f "$tmp"
    # --format: the temporary name has no .tar for mmdebstrap to go by (it would make a directory).
    mmdebstrap --quiet --format=tar --variant=minbase --include="$include" bookworm "$tmp" >&2
    mv "$tmp" "$out"
fi
echo "$out"
