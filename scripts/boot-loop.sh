#!/usr/bin/env bash
# Boots the rig's Debian guest many times under kickvm and under QEMU
# (-accel kvm, the peer) in the same L1, alternating, and counts how each
# boot ended: the hunt for the rare L2 triple fault (docs/reliability.md).
set -euo pipefail
# Read whole before it runs: an edit of this file during a run (an hour
# long) must not change what the run does.
{
cd "$(dirname "$0")/.."

usage() {
    cat <<'USAGE'
Usage: scripts/boot-loop.sh [--vmm kickvm|qemu|both] [--boots N] [--cpus N]
                            [--parallel N] [--timeout SECS] [--soak SECS]
                            [--append ARGS] [--kickvm-args ARGS]
                            [--kickvm-poll MODE] [--exit-stats]

Boots the default guest image (Debian cloud kernel, busybox /init) N times
per VMM inside one rig L1 (QEMU TCG with nested SVM), PARALLEL guests at a
time, each with CPUS vCPUs and 256 MiB; the guest prints a line and powers
off. With --vmm both (the default) kickvm and QEMU -accel kvm take turns,
so both see the same L1 and the same load. Every boot ends as one of:

  ok       the script ran and the guest powered off
  triple   the guest reset itself without being asked (kickvm: its
           "triple fault" dump; QEMU: a reset with -no-reboot, its
           CPU state at the reset is logged by -d cpu_reset); L1's
           kvm:kvm_exit trace of shutdown exits (the RIP at the fault,
           for both VMMs) is kept with it
  hang     no power-off within SECS (default 90): the launcher's threads
           (/proc/PID/task/*/wchan and stack) are recorded, kickvm is sent
           SIGUSR1 (it logs every vCPU's registers), then it is killed
  other    anything else (a panic, an error exit)

With --soak SECS each boot is instead a soak like the launcher's
(crates/launcher/tests/reliability_rig.rs): the tools image, 512 MiB, a
2-queue virtio-net on its own TAP (TCP both ways to peers in L1), a 2-queue
virtio-blk (fio random writes, crc32c-verified), virtio-rng and a virtio
console, all busy for SECS; the same devices under QEMU (virtio-*-pci,
userspace virtio-net). --append adds ARGS to both VMMs' kernel command
line (e.g. nox2apic); --kickvm-args adds ARGS to kickvm's (e.g.
"--threads single" or --decompress-in-guest), to tell which of its choices
matters; --kickvm-poll sets poll=MODE on kickvm's soak NIC and disk
(e.g. off: its queue threads never poll). --exit-stats counts L1's
exits of the L2 guests by reason for each turn (a histogram trigger on
kvm:kvm_exit), in run/exits-VMM-N.txt: how hard each VMM's guests drive
L1's nested SVM.

With --reboots N (and --vmm kickvm or qemu) one guest instead reboots
itself N times (`reboot -f`, counting its boots on a disk): a boot that
does not come within SECS is a hang, recorded as above. --rig-timeout
SECS ends the whole run (L1 is killed; the rig records L1's vCPU
registers from QEMU's monitor first: an L1 that hangs itself).

Results: target/reliability/boot-loop-<time>/results.txt (one line per
boot, a summary at the end) and a directory per boot that did not end ok
(console, log, dumps). Defaults: --boots 50 --cpus 2 --parallel 1.
Needs QEMU and the built guest image (docs/testing.md). ~8 s per boot.
USAGE
}

vmm=both boots=50 cpus=2 parallel=1 timeout=90 reboots=0 rig_timeout= soak=0 extra= kickvm_args= kpoll= exit_stats=
while [ $# -gt 0 ]; do
    case "$1" in
    --vmm) vmm=$2; shift 2 ;;
    --boots) boots=$2; shift 2 ;;
    --cpus) cpus=$2; shift 2 ;;
    --parallel) parallel=$2; shift 2 ;;
    --timeout) timeout=$2; shift 2 ;;
    --reboots) reboots=$2; shift 2 ;;
    --rig-timeout) rig_timeout=$2; shift 2 ;;
    --soak) soak=$2; shift 2 ;;
    --append) extra=$2; shift 2 ;;
    --kickvm-args) kickvm_args=$2; shift 2 ;;
    --kickvm-poll) kpoll=,poll=$2; shift 2 ;;
    --exit-stats) exit_stats=1; shift ;;
    --out) out=$2; shift 2 ;; # set by the re-run inside the rig
    -h | --help) usage; exit 0 ;;
    *) echo "boot-loop.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
case "$vmm" in kickvm | qemu | both) ;; *) echo "boot-loop.sh: --vmm '$vmm': use kickvm, qemu or both" >&2; exit 2 ;; esac
[ "$reboots" = 0 ] || [ "$vmm" != both ] || { echo "boot-loop.sh: --reboots needs --vmm kickvm or --vmm qemu (one VMM per L1: a hang stops the whole L1)" >&2; exit 2; }
for v in "$boots" "$cpus" "$parallel" "$timeout" ${reboots#0} ${soak#0} ${rig_timeout}; do
    [[ "$v" =~ ^[0-9]+$ && "$v" -gt 0 ]] || { echo "boot-loop.sh: '$v' is not a positive number (see --help)" >&2; exit 2; }
done

if [ -z "${KICKVM_IN_RIG:-}" ]; then
    cargo build -q -p kickvm -p kickvm-rig --bins
    out=$PWD/target/reliability/boot-loop-$(date -u +%Y%m%dT%H%M%SZ)
    mkdir -p "$out"
    # The binary under test is copied: a rebuild during the run changes nothing.
    cp target/debug/kickvm "$out/kickvm"
    # The image's paths, found here (L1 sees the cache read-only).
    tools=
    [ "$soak" = 0 ] || tools=--with-tools
    read -r KICKVM_LOOP_KERNEL KICKVM_LOOP_INITRD < <(target/debug/kickvm-rig image $tools --print-paths)
    export KICKVM_LOOP_KERNEL KICKVM_LOOP_INITRD
    # The kernel's System.map, from its Debian package: kickvm's dumps name
    # the guest function.
    release=$(sed -n 's/^kernel-release //p' "$(dirname "$KICKVM_LOOP_KERNEL")/manifest.txt")
    for m in "${KICKVM_CACHE:-$HOME/.cache/kickvm}"/unpacked/linux-image-"$release"_*/boot/System.map-"$release"; do
        [ -f "$m" ] && export KICKVM_SYSTEM_MAP=$m
    done
    what="boot"
    [ "$soak" = 0 ] || what="soak of $soak s"
    echo "boot-loop: $vmm x $boots, $what, $cpus vCPUs, $parallel at a time, append '$extra', kickvm args '$kickvm_args${kpoll:+ $kpoll}'; load before: $(uptime)" | tee "$out/results.txt" >&2
    # One boot takes ~8 s in the rig; L1 gets twice that per boot and VMM.
    per=$((timeout + soak + 20))
    turns=1
    [ "$vmm" = both ] && turns=2
    total=${rig_timeout:-$((boots * per * turns / parallel + 300))}
    set +e
    target/debug/kickvm-rig run --timeout "$total" --share "$out" -- \
        "$PWD/scripts/boot-loop.sh" --vmm "$vmm" --boots "$boots" --cpus "$cpus" \
        --parallel "$parallel" --timeout "$timeout" --reboots "$reboots" --soak "$soak" \
        --append "$extra" --kickvm-args "$kickvm_args" ${kpoll:+--kickvm-poll "${kpoll#,poll=}"} ${exit_stats:+--exit-stats} --out "$out"
    status=$?
    set -e
    echo "boot-loop: load after: $(uptime)" | tee -a "$out/results.txt" >&2
    echo "boot-loop: results in $out/results.txt" >&2
    exit $status
fi

# ---- inside L1 ----
kernel=$KICKVM_LOOP_KERNEL initrd=$KICKVM_LOOP_INITRD
script='echo KVOK'
if [ "$soak" != 0 ]; then
    # The launcher's soak (reliability_rig.rs), against this slot's peer
    # ($gw is set per guest below): fails on any fio or verify error.
    script='end=$(( $(date +%s) + '$soak' ))
gw=$(sed -n "s/.*kickvm.gw=\([^ ]*\).*/\1/p" /proc/cmdline)
FIO="fio --name=soak --filename=/dev/vda --size=4M --bs=4k --direct=1 --ioengine=psync --verify=crc32c --rw=randwrite"
( p=0; while [ $(date +%s) -lt $end ]; do p=$((p+1)); $FIO --verify_backlog=64 --randseed=$p >/tmp/fio.$p 2>&1 || { echo SOAK-FIO-FAILED $p; cat /tmp/fio.$p; }; echo $p > /tmp/passes; done ) &
( while [ $(date +%s) -lt $end ]; do nc $gw 5001 < /dev/zero & sleep 5; kill $! 2>/dev/null; done ) &
( while [ $(date +%s) -lt $end ]; do nc $gw 5002 > /dev/null & sleep 5; kill $! 2>/dev/null; done ) &
( while [ $(date +%s) -lt $end ]; do dd if=/dev/hwrng of=/dev/null bs=512 count=64 2>/dev/null || echo SOAK-RNG-FAILED; done ) &
( n=0; while [ $(date +%s) -lt $end ]; do n=$((n+1)); echo "soak console line $n" > /dev/hvc0 || echo SOAK-HVC-FAILED; usleep 20000; done ) &
wait
p=$(cat /tmp/passes)
$FIO --verify_only --randseed=$p > /tmp/fio.final 2>&1 || { echo SOAK-VERIFY-FAILED; cat /tmp/fio.final; exit 1; }
echo "SOAK-FIO-PASSES $p"'
fi
cmd=$(printf '%s' "$script" | base64 -w0)
append="loglevel=4 kickvm.cmd=$cmd $extra"

# Records what every thread of PID is doing (for a boot that hangs).
threads_of() {
    local pid=$1 t
    for t in /proc/"$pid"/task/*; do
        printf '%s %s wchan=%s state=%s\n' "${t##*/}" "$(cat "$t/comm" 2>/dev/null)" \
            "$(cat "$t/wchan" 2>/dev/null)" "$(awk '{print $3}' "$t/stat" 2>/dev/null)"
        sed 's/^/    /' "$t/stack" 2>/dev/null
    done
}

# One boot of VMM into directory D, in parallel slot SLOT; prints its
# outcome.
boot_one() {
    local vmm=$1 d=$2 slot=$3 pid mem=256 app=$append
    local kargs=() qargs=()
    mkdir -p "$d"
    if [ "$soak" != 0 ]; then
        # Each slot its own TAP and subnet; the peers listen on all of them.
        local t=kvl$slot net=10.0.$((20 + slot))
        ip link del "$t" 2>/dev/null || true
        ip tuntap add dev "$t" mode tap multi_queue && ip addr add "$net.2/24" dev "$t" && ip link set "$t" up
        truncate -s 64M "$d/disk.img"
        mem=512 app="$append kickvm.ip=$net.15/24 kickvm.gw=$net.2"
        kargs=(--net "tap=$t,mac=52:54:00:12:34:$((56 + slot))"",queues=2$kpoll"
            --disk "path=$d/disk.img,queues=2$kpoll" --rng --console "file=$d/hvc0")
        # The launcher's soak runs per-queue; --kickvm-args may say otherwise.
        [[ "$kickvm_args" == *--threads* ]] || kargs+=(--threads per-queue)
        qargs=(-netdev "tap,id=n0,ifname=$t,script=no,downscript=no,queues=2"
            -device "virtio-net-pci,netdev=n0,mq=on,vectors=6,mac=52:54:00:12:34:$((56 + slot))"
            -drive "file=$d/disk.img,if=none,id=d0,format=raw,cache=none"
            -device "virtio-blk-pci,drive=d0,num-queues=2" -device virtio-rng-pci
            -device virtio-serial-pci -chardev "file,id=hc,path=$d/hvc0" -device "virtconsole,chardev=hc")
    fi
    case "$vmm" in
    kickvm)
        RUST_LOG=info "$out/kickvm" run --kernel "$kernel" --initrd "$initrd" --memory "${mem}M" \
            --cpus "$cpus" --no-reboot "${kargs[@]}" $kickvm_args --cmdline "$app" </dev/null >"$d/console" 2>"$d/log" &
        ;;
    qemu)
        qemu-system-x86_64 -M pc -accel kvm -cpu host -smp "$cpus" -m "$mem" -nodefaults \
            -no-user-config -display none -no-reboot -serial "file:$d/console" \
            -kernel "$kernel" -initrd "$initrd" "${qargs[@]}" \
            -append "console=ttyS0 reboot=k panic=1 $app" \
            -d cpu_reset -D "$d/cpu-reset.log" </dev/null >"$d/log" 2>&1 &
        ;;
    esac
    pid=$!
    local waited=0
    while kill -0 "$pid" 2>/dev/null && [ $waited -lt $(((timeout + soak) * 10)) ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    if kill -0 "$pid" 2>/dev/null; then
        threads_of "$pid" >"$d/threads" 2>&1
        [ "$vmm" = kickvm ] && kill -USR1 "$pid" 2>/dev/null && sleep 2
        threads_of "$pid" >"$d/threads-after-dump" 2>&1
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        echo hang
        return
    fi
    local rc=0
    wait "$pid" || rc=$?
    [ "$soak" = 0 ] || ip link del "kvl$slot" 2>/dev/null || true
    if grep -q 'KICKVM-EXIT-STATUS=0' "$d/console" && [ $rc = 0 ] && ! grep -q 'SOAK-.*FAILED' "$d/console"; then
        echo ok
    elif grep -qi 'kernel panic\|BUG:\|Oops' "$d/console"; then
        echo other
    elif [ "$vmm" = kickvm ] && grep -q 'triple fault' "$d/log"; then
        echo triple
    elif [ "$vmm" = qemu ] && [ $rc = 0 ] && ! grep -q 'KICKVM-EXIT-STATUS=' "$d/console"; then
        # -no-reboot: a reset the guest did not ask for (no panic, the
        # script unfinished) ends QEMU with status 0.
        echo triple
    else
        echo other
    fi
}

# L1's KVM records every shutdown exit of an L2 vCPU (SVM exit code 0x7f:
# a triple fault) with the guest RIP at the fault, for either VMM: on AMD
# the vCPU's registers are reset before a VMM can read them.
tracing=/sys/kernel/tracing
[ -d $tracing/events ] || mount -t tracefs tracefs $tracing 2>/dev/null || true
if [ -w $tracing/events/kvm/kvm_exit/filter ]; then
    echo 'exit_reason == 127' >$tracing/events/kvm/kvm_exit/filter
    echo 1 >$tracing/events/kvm/kvm_exit/enable
    echo > $tracing/trace
else
    echo "boot-loop: no kvm:kvm_exit tracepoint in L1: shutdown RIPs not recorded" >&2
fi

if [ "$reboots" != 0 ]; then
    d="$out/run/$vmm-reboots"
    mkdir -p "$d"
    truncate -s 1M "$d/count.img"
    guest='n=$(head -c 8 /dev/vda | tr -dc 0-9); n=$((${n:-0} + 1)); printf "%-8d" $n > /dev/vda; sync; echo KVBOOT $n; [ $n -ge '$reboots' ] && exit 0; reboot -f'
    rappend="loglevel=4 kickvm.cmd=$(printf '%s' "$guest" | base64 -w0)"
    if [ "$vmm" = kickvm ]; then
        RUST_LOG=warn "$out/kickvm" run --kernel "$kernel" --initrd "$initrd" --memory 256M --cpus "$cpus" \
            --disk "path=$d/count.img" --cmdline "$rappend" </dev/null >"$d/console" 2>"$d/log" &
    else
        qemu-system-x86_64 -M pc -accel kvm -cpu host -smp "$cpus" -m 256 -nodefaults -no-user-config \
            -display none -serial "file:$d/console" -kernel "$kernel" -initrd "$initrd" \
            -drive "file=$d/count.img,if=virtio,format=raw" \
            -append "console=ttyS0 reboot=k panic=1 $rappend" </dev/null >"$d/log" 2>&1 &
    fi
    pid=$! seen=0 quiet=0 t0=$(date +%s)
    while kill -0 $pid 2>/dev/null; do
        sleep 1
        now=$(grep -c '^KVBOOT' "$d/console" 2>/dev/null || true)
        if [ "${now:-0}" -gt "$seen" ]; then
            seen=$now quiet=0
            echo "$vmm reboots boot $seen $(date -u +%T) load=$(cut -d' ' -f1 /proc/loadavg)" >>"$out/results.txt"
        elif [ $((quiet += 1)) -ge "$timeout" ]; then
            threads_of $pid >"$d/threads" 2>&1
            [ "$vmm" = kickvm ] && kill -USR1 $pid && sleep 2
            threads_of $pid >"$d/threads-after-dump" 2>&1
            kill -KILL $pid
            echo "$vmm reboots hang after boot $seen" >>"$out/results.txt"
            break
        fi
    done
    wait $pid 2>/dev/null || true
    echo "$vmm reboots: $seen boots in $(($(date +%s) - t0)) s" | tee -a "$out/results.txt"
    cp $tracing/trace "$d/kvm-shutdown-trace" 2>/dev/null || true
    exit 0
fi

vmms=$vmm
[ "$vmm" = both ] && vmms="kickvm qemu"
if [ "$soak" != 0 ]; then
    # The soak's TCP peers: a sink on 5001 and a source on 5002, on every
    # address of L1 (each slot's TAP has its own).
    python3 -c '
import socket, threading
def serve(port, f):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    while True:
        c, _ = s.accept(); threading.Thread(target=f, args=(c,), daemon=True).start()
def sink(c):
    try:
        while c.recv(65536): pass
    except OSError: pass
def source(c):
    b = b"Z" * 65536
    try:
        while True: c.sendall(b)
    except OSError: pass
threading.Thread(target=serve, args=(5001, sink), daemon=True).start()
serve(5002, source)
' &
    peers=$!
    trap 'kill $peers 2>/dev/null' EXIT
fi
t0=$(date +%s)
for ((i = 1; i <= boots; i += parallel)); do
    for v in $vmms; do
        pids=()
        hist=$tracing/events/kvm/kvm_exit/trigger
        [ -z "$exit_stats" ] || echo 'hist:keys=exit_reason:sort=hitcount.descending' >"$hist"
        for ((j = 0; j < parallel && i + j <= boots; j++)); do
            d="$out/run/$v-$((i + j))"
            (
                r=$(boot_one "$v" "$d" "$j")
                echo "$v $((i + j)) $r $(date -u +%T) load=$(cut -d' ' -f1 /proc/loadavg)" >>"$out/results.txt"
                case "$r" in
                ok) rm -rf "$d" ;;
                triple) cp $tracing/trace "$d/kvm-shutdown-trace" 2>/dev/null || true ;;
                esac
            ) &
            pids+=($!)
        done
        wait "${pids[@]}"
        if [ -n "$exit_stats" ]; then
            mkdir -p "$out/run"
            cp $tracing/events/kvm/kvm_exit/hist "$out/run/exits-$v-$i.txt"
            echo '!hist:keys=exit_reason:sort=hitcount.descending' >"$hist"
        fi
    done
done
echo "boot-loop: $(($(date +%s) - t0)) s in L1" >>"$out/results.txt"
cp $tracing/trace "$out/kvm-shutdown-trace" 2>/dev/null || true
for v in $vmms; do
    for r in ok triple hang other; do
        printf '%s %s %s\n' "$v" "$r" "$(grep -c "^$v [0-9]* $r " "$out/results.txt")"
    done
done | tee -a "$out/results.txt"
exit
}
