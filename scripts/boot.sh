#!/usr/bin/env bash
# Boots the project's default guest image (Debian cloud kernel + busybox
# initramfs, built from Debian packages on first use) with kickvm and shows
# its console.
#
#   scripts/boot.sh                     # demo: 2 vCPUs, rng, a disk; runs a short script
#   scripts/boot.sh [kickvm run args]   # your own options, e.g. --cpus 4 --memory 1G
#
# On a host with hardware virtualization kickvm runs directly (with no
# script the guest gives you a shell; `exit` powers it off). On a host whose
# /dev/kvm is kvm_pvm (too slow for a Linux kernel), it runs inside the
# nested rig (docs/testing.md), where there is no terminal: the demo script
# runs and the guest powers off.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
echo "boot: building kickvm (release)" >&2
cargo build --release -q -p kickvm -p kickvm-rig

# The guest image is built here, on the host (the rig's L1 only reads the
# cache), and its paths are handed to kickvm: the launcher itself knows
# nothing of images.
echo "boot: building the guest image (cached under ${KICKVM_CACHE:-$HOME/.cache/kickvm})" >&2
read -r kernel initrd < <(target/release/kickvm-rig image --print-paths)

args=("$@")
has_kernel=false
for a in "${args[@]}"; do
    case "$a" in --kernel|--kernel=*) has_kernel=true ;; esac
done
if [ ${#args[@]} -eq 0 ]; then
    disk="${KICKVM_CACHE:-$HOME/.cache/kickvm}/demo-disk.img"
    mkdir -p "$(dirname "$disk")"
    [ -f "$disk" ] || truncate -s 64M "$disk"
    script='echo "Hello from Linux $(uname -r), booted by kickvm"
echo "CPUs online: $(cat /sys/devices/system/cpu/online)"
echo "virtio drivers bound: $(for d in /sys/bus/virtio/devices/*/driver; do basename "$(readlink "$d")"; done | tr "\n" " ")"
echo "disk: $(cat /sys/block/vda/size) sectors; 16 bytes from /dev/hwrng: $(head -c 16 /dev/hwrng | od -An -tx1 | tr -d " \n")"
grep -H . /proc/interrupts | grep -i virtio | head -8'
    args=(--cpus 2 --memory 512M --rng --disk "path=$disk"
          --cmdline "loglevel=4 kickvm.cmd=$(printf '%s' "$script" | base64 -w0)")
fi
if ! $has_kernel; then
    args=(--kernel "$kernel" --initrd "$initrd" "${args[@]}")
fi

if target/release/kickvm-rig host-kvm >/dev/null 2>&1; then
    exec target/release/kickvm run "${args[@]}"
fi
echo "boot: this host's /dev/kvm cannot run a Linux kernel at useful speed (kvm_pvm);" >&2
echo "boot: running kickvm inside the nested rig (QEMU TCG L1 with nested SVM)" >&2
exec target/release/kickvm-rig run --timeout 300 --share "$(dirname "${KICKVM_CACHE:-$HOME/.cache/kickvm}/x")" -- target/release/kickvm run "${args[@]}"
