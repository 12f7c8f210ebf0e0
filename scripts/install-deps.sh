#!/usr/bin/env bash
# Installs the system packages vessel's build, tests and benchmark use, on
# Debian or Ubuntu: an assembler and linker for the test guests (binutils,
# gcc), QEMU for the benchmark, the tier-3 tests and `sandbox run`,
# iproute2 for the network tests, e2fsprogs for ext4 root filesystems,
# and virtiofsd (built from its Rust crate, with the libseccomp and
# libcap-ng headers it needs) for virtio-fs.
set -euo pipefail

need=()
command -v cc >/dev/null || need+=(gcc)
command -v ld >/dev/null && command -v objcopy >/dev/null || need+=(binutils)
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v unshare >/dev/null || need+=(util-linux)
# ip (network namespaces, veth) for the TAP and agent network tests.
command -v ip >/dev/null || need+=(iproute2)
# mkfs.ext4, e2fsck, debugfs: container root images (`vessel image`, sandbox run).
command -v mkfs.ext4 >/dev/null && command -v debugfs >/dev/null || need+=(e2fsprogs)
# A static busybox for the test guests' initramfs (the dynamic one cannot run there).
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
# virtiofsd's build links libseccomp and libcap-ng.
dpkg -s libseccomp-dev >/dev/null 2>&1 || need+=(libseccomp-dev)
dpkg -s libcap-ng-dev >/dev/null 2>&1 || need+=(libcap-ng-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)

if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "install-deps: installing ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The guest kernel is fetched with apt-get download, which needs package lists.
if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
fi

if ! command -v cargo >/dev/null; then
    echo "install-deps: no Rust toolchain found; install one with rustup (https://rustup.rs) and run again" >&2
    exit 1
fi

# virtiofsd, the Rust daemon (not QEMU's old C one in /usr/lib/qemu, which
# the tests do not use): the builtin VMM is a vhost-user frontend for it.
# Installed into ~/.cargo/bin; the tests look there and on PATH.
rust_virtiofsd() {
    local bin
    for bin in "$(command -v virtiofsd 2>/dev/null)" "$HOME/.cargo/bin/virtiofsd"; do
        [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q '^virtiofsd [0-9]' && return 0
    done
    return 1
}
if ! rust_virtiofsd; then
    echo "install-deps: building virtiofsd (cargo install virtiofsd --locked; a few minutes)"
    # From outside the repository: its .cargo/config.toml links statically.
    (cd / && cargo install virtiofsd --locked)
fi
