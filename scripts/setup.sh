#!/usr/bin/env bash
# The main job, from a fresh checkout: install what is needed, build vessel
# and its guest agent, run a command in a container in a sandbox VM with
# `vessel run` (its guest image is built on first use), and boot the
# bundled test guest on KVM, showing its console output and the boot time
# measured from inside it.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
# Static (see .cargo/config.toml): no dynamic loader at start-up, about
# 0.3 ms less from spawn to the guest's first byte on our nested host.
cargo build --release --quiet --bin vessel
cargo build --release --quiet -p agent --bin vessel-agent
vessel=target/x86_64-unknown-linux-gnu/release/vessel
"$vessel" guests --out target/guests >/dev/null
# The main job: a container in a sandbox VM (QEMU TCG here, our devices
# over vhost-user), with a demo busybox root. The first run builds the
# sandbox guest's boot files in the cache directory: the distribution
# kernel (fetched once, then cached) and an initramfs with the agent next
# to vessel as /init.
"$vessel" image demo-rootfs --out target/demo-rootfs.ext4 >/dev/null
echo "setup: running a container in a sandbox VM:"
"$vessel" run --rm --hostname demo target/demo-rootfs.ext4 -- sh -c 'echo "hello from a container on $(hostname), kernel $(uname -r)"'

if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "setup: /dev/kvm is missing or not accessible to $(id -un); vessel is built but cannot boot a VM here" >&2
    exit 1
fi
head -c 65536 /dev/urandom > target/guests/initrd.bin
echo "setup: booting target/guests/report-pvh.elf on 2 vCPUs:"
"$vessel" vm boot --kernel target/guests/report-pvh.elf --vcpus 2 --mem 128 \
    --initrd target/guests/initrd.bin --cmdline "console=ttyS0 hello from setup.sh"
