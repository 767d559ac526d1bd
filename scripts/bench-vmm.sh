#!/bin/sh
# The launcher's benchmarks: kickvm against QEMU, Firecracker and Cloud
# Hypervisor (built by scripts/peers.sh) in the same run,
# boot time, guest→host ping RTT and syscalls per ping, memory overhead.
#
#   scripts/bench-vmm.sh                      # full run (~10 min here, L1 boots included)
#   scripts/bench-vmm.sh --boot-runs 1 --ping-runs 1 --pings 50   # quick look
#   scripts/bench-vmm.sh --only boot --boot-runs 3 \
#       --boot-vmm kickvm,kickvm-vmlinux,kickvm-api,pc,firecracker,cloud-hypervisor
#   scripts/bench-vmm.sh --only ping --ping-vmm per-queue,per-queue-poll-off,pc,firecracker,cloud-hypervisor
#
# Arguments go to kickvm-vmm-bench (crates/bench/src/bin/kickvm-vmm-bench/main.rs;
# --help-ish usage: any unknown argument). On a host whose /dev/kvm cannot
# run Linux (kvm_pvm, our machines) it runs inside the nested rig
# (docs/testing.md). Results: Markdown on stdout and in
# target/vmm-bench/results.md, with every console and perf output beside it.
set -eu
cd "$(dirname "$0")/.."
out=$PWD/target/vmm-bench
echo "+ cargo build --release --workspace" >&2
cargo build --release --workspace >&2
target/release/kickvm-rig image >/dev/null        # the guest image, built on the host
target/release/kickvm-rig image --print-vmlinux >/dev/null   # and its vmlinux (the rig cannot write the cache)
# Firecracker and Cloud Hypervisor, where scripts/peers.sh built them (the
# bench skips, with the reason, a peer it cannot find).
for peer in $(scripts/peers.sh --paths 2>/dev/null | tr ' ' '='); do
    case $peer in
        firecracker=*) : "${FIRECRACKER:=${peer#*=}}" ;;
        cloud-hypervisor=*) : "${CLOUD_HYPERVISOR:=${peer#*=}}" ;;
    esac
done
export FIRECRACKER="${FIRECRACKER:-}" CLOUD_HYPERVISOR="${CLOUD_HYPERVISOR:-}"
rm -rf "$out" && mkdir -p "$out"
echo "Command: \`scripts/bench-vmm.sh $*\` (git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%Y-%m-%d))"
echo
# On a host whose KVM runs Linux it runs here (as root); on one that cannot
# (kvm_pvm, our machines) it starts the nested rig itself: each boot run in
# a fresh L1, the ping runs in one more.
exec target/release/kickvm-vmm-bench --out "$out" "$@"
