#!/usr/bin/env bash
# The long reliability runs of issue 12 (figures in docs/reliability.md).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'USAGE'
Usage: scripts/reliability.sh WHAT [N]

Runs one of kickvm's reliability checks at full size and keeps its output
in target/reliability/WHAT-<time>.log. CI runs the same tests small.

  durability [RUNS]  real Linux guests in the rig write 4 KiB records and
                     flush (buffered + fsync, then O_DIRECT + fsync); the
                     launcher is SIGKILLed the moment a randomly chosen
                     acknowledgement reaches its console; every acknowledged
                     record must be in the image. RUNS per mode (default 20).
                     ~10 s per run in the rig.
  many-vms [N]       N launchers at once in the rig (default 20), tiny
                     guests (the minimal image's vmlinux, 64 MiB each, booted
                     with tracefs's initcalls and the crypto self-tests left
                     out, which is what lets Debian's kernel fit; see
                     min-memory; KICKVM_MANY_VMS_MIB sets another size) with net, disk, console socket and
                     shared RAM: all boot, all power off, nothing left
                     behind; prints their memory. A few minutes.
  flakey [SECS]      host faults under one real guest: its disk's
                     device-mapper table switched to error, then to flakey
                     (up 1 s, down 1 s) with error_writes and with
                     drop_writes for SECS seconds of writes each (default
                     30), then its TAP set down, up and deleted; prints
                     what the guest was told and what the device holds.
                     About a minute plus 2 x SECS.
  min-memory [MiB]   boots the minimal image's vmlinux (no devices, 1 vCPU)
                     in the rig with 128, 96, 80, 72, 68 and 64 MiB (or the
                     sizes given, e.g. "80 64") and prints, for each, what
                     the kernel has left after reserving itself, whether it
                     reaches /init, and its MemTotal/MemFree there: how
                     small a Debian guest can be. KICKVM_MIN_MEMORY_CMDLINE
                     adds to the guest's command line (e.g. the many-VMs
                     test's "initcall_blacklist=tracer_init_tracefs,event_trace_init
                     cryptomgr.notests"). A few minutes.
  soak [SECS]        SECS seconds (default 600) of traffic on every device
                     at once in the rig (TCP both ways, fio with crc32c
                     verification, hwrng, hvc0), sampling the launcher's
                     RSS, fds and threads every 10 s (a table at the end).
  reboots [N]        N guest reboots (default 20) of one launcher in the
                     rig (disk, TAP, rng, console socket), sampling its
                     RSS, fds and threads at every boot; they must stay
                     flat. ~5-10 s per reboot.
  resets [CYCLES]    CYCLES reset/re-activate cycles (default 1000) of a
                     disk, console, rng and (as root) net device through the
                     test driver at native speed; RSS, fds and threads must
                     stay flat. Under a minute.

The rig ones need QEMU (scripts/install-deps.sh) and build the guest
images on first use (docs/testing.md).
USAGE
}

# Boots the minimal image's vmlinux at each size in "$@" (MiB) in the rig.
min_memory() {
    local sizes=${*:-128 96 80 72 68 64} vmlinux initrd script log
    for m in $sizes; do
        [[ "$m" =~ ^[0-9]+$ ]] || { echo "reliability.sh: '$m' is not a size in MiB (see --help)" >&2; exit 2; }
    done
    cargo build -q -p kickvm --bin kickvm -p kickvm-rig --bin kickvm-rig
    vmlinux=$(target/debug/kickvm-rig image --minimal --print-vmlinux)
    initrd=$(target/debug/kickvm-rig image --minimal --print-paths | cut -d' ' -f2)
    script=$(printf '%s' 'grep -E "MemTotal|MemFree" /proc/meminfo; echo KVBOOTED' | base64 -w0)
    mkdir -p target/reliability
    log=target/reliability/min-memory-$(date -u +%Y%m%dT%H%M%SZ).log
    echo "reliability: min-memory ($sizes MiB); load before: $(uptime)" | tee "$log" >&2
    target/debug/kickvm-rig run --timeout 1200 -- sh -c "for m in $sizes; do echo \"=== \$m MiB\"; \
        timeout 300 target/debug/kickvm run --no-reboot --kernel $vmlinux --initrd $initrd --memory \${m}M \
        --cmdline \"kickvm.cmd=$script ${KICKVM_MIN_MEMORY_CMDLINE:-}\" 2>&1 | grep -E 'Memory:|Freeing unused|MemTotal|MemFree|KVBOOTED|Kernel panic'; done" 2>&1 | tee -a "$log"
    echo "reliability: min-memory finished; load after: $(uptime); log: $log" | tee -a "$log" >&2
}

what=${1:-}
n=${2:-}
if [[ "$what" == min-memory ]]; then
    shift
    min_memory "$@"
    exit 0
fi
case "$what" in
durability) export KICKVM_DURABILITY_RUNS=${n:-20}; set -- -p kickvm --test reliability_rig -- --exact acknowledged_writes_survive_sigkill ;;
many-vms) export KICKVM_MANY_VMS=${n:-20}; set -- -p kickvm --test reliability_rig -- --exact many_vms_boot_and_power_off_cleanly ;;
flakey) export KICKVM_FLAKEY_SECS=${n:-30}; set -- -p kickvm --test reliability_rig -- --exact host_faults_reach_a_real_guest_as_errors_then_it_recovers ;;
soak) export KICKVM_SOAK_SECS=${n:-600}; set -- -p kickvm --test reliability_rig -- --exact soak_every_device_at_once ;;
reboots) export KICKVM_REBOOT_CYCLES=${n:-20}; set -- -p kickvm --test reliability_rig -- --exact guest_reboot_cycles_keep_the_launcher_flat ;;
resets) export KICKVM_RESET_CYCLES=${n:-1000}; set -- -p kickvm-virtio --test reliability_cycles -- ;;
-h | --help) usage; exit 0 ;;
*) echo "reliability.sh: unknown check '${what}': use durability, many-vms, flakey, min-memory, soak, reboots or resets (see --help)" >&2; exit 2 ;;
esac
[[ -z "$n" || "$n" =~ ^[0-9]+$ ]] || { echo "reliability.sh: '$n' is not a number: give a count (see --help)" >&2; exit 2; }

mkdir -p target/reliability
log=target/reliability/$what-$(date -u +%Y%m%dT%H%M%SZ).log
echo "reliability: $what; load before: $(uptime)" | tee "$log" >&2
set +e
cargo test "$@" --nocapture 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
set -e
echo "reliability: $what finished (exit $status); load after: $(uptime); log: $log" | tee -a "$log" >&2
exit "$status"
