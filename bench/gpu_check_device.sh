#!/usr/bin/env bash
# The GPU check (bench/gpu_check.sh) on a lent GPU machine that has no network and its own python3
# (torch, transformers, accelerate, ... but no dvc, mlflow, pycocotools, pydantic, ruamel.yaml):
#   run: bash bench/gpu_check_device.sh [gpu_check.py options]      carry: [".whl"]
# It installs the wheels in .whl/ (see below) into $SITE, puts them and src/ on PYTHONPATH, makes
# `dvc`, `icmlora`, `python` and `accelerate` commands of that python3 (dvc.yaml's stages run
# `python -m icmlora.stages.<stage>`), then runs the check. Its output, each part's log and
# metrics/gpu/gpu_check.json go to $OUT as they are written, so a run cut short still returns them.
#
# .whl/ (git-ignored through .git/info/exclude; bench/gpu_check_wheels.sh fills it, and says why
# each is there) holds cp312 manylinux x86-64 or pure-Python wheels at constraints.txt's versions:
# dvc and mlflow-skinny with what they need that the machine lacks, and transformers, peft,
# huggingface_hub and tokenizers, whose versions the figures depend on (the machine's are older).
# Never torch, numpy or CUDA libraries: the machine's own.
# Overrides, to try this wrapper elsewhere: PYTHON3, WHEELS, SITE, OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v "${PYTHON3:-python3}") || { echo "gpu_check_device: no ${PYTHON3:-python3}"; exit 1; }
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
export OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"

versions() {  # one line: what the check will run with
  "$PY" - <<'PY'
import importlib.metadata as md, platform
out = [f"python {platform.python_version()}"]
for name in ("torch", "transformers", "peft", "accelerate", "huggingface_hub", "tokenizers", "dvc", "mlflow-skinny"):
    try:
        out.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        out.append(f"{name} -")
try:
    import torch
    out.append(f"cuda {torch.version.cuda} available={torch.cuda.is_available()} gpus={torch.cuda.device_count()}")
except ImportError:
    pass
print(", ".join(out))
PY
}

main() {
  local start=$SECONDS
  echo "env: $(nvidia-smi -L 2>&1 | tr '\n' ' ')| $(nproc) cpus | $(git --version 2>&1) | $PY | $(versions)"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu_check_device: installing $WHEELS/*.whl failed"; return 1; }
  export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
  local bin=/tmp/gpu-check-bin
  mkdir -p "$bin"
  printf '#!/bin/sh\nexec "%s" -m dvc "$@"\n' "$PY" >"$bin/dvc"
  printf '#!/bin/sh\nexec "%s" -m icmlora "$@"\n' "$PY" >"$bin/icmlora"
  printf '#!/bin/sh\nexec "%s" -m accelerate.commands.accelerate_cli "$@"\n' "$PY" >"$bin/accelerate"
  printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" >"$bin/python"
  chmod +x "$bin"/*
  export PATH="$bin:$PATH"
  if command -v git >/dev/null; then  # without git, gpu_check.py commits its copies through dulwich
    git config --global user.name >/dev/null || git config --global user.name gpu-check
    git config --global user.email >/dev/null || git config --global user.email gpu-check@localhost
    git config --global --add safe.directory '*'  # the copy that travelled may belong to another user
  fi
  # No network here: nothing may wait on a download or send analytics.
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DVC_NO_ANALYTICS=1 MPLBACKEND=Agg PYTHONUNBUFFERED=1
  echo "installed in $((SECONDS - start)) s: $(versions)"
  "$PY" -c "import dvc.repo, mlflow, pycocotools.cocoeval, pydantic, ruamel.yaml, peft, icmlora.config" \
    || { echo "gpu_check_device: an import failed (above)"; return 1; }
  PYTHON="$PY" bash bench/gpu_check.sh "$@"
  local rc=$?
  cp -f metrics/gpu/gpu_check.json "$OUT/" 2>/dev/null
  echo "gpu_check_device: exit $rc after $((SECONDS - start)) s"
  return $rc
}

main "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
