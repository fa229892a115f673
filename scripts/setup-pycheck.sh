#!/usr/bin/env bash
# The Python environment the export checks run in (scripts/check_exports.py, run by the engine's
# export tests): PyPI's gguf, transformers and torch (CPU inference), pinned to the versions of
# ../shared/reference/harness/setup.sh. Idempotent: an environment that already imports them is
# kept. Prints the interpreter's path last.
#
# ATTUNE_PYVENV chooses the folder (default ~/.cache/attune-harness/venv, the harness's own, so
# one environment serves both).
set -euo pipefail
venv=${ATTUNE_PYVENV:-$HOME/.cache/attune-harness/venv}
py=$venv/bin/python
if [ -x "$py" ] && "$py" -c "import gguf, torch, transformers, safetensors, jinja2" 2>/dev/null; then
  echo "python checks: $("$py" -c 'import gguf, torch, transformers; from importlib.metadata import version; print("gguf", version("gguf"), "| torch", torch.__version__, "| transformers", transformers.__version__)')" >&2
  echo "$py"
  exit 0
fi
if [ ! -x "$py" ]; then
  python3 -m venv "$venv" || {
    echo "setup-pycheck: cannot create a virtualenv at $venv (apt-get install python3-venv)" >&2
    exit 1
  }
fi
# torch from PyPI pulls its CUDA runtime wheels on Linux (about 4.5 GB); the CPU is what runs.
"$py" -m pip install -q --disable-pip-version-check \
  torch==2.15.0 transformers==5.24.0 gguf==0.19.0 safetensors==0.8.0 tokenizers==0.23.3 \
  numpy==2.4.6 Jinja2==3.1.6 >&2
"$py" -c "import gguf, torch, transformers" >&2
echo "$py"
