#!/usr/bin/env bash
# The 10-minute soak: scripts/reliability.sh soak [SECS] (see its --help).
exec "$(dirname "$0")/reliability.sh" soak "$@"
