#!/usr/bin/env bash
# Builds Ember's default initramfs: a newc cpio holding Debian's static busybox (/bin/sh links to
# it; its other applets need no links), /init (ember-init.c: marks the boot timer, then runs init.sh), the init script
# (init.sh -> /lib/ember/init.sh) and its command line parsing (lib/cmdline.sh), the test scripts
# (tests/*.sh -> /tests), ember-exit (ember-exit.c), which ends the VM through port 0xf4, and
# ember-bench (ember-bench.c), the guest half of resources/bench/bench.py, and ember-vecregs
# (ember-vecregs.c), which checks that processes keep their vector registers to themselves, and
# the guest agent (the workspace's agent/ crate, built here with cargo: a static binary), which
# runs job-mode commands sent over vsock.
# It is written twice, uncompressed (.cpio) and gzip'ed (.cpio.gz). Boot the uncompressed one on
# software KVM: the kernel's inflate runs emulated and took ~60 s for this ~1 MiB .gz, against
# ~8 s to copy the 2 MiB .cpio (measured with QEMU on kvm_pvm); the .gz is for hardware KVM or
# when the initrd's size matters more than its unpacking.
# The result is cached outside the clone, keyed by these files and the busybox version:
#   ${XDG_CACHE_HOME:-~/.cache}/ember/initramfs-<hash>.cpio{,.gz}
#   ${XDG_CACHE_HOME:-~/.cache}/ember/default/initramfs.cpio{,.gz} -> the latest build
# When the cached build exists, it only prints where it is.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/ember
busybox=/bin/busybox

log() { printf '[initramfs] %s\n' "$*" >&2; }

# shellcheck source=../lib/install-missing.sh
. "$here/../lib/install-missing.sh"

install_missing busybox-static cpio gzip build-essential

workspace=$(cd "$here/../.." && pwd)
inputs=("$here/build-initramfs.sh" "$here/init.sh" "$here/lib/cmdline.sh" "$here/freestanding.h"
    "$here/ember-init.c" "$here/ember-exit.c" "$here/ember-bench.c" "$here/ember-vecregs.c"
    "$here"/tests/*.sh "$workspace/Cargo.lock" "$workspace/Cargo.toml" "$workspace/agent/Cargo.toml"
    $(find "$workspace/agent/src" -name '*.rs' | LC_ALL=C sort))
hash=$(
    {
        echo "busybox-static $(dpkg-query -W -f='${Version}' busybox-static)"
        echo "gcc $(gcc -dumpfullversion)"
        echo "$(rustc --version)"
        for f in "${inputs[@]}"; do
            echo "== ${f#"$here"/}"
            cat "$f"
        done
    } | sha256sum | cut -c1-16
)
out=$cache/initramfs-$hash.cpio

publish() {
    mkdir -p "$cache/default"
    ln -sfn "../initramfs-$hash.cpio" "$cache/default/initramfs.cpio"
    ln -sfn "../initramfs-$hash.cpio.gz" "$cache/default/initramfs.cpio.gz"
    echo "initramfs: $out"
    echo "initramfs: $out.gz"
}

if [ -f "$out" ] && [ -f "$out.gz" ]; then
    log "cached ($(basename "$out"))"
    publish
    exit 0
fi

mkdir -p "$cache/build"
stage=$(mktemp -d "$cache/build/initramfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/root
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib/ember,tests,dev,proc,sys,tmp,run,root,etc}

# busybox, and a link for /bin/sh only (scripts' #!/bin/sh). Debian's static busybox has a
# standalone shell that runs its applets without a link per applet (through /proc/self/exe, which
# init.sh mounts first); the ~270 links cost ~13 s of emulated kernel code to unpack at every boot
# on software KVM (/init reached at ~30 s instead of ~43 s, measured with resources/bench).
if ! env -i PATH=/nonexistent "$busybox" sh -c 'ls / >/dev/null' 2>/dev/null; then
    log "error: $busybox has no standalone shell (FEATURE_SH_STANDALONE): the guest would lack its commands"
    exit 1
fi
cp "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"

# Freestanding helpers (no libc); no loop may become a memset/memcpy call there is no libc for.
freestanding=(gcc -static -nostdlib -ffreestanding -Os -fno-stack-protector -fno-pie -no-pie
    -fno-asynchronous-unwind-tables -fno-tree-loop-distribute-patterns
    -Wl,--build-id=none -Wl,-z,norelro -Wl,-z,noexecstack -Wall -Wextra -Werror -s)
for helper in ember-init ember-exit ember-bench; do
    # -n: one unaligned segment, the smallest file (these helpers write no globals).
    "${freestanding[@]}" -Wl,-n -o "$root/bin/$helper" "$here/$helper.c"
done
# The register check: the compiler must not touch a vector register of its own.
"${freestanding[@]}" -mgeneral-regs-only -o "$root/bin/ember-vecregs" "$here/ember-vecregs.c"
# The guest agent: static (the workspace's target links with crt-static), release, stripped.
log "building the guest agent (cargo build --release -p ember-agent)"
(cd "$workspace" && cargo build --quiet --release -p ember-agent)
install -m 755 -s "$workspace/target/x86_64-unknown-linux-gnu/release/ember-agent" "$root/bin/ember-agent"

mv "$root/bin/ember-init" "$root/init"
install -m 755 "$here/init.sh" "$root/lib/ember/init.sh"
install -m 644 "$here/lib/cmdline.sh" "$root/lib/ember/cmdline.sh"
install -m 755 "$here"/tests/*.sh "$root/tests/"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\ntty:x:5:\n' >"$root/etc/group"
printf '%s\n' "PS1='ember:\\w\\\$ '" "export PS1" >"$root/etc/profile"
chmod 1777 "$root/tmp"
find "$root" -exec touch -h -d @0 {} +

# newc_node NAME MODE MAJOR MINOR: a cpio (newc) archive holding one device node, so that the
# kernel can open /dev/console for /init before devtmpfs is mounted, without mknod (no root
# needed to build).
newc_node() {
    local name=$1 mode=$2 major=$3 minor=$4 namesize=$((${#1} + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        1 "$mode" 0 0 1 0 0 0 0 "$major" "$minor" "$namesize" 0
    printf '%s\0' "$name"
    head -c $(((4 - (110 + namesize) % 4) % 4)) /dev/zero
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        0 0 0 0 1 0 0 0 0 0 0 11 0
    printf 'TRAILER!!!\0'
    head -c 3 /dev/zero
}

{
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --reproducible --quiet)
    newc_node dev/console $((0020600)) 5 1
} >"$stage/initramfs.cpio"
gzip -9 -n -k "$stage/initramfs.cpio"
mv "$stage/initramfs.cpio.gz" "$out.gz"
mv "$stage/initramfs.cpio" "$out"
log "built: $(du -k "$out" | cut -f1) KiB, $(du -k "$out.gz" | cut -f1) KiB gzip'ed ($(find "$root" -mindepth 1 | wc -l) entries)"
publish
