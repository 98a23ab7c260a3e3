#!/usr/bin/env bash
# Thin wrapper: run the peer comparison (see perf/README.md and `compare.py --help`).
set -euo pipefail
exec python3 "$(dirname "${BASH_SOURCE[0]}")/compare.py" "$@"
