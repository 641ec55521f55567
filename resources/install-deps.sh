#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages Ember's builds and tests need, if any is missing.
# Everything else (guest kernel, initramfs, micro-guests) is built from these by the project.
set -euo pipefail

packages=(
    build-essential   # gcc, as, ld, make, libc6-dev (static glibc for ember): guests, kernel
    flex bison bc libelf-dev libssl-dev  # the Linux kernel build
    cpio              # packing the initramfs
    lz4               # the kernel build compresses the bzImage with it
    linux-source-6.1  # the guest kernel's source
    busybox-static    # the default guest's userland
    util-linux        # script(1), unshare, setpriv: terminal and /dev/kvm error tests
    e2fsprogs         # mkfs.ext4 for disk images
    iproute2          # network namespaces for network tests
    libseccomp-dev libcap-ng-dev  # building virtiofsd (--volume)
    mmdebstrap        # a real Debian root for the image tests (resources/debian-image.sh)
    podman conmon runc  # the OCI runtime's tests: podman runs ember-runtime (runc as the baseline)
    docker.io         # and Docker (dockerd, containerd, its runc shim) runs it too
)

. "$(dirname "$0")/lib/install-missing.sh"
install_missing "${packages[@]}"

# virtiofsd serves --volume directories; it comes from crates.io (a few minutes to build, once).
if ! command -v virtiofsd >/dev/null && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/virtiofsd" ]; then
    echo "[deps] installing virtiofsd (cargo install virtiofsd --locked)" >&2
    cargo install --quiet virtiofsd --locked
fi
