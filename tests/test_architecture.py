"""The layout's promises, checked from the code: stages apart, exact DVC dependencies, one data contract.

- Every dvc.yaml stage runs ``icmlora.stages.<its name>``, and every module there is a stage.
- No stage module imports another stage module.
- Each stage's ``deps`` in dvc.yaml list exactly the source files its command imports
  (transitively within the package, lazy imports inside functions included), so an edit re-runs
  the stages it can change and no others.
- The outputs dvc.yaml declares are the paths icmlora.artifacts defines.
"""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = "icmlora"
STAGES = ["prepare", "base_model", "train_lora", "collect_params", "task_vectors", "train_cvae", "generate", "few_shot",
          "evaluate", "report"]


def module_file(name: str) -> Path | None:
    """The file of a module of the package, or None if ``name`` is not one."""
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path, name: str) -> set[str]:
    """Package modules a module imports anywhere in its body (functions included), with the
    packages whose __init__ runs on the way."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            parts = target.split(".")
            if parts[0] != PACKAGE:
                continue
            for i in range(1, len(parts) + 1):
                if module_file(".".join(parts[:i])) is not None:
                    found.add(".".join(parts[:i]))
    return found


def import_closure(root: str) -> set[str]:
    """Every package module that running ``python -m <root>`` imports."""
    parts = root.split(".")
    todo = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += imported_modules(module_file(name), name) - seen
    return seen


def closure_files(stage: str) -> set[str]:
    return {module_file(m).relative_to(REPO).as_posix() for m in import_closure(f"{PACKAGE}.stages.{stage}")}


def dvc_stages() -> dict[str, dict]:
    """{stage name: definition}, ``foreach``/``matrix`` stages by their base name."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {name: spec.get("do", spec) for name, spec in stages.items()}


def test_every_dvc_stage_is_one_stage_module_named_as_the_stage():
    stages = dvc_stages()
    assert list(stages) == STAGES
    modules = sorted(p.stem for p in (SRC / PACKAGE / "stages").glob("*.py") if p.stem != "__init__")
    assert modules == sorted(STAGES)
    for name, spec in stages.items():
        assert re.search(rf"\b{PACKAGE}\.stages\.{name}\b", spec["cmd"]), (name, spec["cmd"])


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_another_stage(stage):
    name = f"{PACKAGE}.stages.{stage}"
    others = {m for m in imported_modules(module_file(name), name) if m.startswith(f"{PACKAGE}.stages.")}
    assert not others, f"stage {stage} imports {sorted(others)}: move what they share out of icmlora/stages/"
    # Nor through a shared module: the library never imports a stage.
    assert not {m for m in import_closure(name) if m.startswith(f"{PACKAGE}.stages.") and m != name}


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_are_exactly_its_import_closure(stage):
    deps = {d for d in dvc_stages()[stage].get("deps", []) if d.startswith("src/")}
    needed = closure_files(stage)
    missing, extra = sorted(needed - deps), sorted(deps - needed)
    assert not missing, (f"dvc.yaml stage {stage}: deps miss {missing}, which its command imports "
                         "(python tests/test_architecture.py --write fixes dvc.yaml)")
    assert not extra, f"dvc.yaml stage {stage}: deps list {extra}, which its command never imports"


def test_the_config_module_is_a_dependency_of_every_stage():
    for stage in STAGES:
        assert "src/icmlora/config.py" in dvc_stages()[stage]["deps"], stage


def _expanded_outputs(params: dict) -> set[str]:
    """Every output path of dvc.yaml, for every item of its foreach/matrix stages."""
    import itertools

    def value(expr: str):
        node = params
        for part in expr.split("."):
            node = node[part]
        return node

    paths = set()
    for spec in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        if "foreach" in spec:
            items = [{"item": v} for v in value(spec["foreach"].strip("${}"))]
        elif "matrix" in spec:
            keys = list(spec["matrix"])
            combos = itertools.product(*(value(spec["matrix"][k].strip("${}")) for k in keys))
            items = [{f"item.{k}": v for k, v in zip(keys, combo)} for combo in combos]
        else:
            items = [{}]
        body = spec.get("do", spec)
        for item in items:
            for key in ("outs", "metrics", "plots"):
                for entry in body.get(key, []):
                    path = next(iter(entry)) if isinstance(entry, dict) else entry
                    for name, v in item.items():
                        path = path.replace("${" + name + "}", str(v))
                    paths.add(path)
    return paths


