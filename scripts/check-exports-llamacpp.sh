#!/usr/bin/env bash
# Loads Attune's GGUF exports in llama.cpp and compares its greedy tokens with Attune's.
#
#   scripts/check-exports-llamacpp.sh [--keep DIR]
#
# Threads: ATTUNE_LLAMACPP_THREADS (default 1; llama.cpp's workers spin, which on a shared
# 2-core machine costs more than a second thread gives).
#
# llama.cpp is built from the pinned source (../shared/reference/LLAMACPP.md: the copy vendored
# in the PyPI sdist of llama-cpp-python 0.3.36, llama.cpp 0c1e57098), cached in
# ~/.cache/attune-llamacpp (ATTUNE_LLAMACPP_CACHE), never in the repository; about 10 minutes on
# 2 cores the first time. AMX tiles are disabled (-mno-amx-*): the native AMX backend crashes on
# the Xeons this project runs on.
#
# On the default model with the reference PEFT LoRA (../shared/reference/adapters/lora), in a
# temporary library, through the `attune` CLI:
#   1. the adapter merged, F16 GGUF          -> llama.cpp greedy == Attune greedy (required)
#   2. the base as F16 GGUF + the LoRA GGUF  -> llama.cpp (the adapter applied with the C API
#      that --lora uses) greedy == Attune greedy (required); `llama-completion --lora` prints
#      the same text
#   3. the adapter merged, Q8_0 and Q4_K_M   -> llama.cpp loads them; agreement reported
# Prompt ids from llama.cpp's own tokenizer must equal Attune's for every file. Exit 1 on any
# required difference.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export PATH="$HOME/.cargo/bin:$PATH"
cache=${ATTUNE_LLAMACPP_CACHE:-$HOME/.cache/attune-llamacpp}
keep=""
[ "${1:-}" = "--keep" ] && keep=${2:?--keep needs a folder}

step() { printf '\n==> %s\n' "$*"; }

# ---- llama.cpp, built once ----------------------------------------------------------------
if [ ! -x "$cache/build/bin/llama-completion" ] || [ ! -e "$cache/build/bin/libllama.so" ]; then
  step "Building llama.cpp (llama-cpp-python 0.3.36's vendored copy) in $cache"
  command -v cmake >/dev/null || { echo "cmake is missing: apt-get install cmake" >&2; exit 1; }
  mkdir -p "$cache/sdist"
  if [ ! -d "$cache/src" ]; then
    python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
      llama-cpp-python==0.3.36 -d "$cache/sdist"
    tmp=$(mktemp -d)
    tar xzf "$cache/sdist/llama_cpp_python-0.3.36.tar.gz" -C "$tmp"
    mv "$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp" "$cache/src"
    rm -rf "$tmp"
  fi
  flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake -S "$cache/src" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
    -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" >"$cache/cmake.log"
  cmake --build "$cache/build" -j2 --target llama llama-completion >"$cache/build.log"
fi
greedy=$cache/build/bin/attune-greedy
if [ ! -x "$greedy" ] || [ scripts/llamacpp/greedy.cpp -nt "$greedy" ]; then
  g++ -O2 -std=c++17 -I "$cache/src/include" -I "$cache/src/ggml/include" \
    scripts/llamacpp/greedy.cpp -o "$greedy" -L "$cache/build/bin" -lllama -lggml -lggml-base \
    -Wl,-rpath,"$cache/build/bin"
fi

