#!/usr/bin/env bash
# DPO from a judge's votes, measured on PubMedQA (issue 17 item 5).
#
# On a fresh temporary library, with the release CLI only:
#   1. import PubMedQA (train / valid / test as shipped in data/pubmedqa);
#   2. a brief SFT LoRA on the train split (the second policy candidate);
#   3. arena "policy": the base model (A) vs the SFT LoRA (B) on N_TRAIN train prompts;
#   4. the judge: the default model itself, constrained verdicts (each "Verdict: 1|2|tie|both
#      bad" scored by its log-prob, no generation), both orders (disagreements are ties);
#   5. DPO (LoRA on the base; the base with the adapter off is the reference) on the pairs
#      from the judge's votes only (`--votes judge`);
#   6. arena "held-out": the DPO adapter's starting point (the base, A) vs the DPO adapter (B)
#      on N_HELD test prompts, judged the same way: the judge's win rate of the DPO adapter
#      with its 95% Wilson interval, and the judge's position bias;
#   7. label accuracy (Final answer: yes|no|maybe) on N_HELD test rows, base vs DPO adapter.
# Everything lands in $OUT (default: a new temp dir): the library, each step's log, the JSON
# results and summary.md. Times are printed per phase (CPU user+sys and wall).
#
# Usage: scripts/measure-dpo-pubmedqa.sh [OUT_DIR]
# Env: ATTUNE_BIN (default target/release/attune), MODEL (default: the default model file),
#      DATA (default /work/shared/data/pubmedqa or $ATTUNE_PUBMEDQA), N_TRAIN=100, N_HELD=100,
#      MAX_TOKENS=64 (answers, also --max-new-tokens of the accuracy eval), SFT_STEPS=30,
#      DPO_STEPS=40, DPO_BETA=0.1, DPO_LR=2e-4, MAX_LEN=768.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${ATTUNE_BIN:-$ROOT/target/release/attune}"
MODEL="${MODEL:-$HOME/.local/share/attune/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
DATA="${DATA:-${ATTUNE_PUBMEDQA:-/work/shared/data/pubmedqa}}"
N_TRAIN="${N_TRAIN:-100}"
N_HELD="${N_HELD:-100}"
MAX_TOKENS="${MAX_TOKENS:-64}"
SFT_STEPS="${SFT_STEPS:-30}"
DPO_STEPS="${DPO_STEPS:-40}"
DPO_BETA="${DPO_BETA:-0.1}"
DPO_LR="${DPO_LR:-2e-4}"
MAX_LEN="${MAX_LEN:-768}"
OUT="${1:-$(mktemp -d -t attune-dpo-pubmedqa.XXXXXX)}"

for f in "$BIN" "$MODEL" "$DATA/train.jsonl" "$DATA/valid.jsonl" "$DATA/test.jsonl"; do
    [ -e "$f" ] || { echo "missing: $f (build with cargo build --release -p attune-cli; fetch the model with scripts/fetch-model.sh)" >&2; exit 2; }
done
mkdir -p "$OUT"
LIB="$OUT/library"
if [ -e "$LIB" ]; then echo "$LIB exists: give a new OUT_DIR" >&2; exit 2; fi
export ATTUNE_DATA_DIR="$LIB"
echo "output: $OUT"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //') ($(nproc) cores visible)"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "settings: N_TRAIN=$N_TRAIN N_HELD=$N_HELD MAX_TOKENS=$MAX_TOKENS SFT_STEPS=$SFT_STEPS DPO_STEPS=$DPO_STEPS DPO_BETA=$DPO_BETA DPO_LR=$DPO_LR MAX_LEN=$MAX_LEN"
} | tee "$OUT/env.txt"

# Runs one phase, its output in $OUT/NAME.log, and records its CPU and wall seconds.
phase() {
    local name="$1"
    shift
    echo "== $name: $*" >&2
    local t0
    t0=$(date +%s)
    /usr/bin/time -f "%U %S" -o "$OUT/$name.time" "$@" >"$OUT/$name.out" 2>"$OUT/$name.log" || {
        echo "phase $name failed; see $OUT/$name.log" >&2
        tail -20 "$OUT/$name.log" >&2
        exit 1
    }
    local t1
    t1=$(date +%s)
    read -r u s <"$OUT/$name.time"
    echo "$name wall_s=$((t1 - t0)) cpu_s=$(echo "$u + $s" | bc)" | tee -a "$OUT/times.txt" >&2
}

phase models "$BIN" models add "$MODEL"
# The fresh library's first model has id 1.
BASE=1
phase data "$BIN" data import "$DATA/train.jsonl" --name pubmedqa --valid "$DATA/valid.jsonl" --test "$DATA/test.jsonl" -y

# 2. The second candidate: a brief SFT LoRA.
phase sft "$BIN" train -m "$BASE" -d pubmedqa --method lora --name sft --steps "$SFT_STEPS" \
    --batch-size 2 --max-len "$MAX_LEN" --eval-limit 10 --forgetting-rows 0 --seed 1

