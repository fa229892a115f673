#!/usr/bin/env bash
# Fuzzes every reader of untrusted input for a set time per target, then reports the
# executions and failures of each. The targets are property tests on stable Rust with a seeded
# mutation harness (attune_models::fuzz), over the committed seed corpora in
# models/fuzz/corpus/ and crates/engine/fuzz/corpus/; `cargo test` runs them for 2 s each.
#
# Usage: scripts/fuzz.sh [seconds-per-target]   (default 60)
# Exit status: 0 when no target crashed or hung. Failing inputs go to target/fuzz-failures/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
secs="${1:-60}"
case "$secs" in
  '' | *[!0-9.]*)
    echo "fuzz: seconds-per-target must be a number, got '$secs'" >&2
    exit 2
    ;;
esac
export ATTUNE_FUZZ_SECS="$secs"
log=$(mktemp)
trap 'rm -f "$log" "$log.reports"' EXIT

status=0
# One test thread: each target gets the whole budget on its own.
run() {
  if ! cargo test --release "$@" -- --nocapture --test-threads 1 >>"$log" 2>&1; then
    status=1
  fi
  # With --nocapture a report shares its line with libtest's "test NAME ... ".
  sed -n -e 's/.*\(fuzz [a-z_]*: [0-9]* execs.*\)/\1/p' -e '/panicked\|^test .* FAILED/p' \
    "$log" | tail -n +$((shown + 1)) | tee -a "$log.reports"
  shown=$(wc -l <"$log.reports")
}
: >"$log.reports"
shown=0
run -p attune-models --test fuzz
run -p attune-engine --lib datasets::fuzz

echo
echo "== fuzz summary (${secs} s per target) =="
awk '/^fuzz / {
  execs += $3; crashes += $(NF-3); hangs += $(NF-1); n++
  printf "  %-16s %12s execs  %s crashes  %s hangs\n", $2, $3, $(NF-3), $(NF-1)
}
END { printf "  %d targets, %d execs, %d crashes, %d hangs\n", n, execs, crashes, hangs }' "$log.reports"
if grep -qE '^fuzz .* [1-9][0-9]* (crashes|hangs)' "$log.reports"; then
  status=1
fi
exit "$status"
