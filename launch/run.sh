#!/usr/bin/env bash
# Quickstart on a fresh CPU machine: creates (or reuses) .venv, installs seft_scale, then
#   bash launch/run.sh main   -> the main job (see README)
#   bash launch/run.sh test   -> the whole test suite
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SEFT_VENV:-.venv}
stamp_src=$(cat pyproject.toml launch/constraints-cpu.txt | sha1sum | cut -c1-16)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.seft_installed" 2>/dev/null)" != "$stamp_src" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned: a later unpinned requirement would otherwise pull a CUDA build
  "$VENV/bin/python" -m pip install -q -c launch/constraints-cpu.txt torch
  DS_BUILD_OPS=0 "$VENV/bin/python" -m pip install -q -c launch/constraints-cpu.txt -e ".[dev]"
  echo "$stamp_src" > "$VENV/.seft_installed"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case "${1:-}" in
  main) shift; exec "$VENV/bin/python" launch/train.py --config configs/runs/demo.yaml --output-dir "${1:-out/demo-$(date +%Y%m%d-%H%M%S)}" ;;
  test) shift; exec "$VENV/bin/python" -m pytest -q tests "$@" ;;
  *) echo "usage: bash launch/run.sh {main [OUTPUT_DIR] | test [pytest args]}" >&2; exit 2 ;;
esac
