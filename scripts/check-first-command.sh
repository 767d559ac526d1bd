#!/usr/bin/env bash
# Runs the README's first command (scripts/boot.sh) the way a newcomer
# meets it: with an empty cache, so the guest image (and, on a kvm_pvm
# host, the rig's own image) is built by the command itself. Downloaded
# Debian packages may be reused from the usual cache, to spare the mirror.
# Passes when the demo guest says hello and powers off.
set -euo pipefail
cd "$(dirname "$0")/.."

usual="${KICKVM_CACHE:-$HOME/.cache/kickvm}"
fresh="$(mktemp -d /tmp/kickvm-first-command.XXXXXX)"
trap 'rm -rf "$fresh"' EXIT
if [ -d "$usual/debs" ]; then
    ln -s "$(cd "$usual/debs" && pwd)" "$fresh/debs"
fi
echo "first-command: scripts/boot.sh with an empty cache ($fresh)" >&2
out="$fresh/boot.out"
KICKVM_CACHE="$fresh" scripts/boot.sh 2>&1 | tee "$out"
grep -q "Hello from Linux" "$out" || { echo "first-command: FAILED: the guest never said hello" >&2; exit 1; }
for part in images; do
    [ -d "$fresh/$part" ] || { echo "first-command: FAILED: nothing was built in $fresh/$part" >&2; exit 1; }
done
echo "first-command: ok: the guest image was built from an empty cache and booted" >&2
