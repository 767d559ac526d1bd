#!/usr/bin/env bash
# Coverage-guided fuzzing of kickvm (cargo-fuzz / libFuzzer): see --help.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
FUZZ=$ROOT/fuzz
ALL_TARGETS=(bzimage cli virtio_pci chain devices api vhost_user)

usage() {
    cat <<'EOF'
Usage: scripts/fuzz.sh [--smoke | --time SECS] [--keep-going] [TARGET...]

Fuzzes kickvm's targets one after another (one fuzzer process at a time),
each for SECS seconds (default 600), and says per target: execs, exec/s,
coverage (libFuzzer's cov: edges and ft: features), peak RSS, and whether
it found anything. Exits non-zero if any target crashed, hung for more
than 1 s (-timeout=1) or went over 1024 MB (-rss_limit_mb=1024), naming
the input that did it (fuzz/artifacts/<target>/crash-*, timeout-*, oom-*).

Targets (all when none is named; code in fuzz/src/, one per module):
  bzimage     the kernel loader: a structured bzImage setup header, the
              checks `kickvm run` makes before it starts (inspect_kernel,
              check_kernel_fits, check_cmdline, check_initrd_fits), then
              load_kernel, load_initrd, write_boot_structures      (bz.rs)
  cli         `kickvm run` argv through clap into a VmConfig and
              validate(), in a sandbox directory; every option parser (cli.rs)
  virtio_pci  the PCI root (0xCF8/0xCFC, ECAM) and virtio-pci transport
              (BAR0: common cfg, ISR, device cfg, notify, MSI-X table and
              PBA, the PCI_CFG window) with virtio-blk, -console and -rng
              and their queue threads behind; every access width 1..8, any
              offset, resets and DRIVER_OK in any order; checks that
              teardown stops every thread and closes every fd     (vpci.rs)
  chain       the descriptor chain walker (chain::walk) over arbitrary
              memory layouts, descriptor and indirect tables, queue sizes
              1..256, INDIRECT_DESC on/off; checked against a reference
              walk, with GuestIovecs operations on the result    (chain.rs)
  devices     virtio-blk, -net (TAP kvfuzz0, when root), -console and
              -rng request handling, served inline (no threads), with
              resets and re-activations between requests; each run ends
              with a valid request served after a reset        (devices.rs)
  api         bytes a client writes to `kickvm --api-socket`, in reads
              of any size, through the HTTP framing into the VMM: routes,
              Cloud Hypervisor's JSON shapes, VmConfig, validate(), the
              VM's states (boot fails: KVM is /dev/null); every error one
              line                                                (api.rs)
  vhost_user  a vhost-user back-end (kickvm_vhost::serve_with) fed
              structured and raw frontend messages with real fds (memfds,
              eventfds, pipes) over a socket; checks the device comes back,
              threads and fds are released, the next frontend is
              answered                                      (vhost_user.rs)

Options:
  --smoke       A few seconds per target from the seeds (CI: scripts/test.sh),
                plus `cargo test` of the fuzz crate (every seed decodes to
                the structure it was written from and runs clean).
  --time SECS   Fuzz each target for SECS seconds.
  --keep-going  Do not stop at the first crash: libFuzzer's -fork=1 with
                -ignore_crashes/-ignore_timeouts/-ignore_ooms; every input
                found is listed at the end (still exits non-zero).
  -h, --help    This text.

Every run first replays fuzz/regressions/<target>/* (minimized inputs of
bugs found before); those listed in fuzz/regressions/OPEN are expected to
fail until their bug is fixed (reported, not fatal; remove the line when
it passes). Fixed regressions also join the seeds.

Inputs and corpora:
  fuzz/seeds/<target>/        committed seeds, written from fuzz/src/seeds.rs
                              (KICKVM_FUZZ_WRITE_SEEDS=1 cargo +nightly test
                              --manifest-path fuzz/Cargo.toml write_seeds)
  fuzz/corpus/<target>/       working corpus (not in git), grows across runs
  fuzz/artifacts/<target>/    what libFuzzer found (not in git)

By hand, with the same build (release, debug assertions, ASan):
  cd fuzz && cargo +nightly fuzz run -a virtio_pci corpus/virtio_pci -- -timeout=1
  cargo +nightly fuzz run -a virtio_pci artifacts/virtio_pci/crash-...   # reproduce
  cargo +nightly fuzz tmin -a virtio_pci artifacts/virtio_pci/crash-...  # minimize
  cargo +nightly fuzz fmt virtio_pci artifacts/virtio_pci/crash-...      # decode
Environment: KICKVM_FUZZ_LOG=1 prints the log lines a run causes;
KICKVM_FUZZ_LOG_LIMIT=N (default 64) is how many lines one call site may
log in one run before it counts as a log flood; KICKVM_FUZZ_LOG_IGNORE=a,b
leaves call sites whose file:line contains a or b out of that check (to
fuzz on past a known flood); KICKVM_FUZZ_TIMING=1 (virtio_pci) prints how
long each reset and teardown took.

Needs the nightly toolchain (rustup toolchain install nightly) and
cargo-fuzz (installed here with `cargo install cargo-fuzz --locked` if
missing). Without nightly, this prints why and exits 0.
EOF
}

SECS=600
SMOKE=0
KEEP_GOING=0
TARGETS=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --smoke) SMOKE=1; SECS=5; shift ;;
        --time)
            [ $# -ge 2 ] && [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -gt 0 ] || { echo "fuzz: --time needs a number of seconds" >&2; exit 2; }
            SECS=$2; shift 2 ;;
        --keep-going) KEEP_GOING=1; shift ;;
        -*) echo "fuzz: unknown option $1 (see --help)" >&2; exit 2 ;;
        *)
            if [[ ! " ${ALL_TARGETS[*]} " == *" $1 "* ]]; then
                echo "fuzz: no target named $1; targets: ${ALL_TARGETS[*]}" >&2
                exit 2
            fi
            TARGETS+=("$1"); shift ;;
    esac
done
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")

say() { echo "fuzz: $*" >&2; }

if ! cargo +nightly --version >/dev/null 2>&1; then
    say "SKIPPED: no nightly Rust toolchain (cargo-fuzz needs it for -Zsanitizer);"
    say "         install it with: rustup toolchain install nightly"
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked
fi

# Release, with debug assertions and overflow checks (-a): an arithmetic
# overflow on a guest value is a crash, as in a debug build.
say "building (cargo +nightly fuzz build -a)"
(cd "$FUZZ" && cargo +nightly fuzz build -a)
HOST=$(rustc +nightly -vV | sed -n 's/^host: //p')
BIN=$FUZZ/target/$HOST/release

if [ "$SMOKE" = 1 ]; then
    say "checking the seeds (cargo +nightly test in fuzz/)"
    (cd "$FUZZ" && cargo +nightly test --lib -q)
fi

# Per target: the largest input libFuzzer makes.
max_len() {
    case "$1" in
        virtio_pci) echo 16384 ;;
        bzimage) echo 8192 ;;
        devices) echo 8192 ;;
        *) echo 4096 ;;
    esac
}

is_open() { # regression file (relative to fuzz/regressions) listed in OPEN?
    [ -f "$FUZZ/regressions/OPEN" ] && grep -qxF "$1" <(sed 's/[[:space:]]*#.*//; /^$/d' "$FUZZ/regressions/OPEN")
}

# What an input does, in one line: the panic or sanitizer report of a
# replay (up to 3 tries: some findings depend on timing).
cause() {
    local out
    for _ in 1 2 3; do
        out=$("$1" -timeout=1 -rss_limit_mb=1024 "$2" 2>&1 || true)
        if grep -qaE "panicked at|ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer)" <<<"$out"; then
            { grep -aE -A1 "panicked at" <<<"$out" | sed -n 2p; grep -aoE "ERROR: (libFuzzer|AddressSanitizer|LeakSanitizer): .*" <<<"$out" | head -1; } \
                | head -1 | cut -c1-240
            return
        fi
    done
    echo "did not reproduce in 3 replays (timing-dependent; see the fuzzer log)"
}

FAILED=()
SUMMARY=()
for t in "${TARGETS[@]}"; do
    bin=$BIN/$t
    corpus=$FUZZ/corpus/$t
    artifacts=$FUZZ/artifacts/$t
    mkdir -p "$corpus" "$artifacts"
    log=$FUZZ/artifacts/$t.log

    # Regressions: each reproducer once.
    if [ -d "$FUZZ/regressions/$t" ]; then
        for r in "$FUZZ/regressions/$t"/*; do
            [ -f "$r" ] || continue
            rel=${r#"$FUZZ/regressions/"}
            if "$bin" -timeout=1 -rss_limit_mb=1024 "$r" >"$log" 2>&1; then
                if is_open "$rel"; then
                    say "$t: regression $rel PASSES now: its bug is fixed; remove it from fuzz/regressions/OPEN"
                else
                    cp "$r" "$corpus/"
                fi
            elif is_open "$rel"; then
                say "$t: regression $rel still fails (open bug, listed in fuzz/regressions/OPEN)"
            else
                say "$t: REGRESSION fuzz/regressions/$rel fails again:"
                grep -E "panicked|ERROR: libFuzzer|SUMMARY" "$log" | head -5 >&2 || true
                FAILED+=("$t: regression $rel (log: $log)")
            fi
        done
    fi

    cp "$FUZZ/seeds/$t"/* "$corpus/" 2>/dev/null || true
    flags=(-timeout=1 -rss_limit_mb=1024 -max_total_time="$SECS" -max_len="$(max_len "$t")"
           -print_final_stats=1 -artifact_prefix="$artifacts/")
    [ "$SMOKE" = 1 ] && flags+=(-seed=1)
    [ "$KEEP_GOING" = 1 ] && flags+=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
    say "$t: fuzzing for ${SECS}s (log: ${log#"$ROOT/"})"
    before=$(ls "$artifacts" | sort)
    set +e
    "$bin" "${flags[@]}" "$corpus" >"$log" 2>&1
    rc=$?
    set -e
    found=$(comm -13 <(echo "$before") <(ls "$artifacts" | sort) | grep -E '^(crash|timeout|oom|leak|slow-unit)-' || true)

    fstat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
    execs=$(fstat number_of_executed_units)
    eps=$(fstat average_exec_per_sec)
    rss=$(fstat peak_rss_mb)
    last=$(grep -aE '^#[0-9]+' "$log" | grep -a 'cov:' | tail -1 || true)
    [ -n "$execs" ] || execs=$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$last")
    [ -n "$rss" ] || rss=$(sed -nE 's/.*rss: ([0-9]+)Mb.*/\1/p' <<<"$last")
    cov=$(sed -nE 's/.*cov: ([0-9]+).*/\1/p' <<<"$last")
    ft=$(sed -nE 's/.*ft: ([0-9]+).*/\1/p' <<<"$last")
    corp=$(sed -nE 's/.*corp: ([0-9]+).*/\1/p' <<<"$last")
    # -fork=1 prints no final stats: the average from the last line's count.
    [ -n "$eps" ] || { [ -n "$execs" ] && eps=$((execs / SECS)); }

    result=ok
    if [ $rc -ne 0 ] || [ -n "$found" ]; then
        result=FAILED
        kind=$(grep -aoE 'ERROR: libFuzzer: [a-z -]+|ERROR: AddressSanitizer: [a-z-]+' "$log" | head -1)
        say "$t: $kind (exit $rc)"
        grep -aE "panicked at|^thread '.*' .*panicked" -A2 "$log" | head -6 >&2 || true
        for a in $found; do
            why=$(cause "$bin" "$artifacts/$a")
            say "$t: found fuzz/artifacts/$t/$a: $why"
            FAILED+=("$t: fuzz/artifacts/$t/$a: $why")
        done
        [ -n "$found" ] || FAILED+=("$t: exit $rc, see $log")
    fi
    SUMMARY+=("$(printf '%-11s %-7s %6ss %11s %8s %6s %7s %6s %7s' "$t" "$result" "$SECS" \
        "${execs:-?}" "${eps:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "${rss:-?} MB")")
done

echo
printf '%-11s %-7s %7s %11s %8s %6s %7s %6s %7s\n' target result time execs exec/s cov ft corpus "peak RSS"
for l in "${SUMMARY[@]}"; do echo "$l"; done
if [ ${#FAILED[@]} -gt 0 ]; then
    echo
    echo "fuzz: FAILED:"
    for f in "${FAILED[@]}"; do echo "  $f"; done
    echo "Reproduce: cd fuzz && cargo +nightly fuzz run -a TARGET ARTIFACT; minimize: cargo +nightly fuzz tmin -a TARGET ARTIFACT"
    exit 1
fi
