#!/usr/bin/env bash
# How long graph changes pause I/O: runs strata-graph-churn (verify load from every
# reactor through a raw node, first quiet, then while the admin thread inserts, re-parents
# and removes raw filters and adds/deletes other nodes as fast as it can) on three
# backends: a RAM disk, null-co with 20 us latency (requests stay in flight), and an
# O_DIRECT file. Extra arguments go to every run (e.g. `-t 5 -q 32 -m 0`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release -p strata-perf --bin strata-graph-churn
dir="${STRATA_PERF_DIR:-/var/tmp}"
img="$dir/strata-drain-pause.img"
trap 'rm -f "$img"' EXIT
truncate -s 256M "$img"
for node in \
    driver=memory,size=256M \
    driver=null-co,size=1G,latency-ns=20000 \
    "driver=file,filename=$img,cache.direct=on"; do
    printf '\n==== --node %s %s ====\n' "$node" "$*"
    target/release/strata-graph-churn --node "$node" "$@"
done
