#!/usr/bin/env bash
# Builds every fuzz target and runs each for a bounded time (default 20 s;
# FUZZ_SECONDS overrides). cargo fuzz wants a nightly compiler for its
# sanitizer flags; RUSTC_BOOTSTRAP lets the stable one accept them.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
export RUSTC_BOOTSTRAP=1
seconds=${FUZZ_SECONDS:-20}
cargo fuzz build -O
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in $(cargo fuzz list); do
    echo "fuzz: $target for ${seconds}s"
    # New inputs go to corpus/<target> (ignored by git); the committed
    # seeds/<target>, where there are some, start the run on inputs that
    # reach past the formats' first checks.
    mkdir -p "corpus/$target"
    corpora=("corpus/$target")
    [ -d "seeds/$target" ] && corpora+=("seeds/$target")
    if ! cargo fuzz run -O "$target" "${corpora[@]}" -- -max_total_time="$seconds" >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz: $target FAILED (the crashing input is under fuzz/artifacts/$target)"
        exit 1
    fi
    grep -E "^Done" "$log"
done
