#!/usr/bin/env bash
# Drives `kickvm --api-socket` with Cloud Hypervisor's own client,
# ch-remote: a client none of us wrote. See --help.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() {
    cat <<'EOF'
Usage: scripts/ch-remote.sh [--build-only | --drive CH_REMOTE]

Fetches Cloud Hypervisor's public source and its micro_http git
dependency into $KICKVM_CACHE/ch-remote (default ~/.cache/kickvm; never
into this repository), builds ch-remote from them (micro_http patched in by
path), and drives kickvm with it, with the default guest image:

  ping, create (from a JSON file), info (Created), add-net (a TAP fd passed
  over the socket: fd=[3]), add-disk, boot, the guest pings the host over
  that NIC, info (Running), counters (the NIC's bytes), add-disk on the
  running VM (the guest finds /dev/vdb), power-button (the guest waits for
  KEY_POWER and powers off: info Shutdown), boot again (both disks), shutdown,
  info (Shutdown), shutdown-vmm (kickvm gone within 3 s, socket removed).

On a host whose /dev/kvm cannot run Linux (kvm_pvm) the driving part runs
in the nested rig (kickvm-rig run). Needs root (TAP), git, python3 (opens
the TAP for ch-remote), iproute2, and a Rust toolchain >= 1.89.

Sources (cloned once, then reused):
  CH_GIT          Cloud Hypervisor repository (default: its GitHub URL)
  CH_REF          branch or tag (default: main)
  MICRO_HTTP_GIT  micro-http repository (default: its GitHub URL)

Building ch-remote compiles most of Cloud Hypervisor: about 10 minutes on
2 cores (release, no LTO), which is why this is a script and not a CI test.

  --build-only        build ch-remote and print its path
  --drive CH_REMOTE   only the driving part, with that ch-remote binary
EOF
}

say() { echo "ch-remote: $*" >&2; }
CACHE=${KICKVM_CACHE:-$HOME/.cache/kickvm}/ch-remote

build() {
    mkdir -p "$CACHE"
    local ch=$CACHE/cloud-hypervisor mh=$CACHE/micro-http
    [ -d "$ch/.git" ] || { say "cloning ${CH_GIT:-https://github.com/cloud-hypervisor/cloud-hypervisor}"; \
        git clone -q --depth 1 -b "${CH_REF:-main}" "${CH_GIT:-https://github.com/cloud-hypervisor/cloud-hypervisor}" "$ch"; }
    [ -d "$mh/.git" ] || { say "cloning ${MICRO_HTTP_GIT:-https://github.com/firecracker-microvm/micro-http}"; \
        git clone -q --depth 1 "${MICRO_HTTP_GIT:-https://github.com/firecracker-microvm/micro-http}" "$mh"; }
    say "building ch-remote (release without LTO; log: $CACHE/build.log)"
    (cd "$ch" && CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
        cargo build --release --bin ch-remote -p cloud-hypervisor --target-dir "$CACHE/target" \
        --config "patch.\"https://github.com/firecracker-microvm/micro-http\".micro_http.path=\"$mh\"" \
        >"$CACHE/build.log" 2>&1) || { tail -20 "$CACHE/build.log" >&2; exit 1; }
    echo "$CACHE/target/release/ch-remote"
}

