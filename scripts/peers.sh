#!/usr/bin/env bash
# Builds Firecracker and Cloud Hypervisor from their public sources, as
# benchmark peers for kickvm-vmm-bench. See --help.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: scripts/peers.sh [--paths]

Clones Firecracker, Cloud Hypervisor and their micro_http git dependency
into $KICKVM_CACHE/peers (default ~/.cache/kickvm/peers; never into this
repository), builds the `firecracker` and `cloud-hypervisor` binaries in
release and prints their paths, one a line:

  firecracker /…/peers/target-fc/release/firecracker
  cloud-hypervisor /…/peers/target-ch/release/cloud-hypervisor

kickvm-vmm-bench finds them there (or through the environment variables
FIRECRACKER and CLOUD_HYPERVISOR) for `--boot-vmm firecracker,cloud-hypervisor`
and `--ping-vmm firecracker,cloud-hypervisor`.

The builds are release builds with LTO off and 16 codegen units (both
projects ship LTO on): it saves many minutes on 2 cores and does not change
the VMMs' syscalls, thread layout or memory use; their code may be a few per
cent slower than the shipped binaries. Firecracker is built for the host's
GNU target (upstream ships musl), so it runs with its empty default seccomp
filter; its rust-toolchain.toml is removed in the build copy (it pins a
toolchain this machine may lack). micro_http is patched in by path.
Needs git, a Rust toolchain, libclang and libseccomp-dev (for Firecracker).
When scripts/ch-remote.sh has already built Cloud Hypervisor's workspace in
$KICKVM_CACHE/ch-remote, that checkout and target directory are reused.

Sources (cloned once, then reused; file:// URLs work):
  FC_GIT          Firecracker (default: its GitHub URL), FC_REF (default: main)
  CH_GIT          Cloud Hypervisor (default: its GitHub URL), CH_REF (default: main)
  MICRO_HTTP_GIT  micro-http (default: its GitHub URL)
  CARGO_FC        cargo command for Firecracker (default: cargo; it needs a
                  recent stable, e.g. CARGO_FC="cargo +nightly" when older)

  --paths   print the paths of the binaries already built (no cloning or
            building); exits 1 when one is missing
Build logs: $KICKVM_CACHE/peers/{fc,ch}-build.log.  Expect 10-20 minutes
per VMM on 2 busy cores.
EOF
}

say() { echo "peers: $*" >&2; }
CACHE=${KICKVM_CACHE:-$HOME/.cache/kickvm}
P=$CACHE/peers
MH_URL=https://github.com/firecracker-microvm/micro-http

# Cloud Hypervisor: ch-remote.sh's checkout and target when they exist.
if [ -d "$CACHE/ch-remote/cloud-hypervisor/.git" ] && [ ! -d "$P/cloud-hypervisor/.git" ]; then
    CH_SRC=$CACHE/ch-remote/cloud-hypervisor CH_TARGET=$CACHE/ch-remote/target MH_SRC=$CACHE/ch-remote/micro-http
else
    CH_SRC=$P/cloud-hypervisor CH_TARGET=$P/target-ch MH_SRC=$P/micro-http
fi
FC_SRC=$P/firecracker FC_TARGET=$P/target-fc
FC_BIN=$FC_TARGET/release/firecracker CH_BIN=$CH_TARGET/release/cloud-hypervisor

# A shallow clone first; a mirror that lacks some blobs (large test files)
# cannot serve one, so then a full clone (a local one is copied) whose work tree leaves out the
# files it has no contents for (sparse checkout), with a warning.
clone() { # url ref dir
    [ -d "$3/.git" ] && return 0
    say "cloning $1 into $3"
    git clone -q --depth 1 ${2:+-b "$2"} "$1" "$3" 2>/dev/null && return 0
    rm -rf "$3"
    # (a local repository is copied, not packed: pack-objects stops at a missing blob)
    git clone -q --no-checkout ${2:+-b "$2"} "${1#file://}" "$3"
    local missing
    missing=$(git -C "$3" ls-tree -r HEAD | while read -r _ type obj path; do
        [ "$type" = blob ] && ! git -C "$3" cat-file -e "$obj" 2>/dev/null && echo "$path"; done || true)
    if [ -n "$missing" ]; then
        say "warning: $1 lacks the contents of: $(echo "$missing" | tr '\n' ' ')(left out of the checkout)"
        git -C "$3" sparse-checkout set --no-cone '/*' $(echo "$missing" | sed 's|^|!/|')
    fi
    git -C "$3" checkout -q
}

build() { # name src target-dir log cargo...
    local name=$1 src=$2 tdir=$3 log=$4; shift 4
    say "building $name (release, LTO off; log: $log)"
    (cd "$src" && CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
        "$@" build --release --bin "$name" -p "$name" --target-dir "$tdir" \
        --config "patch.\"$MH_URL\".micro_http.path=\"$MH_SRC\"" >"$log" 2>&1) \
        || { tail -20 "$log" >&2; say "building $name failed (whole log: $log)"; exit 1; }
}

paths() {
    local rc=0
    for b in "firecracker $FC_BIN" "cloud-hypervisor $CH_BIN"; do
        if [ -x "${b#* }" ]; then echo "$b"; else say "${b%% *} is not built (run scripts/peers.sh)"; rc=1; fi
    done
    return $rc
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    --paths) paths; exit $? ;;
    "") ;;
    *) echo "peers.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
esac

command -v git >/dev/null || { echo "peers.sh: git is missing: install it (apt-get install git)" >&2; exit 1; }
# What Firecracker's build needs besides Rust: libclang (userfaultfd-sys
# runs bindgen) and libseccomp (its seccompiler links it).
exists() { for f in "$@"; do [ -e "$f" ] && return 0; done; return 1; }
if [ -z "${LIBCLANG_PATH:-}" ] && ! exists /usr/lib/llvm-*/lib/libclang.so* /usr/lib/*/libclang-*.so*; then
    echo "peers.sh: libclang is missing (Firecracker's build runs bindgen): apt-get install libclang-dev, or set LIBCLANG_PATH" >&2
    exit 1
fi
if ! exists /usr/lib/*/libseccomp.so /usr/lib/libseccomp.so /usr/local/lib/libseccomp.so; then
    echo "peers.sh: libseccomp is missing (Firecracker's build links it): apt-get install libseccomp-dev" >&2
    exit 1
fi
mkdir -p "$P"
clone "${MICRO_HTTP_GIT:-$MH_URL}" "" "$MH_SRC"
clone "${CH_GIT:-https://github.com/cloud-hypervisor/cloud-hypervisor}" "${CH_REF:-main}" "$CH_SRC"
clone "${FC_GIT:-https://github.com/firecracker-microvm/firecracker}" "${FC_REF:-main}" "$FC_SRC"
rm -f "$FC_SRC/rust-toolchain.toml"

build cloud-hypervisor "$CH_SRC" "$CH_TARGET" "$P/ch-build.log" cargo
# shellcheck disable=SC2086 # CARGO_FC is a command with arguments
build firecracker "$FC_SRC" "$FC_TARGET" "$P/fc-build.log" ${CARGO_FC:-cargo}
paths
