# Two commands for a newcomer: `make repro` (run the pipeline) and `make test`.
# Both create .venv with the pinned dependencies on first use; no activation needed.
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# Stage commands in dvc.yaml call `python -m icmlora.stages.<stage>`: put the venv first on PATH for them.
export PATH := $(BIN):$(PATH)
MLFLOW_PORT ?= 5000

.PHONY: setup repro test test-fast test-long mlflow push bench scale seeds family family-folds team team-down mutation docs docs-build clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable '.[dev]'
	touch $@

repro: $(STAMP)
	$(BIN)/dvc repro

# test: unit tests + one shared micro pipeline and its end-to-end checks (about 6 min on 2 cores).
# test-fast: unit tests only (no training, no dvc repro; under a minute).
# test-long: several processes, queues, remotes and servers, a second pipeline (.ci/run runs it too).
test: $(STAMP)
	$(BIN)/python -m pytest -m "not long"

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not long"

test-long: $(STAMP)
	$(BIN)/python -m pytest -m long

# MLflow UI + REST API on the repository's store, bound to this machine only; its home page opens the
# pipeline's runs table (src/icmlora/mlflow_app.py), not MLflow 3's GenAI overview.
mlflow: $(STAMP)
	@echo "MLflow: http://127.0.0.1:$(MLFLOW_PORT)/ (the icmlora runs table)"
	$(BIN)/mlflow server --app-name icmlora --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlflow-artifacts --host 127.0.0.1 --port $(MLFLOW_PORT)

push: $(STAMP)
	$(BIN)/dvc push

# The documentation site (mkdocs.yml, docs/): served on 127.0.0.1:8000 with live reload; docs-build writes
# build/site/ and fails on a broken link or a page missing from the nav (CI runs it).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve -a 127.0.0.1:8000

docs-build: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# A team's stack on 127.0.0.1, to try it: PostgreSQL, an S3 endpoint (moto) and an MLflow server with basic
# auth, artifacts proxied to S3 (src/icmlora/team.py). Prints the exports; team-down stops them (data kept in .team/).
team: $(STAMP)
	$(BIN)/python -m icmlora.team up

team-down: $(STAMP)
	$(BIN)/python -m icmlora.team down

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean-venv:
	rm -rf $(VENV)

# The real setting's shape on this machine (Florence-2-base dims, VOC sizes, real D), a few
# steps per stage in a clone: metrics/scale.json. Not part of `make test`.
scale: $(STAMP)
	$(BIN)/python bench/scale.py

# The spread over seeds: the default pipeline for more seeds as queued DVC experiments, one table
# (metrics/seeds.json, metrics/seeds.csv). Long: one full pipeline per seed.
seeds: $(STAMP)
	$(BIN)/python bench/seeds.py

# Tasks the generator has not seen: the task family (profiles/family.yaml: 30 (hue, row) tasks, 6 held
# out) in a clone, at three generator seeds, against retrieval baselines: metrics/family/. About 40 min.
family: $(STAMP)
	$(BIN)/python bench/family.py

# Every family task held out once (3 folds of 10): the generator kinds (cvae, ridge, hypernet, flow)
# against ridge, few-shot LoRA, retrieval of training adapters (oracle_single with hindsight) and own
# trained LoRAs on 30 held-out tasks, best-of-N on the support examples, the wrong task's vector, one
# pooled paired bootstrap: metrics/family/folds/ (docs: generators). Target: under 2 h.
family-folds: $(STAMP)
	$(BIN)/python bench/family_folds.py

# Mutation score of the modules that decide figures (pyproject.toml [tool.mutmut]): mutmut against the
# fast tests, per module in metrics/mutation.json; survivors explained in docs/mutation-survivors.md.
# Not part of `make test`; over an hour on 2 cores (63 min with other work beside it).
mutation: $(STAMP)
	$(BIN)/python bench/mutation.py
