#!/usr/bin/env bash
# Where a guest's own boot goes, VMM by VMM: the same ELF vmlinux,
# initramfs and command line under kickvm, Firecracker and Cloud
# Hypervisor (or two kickvm binaries), 1 vCPU, 256 MiB, taking turns in
# one rig L1; after boot the guest prints its own `dmesg` landmarks (no
# console output during boot), and the table gives each phase's median
# in the guest's clock (kvm-clock: wall time, stalls of L1 included).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'USAGE'
Usage: scripts/guest-phases.sh [--runs N] [--vmm LIST] [--out DIR] [--append ARGS]
                               [--tabulate]

Boots the default guest image's vmlinux N times (default 3) under each
VMM of LIST (comma-separated, default kickvm,firecracker,cloud-hypervisor),
taking turns, all in one rig L1 (L1's memory compacted before each boot),
and prints a Markdown table: per boot phase, the median milliseconds of
each VMM, from the guest's dmesg timestamps (kernel start = the first
kvm-clock reading; phases end at the landmark messages named in the
table). VMMs:
  kickvm                target/release/kickvm
  kickvm=PATH           another kickvm binary (an A/B of two builds)
  firecracker           $FIRECRACKER, else where scripts/peers.sh built it
  cloud-hypervisor      $CLOUD_HYPERVISOR, else likewise
--append adds kernel arguments (with initcall_debug the consoles also
get the time of the initcalls that probe the platform: ACPI, PCI, serial,
i8042, RTC; all of them would take minutes on the rig's serial port). Consoles go to DIR (default
target/guest-phases), one file per boot;
--tabulate makes the table again from the consoles a run left there (the
boots that finished: a run cut short by an L1 failure keeps its consoles).
Build first: cargo build --release -p kickvm -p kickvm-rig.
USAGE
}

runs=3 vmms=kickvm,firecracker,cloud-hypervisor out=$PWD/target/guest-phases tabulate= append=
while [ $# -gt 0 ]; do
    case $1 in
        --runs) runs=${2:?--runs needs a number}; shift 2 ;;
        --vmm) vmms=${2:?--vmm needs a list}; shift 2 ;;
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        --tabulate) tabulate=1; shift ;;
        --append) append=${2?--append needs kernel arguments}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "guest-phases: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case $runs in ''|*[!0-9]*|0) echo "guest-phases: --runs $runs: give a whole number ≥ 1" >&2; exit 2 ;; esac

# Phase name → the dmesg message that ends it, in boot order.
PHASES=(
    "early boot: memory, APIC, CPU|smp: Brought up"
    "core initcalls|ACPI: Added _OSI(Module Device)"
    "ACPI tables loaded and enabled|ACPI: Interpreter enabled"
    "ACPI namespace scan, PCI root bridge, bus 0 scan|iommu: Default domain"
    "subsystems, clocksource, network|Trying to unpack rootfs"
    "initramfs unpacked, crypto, block|Serial: 8250/16550"
    "serial ports, i8042, RTC probes|ledtrig-cpu"
    "late initcalls, free init memory|Run /init"
)

IFS=, read -r -a list <<EOF
$vmms
EOF

