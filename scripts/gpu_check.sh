#!/usr/bin/env bash
# The QLoRA training step at the Mistral-7B shape on one GPU (random weights, all 32 layers): peak memory against the
# planner (nca_kit.plan), steps per second, host synchronisations per step, and the packed layout with flash
# attention if flash_attn is installed. Under 10 minutes on one H100 / H200 (the Python side stops starting new
# settings after --time-budget seconds, 420 by default; every finished setting is already in the JSON).
#
#   scripts/gpu_check.sh [OUT_DIR] [extra bench/gpu_check.py arguments]
#
# OUT_DIR defaults to $OUT (set on a lent GPU machine), else runs/gpu_check. Results: OUT_DIR/gpu_check.json,
# OUT_DIR/gpu_check.log, OUT_DIR/nvidia-smi.txt. Python: $PYTHON, else .venv/bin/python, else python3 (it needs a
# CUDA build of torch, transformers, peft, bitsandbytes, accelerate; on CPU add --dry-run).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-runs/gpu_check}}"
shift || true
mkdir -p "$OUT_DIR"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCA_KIT_PROGRESS=0
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch, transformers, peft, bitsandbytes, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
  2>&1 | tee "$OUT_DIR/gpu_check.log"
timeout 580 "$PY" bench/gpu_check.py --out "$OUT_DIR" --tmp "${TMPDIR:-/tmp}" "$@" 2>&1 | tee -a "$OUT_DIR/gpu_check.log"