# ---- Attune's exports ---------------------------------------------------------------------
step "Building the attune CLI"
cargo build --release -p attune-cli >/dev/null 2>&1 || cargo build --release -p attune-cli
attune="${CARGO_TARGET_DIR:-$root/target}/release/attune"
work=${keep:-$(mktemp -d)}
mkdir -p "$work"
[ -z "$keep" ] && trap 'rm -rf "$work"' EXIT
export ATTUNE_DATA_DIR=$work/data
model=$(scripts/fetch-model.sh | tail -n 1)
lora=$root/../shared/reference/adapters/lora
"$attune" models add "$model" >/dev/null
"$attune" adapters list | grep -q ref-lora || "$attune" adapters import "$lora" --base 1 --name ref-lora >/dev/null
export_json() { # NAME OUT ARGS... -> the record as JSON (kept from an earlier --keep run)
  local out=$2
  if [ -n "$keep" ] && [ -s "$out.json" ]; then return 0; fi
  rm -rf "$out"
  "$attune" export "$1" --out "$out" --json "${@:3}" >"$out.json"
}
step "Exporting with Attune"
export_json ref-lora "$work/merged-f16" --format gguf --quant f16
export_json 1 "$work/base-f16" --model --format gguf --quant f16
export_json ref-lora "$work/lora" --format gguf-lora
export_json ref-lora "$work/merged-q8_0" --format gguf --quant q8_0
export_json ref-lora "$work/merged-q4_k_m" --format gguf --quant q4_k_m
ls -l "$work"/*/*.gguf | awk '{ print "  " $5 "  " $9 }'

# ---- llama.cpp's answers --------------------------------------------------------------------
compare() { # LABEL REQUIRED RECORD.json MODEL [ADAPTER]
  python3 - "$@" "${ATTUNE_LLAMACPP_THREADS:-1}" "$greedy" <<'PY'
import json, subprocess, sys, tempfile
label, required, record, model, *rest = sys.argv[1:]
greedy = rest.pop()
threads = rest.pop()
adapter = rest[0] if rest else None
ref = json.load(open(record))["verification"]["reference"]
agree = total = 0
ids_ok = True
first = None
for i, r in enumerate(ref):
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(r["text"])
    cmd = [greedy, "-m", model, "-n", str(len(r["answer_ids"])), "-t", threads, "-f", f.name]
    if adapter:
        cmd += ["-l", adapter]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(f"FAIL {label}: llama.cpp failed on prompt {i+1}: {out.stderr.strip()[-500:]}")
        sys.exit(1)
    lines = dict(l.split(":", 1) for l in out.stdout.splitlines() if ":" in l)
    pids = [int(x) for x in lines["prompt_ids"].split()]
    ans = [int(x) for x in lines["answer"].split()]
    if pids != r["prompt_ids"]:
        ids_ok = False
    for k, (a, b) in enumerate(zip(r["answer_ids"], ans)):
        total += 1
        if a == b:
            agree += 1
        elif first is None:
            first = (i + 1, k + 1, a, b)
    if len(ans) != len(r["answer_ids"]):
        total += abs(len(ans) - len(r["answer_ids"]))
        if first is None:
            first = (i + 1, min(len(ans), len(r["answer_ids"])) + 1, "end", "end")
same = ids_ok and agree == total
detail = f"{agree}/{total} answer tokens the same as Attune's, prompt ids {'identical' if ids_ok else 'DIFFERENT'}"
if first:
    detail += f"; first difference: prompt {first[0]}, step {first[1]} (Attune {first[2]}, llama.cpp {first[3]})"
verdict = "ok  " if same else ("FAIL" if required == "required" else "note")
print(f"{verdict} {label}: {detail}")
sys.exit(0 if same or required != "required" else 1)
PY
}
step "llama.cpp ($(cd "$cache/src" && git describe --always 2>/dev/null || echo 0c1e57098)) greedy vs Attune greedy, $(python3 -c "import json; print(len(json.load(open('$work/merged-f16.json'))['verification']['reference']))") prompts"
status=0
compare "F16 GGUF (adapter merged)" required "$work/merged-f16.json" "$work"/merged-f16/*.gguf || status=1
compare "F16 base GGUF + LoRA GGUF" required "$work/lora.json" "$work"/base-f16/*.gguf "$work"/lora/*.gguf || status=1
compare "Q8_0 GGUF (adapter merged)" reported "$work/merged-q8_0.json" "$work"/merged-q8_0/*.gguf || true
compare "Q4_K_M GGUF (adapter merged)" reported "$work/merged-q4_k_m.json" "$work"/merged-q4_k_m/*.gguf || true

# `--lora` on llama.cpp's own command line prints what the C API gave.
first_prompt=$work/prompt1.txt
python3 -c "import json,sys; sys.stdout.write(json.load(open('$work/lora.json'))['verification']['reference'][0]['text'])" >"$first_prompt"
n=$(python3 -c "import json; print(len(json.load(open('$work/lora.json'))['verification']['reference'][0]['answer_ids']))")
cli_out=$work/llama-completion.txt
"$cache/build/bin/llama-completion" -m "$work"/base-f16/*.gguf --lora "$work"/lora/*.gguf \
  -f "$first_prompt" -n "$((n + 1))" --temp 0 -no-cnv --no-display-prompt --no-warmup \
  -t "${ATTUNE_LLAMACPP_THREADS:-1}" --simple-io >"$cli_out" 2>"$work/llama-completion.log"
"$greedy" -m "$work"/base-f16/*.gguf -l "$work"/lora/*.gguf -f "$first_prompt" -n "$n" \
  -t "${ATTUNE_LLAMACPP_THREADS:-1}" | sed -n 's/^text: //p' >"$work/c-api.txt"
if python3 - "$cli_out" "$work/c-api.txt" <<'PY'
import sys
cli = open(sys.argv[1], encoding="utf-8", errors="replace").read()
cli = cli.replace("[end of text]", "").strip()
api = open(sys.argv[2], encoding="utf-8", errors="replace").read().strip().replace("\\n", "\n")
# llama-completion counts its -n one short of the C API loop: it gets one token more, and what it
# prints must begin with the checked answer (or equal it, when the answer ended the turn).
same = cli.startswith(api) and len(api) > 0
print(("ok   llama-completion --lora prints the same answer: " if same else
       "FAIL llama-completion --lora printed something else:\n  --lora: ") + cli[:100].replace("\n", " ") + "...")
if not same:
    print("  C API : " + api[:100].replace("\n", " "))
sys.exit(0 if same else 1)
PY
then :; else status=1; fi
[ $status = 0 ] && echo "all required checks passed" || echo "some required checks FAILED"
exit $status
