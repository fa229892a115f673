#!/usr/bin/env bash
# Validates an Axolotl YAML (a run bundle's axolotl.yaml) with Axolotl's own config loader,
# `axolotl.utils.config.validate_config` (its pydantic schema and validators), on the CPU.
# Axolotl's full install wants CUDA builds (bitsandbytes, flash-attn, ...), so PyPI's
# axolotl wheel is installed without its dependencies into a cached folder beside the TRL
# environment, plus the two small packages its config modules import that the TRL environment
# lacks (pillow, addict); torch, transformers, peft, trl and pydantic come from that environment.
# Usage: scripts/check-axolotl-yaml.sh PYTHON FILE.yaml
set -euo pipefail
py=${1:?usage: check-axolotl-yaml.sh PYTHON FILE.yaml}
yaml_file=${2:?usage: check-axolotl-yaml.sh PYTHON FILE.yaml}
want='axolotl==0.18.0 pillow==11.0.0 addict==2.4.0'
site=${ATTUNE_AXOLOTL_SITE:-$HOME/.cache/attune-axolotl/0.18.0}
if [ ! -f "$site/.complete" ]; then
  rm -rf "$site"
  mkdir -p "$site"
  # shellcheck disable=SC2086
  "$py" -m pip install -q --disable-pip-version-check --no-deps --target "$site" $want >&2
  touch "$site/.complete"
fi
PYTHONPATH="$site" "$py" - "$yaml_file" <<'PY'
import sys
import yaml
from importlib.metadata import version
from axolotl.utils.config import validate_config
from axolotl.utils.dict import DictDefault

path = sys.argv[1]
with open(path, encoding="utf-8") as f:
    raw = yaml.safe_load(f)
cfg = validate_config(DictDefault(raw))
# Every key the YAML sets must survive validation (a misspelt key would be dropped or refused).
lost = [k for k in raw if k not in cfg]
if lost:
    sys.exit(f"{path}: Axolotl's config dropped {lost}")
print(f"{path}: valid for Axolotl {version('axolotl')} ({len(raw)} keys; adapter "
      f"{cfg.get('adapter')}, lora_r {cfg.get('lora_r')}, sequence_len {cfg.get('sequence_len')}, "
      f"lr_scheduler {cfg.get('lr_scheduler')})")
PY
