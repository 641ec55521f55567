#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages Ember's builds and tests need, if any is missing.
# Everything else (guest kernel, initramfs, micro-guests) is built from these by the project.
set -euo pipefail

packages=(
    build-essential   # gcc, as, ld, make: micro-guests and the guest kernel
    flex bison bc libelf-dev libssl-dev  # the Linux kernel build
    cpio              # packing the initramfs
    lz4               # the kernel build compresses the bzImage with it
    linux-source-6.1  # the guest kernel's source
    busybox-static    # the default guest's userland
    util-linux        # script(1), unshare, setpriv: terminal and /dev/kvm error tests
    e2fsprogs         # mkfs.ext4 for disk images
    iproute2          # network namespaces for network tests
)

missing=()
for entry in "${packages[@]}"; do
    pkg=${entry%% *}
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing: ${missing[*]}" >&2
sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
