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
# for a kernel): keep the most recently used few, and always the ones default/ points at. Under the
# kernel builder's lock, so that no build is pointing default/ at an entry while it goes; if another
# build holds the lock for long, pruning waits for a later run.
keep=3
prune() { # prune <current entry name> <glob of entry names>
    local current=$1 pattern=$2 n=0 entry
    touch -h "$current" 2>/dev/null || true
    # Newest first, one name per line; the names are ours (kernel-<hex>, initramfs-<hex>.cpio),
    # and the loop runs inside the cache directory, so nothing is split or expanded.
    while IFS= read -r entry; do
        case $entry in *.tmp.*) continue ;; esac
        n=$((n + 1))
        if [ "$n" -gt "$keep" ] && [ "$entry" != "$current" ]; then
            rm -rf -- "./$entry" "./$entry.gz"
        fi
    done < <(ls -dt -- $pattern 2>/dev/null)
}
(
    cd "$cache"
    flock -w 5 9 || exit 0
    prune "$(basename "$(dirname "$(readlink -f default/vmlinux)")")" 'kernel-*'
    prune "$(basename "$(readlink -f default/initramfs.cpio)")" 'initramfs-*.cpio'
) 9>"$cache/.kernel.lock"

echo "default guest (in $cache/default):"
for f in vmlinux bzImage initramfs.cpio initramfs.cpio.gz; do
    printf '  %-18s -> %s\n' "$f" "$(readlink -f "$cache/default/$f")"
done
