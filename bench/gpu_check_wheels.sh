#!/usr/bin/env bash
# Fills .whl/ for bench/gpu_check_device.sh: cp312 manylinux x86-64 or pure-Python wheels, at
# constraints.txt's versions, of what the pipeline needs at run time on a lent GPU machine whose
# python3 (3.12) has torch, numpy, pandas, matplotlib, scikit-learn, accelerate, safetensors, ...
# but no dvc, mlflow, pycocotools, pydantic or ruamel.yaml. Run here (it needs the package index):
#   bash bench/gpu_check_wheels.sh          (.whl/ is git-ignored)
# Never torch, numpy or CUDA libraries (the machine's own). mlflow-skinny, not mlflow: the stages
# log to a sqlite store (SQLAlchemy + Alembic) and need neither the UI nor its server's packages.
# transformers, peft, huggingface_hub and tokenizers travel although the machine has older ones:
# the figures depend on them (the tiny model's BPE vocabulary, Florence-2's classes, PEFT's LoRA).
# protobuf, typing_extensions and anyio: the versions mlflow and pydantic were checked with here.
set -euo pipefail
cd "$(dirname "$0")/.."
NAMES="aiohttp-retry alembic amqp annotated-types anyio appdirs asyncssh atpublic billiard cachetools celery
cffi click-didyoumean click-plugins click-repl configobj cryptography databricks-sdk dictdiffer diskcache distro
dpath dulwich dvc dvc-data dvc-http dvc-objects dvc-render dvc-studio-client dvc-task entrypoints fastapi
flatten-dict flufl.lock funcy gitdb GitPython google-auth grandalf gto httpcore2 httpx2 huggingface_hub
hydra-core importlib_metadata iterative-telemetry kombu Mako mlflow-skinny omegaconf opentelemetry-api
opentelemetry-proto opentelemetry-sdk opentelemetry-semantic-conventions orjson peft platformdirs prompt_toolkit
protobuf pyasn1 pyasn1_modules pycocotools pycparser pydantic pydantic_core pydantic-settings pydot pygit2 pygtrie
python-dotenv ruamel.yaml scmrepo semver shortuuid shtab smmap SQLAlchemy sqlparse sqltrie starlette tokenizers
tomlkit transformers truststore typing_extensions typing-inspection tzlocal uvicorn vine voluptuous wcwidth
zc.lockfile"
PY=${PYTHON:-python3}
# NAME==VERSION from constraints.txt for each name (names compared as pip normalizes them)
SPECS=$("$PY" - "$NAMES" <<'PY'
import re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
pins = {norm(line.split("==")[0]): line.strip() for line in open("constraints.txt") if "==" in line}
print(" ".join(pins[norm(n)] for n in sys.argv[1].split()))
PY
)
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $SPECS
# omegaconf (hydra-core, for dvc) needs antlr4-python3-runtime 4.9.*, published only as source: build its
# pure-Python wheel (a Python 3.12 builds it; any Python 3 gives the same py3-none-any wheel).
"$PY" -m pip wheel -q --no-deps -w .whl "$(grep -i '^antlr4-python3-runtime==' constraints.txt)"
ls .whl | wc -l
du -sh .whl