# The table: per phase, each VMM's median over its runs (ms), from the
# consoles in $out.
tabulate() {
    printf '| phase (ends at the message) |'
    for v in "${list[@]}"; do printf ' %s |' "$(basename "${v#kickvm=}")"; done
    printf '\n|---|'
    for _ in "${list[@]}"; do printf -- '---|'; done
    printf '\n'
    for i in "${!list[@]}"; do
        for r in $(seq "$runs"); do
            grep -q KICKVM-EXIT-STATUS=0 "$out/$i-$r.log" 2>/dev/null || continue
            printf '%s\t%s\t' "$i" "$r"
            awk -v phases="$(printf '%s\n' "${PHASES[@]}" | sed 's/.*|//' | paste -sd '\t')" '
                BEGIN { n = split(phases, p, "\t") }
                /^\[ *[0-9.]+\]/ {
                    t = substr($0, 2, index($0, "]") - 2) + 0
                    for (k = 1; k <= n; k++) if (!(k in at) && index($0, p[k])) at[k] = t
                }
                END { prev = 0; for (k = 1; k <= n; k++) { if (k in at) { printf "%.1f\t", (at[k] - prev) * 1000; prev = at[k] } else printf "-\t" } printf "%.1f\n", prev * 1000 }
            ' "$out/$i-$r.log"
        done
    done >"$out/phases.tsv"
    awk -F'\t' -v names="$(printf '%s\n' "${PHASES[@]}" | sed 's/|.*//' | paste -sd '\t')" \
        -v ends="$(printf '%s\n' "${PHASES[@]}" | sed 's/.*|//' | paste -sd '\t')" -v nv="${#list[@]}" '
        function median(s,   a, m, i, j, x) {
            m = split(s, a, " ")
            if (m == 0) return "–"
            for (i = 2; i <= m; i++) { x = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
            return sprintf("%.1f", m % 2 ? a[(m + 1) / 2] : (a[m / 2] + a[m / 2 + 1]) / 2)
        }
        BEGIN { n = split(names, nm, "\t"); split(ends, en, "\t") }
        { runs[$1]++; for (k = 1; k <= n + 1; k++) if ($(k + 2) != "-") v[$1, k] = v[$1, k] " " $(k + 2) }
        END {
            for (k = 1; k <= n + 1; k++) {
                printf "| %s |", k <= n ? nm[k] " (`" en[k] "`)" : "**kernel start → `Run /init`**"
                for (i = 0; i < nv; i++) printf " %s |", median(v[i, k])
                printf "\n"
            }
            printf "| boots |"
            for (i = 0; i < nv; i++) printf " %d |", runs[i]
            printf "\n"
        }' "$out/phases.tsv"
}

if [ -n "$tabulate" ]; then
    tabulate | tee "$out/phases.md"
    exit 0
fi

if [ -z "${KICKVM_IN_RIG:-}" ]; then
    rig=target/release/kickvm-rig
    [ -x "$rig" ] || { echo "guest-phases: no $rig: cargo build --release -p kickvm -p kickvm-rig" >&2; exit 1; }
    "$rig" image >/dev/null
    "$rig" image --print-vmlinux >/dev/null   # the rig cannot write the cache
    peers=$(scripts/peers.sh --paths 2>/dev/null || true)
    : "${FIRECRACKER:=$(awk '$1 == "firecracker" { print $2 }' <<<"$peers")}"
    : "${CLOUD_HYPERVISOR:=$(awk '$1 == "cloud-hypervisor" { print $2 }' <<<"$peers")}"
    mkdir -p "$out" && rm -f "$out"/[0-9]*-[0-9]*.log* "$out"/phases.tsv "$out"/phases.md   # a former run's, only
    echo "guest-phases: $runs runs of $vmms in one L1; consoles in $out" >&2
    # Only KICKVM_* variables reach L1.
    exec env KICKVM_GP_FIRECRACKER="${FIRECRACKER:-}" KICKVM_GP_CLOUD_HYPERVISOR="${CLOUD_HYPERVISOR:-}" \
        "$rig" run --share "$out" -- "$0" --runs "$runs" --vmm "$vmms" --out "$out" --append "$append"
fi

# Inside L1.
paths=$(target/release/kickvm-rig image --print-paths)
kernel=${paths% *} initrd=${paths#* }
vmlinux=$(dirname "$kernel")/vmlinux
[ -f "$vmlinux" ] || { echo "guest-phases: no $vmlinux: run target/release/kickvm-rig image --print-vmlinux on the host" >&2; exit 1; }
pattern=$(printf '%s\n' "${PHASES[@]}" | sed 's/.*|//' | paste -sd '|' | sed 's/[()]/./g')
platform='initcall (acpi_init|pci_subsys_init|pnpacpi_init|serial8250_init|i8042_init|cmos_init|add_rtc_cmos)[+]'
script=$(printf "dmesg | grep -E '%s|%s'" "$pattern" "$platform")
b64=$(printf '%s' "$script" | base64 -w0)
base="console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.dumbkbd"
extra="loglevel=4${append:+ $append} kickvm.cmd=$b64"

boot() { # VMM LOG
    local vmm=$1 log=$2 bin
    case $vmm in
        kickvm|kickvm=*)
            bin=target/release/kickvm
            [ "$vmm" = kickvm ] || bin=${vmm#kickvm=}
            timeout 120 "$bin" run --kernel "$vmlinux" --initrd "$initrd" --memory 256M --cpus 1 \
                --cmdline "$extra" >"$log" 2>"$log.err" </dev/null ;;
        firecracker)
            bin=${KICKVM_GP_FIRECRACKER:?no Firecracker: build it with scripts/peers.sh or set FIRECRACKER}
            printf '{"boot-source":{"kernel_image_path":"%s","initrd_path":"%s","boot_args":"%s %s"},"drives":[],"machine-config":{"vcpu_count":1,"mem_size_mib":256,"smt":false}}' \
                "$vmlinux" "$initrd" "$base" "$extra" >"$log.json"
            # Firecracker stays up after the guest's poweroff: stop it at the exit marker.
            "$bin" --no-api --config-file "$log.json" --level Warning >"$log" 2>"$log.err" </dev/null &
            local pid=$! i
            for i in $(seq 1200); do
                grep -q KICKVM-EXIT-STATUS "$log" && break
                sleep 0.1
            done
            kill "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true ;;
        cloud-hypervisor)
            bin=${KICKVM_GP_CLOUD_HYPERVISOR:?no Cloud Hypervisor: build it with scripts/peers.sh or set CLOUD_HYPERVISOR}
            timeout 120 "$bin" --kernel "$vmlinux" --initramfs "$initrd" --cmdline "$base $extra" --cpus boot=1 \
                --memory size=256M --serial tty --console off >"$log" 2>"$log.err" </dev/null ;;
        *) echo "guest-phases: unknown VMM $vmm (see --help)" >&2; exit 2 ;;
    esac
    grep -q KICKVM-EXIT-STATUS=0 "$log" || { echo "guest-phases: $vmm did not finish its boot: see $log" >&2; exit 1; }
}

for r in $(seq "$runs"); do
    for i in "${!list[@]}"; do
        echo 1 >/proc/sys/vm/compact_memory 2>/dev/null || true
        boot "${list[$i]}" "$out/$i-$r.log"
        echo "guest-phases: run $r ${list[$i]} done" >&2
    done
done

tabulate | tee "$out/phases.md"
