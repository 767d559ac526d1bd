#!/bin/sh
# Installs what kickvm's build and tests need on a Debian 12 host.
# Idempotent: installs only what is missing, and runs `apt-get update` only
# when something is missing (the image builder also needs apt's package
# lists to resolve and download guest packages: updated when absent).
set -eu

# qemu-system-x86: the rig's L1 and the reference VMM; qemu-system-common:
# qemu-storage-daemon, the peer back-end of `kickvm-bench vhost-blk` (a
# dependency of qemu-system-x86, listed to be explicit); iproute2: netns/TAP
# in tests; strace and linux-perf: syscall counting; gzip, dpkg and apt:
# the image builder (always present on Debian, listed to be explicit);
# curl: a client none of us wrote for the API socket's tests; acpica-tools:
# iasl, ACPICA's disassembler (Linux's AML parser), reads kickvm's DSDT in
# acpi.rs's tests.
PACKAGES="qemu-system-x86 qemu-system-common iproute2 strace linux-perf gzip dpkg apt curl acpica-tools"

missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done

# The image builder runs `apt-cache show` and `apt-get download`: they need
# the package lists even when every host package is already installed.
lists_present() {
    ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1
}

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if [ -n "$missing" ] || ! lists_present; then
    echo "install-deps: apt-get update" >&2
    $SUDO apt-get update -q
fi
if [ -n "$missing" ]; then
    echo "install-deps: installing$missing" >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
else
    echo "install-deps: all present ($PACKAGES)" >&2
fi