SAMPLING=(--max-tokens "$MAX_TOKENS" --temperature 0 --repeat-penalty 1.1)
# 3.-4. Candidates on train prompts, the constrained judge in both orders.
phase arena1 "$BIN" arena create --a "$BASE" --b adapter:sft --dataset pubmedqa --split train \
    --limit "$N_TRAIN" --name policy "${SAMPLING[@]}" --json
A1=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$OUT/arena1.out")
phase judge1 "$BIN" arena judge "$A1" --judge-model "$BASE" --verdict constrained --both-orders --json
phase results1 "$BIN" arena results "$A1" --json

# 5. DPO from the judge's votes only.
phase dpo "$BIN" train -m "$BASE" --method dpo --arena "$A1" --votes judge --adapter lora \
    --name dpo-judge --steps "$DPO_STEPS" --batch-size 2 --beta "$DPO_BETA" --lr "$DPO_LR" \
    --max-len "$MAX_LEN" --eval-limit 10 --forgetting-rows 0 --seed 1

# 6. Held out: the DPO adapter against its starting point (the base), judged the same way.
phase arena2 "$BIN" arena create --a "$BASE" --b adapter:dpo-judge --dataset pubmedqa --split test \
    --limit "$N_HELD" --name held-out "${SAMPLING[@]}" --json
A2=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$OUT/arena2.out")
phase judge2 "$BIN" arena judge "$A2" --judge-model "$BASE" --verdict constrained --both-orders --json
phase results2 "$BIN" arena results "$A2" --json

# 7. Label accuracy on the test split, before and after.
phase eval_base "$BIN" eval -m "$BASE" -d pubmedqa --split test --limit "$N_HELD" --accuracy \
    --max-new-tokens "$MAX_TOKENS" --forgetting-rows 0 --json
phase eval_dpo "$BIN" eval -a dpo-judge -d pubmedqa --split test --limit "$N_HELD" --accuracy \
    --max-new-tokens "$MAX_TOKENS" --forgetting-rows 0 --json

python3 - "$OUT" <<'PY'
import json, math, sys
out = sys.argv[1]
def load(name):
    return json.load(open(f"{out}/{name}.out"))
def est(e):
    return "-" if e is None else f"{100*e['value']:.1f}% [{100*e['low']:.1f}, {100*e['high']:.1f}]"
def judge_of(r):
    js = [j for j in r["judges"] if j.get("verdict") == "constrained"]
    assert len(js) == 1, r["judges"]
    return js[0]
j1, j2 = load("judge1"), load("judge2")
r1, r2 = judge_of(load("results1")), judge_of(load("results2"))
e0, e1 = load("eval_base"), load("eval_dpo")
dpo_log = open(f"{out}/dpo.log").read()
pairs_line = next((l.strip() for l in dpo_log.splitlines() if "from arena" in l), "?")
set_line = next((l.strip() for l in dpo_log.splitlines() if l.startswith("preference set")), "?")
t1, t2 = r1["rates"]["tally"], r2["rates"]["tally"]
def acc(e):
    if e.get("accuracy") is None:
        return "-"
    n = e["n_labeled"]; k = round(e["accuracy"] * n)
    # Wilson 95%
    z = 1.959963984540054; p = k / n
    c = (p + z*z/(2*n)) / (1 + z*z/n); h = z*math.sqrt(p*(1-p)/n + z*z/(4*n*n)) / (1 + z*z/n)
    return f"{100*p:.1f}% ({k}/{n}) [{100*(c-h):.1f}, {100*(c+h):.1f}]"
lines = [
    f"judge: {r1['judge_label']}, constrained verdict, both orders, rubric v{r1['rubric_version']}",
    "",
    "| step | figure |",
    "|---|---|",
    f"| policy arena ({t1['a_wins']+t1['b_wins']+t1['ties']+t1['both_bad']} train prompts): base (A) vs SFT LoRA (B), judge votes | A {t1['a_wins']}, B {t1['b_wins']}, tie {t1['ties']}, both bad {t1['both_bad']}; B's win rate {est(r1['rates']['b'])} |",
    f"| position bias on the train prompts: the two orders disagreed | {j1['order_disagreements']} of {j1['judged']} prompts |",
    f"| DPO pairs from the judge's votes | {set_line} / {pairs_line} |",
    f"| held-out arena ({t2['a_wins']+t2['b_wins']+t2['ties']+t2['both_bad']} test prompts): base (A) vs DPO adapter (B), judge votes | A {t2['a_wins']}, B {t2['b_wins']}, tie {t2['ties']}, both bad {t2['both_bad']} |",
    f"| judge's win rate of the DPO adapter vs its starting point (tie = half) | {est(r2['rates']['b'])} |",
    f"| position bias on the test prompts: the two orders disagreed | {j2['order_disagreements']} of {j2['judged']} prompts |",
    f"| label accuracy, test split, base | {acc(e0)} |",
    f"| label accuracy, test split, DPO adapter | {acc(e1)} |",
    f"| mean NLL of the test answers, base / DPO | {e0['mean_nll']:.4f} / {e1['mean_nll']:.4f} |",
]
open(f"{out}/summary.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
echo
cat "$OUT/times.txt"
echo "library and logs: $OUT"
