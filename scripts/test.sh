#!/usr/bin/env bash
# The one test command: dependencies, format, lints, release build, tests.
# Exits non-zero on the first failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

section() { printf '\n==== %s ====\n' "$*"; }

section "install dependencies"
bash scripts/install-deps.sh

section "cargo fmt --check"
cargo fmt --all -- --check

section "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

section "cargo build --release"
cargo build --workspace --release

# Release: the end-to-end tests start the real release binaries (stratad, strata-img,
# strata-perf) and run benchmark-style smoke tests whose timing would be meaningless in
# a debug build; building once in release also shares artifacts with the step above.
section "cargo test --release"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --release 2>&1 | tee "$log"

# One closing line over every test binary and doc-test run: cargo's last summary line is
# often a crate's doc-tests ("0 passed"), which alone would read as "ran no test".
awk '/^test result:/ {
        for (i = 2; i <= NF; i++) {
            if ($i == "passed;") p += $(i - 1)
            if ($i == "failed;") f += $(i - 1)
            if ($i == "ignored;") s += $(i - 1)
        }
    }
    END {
        line = sprintf("total: %d passed, %d failed", p, f)
        if (s) line = line sprintf(", %d skipped", s)
        print ""
        print line
    }' "$log"
