#!/usr/bin/env bash
# The prepared GPU check: run it on a machine with one CUDA GPU after `make setup` (under 8 minutes).
#   benchmarks/gpu_check.sh [--out DIR] [--iters N] [--skip-tests] [--parts tests,retinanet,swin,launch]
# It runs the CUDA-marked tests, RetinaNet R-50 baseline vs LGD in fp32 and bf16 (800 px, 2 images,
# synthetic data, no weights), Swin-T LGD with and without activation checkpointing, and a 1-process
# NCCL launch; it writes DIR/gpu-check.json and DIR/gpu-check.md (default DIR: output/gpu-check).
# `--dry-run` runs the same parts small on the CPU (what the test suite checks).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then
  echo "gpu_check: $PY not found: run \`make setup\` first (or set PYTHON)" >&2
  exit 2
fi
exec "$PY" benchmarks/gpu_check.py "$@"
