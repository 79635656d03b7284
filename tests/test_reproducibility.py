"""Reproducing: the same pipeline run again from scratch, and `dvc exp run` in the workspace and
through the queue.

The micro pipeline runs once per session (conftest's `micro_pipeline`, shared with
test_pipeline.py). conftest's `micro_rerun` runs it a second time from scratch (a git clone of
the copy's first commit: no DVC cache, no run cache, no dvc.lock) and the two dvc.lock files are
compared, output by output. The experiment tests work in a git clone of the reproduced copy that
reads its DVC cache, so they change a clone, never `micro_pipeline`; they re-run only `evaluate`
and `report`.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from e2e_helpers import DVC, clone_sharing_cache, lock_outs, mlflow_runs, run

pytestmark = pytest.mark.slow

# --- a second run from scratch -------------------------------------------------------------------

TOLERANCE = 1e-6  # metric values (mAPs, losses, ratios) of the two runs: equal within this
# Wall-clock fields, ignored: *_seconds, seconds, and timing.speedup_median (a ratio of two of them).
TIMING_KEY = re.compile(r"seconds|speedup")

# Outputs whose bytes differ between two runs with the same seed on the same machine, how each is
# compared instead, and why its bytes differ. Every other output (and every other file of a
# directory output) must have the same md5 in both dvc.lock files / the same bytes.
NOT_BIT_IDENTICAL: list[tuple[str, str, str]] = [
    # Legitimate: wall-clock times. Every declared metrics file is bit-identical: the stages
    # write their timings apart, under metrics/timing/ (and a LoRA's beside its metrics).
    ("metrics/timing/*.json", "metrics", "seconds, and speedup_median computed from them"),
    ("metrics/lora/*/*.json", "metrics", "train_seconds, eval_seconds"),
]


def _rule(path: str) -> tuple[str, str] | None:
    return next(((kind, why) for pattern, kind, why in NOT_BIT_IDENTICAL if fnmatch.fnmatch(path, pattern)), None)


def _same_metrics(a, b, where: str) -> list[str]:
    """Differences between two metrics documents other than wall-clock fields."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys differ: {sorted(set(a) ^ set(b))}"]
        return [p for k in a if not TIMING_KEY.search(k) for p in _same_metrics(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: lengths differ"]
        return [p for i, (x, y) in enumerate(zip(a, b)) for p in _same_metrics(x, y, f"{where}[{i}]")]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        same = (math.isnan(a) and math.isnan(b)) or abs(a - b) <= TOLERANCE
        return [] if same else [f"{where}: {a} != {b}"]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def _same_content(kind: str, a: Path, b: Path, rel: str) -> list[str]:
    if kind == "metrics":
        return _same_metrics(json.loads(a.read_text()), json.loads(b.read_text()), rel)
    raise AssertionError(kind)


def _files(root: Path, path: str) -> dict[str, Path]:
    """{repo-relative path: file} of one output (a file, or every file under a directory)."""
    top = root / path
    if top.is_file():
        return {path: top}
    return {p.relative_to(root).as_posix(): p for p in sorted(top.rglob("*")) if p.is_file()}


@pytest.mark.long
def test_rerun_from_scratch_reproduces_every_output(micro_pipeline, micro_rerun):
    """Same seed, same code, same machine, from scratch: every output in dvc.lock has the same md5,
    except the metrics files listed in NOT_BIT_IDENTICAL, whose values must still match within
    TOLERANCE (wall-clock timings ignored)."""
    first, second = lock_outs(micro_pipeline), lock_outs(micro_rerun)
    assert sorted(first) == sorted(second)
    problems, differing = [], []
    for stage in first:
        assert sorted(first[stage]) == sorted(second[stage]), stage
        for out, md5 in first[stage].items():
            if second[stage][out] == md5:
                continue
            files_a, files_b = _files(micro_pipeline, out), _files(micro_rerun, out)
            if sorted(files_a) != sorted(files_b):
                problems.append(f"{stage}: {out}: not the same files")
                continue
            for rel, a in files_a.items():
                if a.read_bytes() == files_b[rel].read_bytes():
                    continue
                differing.append(rel)
                rule = _rule(rel)
                if rule is None:
                    problems.append(f"{stage}: {rel} is not bit-identical (and not listed in NOT_BIT_IDENTICAL)")
                    continue
                problems += [f"{stage}: {p}" for p in _same_content(rule[0], a, files_b[rel], rel)]
    assert not problems, "\n".join(problems)
    # What must be bit-identical is: prepared data, the base model, every LoRA checkpoint, the
    # normalized params, the generators' and the generated adapters' weights, the evaluation tables.
    assert not [p for p in differing if not p.endswith(".json")]


# --- dvc exp run ---------------------------------------------------------------------------------

def params_survive_set_param(params: Path, tmp_path: Path) -> str | None:
    """None if params.yaml still loads after DVC rewrites it exactly as `dvc exp run -S` does
    (dvc.utils.hydra.apply_overrides); otherwise the error."""
    from dvc.utils.hydra import apply_overrides

    from icmlora.config import load_params
    from icmlora.errors import InputError

    copy = tmp_path / "params.yaml"
    shutil.copyfile(params, copy)
    apply_overrides(copy, ["evaluate.noise_seed=1"])
    try:
        load_params(copy)
    except InputError as exc:
        return str(exc)
    return None


def test_params_yaml_still_loads_after_dvc_set_param(repo, tmp_path):
    """Cheap: no pipeline. Both params files (the repository's and the micro profile's merge)."""
    from icmlora.profile import apply_profile

    micro = tmp_path / "micro"
    micro.mkdir()
    shutil.copyfile(repo / "params.yaml", micro / "params.yaml")
    apply_profile(micro / "params.yaml", repo / "profiles" / "micro.yaml")
    for params in (repo / "params.yaml", micro / "params.yaml"):
        sub = tmp_path / f"check-{params.parent.name}"
        sub.mkdir()
        assert params_survive_set_param(params, sub) is None


def test_metrics_and_experiments_read_as_json(micro_pipeline, e2e_env):
    shown = run([DVC, "metrics", "show", "--json"], micro_pipeline, e2e_env)
    assert "failed to load" not in shown.stderr, shown.stderr
    assert "metrics/summary.json" in json.loads(shown.stdout)[""]["data"]
    exps = run([DVC, "exp", "show", "--json"], micro_pipeline, e2e_env, ok=False)
    assert exps.returncode == 0, exps.stderr[-2000:]
    workspace = next(e for e in json.loads(exps.stdout) if e["rev"] == "workspace")["data"]
    assert workspace["metrics"]["metrics/summary.json"]["data"] == json.loads(
        (micro_pipeline / "metrics" / "summary.json").read_text())
    seed = re.search(r"^seed: (\d+)", (micro_pipeline / "params.yaml").read_text(), re.M).group(1)
    assert workspace["params"]["params.yaml"]["data"]["seed"] == int(seed)


@pytest.fixture(scope="module")
def exp_repo(micro_pipeline, tmp_path_factory, e2e_env) -> Path:
    """A git clone of the reproduced copy, reading its DVC cache: nothing to run, its own (empty)
    MLflow store. The experiments below change this clone, not micro_pipeline."""
    dest = clone_sharing_cache(micro_pipeline, tmp_path_factory.mktemp("exp") / "repo", e2e_env)
    assert "up to date" in run([DVC, "status"], dest, e2e_env).stdout
    assert not (dest / "mlflow.db").exists()
    return dest


def ran_stages(log: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", log)


def summary_keys(repo: Path) -> set[str]:
    """The dotted keys of metrics/summary.json's numeric values."""
    def walk(obj, prefix=""):
        for k, v in obj.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                yield f"{prefix}{k}"
    return set(walk(json.loads((repo / "metrics/summary.json").read_text())))


def exp_show_row(repo: Path, env: dict, name: str) -> dict[str, str]:
    """The experiment's row of `dvc exp show --csv` (a metric's column is its dotted key, prefixed
    with '<file>:' only where two files share the key)."""
    rows = list(csv.DictReader(io.StringIO(run([DVC, "exp", "show", "--csv"], repo, env).stdout)))
    found = [r for r in rows if r["Experiment"] == name]
    assert len(found) == 1, [r["Experiment"] for r in rows]
    return {k.removeprefix("metrics/summary.json:"): v for k, v in found[0].items()}


def assert_runs_logged(repo: Path, name: str, rows: int) -> list[dict]:
    """The experiment's MLflow runs are in the repository's own store, tagged dvc_exp = its name:
    one per evaluated adapter (`evaluate`) and the summary run (`report`), nothing else."""
    runs = [r for r in mlflow_runs(repo / "mlflow.db") if r.get("dvc_exp") == name]
    stages = [r.get("stage") for r in runs]
    assert stages.count("evaluate") == rows and stages.count("report") == 1, sorted(set(stages))
    assert set(stages) == {"evaluate", "report"}
    assert all(len(r.get("git_commit", "")) == 40 for r in runs)
    return runs


def test_dvc_exp_run_in_the_workspace(exp_repo, e2e_env):
    """`dvc exp run -S evaluate.confidence=0.9`: only evaluate and report run (the two stages that
    read it); the experiment is listed with its params and summary metrics; its MLflow runs are
    tagged with its name. (A knob whose change leaves evaluate's outputs as they were, as
    evaluate.noise_seed can on the untrained micro models, runs evaluate alone: DVC then skips
    report, whose inputs did not change.)"""
    out = run([DVC, "exp", "run", "-S", "evaluate.confidence=0.9"], exp_repo, e2e_env).stdout
    assert ran_stages(out) == ["evaluate", "report"], out
    name = re.search(r"Ran experiment\(s\): (\S+)", out).group(1)
    assert name in run([DVC, "exp", "list", "--name-only"], exp_repo, e2e_env).stdout.split()

    row = exp_show_row(exp_repo, e2e_env, name)
    assert row["evaluate.confidence"] == "0.9"
    keys = summary_keys(exp_repo)
    assert keys and keys <= set(row), sorted(keys - set(row))
    assert row["ranks.2.generated_over_trained_median"] not in ("", "-")

    # The workspace holds the experiment's results: against HEAD, the params and metrics diffs.
    params = json.loads(run([DVC, "params", "diff", "--json"], exp_repo, e2e_env).stdout)
    confidence = params["params.yaml"]["evaluate.confidence"]
    assert (confidence["old"], confidence["new"]) == (0.95, 0.9), confidence
    diff = json.loads(run([DVC, "metrics", "diff", "--all", "--json"], exp_repo, e2e_env).stdout)
    assert keys <= set(diff["metrics/summary.json"]), sorted(keys - set(diff["metrics/summary.json"]))

    rows = len(list(csv.DictReader((exp_repo / "metrics/comparison.csv").open())))
    assert_runs_logged(exp_repo, name, rows)


def _worker_pids(repo: Path) -> list[int]:
    """PIDs of this repository's DVC queue workers that are still alive (from DVC's own records)."""
    pids = []
    for info in (repo / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.json"):
        pid = json.loads(info.read_text()).get("pid")
        cmdline = Path(f"/proc/{pid}/cmdline")
        if pid and cmdline.exists() and b"queue-worker" in cmdline.read_bytes():
            pids.append(pid)
    return pids


def stop_queue(repo: Path, env: dict) -> None:
    """`dvc queue stop`, then wait for the workers `dvc queue start` spawned to exit; kill what is
    left (`dvc queue stop --kill`, then SIGTERM to each worker's PID)."""
    run([DVC, "queue", "stop"], repo, env, ok=False)
    deadline = time.monotonic() + 60
    while _worker_pids(repo) and time.monotonic() < deadline:
        time.sleep(1)
    if _worker_pids(repo):
        run([DVC, "queue", "stop", "--kill"], repo, env, ok=False)
        time.sleep(5)
        for pid in _worker_pids(repo):
            os.kill(pid, signal.SIGTERM)


def queue_state(repo: Path, env: dict, name: str) -> str:
    out = run([DVC, "queue", "status"], repo, env).stdout
    line = next((ln for ln in out.splitlines() if f" {name} " in f" {ln} "), "")
    return line.split()[-1] if line else "?"


def run_queue(repo: Path, env: dict, name: str, timeout: float = 900) -> str:
    """`dvc queue start`, wait until experiment ``name`` leaves Queued/Running (or ``timeout`` s), stop
    the workers; its last state ("Success" when it ran)."""
    state = "?"
    try:
        run([DVC, "queue", "start"], repo, env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = queue_state(repo, env, name)
            if state not in ("Queued", "Running"):
                break
            time.sleep(5)
    finally:
        stop_queue(repo, env)
    return state


@pytest.mark.long
def test_queued_experiment_logs_to_the_repository_store(exp_repo, e2e_env):
    """`dvc exp run --queue` + `dvc queue start`: the experiment runs in a temporary copy under
    .dvc/tmp/exps, yet its MLflow runs (and artifacts) land in the repository's own store, through
    the absolute tracking URI built from DVC_ROOT, tagged dvc_exp = its name."""
    run(["git", "checkout", "-q", "--", "."], exp_repo)  # back to HEAD if the workspace test ran
    assert "up to date" in run([DVC, "status"], exp_repo, e2e_env).stdout
    out = run([DVC, "exp", "run", "--queue", "-S", "evaluate.confidence=0.8"], exp_repo, e2e_env).stdout
    name = re.search(r"Queued experiment '([^']+)'", out).group(1)
    state = run_queue(exp_repo, e2e_env, name)
    log = run([DVC, "queue", "logs", name], exp_repo, e2e_env, ok=False).stdout
    assert state == "Success", f"{name}: {state}\n{log[-3000:]}"
    assert not _worker_pids(exp_repo)
    assert ran_stages(log) == ["evaluate", "report"], log[-3000:]
    assert name in run([DVC, "exp", "list", "--name-only"], exp_repo, e2e_env).stdout.split()
    row = exp_show_row(exp_repo, e2e_env, name)
    assert row["evaluate.confidence"] == "0.8" and summary_keys(exp_repo) <= set(row)

    rows = len(list(csv.DictReader((exp_repo / "metrics/comparison.csv").open())))
    runs = assert_runs_logged(exp_repo, name, rows)
    store_artifacts = (exp_repo / "mlflow-artifacts").resolve().as_uri()
    (summary,) = [r for r in runs if r["stage"] == "report"]
    assert summary["artifact_uri"].startswith(store_artifacts + "/"), summary["artifact_uri"]
    assert any(Path(summary["artifact_uri"].removeprefix("file://")).rglob("*.png"))


@pytest.mark.parametrize("bad", ["lora.train.steps=abc", "+lora.rank=3"])
def test_a_rejected_value_costs_no_output(micro_pipeline, tmp_path, e2e_env, bad):
    """`dvc exp run -S <bad value>` fails with the validation error, and every output (metrics
    included) and dvc.lock stay as they were: outputs are persist, stages write them atomically.
    Only params.yaml holds the bad value, as DVC left it; `git checkout params.yaml` undoes it."""
    from e2e_helpers import file_hashes

    clone = clone_sharing_cache(micro_pipeline, tmp_path / "repo", e2e_env)
    before = file_hashes(clone, "data", "models", "metrics")
    lock = (clone / "dvc.lock").read_bytes()
    proc = run([DVC, "exp", "run", "-S", bad], clone, e2e_env, ok=False)
    assert proc.returncode != 0
    assert "invalid parameters" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert file_hashes(clone, "data", "models", "metrics") == before
    assert (clone / "dvc.lock").read_bytes() == lock
    run(["git", "checkout", "--", "params.yaml"], clone)
    assert "up to date" in run([DVC, "status"], clone, e2e_env).stdout


@pytest.mark.long
def test_two_queue_workers_on_a_fresh_sqlite_store_lose_no_run(micro_pipeline, tmp_path, e2e_env):
    """`dvc queue start -j 2`: two workers run two experiments at once, both logging to the
    repository's SQLite store, which neither finds created (the store's set-up is serialized by a
    file lock, later writes wait on SQLite's busy timeout): both succeed, every run is recorded."""
    clone = clone_sharing_cache(micro_pipeline, tmp_path / "repo", e2e_env)
    assert not (clone / "mlflow.db").exists()
    names = []
    for confidence in ("0.8", "0.85"):
        out = run([DVC, "exp", "run", "--queue", "-S", f"evaluate.confidence={confidence}"], clone, e2e_env).stdout
        names.append(re.search(r"Queued experiment '([^']+)'", out).group(1))
    states = {}
    try:
        run([DVC, "queue", "start", "-j", "2"], clone, e2e_env)
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline:
            states = {n: queue_state(clone, e2e_env, n) for n in names}
            if not {"Queued", "Running"} & set(states.values()):
                break
            time.sleep(5)
    finally:
        stop_queue(clone, e2e_env)
    logs = {n: run([DVC, "queue", "logs", n], clone, e2e_env, ok=False).stdout for n in names}
    assert set(states.values()) == {"Success"}, {n: (s, logs[n][-2000:]) for n, s in states.items()}
    rows = len(list(csv.DictReader((micro_pipeline / "metrics/comparison.csv").open())))
    for name in names:
        assert_runs_logged(clone, name, rows)


def test_seeds_study_names_what_a_stale_experiment_ran_with(repo):
    """Cheap: bench/seeds.py's comparison of an experiment's params with params.yaml's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("seeds_bench", repo / "bench" / "seeds.py")
    seeds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seeds)
    workspace = {"params": {"seed": 2024, "base": {"train": {"steps": 2400}}, "lora": {"lr_by_rank": {"r1": 0.002}}}}
    draw = {"params": {"seed": 1, "base": {"train": {"steps": 2400}}, "lora": {"lr_by_rank": {"r1": 0.002}}}}
    old = {"params": {"seed": 1, "base": {"train": {"steps": 1600}}, "lora": {"lr_by_rank": {}}}}
    assert seeds.setting_differences(draw, workspace) == []
    assert seeds.setting_differences(old, workspace) == [
        "base.train.steps: 1600 here, 2400 in params.yaml", "lora.lr_by_rank.r1: (unset) here, 0.002 in params.yaml"]


@pytest.mark.long
def test_make_seeds_runs_a_seed_as_a_queued_experiment_and_tabulates_it(micro_pipeline, tmp_path, e2e_env, repo):
    """bench/seeds.py (`make seeds`) on a clone of the micro copy: it queues `seed=7` as the DVC
    experiment seed-7, runs the queue, and writes metrics/seeds.json / .csv with the workspace's
    seed and seed 7 side by side (figures read from `dvc exp show` and from the experiment's own
    commit), their spread and the per-seed checks; the experiment's MLflow runs carry dvc_exp."""
    dest = clone_sharing_cache(micro_pipeline, tmp_path / "repo", e2e_env)
    own_seed = str(yaml.safe_load((dest / "params.yaml").read_text())["seed"])
    try:
        proc = subprocess.run([sys.executable, str(repo / "bench" / "seeds.py"), "--repo", str(dest), "--seeds", "7"],
                              env=e2e_env, capture_output=True, text=True, timeout=1800)
    finally:
        stop_queue(dest, e2e_env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "seed-7" in run([DVC, "exp", "list", "--all-commits", "--name-only"], dest, e2e_env).stdout.split()

    record = json.loads((dest / "metrics" / "seeds.json").read_text())
    assert set(record["seeds"]) == {own_seed, "7"}
    assert record["seeds"]["7"]["experiment"] == "seed-7" and record["seeds"][own_seed]["experiment"] == "workspace"
    for seed, row in record["seeds"].items():
        # from dvc exp show (the declared metrics) and from the run's own commit (every LoRA's metrics file)
        for key in ("base_valid_map50", "r1.generated_over_trained_median", "task_vector_silhouette",
                    "r1.lora_own_task_map50_median", "r2.cvae_final_recon"):
            assert isinstance(row.get(key), float), (seed, key, row.get(key))
    # a different seed is a different draw (the micro base scores 0 either way; its generators differ)
    assert record["seeds"]["7"]["r2.cvae_final_recon"] != record["seeds"][own_seed]["r2.cvae_final_recon"]
    spread = record["spread"]["r2.cvae_final_recon"]
    values = [row["r2.cvae_final_recon"] for row in record["seeds"].values()]
    assert spread["n"] == 2  # the spread is written to 4 decimals
    assert [spread["min"], spread["median"], spread["max"]] == pytest.approx(
        [min(values), sum(values) / 2, max(values)], abs=5e-5)
    assert set(record["checks"]) == {own_seed, "7"} and set(record["verdicts"]) == {own_seed, "7"}
    header = (dest / "metrics" / "seeds.csv").read_text().splitlines()[0]
    assert header == f"figure,seed {min(own_seed, '7', key=int)},seed {max(own_seed, '7', key=int)},median,min,max"
    tagged = {r.get("stage") for r in mlflow_runs(dest / "mlflow.db") if r.get("dvc_exp") == "seed-7"}
    assert {"base_model", "train_lora", "train_cvae", "evaluate", "report"} <= tagged, tagged

    # Once the default changes, seed-7 is a draw of another setting: left out of the table, not reused.
    params = dest / "params.yaml"
    assert "noise_seed: 0 " in params.read_text()
    params.write_text(params.read_text().replace("noise_seed: 0 ", "noise_seed: 1 "))
    seeds = [sys.executable, str(repo / "bench" / "seeds.py"), "--repo", str(dest)]
    collect = subprocess.run([*seeds, "--collect"], env=e2e_env, capture_output=True, text=True, timeout=600)
    differs = "evaluate.noise_seed: 0 here, 1 in params.yaml"
    assert collect.returncode == 0, collect.stderr[-3000:]
    assert f"seed-7 ran with other params than params.yaml's, left out of the table: {differs}" in collect.stdout
    assert set(json.loads((dest / "metrics" / "seeds.json").read_text())["seeds"]) == {own_seed}
    again = subprocess.run([*seeds, "--seeds", "7", "8"], env=e2e_env, capture_output=True, text=True, timeout=600)
    assert again.returncode != 0 and "`dvc exp remove <ref>`" in again.stderr, again.stdout[-2000:]
    assert re.search(rf"refs/exps/\w\w/\w+/seed-7: {differs}", again.stderr), again.stderr
    assert "seed-8" not in run([DVC, "queue", "status"], dest, e2e_env).stdout  # nothing queued before the stop