def test_dvc_outputs_are_the_data_contract_paths():
    """dvc.yaml declares exactly the outputs icmlora.artifacts defines, for the params' items."""
    import icmlora.artifacts as a

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    tasks, ranks, seeds = params["data"]["tasks"], params["lora"]["ranks"], params["lora"]["seeds"]
    expected = {a.PREPARED_DIR, a.BASE_MODEL_DIR, a.BASE_MODEL_METRICS, a.BASE_MODEL_LOSS, a.TASK_VECTORS_FILE,
                a.TASK_VECTORS_INFO, a.TASK_VECTOR_PLOTS, a.TASK_VECTOR_METRICS, a.GENERATED_DIR, a.GENERATE_METRICS,
                a.COMPARISON_TABLE, a.CROSS_TASK_TABLE, a.BOOTSTRAP_TABLE, a.EVALUATE_METRICS, a.REPORT_PLOTS, a.SUMMARY_METRICS, a.VERDICTS,
                a.FEW_SHOT_DIR, a.FEW_SHOT_METRICS,
                *(a.timing_file(s) for s in ("base_model", "task_vectors", "generate", "few_shot", "evaluate", "report"))}
    for task in tasks:
        for seed in seeds:
            expected |= {a.lora_group_dir(task, seed), a.lora_metrics_group_dir(task, seed)}
            # every adapter and its metrics file inside them
            assert all(a.lora_dir(task, r, seed).parent == a.lora_group_dir(task, seed) for r in ranks)
            assert all(a.lora_metrics_file(task, r, seed).parent == a.lora_metrics_group_dir(task, seed) for r in ranks)
    for rank in ranks:
        expected |= {a.lora_matrix_file(rank), a.lora_manifest_file(rank), a.generator_dir(rank), a.cvae_loss_file(rank)}
    declared = _expanded_outputs(params)
    expected_paths = {p.as_posix() for p in expected}
    assert declared == expected_paths, (sorted(declared - expected_paths), sorted(expected_paths - declared))


def write_deps(path: Path = REPO / "dvc.yaml") -> list[str]:
    """Rewrite each stage's source deps in dvc.yaml to its import closure (comments, order and
    other deps kept); returns the stages it changed. `python tests/test_architecture.py --write`."""
    import io

    from ruamel.yaml import YAML

    rt = YAML()
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)  # dvc.yaml's style: "- " two spaces under its key
    document = rt.load(path.read_text())
    changed = []
    for name, spec in document["stages"].items():
        body = spec.get("do", spec)
        others = [d for d in body["deps"] if not d.startswith("src/")]
        own = f"src/{PACKAGE}/stages/{name}.py"
        wanted = others + [own] + sorted(closure_files(name) - {own})
        if list(body["deps"]) != wanted:
            body["deps"].clear()
            body["deps"].extend(wanted)
            changed.append(name)
    out = io.StringIO()
    rt.dump(document, out)
    path.write_text(out.getvalue())
    return changed


def test_the_committed_lock_records_the_committed_files():
    """`dvc status` at a clean checkout has nothing to say about what git holds: every dependency and
    output of dvc.lock that git tracks (stage code, metrics, plots; a folder when git tracks all of it)
    hashes as the lock records it, and the lock names no stage dvc.yaml no longer has. Models and data
    are in DVC's cache, not git, and are not checked here."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    tracked = set(subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split())
    folders = {p.as_posix() for f in tracked for p in Path(f).parents}
    stale, checked = [], 0
    with Repo(str(REPO)) as repo:
        names = {stage.name for stage in repo.index.stages}
        # what DVC caches (models, data), and a folder holding some of it, is absent from a fresh clone
        # whatever .gitignore git keeps there
        cached = {Path(out.fs_path).relative_to(REPO) for stage in repo.index.stages for out in stage.outs if out.use_cache}
        for stage in repo.index.stages:
            for item in [*stage.deps, *stage.outs]:
                if isinstance(item, ParamsDependency):
                    continue
                rel = Path(item.fs_path).relative_to(REPO).as_posix()
                if any(Path(rel) == c or c in Path(rel).parents or Path(rel) in c.parents for c in cached):
                    continue
                if rel in folders:
                    on_disk = {p.relative_to(REPO).as_posix() for p in (REPO / rel).rglob("*") if p.is_file()}
                    if not on_disk <= tracked:  # a folder git holds only part of (or a workspace's extra files)
                        continue
                elif rel not in tracked:
                    continue
                checked += 1
                if item.hash_info != item.get_hash():
                    stale.append(f"{stage.name}: {rel}")
    locked = set(yaml.safe_load((REPO / "dvc.lock").read_text())["stages"])
    assert checked > 100, checked
    assert not stale, f"dvc.lock records other contents for {stale}: run `dvc repro` and commit dvc.lock"
    assert locked <= names, f"dvc.lock names stages dvc.yaml does not have: {sorted(locked - names)}"


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python tests/test_architecture.py --write   (rewrites dvc.yaml's source deps)")
    print("dvc.yaml: rewrote the source deps of", ", ".join(write_deps()) or "no stage")
