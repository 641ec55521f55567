#!/usr/bin/env bash
# Builds (or finds cached) Ember's default guest: the Linux kernel (resources/linux) and the
# initramfs (resources/initramfs), then prints their paths. Fast and silent but for the paths when
# both are cached; the first kernel build takes several minutes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/ember

"$here/linux/build-kernel.sh" >/dev/null
"$here/initramfs/build-initramfs.sh" >/dev/null

echo "default guest (in $cache/default):"
for f in vmlinux bzImage initramfs.cpio initramfs.cpio.gz; do
    printf '  %-18s -> %s\n' "$f" "$(readlink -f "$cache/default/$f")"
done
