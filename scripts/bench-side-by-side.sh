#!/usr/bin/env bash
# Runs Attune's inference and training benches and the PyTorch reference harness
# (../shared/reference/harness) in one go, interleaved, and prints each figure beside
# PyTorch's best mode on this machine (float32 or bfloat16) with the ratio, the date
# and the CPU. About 20 minutes on 2 cores; measure on an otherwise idle machine.
#
# Usage: scripts/bench-side-by-side.sh
# The harness's virtualenv (PyTorch, transformers, PEFT: about 5 GB, once) and its copy
# of the model live in ~/.cache/attune-harness (ATTUNE_HARNESS_VENV,
# ATTUNE_HARNESS_MODELS), never in the repository. Results: target/bench-side-by-side/.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export PATH="$HOME/.cargo/bin:$PATH"
shared="${ATTUNE_SHARED:-$(dirname "$root")/shared}"
cache="$HOME/.cache/attune-harness"
export ATTUNE_HARNESS_VENV="${ATTUNE_HARNESS_VENV:-$cache/venv}"
models="${ATTUNE_HARNESS_MODELS:-$cache/models}"
export ATTUNE_HARNESS_MODEL="$models/smollm2-135m-instruct-q4_1.gguf"
export ATTUNE_SHARED="$shared"

if [ ! -f "$shared/reference/harness/setup.sh" ]; then
  echo "bench-side-by-side: no reference harness at $shared/reference/harness (set ATTUNE_SHARED)" >&2
  exit 1
fi
# Idempotent and cheap once done: pip sees its pins satisfied, the model is checked by sha256.
if [ ! -x "$ATTUNE_HARNESS_VENV/bin/python" ] || [ ! -f "$ATTUNE_HARNESS_MODEL" ]; then
  echo "==> Setting up the reference harness in $cache (PyTorch from PyPI: about 5 GB, once)"
  REFVENV="$ATTUNE_HARNESS_VENV" REFMODELS="$models" bash "$shared/reference/harness/setup.sh"
fi
scripts/fetch-model.sh >/dev/null
exec python3 scripts/bench_side_by_side.py "$@"