# The driving part: kickvm and ch-remote on this host's /dev/kvm.
drive() {
    local chr=$1 kickvm=$ROOT/target/release/kickvm
    local work; work=$(mktemp -d /tmp/kickvm-ch-remote.XXXXXX)
    local sock=$work/api.sock console=$work/console.log
    # (no process substitution: L1's chroot has no /dev/fd)
    local paths kernel initrd; paths=$(target/release/kickvm-rig image --print-paths)
    kernel=${paths% *} initrd=${paths#* }
    cr() { "$chr" --api-socket "$sock" "$@"; }
    fail() { say "FAILED: $*"; say "console:"; tail -20 "$console" >&2 || true; kill "$pid" 2>/dev/null || true; exit 1; }

    "$kickvm" --api-socket "$sock" -v >"$console" 2>"$work/kickvm.log" &
    pid=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
    say "ping: $(cr ping)"

    # The power button's input device is opened first, so no press is
    # missed; KEY_POWER is an input_event of type 1, code 116, value 1.
    local script='for e in /sys/class/input/event*; do grep -q "Power Button" $e/device/name && exec 3</dev/input/${e##*/}; done
ping -c 3 -W 2 10.0.2.2 && echo PING-OK
i=0; while [ ! -e /dev/vdb ] && [ $i -lt 300 ]; do sleep 1; i=$((i+1)); done; [ -e /dev/vdb ] && echo HOTPLUG-DISK-OK
while :; do set -- $(dd bs=24 count=1 <&3 2>/dev/null | hexdump -v -e "6/4 \"%08x \" \"\n\""); [ "$5" = 00740001 ] && [ "$6" = 00000001 ] && break; done
echo KEY-POWER; poweroff -f'
    local cmd; cmd="loglevel=4 kickvm.cmd=$(printf '%s' "$script" | base64 -w0)"
    cat >"$work/vm.json" <<JSON
{"payload": {"kernel": "$kernel", "initramfs": "$initrd", "cmdline": "$cmd"},
 "cpus": {"boot_vcpus": 1, "max_vcpus": 1}, "memory": {"size": 268435456},
 "serial": {"mode": "Tty"}, "console": {"mode": "Off"}}
JSON
    cr create "$work/vm.json"
    cr info | grep -q '"state":"Created"' || fail "info after create is not Created"
    say "create + info: Created"

    # Kata's way: the orchestrator opens the TAP and passes its fd.
    python3 - "$chr" "$sock" <<'PY'
import fcntl, os, struct, sys
fd = os.open("/dev/net/tun", os.O_RDWR)
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, TUNSETIFF = 0x2, 0x1000, 0x4000, 0x400454ca
fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", b"kvch0", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
os.dup2(fd, 3)
os.set_inheritable(3, True)  # os.open's fd is close-on-exec; dup2 onto itself keeps that
os.execv(sys.argv[1], [sys.argv[1], "--api-socket", sys.argv[2], "add-net", "fd=[3],mac=52:54:00:12:34:56"])
PY
    ip addr add 10.0.2.2/24 dev kvch0 && ip link set kvch0 up
    say "add-net with fd=[3]: done (TAP kvch0, held by kickvm)"
    truncate -s 64M "$work/disk.img"
    cr add-disk "path=$work/disk.img"
    say "add-disk: done"

    cr boot
    for _ in $(seq 240); do grep -q PING-OK "$console" && break; sleep 0.5; done
    grep -q PING-OK "$console" || fail "the guest did not ping the host over the NIC"
    cr info | grep -q '"state":"Running"' || fail "info after boot is not Running"
    say "boot + info: Running; the guest pinged the host"
    local counters; counters=$(cr counters)
    say "counters: $counters"
    python3 -c 'import json,sys; c=json.loads(sys.argv[1]); n=c["net1"] if "net1" in c else c["net0"]; sys.exit(0 if n["q0_bytes"]>0 and n["q1_bytes"]>0 else 1)' "$counters" \
        || fail "counters show no traffic on the NIC"
    truncate -s 64M "$work/hot.img"
    say "add-disk on the running VM: $(cr add-disk "path=$work/hot.img")"
    for _ in $(seq 240); do grep -q HOTPLUG-DISK-OK "$console" && break; sleep 0.5; done
    grep -q HOTPLUG-DISK-OK "$console" || fail "the guest did not find the disk plugged in after boot"
    say "the guest found /dev/vdb"
    cr power-button
    for _ in $(seq 120); do cr info | grep -q '"state":"Shutdown"' && break; sleep 0.5; done
    grep -q KEY-POWER "$console" || fail "the guest got no KEY_POWER"
    cr info | grep -q '"state":"Shutdown"' || fail "the guest did not power off after power-button"
    say "power-button: the guest got KEY_POWER and powered off; info: Shutdown"
    cr boot
    for _ in $(seq 240); do [ "$(grep -c HOTPLUG-DISK-OK "$console")" = 2 ] && break; sleep 0.5; done
    [ "$(grep -c HOTPLUG-DISK-OK "$console")" = 2 ] || fail "booted again, the guest does not have both disks"
    say "boot again: Running, with both disks"
    cr shutdown
    cr info | grep -q '"state":"Shutdown"' || fail "info after shutdown is not Shutdown"
    say "shutdown + info: Shutdown"
    local t0; t0=$(date +%s%N)
    cr shutdown-vmm
    while kill -0 "$pid" 2>/dev/null; do
        [ $(( ($(date +%s%N) - t0) / 1000000 )) -lt 3000 ] || fail "kickvm still runs 3 s after shutdown-vmm"
        sleep 0.01
    done
    wait "$pid" || fail "kickvm exited with status $?"
    [ ! -e "$sock" ] || fail "the API socket is left behind"
    [ ! -e /sys/class/net/kvch0 ] || fail "the TAP is left behind"
    say "shutdown-vmm: kickvm gone after $(( ($(date +%s%N) - t0) / 1000000 )) ms, socket and TAP gone"
    say "PASSED: ping, create, info, add-net (fd), add-disk, boot, counters, add-disk after boot, power-button, boot, shutdown, shutdown-vmm"
    rm -rf "$work"
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    --drive) drive "$2"; exit 0 ;;
    --build-only) build; exit 0 ;;
    "") ;;
    *) echo "ch-remote.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
esac

scripts/install-deps.sh
chr=$(build)
cargo build --release -q -p kickvm -p kickvm-rig
target/release/kickvm-rig image >/dev/null
if target/release/kickvm-rig host-kvm; then
    drive "$chr"
else
    say "this host's KVM cannot run Linux: driving kickvm in the nested rig"
    target/release/kickvm-rig run -- "$ROOT/scripts/ch-remote.sh" --drive "$chr"
fi
