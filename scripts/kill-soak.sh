#!/usr/bin/env bash
# Kill soak: SIGKILLs a training run of the `attune` CLI at random moments (during steps,
# checkpoint writes and evaluation), resumes it each time with `attune runs resume`, and checks
# that the loss curve of the killed-and-resumed run is the curve of the same run left alone,
# step for step, and that the library passes `PRAGMA integrity_check` after every kill.
#
# The run: a LoRA run (r 32 on every projection, so a checkpoint write takes long enough to
# be hit) of the default model on the PubMedQA sample in tests/data, 2 rows of 64 tokens a
# step with the loss on every token, a checkpoint every 3 steps, an evaluation on 4 rows every 10.
#
# Usage: scripts/kill-soak.sh [kills] [seed]   (defaults: 50 kills, seed from the clock)
# Needs scripts/setup.sh (or at least the default model) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export PATH="$HOME/.cargo/bin:$PATH"
kills="${1:-50}"
seed="${2:-$(date +%s)}"
RANDOM=$((seed % 32768))
steps=120
eval_every=10

scripts/fetch-model.sh >/dev/null
cargo build --release -p attune-cli 2>&1 | tail -1
attune="${CARGO_TARGET_DIR:-$root/target}/release/attune"
model="${ATTUNE_TEST_MODEL:-${ATTUNE_DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/attune}/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
work=$(mktemp -d)
child=""
cleanup() {
  if [ -n "$child" ] && kill -0 "$child" 2>/dev/null; then kill -9 "$child" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
export ATTUNE_DATA_DIR="$work/data"
a() { "$attune" "$@"; }

a models add "$model" >/dev/null
a data import tests/data/pubmedqa-sample.jsonl --name soak >/dev/null
train_args=(--model 1 --data soak --method lora --lora-r 32 --steps "$steps" --batch-size 2
  --max-len 64 --checkpoint-every 3 --eval-every "$eval_every" --eval-limit 4
  --loss-on all --forgetting-rows 0 --seed 7)

integrity() {
  python3 - "$ATTUNE_DATA_DIR/library.sqlite3" <<'PY'
import sqlite3, sys
print(sqlite3.connect(sys.argv[1]).execute("PRAGMA integrity_check").fetchone()[0])
PY
}

echo "kill soak: $kills kills, seed $seed, $steps steps"
start=$(date +%s)
a train "${train_args[@]}" --name straight >"$work/straight.log" 2>&1
echo "uninterrupted run: $(( $(date +%s) - start )) s"

# The soak run: start it, kill it at a random moment, resume, again.
declare -A phase
done_kills=0
early=0
status=""
# The run is created by `attune train`; a kill before it was created starts it again.
next_cmd() {
  if a runs show soak --json >/dev/null 2>&1; then
    cmd=(runs resume soak)
  else
    cmd=(train "${train_args[@]}" --name soak)
  fi
}
while [ "$done_kills" -lt "$kills" ]; do
  out="$work/segment-$done_kills.log"
  next_cmd
  "$attune" "${cmd[@]}" >"$out" 2>&1 &
  child=$!
  # One kill in ten lands while the model loads (0 to 2 s after the start); the others 0.2
  # to 6 s after training (re)started: during steps, checkpoint writes and evaluations.
  if [ $((RANDOM % 10)) -ne 0 ]; then
    for _ in $(seq 600); do
      grep -q 'training from step' "$out" 2>/dev/null && break
      kill -0 "$child" 2>/dev/null || break
      sleep 0.1
    done
    delay=$(awk -v r="$RANDOM" 'BEGIN { printf "%.2f", 0.2 + 5.8 * r / 32767 }')
  else
    delay=$(awk -v r="$RANDOM" 'BEGIN { printf "%.2f", 2.0 * r / 32767 }')
  fi
  sleep "$delay"
  if ! kill -0 "$child" 2>/dev/null; then
    wait "$child" || true
    child=""
    status=$(a runs show soak --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["run"]["status"])')
    if [ "$status" = "completed" ]; then
      echo "the run completed after $done_kills kills; more steps are needed for $kills"
      break
    fi
    early=$((early + 1))
    if [ "$early" -gt 3 ]; then
      echo "the run keeps stopping by itself (status $status):" >&2
      cat "$out" >&2
      exit 1
    fi
    continue
  fi
  kill -9 "$child"
  wait "$child" 2>/dev/null || true
  child=""
  # What the run was doing: a temporary checkpoint folder means a checkpoint write; a step
  # at an evaluation boundary with no eval line after it means an evaluation.
  run_dir=$(a runs show soak --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["run"]["run_dir"])')
  last=$(grep -E '^(step|eval|checkpoint) ' "$out" | tail -1 || true)
  if ls -d "$run_dir"/checkpoints/.tmp-* >/dev/null 2>&1; then
    p="checkpoint-write"
  elif [ -z "$last" ] && ! grep -q 'training from step' "$out"; then
    p="loading"
  elif [[ "$last" =~ ^step\ ([0-9]+)/ ]] && [ $(( BASH_REMATCH[1] % eval_every )) -eq 0 ]; then
    p="evaluation"
  else
    p="step"
  fi
  phase[$p]=$(( ${phase[$p]:-0} + 1 ))
  check=$(integrity)
  if [ "$check" != "ok" ]; then
    echo "kill $done_kills ($p): integrity_check says: $check" >&2
    exit 1
  fi
  done_kills=$((done_kills + 1))
done
# Let it finish.
a runs resume soak >"$work/final.log" 2>&1 || {
  cat "$work/final.log" >&2
  exit 1
}

python3 - "$ATTUNE_DATA_DIR" "$attune" <<'PY'
import json, subprocess, sys
attune = sys.argv[2]
def losses(name):
    d = json.loads(subprocess.check_output([attune, "runs", "show", name, "--json"]))
    assert d["run"]["status"] == "completed", d["run"]["status"]
    return {m["step"]: m["loss"] for m in d["metrics"] if m["kind"] == "train"}, \
           {m["step"]: m["loss"] for m in d["metrics"] if m["kind"] == "eval"}
(st, se), (kt, ke) = losses("straight"), losses("soak")
assert sorted(st) == sorted(kt), f"steps differ: {sorted(set(st) ^ set(kt))}"
diff = max(abs(st[s] - kt[s]) for s in st)
exact = sum(st[s] == kt[s] for s in st)
ediff = max((abs(se[s] - ke[s]) for s in se if s in ke), default=0.0)
print(f"train loss: {len(st)} steps, {exact} bit-identical, max |difference| {diff:.3g}")
print(f"eval loss: {len(se)} evaluations, max |difference| {ediff:.3g}")
if diff > 1e-5 or ediff > 1e-5:
    sys.exit("the resumed loss curve differs from the uninterrupted one")
PY
final=$(integrity)
echo "kills by phase: $(for k in "${!phase[@]}"; do printf '%s %s, ' "$k" "${phase[$k]}"; done)"
echo "integrity_check after every kill and at the end: $final"
echo "total time: $(( $(date +%s) - start )) s"
[ "$final" = "ok" ]
