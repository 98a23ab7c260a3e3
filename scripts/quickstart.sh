#!/usr/bin/env bash
# Quick start: build the release binaries and run strata-perf on the embedded nodes
# (null-co, then a 1 GiB memory node), 4 KiB random reads, queue depth 32, 3 s, one job
# per CPU. Arguments replace those defaults for both runs (e.g. `-t 10 -q 1 -w randrw`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release -p strata-perf
if [ "$#" -eq 0 ]; then
    set -- -q 32 -o 4k -w randread -t 3
fi
for node in driver=null-co,size=1G driver=memory,size=1G; do
    printf '\n==== strata-perf --node %s %s ====\n' "$node" "$*"
    target/release/strata-perf --node "$node" "$@"
done
