#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): the default profile in bf16 and in fp32 and the scale profile's
# training stages, at the same time on one GPU; train_lora in 2 processes when there are 2+ GPUs.
# Writes metrics/gpu/gpu_check.json as it goes (per-stage seconds, peak GPU memory, quality figures);
# parts still running at --deadline seconds (default 480) are stopped and recorded as incomplete.
# Without a CUDA GPU it says so and exits 2. On a lent machine with no network: bench/gpu_check_device.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" bench/gpu_check.py "$@"
