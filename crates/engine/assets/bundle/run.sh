#!/usr/bin/env bash
# Attune run bundle: train this run on this machine with @ENGINE_NAME@, launched by
# `accelerate launch`: one process per GPU when there are GPUs, one process on the CPU when
# there are none. Python is the one on PATH (or $PYTHON). The result lands in output/.
# Extra arguments go to the training script (train_trl.py --help), e.g. --stop-after 3.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-$(command -v python3 || command -v python || true)}
if [ -z "$PY" ]; then
  echo "run.sh: no python3 on PATH (set PYTHON=/path/to/python)" >&2
  exit 2
fi
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$gpus" -gt 0 ]; then
  launch=(--num_processes "$gpus" --num_machines 1 --mixed_precision bf16 --dynamo_backend no)
  if [ "$gpus" -gt 1 ]; then launch+=(--multi_gpu); fi
  echo "run.sh: $gpus GPU(s), one process each" >&2
else
  launch=(--cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
  echo "run.sh: no GPU, one process on the CPU" >&2
fi
mkdir -p output
@LAUNCH@
