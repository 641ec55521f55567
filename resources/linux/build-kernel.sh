#!/usr/bin/env bash
# Builds Ember's guest kernel from Debian's linux-source-6.1 package:
#   make tinyconfig, merge ember.config over it, make olddefconfig, apply patches/*.patch,
#   then build vmlinux (the ELF with a PVH note that Ember boots) and bzImage.
# The result is cached outside the clone, keyed by the config fragment, the patches and the
# package version:
#   ${XDG_CACHE_HOME:-~/.cache}/ember/kernel-<hash>/{vmlinux,bzImage,config,System.map}
#   ${XDG_CACHE_HOME:-~/.cache}/ember/default/{vmlinux,bzImage} -> the latest build
# When the cached build exists, it only prints where it is.
# `build-kernel.sh --key` prints the cache key and builds nothing.
# Environment: EMBER_KERNEL_JOBS (make -j, default 2), EMBER_KEEP_BUILD=1 keeps the build tree.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/ember
jobs=${EMBER_KERNEL_JOBS:-2}
source_pkg=linux-source-6.1
# Bump when the build steps below change in a way that changes the output.
recipe=1

log() { printf '[kernel] %s\n' "$*" >&2; }

# shellcheck source=../lib/install-missing.sh
. "$here/../lib/install-missing.sh"

install_missing "$source_pkg" build-essential flex bison bc libelf-dev lz4 xz-utils

version=$(dpkg-query -W -f='${Version}' "$source_pkg")
tarball=/usr/src/$source_pkg.tar.xz
[ -f "$tarball" ] || { log "missing $tarball (from $source_pkg $version)"; exit 1; }

shopt -s nullglob
patches=("$here"/patches/*.patch)
shopt -u nullglob

hash=$(
    {
        echo "recipe $recipe"
        echo "$source_pkg $version"
        echo "== ember.config"
        cat "$here/ember.config"
        for p in "${patches[@]}"; do
            echo "== patches/$(basename "$p")"
            cat "$p"
        done
    } | sha256sum | cut -c1-16
)
if [ "${1:-}" = --key ]; then
    echo "$hash"
    exit 0
fi
out=$cache/kernel-$hash

mkdir -p "$cache"

# Points default/ at this build, under the cache's lock (build-guest.sh prunes under it too).
publish() {
    (
        flock 9
        mkdir -p "$cache/default"
        ln -sfn "../kernel-$hash/vmlinux" "$cache/default/vmlinux"
        ln -sfn "../kernel-$hash/bzImage" "$cache/default/bzImage"
    ) 9>"$cache/.kernel.lock"
    echo "kernel: $out/vmlinux"
    echo "kernel: $out/bzImage"
}

cached() {
    [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]
}

if cached; then
    log "cached ($source_pkg $version, $(basename "$out"))"
    publish
    exit 0
fi

# One build of this configuration at a time (test binaries, CI steps and people may call this at
# once): the others wait here, then find it cached. Builds of other configurations (another
# checkout's) go on beside it, and whoever finds its own kernel cached never waits.
exec 8>"$cache/.kernel-$hash.lock"
if ! flock -n 8; then
    log "waiting for another build of this kernel to finish"
    flock 8
fi
if cached; then
    log "cached ($source_pkg $version, $(basename "$out"))"
    publish
    exit 0
fi

work=$cache/build/kernel-$hash
src=$work/$source_pkg
buildlog=$work/build.log
# The build tree of an earlier failed build of this kernel is kept for debugging until the next
# build of it (others' build trees are theirs).
rm -rf "$work"
mkdir -p "$work"

fail() {
    log "FAILED: $*; last lines of $buildlog:"
    tail -n 40 "$buildlog" >&2 || true
    log "build tree kept in $work"
    exit 1
}

start=$SECONDS
log "building $source_pkg $version with ${#patches[@]} patch(es) into $out (log: $buildlog)"
log "unpacking $tarball"
tar -xJf "$tarball" -C "$work" || fail "unpacking $tarball"
[ -d "$src" ] || fail "no $src after unpacking"
cd "$src"

log "configuring: tinyconfig + ember.config"
{
    make ARCH=x86_64 tinyconfig &&
        scripts/kconfig/merge_config.sh -m .config "$here/ember.config" &&
        make ARCH=x86_64 olddefconfig
} >>"$buildlog" 2>&1 || fail "configuring"

# Every line of the fragment must have survived olddefconfig (a missing dependency silently drops
# an option otherwise).
bad=0
while IFS= read -r line; do
    if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
        grep -qxF "$line" .config || {
            log "config: wanted $line, got: $(grep -E "^(# )?${BASH_REMATCH[1]}[= ]" .config || echo unset)"
            bad=1
        }
    elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
        ! grep -q "^${BASH_REMATCH[1]}=" .config || {
            log "config: wanted ${BASH_REMATCH[1]} off, got: $(grep "^${BASH_REMATCH[1]}=" .config)"
            bad=1
        }
    fi
done <"$here/ember.config"
[ $bad -eq 0 ] || fail "ember.config does not apply as written"

for p in "${patches[@]}"; do
    log "patching: $(basename "$p")"
    patch -p1 --forward --batch <"$p" >>"$buildlog" 2>&1 || fail "applying $(basename "$p")"
done

log "compiling with make -j$jobs (a few minutes; a line every 100 objects)"
export KBUILD_BUILD_USER=ember KBUILD_BUILD_HOST=ember
make ARCH=x86_64 -j"$jobs" vmlinux bzImage 2>&1 |
    awk -v logfile="$buildlog" '
        { print >> logfile; fflush(logfile) }
        /^  (CC|AS|AR|LD)/ {
            n++
            if (n % 100 == 0) { printf "[kernel] %5d objects, now %s\n", n, $2; fflush() }
        }' || fail "make"

tmp=$out.tmp.$$
rm -rf "$tmp"
mkdir -p "$tmp"
cp vmlinux "$tmp/vmlinux"
cp arch/x86/boot/bzImage "$tmp/bzImage"
cp .config "$tmp/config"
cp System.map "$tmp/System.map"
rm -rf "$out"
mv "$tmp" "$out"
cd /
[ "${EMBER_KEEP_BUILD:-0}" = 1 ] || rm -rf "$work"
log "built in $((SECONDS - start)) s: $(du -h "$out/vmlinux" | cut -f1) vmlinux, $(du -h "$out/bzImage" | cut -f1) bzImage"
publish
