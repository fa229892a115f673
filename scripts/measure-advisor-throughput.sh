#!/usr/bin/env bash
# The advisor's fallback throughputs (crates/engine/src/advisor.rs): real `attune train` runs of
# the default model with the advisor's preset (batch 4, PubMedQA rows up to 1024 tokens, loss on
# the answers) in a temporary library, one per method; prints the median tok/s of steps 2..N,
# the figure the advisor's "measured" path takes from a completed run. ~2 min on 2 cores.
# Usage: scripts/measure-advisor-throughput.sh [steps]   (default 10; release build)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
steps="${1:-10}"
shared="${ATTUNE_SHARED:-$(dirname "$(pwd)")/shared}"
model=$(scripts/fetch-model.sh | tail -n 1)
cargo build --release -q -p attune-cli
attune=target/release/attune
lib=$(mktemp -d)
trap 'rm -rf "$lib"' EXIT
"$attune" --data-dir "$lib" models add "$model" >/dev/null
"$attune" --data-dir "$lib" data import "$shared/data/pubmedqa/train.jsonl" --name pubmedqa --yes >/dev/null
echo "advisor preset, $steps steps, $(nproc) threads, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for m in lora prompt full; do
  "$attune" --data-dir "$lib" train --model 1 --data pubmedqa --method "$m" --steps "$steps" \
    --eval-limit 2 --forgetting-rows 0 --name "$m-throughput" >"$lib/$m.log" 2>&1 \
    || { cat "$lib/$m.log" >&2; exit 1; }
  python3 - "$lib/$m.log" "$m" <<'PY'
import re, statistics, sys
rates = [float(x) for x in re.findall(r"(\d+) tok/s", open(sys.argv[1]).read())]
if len(rates) < 2:
    sys.exit(f"{sys.argv[2]}: fewer than 2 steps reported a speed")
print(f"{sys.argv[2]:7s} median of steps 2..{len(rates)}: {statistics.median(rates[1:]):.0f} tok/s  (every step: {[round(r) for r in rates]})")
PY
done
