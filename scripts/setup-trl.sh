#!/usr/bin/env bash
# The Python environment of the checks against TRL (preference-training parity, the exported
# TRL bundle's CPU round trip): the export checks' environment (scripts/setup-pycheck.sh, by
# default the reference harness's own venv) plus PyPI's trl, accelerate, peft and datasets,
# pinned so that none of the harness's pins moves. Idempotent and cached between runs: an
# environment that already imports them is kept. Prints the interpreter's path last.
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(scripts/setup-pycheck.sh)
want='trl==1.16.0 accelerate==1.15.0 peft==0.21.2 datasets==5.2.0'
if "$py" - <<'PY' 2>/dev/null; then
from importlib.metadata import version
import sys
need = {"trl": "1.16.0", "accelerate": "1.15.0", "peft": "0.21.2", "datasets": "5.2.0"}
sys.exit(0 if all(version(k) == v for k, v in need.items()) else 1)
PY
  echo "$py"
  exit 0
fi
# shellcheck disable=SC2086
"$py" -m pip install -q --disable-pip-version-check $want >&2
"$py" -c "import trl, accelerate, peft, datasets; print('trl', trl.__version__, '| accelerate', accelerate.__version__, '| peft', peft.__version__)" >&2
echo "$py"
