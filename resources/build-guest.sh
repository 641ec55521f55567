#!/usr/bin/env bash
# Builds (or finds cached) Ember's default guest: the Linux kernel (resources/linux) and the
# initramfs (resources/initramfs), then prints their paths. Fast and silent but for the paths when
# both are cached; the first kernel build takes several minutes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/ember

"$here/linux/build-kernel.sh" >/dev/null
"$here/initramfs/build-initramfs.sh" >/dev/null

# Every change to the kernel's config, patches or the initramfs leaves a new cache entry (~60 MiB
# for a kernel): keep the most recently used few, and always the ones default/ points at.
keep=3
prune() { # prune "<current entry>" <entries...>
    local current=$1 n=0 entry
    shift
    touch -h "$current" 2>/dev/null || true
    # shellcheck disable=SC2012 # names are ours: kernel-<hex>, initramfs-<hex>.cpio
    for entry in $(ls -dt "$@" 2>/dev/null); do
        n=$((n + 1))
        if [ "$n" -gt "$keep" ] && [ "$entry" != "$current" ]; then
            rm -rf "$entry" "$entry.gz"
        fi
    done
}
(
    flock 9
    prune "$(dirname "$(readlink -f "$cache/default/vmlinux")")" "$cache"/kernel-*
    prune "$(readlink -f "$cache/default/initramfs.cpio")" "$cache"/initramfs-*.cpio
) 9>"$cache/.prune.lock"

echo "default guest (in $cache/default):"
for f in vmlinux bzImage initramfs.cpio initramfs.cpio.gz; do
    printf '  %-18s -> %s\n' "$f" "$(readlink -f "$cache/default/$f")"
done
