#!/usr/bin/env bash
# Runs every test tier that this machine can run; the others report
# themselves as skipped, with the reason. Ends with one summary line.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh
cargo fmt --all --check
(cd fuzz && cargo fmt --check)
cargo clippy --workspace --all-targets --quiet -- -D warnings

# The CLI tests (tests/tests/cli.rs) run the binaries as a user does:
# build them, in the test profile, next to the test executables.
cargo build --workspace --bins --quiet

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-targets --no-fail-fast 2>&1 | tee "$log" || status=$?

# Every parser of guest-controlled data, fuzzed for a bounded time.
./scripts/fuzz.sh || status=$?

# Sum every harness's "test result:" line ("ignored" = skipped here: tests
# that cannot run on this machine say why above).
awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i+1) ~ /^passed/) p += $i
            if ($(i+1) ~ /^failed/) f += $i
            if ($(i+1) ~ /^ignored/) s += $i
        }
     }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
