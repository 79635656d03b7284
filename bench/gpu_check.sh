#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): micro pipeline in bf16 on one GPU, train_lora in 2 processes
# when there are 2+ GPUs, the scale profile's training stages at real dimensions; writes
# metrics/gpu_check.json. Without a CUDA GPU it says so and exits 2.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" bench/gpu_check.py "$@"
