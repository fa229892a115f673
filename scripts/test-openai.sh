#!/usr/bin/env bash
# The official `openai` Python client (from PyPI, in a venv cached under
# ~/.cache/attune-openai-venv) against `attune serve` on a fresh library: models,
# chat with and without streaming, an adapter and a template as the model, stop
# sequences, completions, 404/401/400 errors, and greedy output equal to
# `attune generate`. Needs the release build (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bin="${CARGO_TARGET_DIR:-$root/target}/release/attune"
[ -x "$bin" ] || { echo "test-openai: $bin is missing; run scripts/setup.sh" >&2; exit 1; }
venv="${ATTUNE_OPENAI_VENV:-$HOME/.cache/attune-openai-venv}"
if ! "$venv/bin/python" -c 'import openai' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'openai>=1.50,<3'
fi
model_file=$(scripts/fetch-model.sh | tail -n 1)
adapter="$root/../shared/reference/adapters/lora"
[ -d "$adapter" ] || { echo "test-openai: the reference adapter $adapter is missing" >&2; exit 1; }

work=$(mktemp -d)
server_pid=
cleanup() {
  status=$?
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
export ATTUNE_DATA_DIR="$work/data"
"$bin" models add "$model_file" >/dev/null
model=$("$bin" models list --json | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)[0]["name"])')
"$bin" adapters import "$adapter" --base 1 --name pubmed-lora >/dev/null
"$bin" templates add Brief --system "Answer in one short sentence." --user "Question: {{input}}" >/dev/null
prompt="What is the capital of France?"
greedy=$("$bin" generate --chat --json --temperature 0 --repeat-penalty 1 --top-k 0 --top-p 1 --min-p 0 \
  --max-tokens 24 "$prompt" | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["text"], end="")')

key="test-key-$RANDOM$RANDOM"
port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ATTUNE_API_KEY="$key" "$bin" serve --port "$port" >"$work/serve.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
  grep -q "serves the OpenAI API" "$work/serve.log" && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
  sleep 0.1
done
ATTUNE_BASE_URL="http://127.0.0.1:$port/v1" ATTUNE_API_KEY="$key" ATTUNE_MODEL="$model" \
  ATTUNE_GREEDY="$greedy" "$venv/bin/python" tests/openai/test_openai.py
