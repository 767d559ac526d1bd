#!/usr/bin/env bash
# Runs every kickvm test on a Debian machine: installs what the tests need
# (Debian packages via scripts/install-deps.sh), builds the workspace, and
# runs clippy, the unit, device (real TAP/file/pty), and end-to-end (real
# Linux guests, in the nested rig where the host's KVM cannot run one)
# tests, every fuzz target for a few seconds, and the README's first
# command from an empty cache.
#
# Downloaded packages and built guest images are cached under
# $KICKVM_CACHE (default ~/.cache/kickvm): a second run is offline.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
export KICKVM_CACHE="${KICKVM_CACHE:-$HOME/.cache/kickvm}"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

echo "test: building" >&2
cargo build --workspace --all-targets
echo "test: clippy (every unsafe block documented, no warnings)" >&2
cargo clippy --workspace --all-targets -- -D warnings
echo "test: running (end-to-end tests print the rig's stage timings)" >&2
cargo test --workspace
echo "test: fuzz targets, a few seconds each from their seeds (scripts/fuzz.sh --smoke)" >&2
scripts/fuzz.sh --smoke
echo "test: the README's first command from an empty cache (scripts/check-first-command.sh)" >&2
scripts/check-first-command.sh
