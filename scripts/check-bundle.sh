#!/usr/bin/env bash
# The CPU round trip of a run bundle (issue 18): export a LoRA run of the default model on four
# short chat rows (the first rows of the engine's general-domain sample) for TRL, run the
# bundle's run.sh (accelerate launch, one CPU process, Python from PATH: the interpreter
# scripts/setup-trl.sh prints) for its 3 steps, compare its first-step loss with Attune's own
# first step on the same rows, import the adapter back (the run's charts from
# trainer_state.json) and evaluate it with Attune on the validation rows against TRL's own
# evaluation of it (same tolerance); then validate the bundle's Axolotl YAML with Axolotl's
# own config loader (scripts/check-axolotl-yaml.sh).
#
# Why the first step: the four rows are one batch (batch size 4), so both engines' first step
# sees the same rows whatever their shuffles, and LoRA's B starts at zero, so that loss is the
# base model's mean NLL over the assistant tokens (by Attune's mask rule, which train_trl.py
# applies): both sides compute it in f32 from the same dequantized GGUF (Attune with
# ATTUNE_MATMUL=f32). Tolerance 1e-3 absolute: the reference README's bound on a mean NLL
# computed in f32 by Attune and by PyTorch from the same weights. Later steps are not compared:
# lora_A's random init comes from each engine's own generator.
#
# Takes 1-3 minutes on 2 cores (most of it importing PyTorch and dequantizing the GGUF).
# Usage: scripts/check-bundle.sh [attune binary]   (default target/release/attune)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
attune=$(realpath "${1:-${CARGO_TARGET_DIR:-target}/release/attune}")
model=${ATTUNE_CHECK_MODEL:-$HOME/.local/share/attune/models/SmolLM2-135M-Instruct.Q4_1.gguf}
sample=crates/engine/assets/general_sample.jsonl
tolerance=1e-3
[ -x "$attune" ] || { echo "check-bundle: no attune binary at $attune (cargo build --release -p attune-cli)" >&2; exit 2; }
[ -f "$model" ] || { echo "check-bundle: the default model is missing: $model (scripts/fetch-model.sh)" >&2; exit 2; }
py=$(scripts/setup-trl.sh)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export ATTUNE_DATA_DIR=$work/library
head -n 4 "$sample" > "$work/train.jsonl"
sed -n 5,6p "$sample" > "$work/valid.jsonl"
"$attune" models add "$model" >/dev/null
"$attune" data import "$work/train.jsonl" --valid "$work/valid.jsonl" --name rt >/dev/null
common=(-m 1 -d rt --method lora --steps 3 --batch-size 4 --max-len 256 --warmup 1
        --forgetting-rows 0 --eval-limit 2 --checkpoint-every 0)

echo "== Attune's own run (f32), 3 steps" >&2
ATTUNE_MATMUL=f32 "$attune" train "${common[@]}" --name own >&2
own=$("$attune" runs show own --json | "$py" -c '
import json, sys
d = json.load(sys.stdin)
print(next(m["loss"] for m in d["metrics"] if m["kind"] == "train" and m["step"] == 1))')

echo "== export the same run for TRL" >&2
"$attune" train "${common[@]}" --name exported --create-only >&2
"$attune" runs export exported --engine trl --out "$work/bundle" >&2
for f in run.sh train_trl.py axolotl.yaml README.md bundle.json data/train.jsonl \
         chat_template.jinja deepspeed/zero3.json accelerate/fsdp.yaml slurm.sbatch; do
  [ -f "$work/bundle/$f" ] || { echo "check-bundle: the bundle has no $f" >&2; exit 1; }
done

echo "== run.sh: accelerate launch, one CPU process" >&2
started=$(date +%s)
PATH="$(dirname "$py"):$PATH" CUDA_VISIBLE_DEVICES="" "$work/bundle/run.sh" >&2
echo "run.sh took $(( $(date +%s) - started )) s" >&2
trl=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["first_loss"])' \
      "$work/bundle/output/attune_result.json")

echo "== import the result and evaluate it" >&2
"$attune" runs import-result exported "$work/bundle/output" >&2
"$attune" runs show exported --json > "$work/exported.json"
"$attune" eval --adapter exported -d rt --split valid --json > "$work/eval.json"

"$py" - "$own" "$trl" "$tolerance" "$work/exported.json" "$work/eval.json" \
      "$work/bundle/output/trainer_state.json" "$work/bundle/output/attune_result.json" <<'PY'
import json, math, sys
own, trl, tol = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
run = json.load(open(sys.argv[4]))
ev = json.load(open(sys.argv[5]))
state = json.load(open(sys.argv[6]))
result = json.load(open(sys.argv[7]))
diff = abs(own - trl)
print(f"first-step loss: Attune {own:.6f}, TRL {trl:.6f}, |diff| {diff:.2e} (tolerance {tol:g})")
ok = diff <= tol
train = [m for m in run["metrics"] if m["kind"] == "train"]
logged = [h for h in state["log_history"] if "loss" in h]
print(f"imported run: status {run['run']['status']}, step {run['run']['step']}, "
      f"{len(train)} training points, adapter {run['adapter']}")
if run["run"]["status"] != "completed" or run["adapter"] != "exported":
    print("FAIL: the run is not completed with its adapter"); ok = False
if [round(m["loss"], 6) for m in train] != [round(h["loss"], 6) for h in logged] or len(train) != 3:
    print("FAIL: the run's charts are not trainer_state.json's log_history"); ok = False
nll = ev["mean_nll"]
trl_eval = result["eval_loss"]
print(f"the imported adapter on the validation rows: Attune's mean NLL {nll:.6f}, "
      f"TRL's eval_loss {trl_eval:.6f}, |diff| {abs(nll - trl_eval):.2e} (tolerance {tol:g})")
if not (math.isfinite(nll) and abs(nll - trl_eval) <= tol):
    print("FAIL: Attune's evaluation of the imported adapter is not TRL's"); ok = False
sys.exit(0 if ok else 1)
PY

echo "== validate axolotl.yaml with Axolotl's config model" >&2
scripts/check-axolotl-yaml.sh "$py" "$work/bundle/axolotl.yaml"
echo "check-bundle: OK" >&2
