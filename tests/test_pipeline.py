"""End to end: copy the repository, apply the micro profile, `dvc repro`, check the files.

The copy and its one full `dvc repro` are conftest's session fixture `micro_pipeline`, shared
with test_reproducibility.py (the pipeline runs once per session, not once per module).
"""

import json
import sqlite3

import pandas as pd
import pytest
from e2e_helpers import BIN, run
from icmlora.config import load_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def micro_repo(micro_pipeline):
    return micro_pipeline


@pytest.fixture(scope="module")
def env(e2e_env) -> dict:
    return e2e_env  # MLFLOW_TRACKING_URI unset: the copy's own sqlite store


def test_dvc_repro_base_model(micro_repo, env):
    """base_model and what it depends on, as the full repro left them: nothing left to run."""
    out = run([str(BIN / "dvc"), "repro", "base_model"], micro_repo, env).stdout
    assert "Running stage" not in out, out
    assert (micro_repo / "models/base/config.json").is_file()
    assert (micro_repo / "models/base/model.safetensors").is_file()
    assert not list((micro_repo / "models/base").glob("*.bin"))  # safetensors only
    for task in ("circle", "square", "triangle", "_agnostic"):
        assert (micro_repo / f"data/prepared/{task}/valid/annotations.jsonl").is_file()
    metrics = json.loads((micro_repo / "metrics/base_model.json").read_text())
    assert {"map50", "map50_95"} <= set(metrics) and not any("seconds" in k for k in metrics)
    assert {"train_seconds", "eval_seconds"} == set(json.loads((micro_repo / "metrics/timing/base_model.json").read_text()))
    assert metrics["train_steps"] == 6 and metrics["num_images"] == 24
    status = run([str(BIN / "dvc"), "status", "base_model"], micro_repo, env).stdout
    assert "up to date" in status or status.strip() == ""
    with sqlite3.connect(micro_repo / "mlflow.db") as db:
        runs = [r for (r,) in db.execute("select run_uuid from tags where key = 'stage' and value = 'base_model'")]
        assert len(runs) == 1, runs
        tags = dict(db.execute("select key, value from tags where run_uuid = ?", runs).fetchall())
    assert tags["stage"] == "base_model" and len(tags["git_commit"]) == 40


def test_dvc_repro_whole_pipeline(micro_repo, env):
    """Every stage on the micro profile (`dvc repro`, run by the micro_pipeline fixture); MLflow
    then holds trained and generated runs side by side."""
    for rank in (1, 2):
        for task in ("circle", "square", "triangle"):
            lora = micro_repo / f"models/lora/{task}-s0/r{rank}"
            assert sorted(p.name for p in (lora / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
            assert (lora / "final" / "adapter_model.safetensors").is_file()
            samples = sorted(p.name for p in (micro_repo / f"models/generated/{task}-r{rank}").iterdir())
            assert samples == ["sample-0", "sample-1", "sample-z0"]
        manifest = json.loads((micro_repo / f"data/lora_matrix/r{rank}.json").read_text())
        assert manifest["rows"] == 9 and manifest["rank"] == rank
        assert (micro_repo / f"models/cvae/r{rank}/model.safetensors").is_file()
        assert (micro_repo / f"metrics/cvae/r{rank}.csv").read_text().startswith("epoch,loss,recon,kl")
    summary = json.loads((micro_repo / "metrics/summary.json").read_text())
    assert set(summary["ranks"]) == {"1", "2"}
    for key in ("generated_over_trained_median", "wrong_task_over_right_task_median", "novelty_ratio_median",
                "heldout_generated_map50_median", "avg_checkpoint_map50_median", "noise_map50_median"):
        assert summary["ranks"]["2"][key] is not None, key
    assert {"generator_bytes", "checkpoint_bytes", "ratio"} <= set(summary["storage"])
    timing = json.loads((micro_repo / "metrics/timing/report.json").read_text())
    assert {"generate_adapter_seconds", "train_lora_seconds_median", "speedup_median", "heldout_generator_seconds_median",
            "few_shot_train_seconds_median", "few_shot_select_and_train_seconds_median",
            "generator_speedup_over_few_shot_train"} == set(timing)
    assert timing["heldout_generator_seconds_median"] > 0 and timing["few_shot_train_seconds_median"] > 0
    for png in ("generated_vs_trained", "comparisons", "task_heatmap_r2", "cvae_loss", "map_vs_novelty"):
        assert (micro_repo / f"metrics/plots/report/{png}.png").stat().st_size > 1000
    # Every comparison has its paired-bootstrap interval and verdict, pooled and per task.
    pooled = summary["ranks"]["2"]["comparisons"]
    assert set(pooled) == {f"generated - {s}" for s in ("trained", "avg_checkpoint", "noise", "wrong_task")}
    assert all(c["ci_low"] <= c["difference"] <= c["ci_high"] and c["verdict"] in ("better", "worse", "indistinguishable")
               for c in pooled.values())
    assert "generated - nearest_task" in summary["ranks"]["2"]["heldout_comparisons"]
    # The held-out task (triangle) through the whole pipeline: every baseline a user could use instead,
    # the ridge map among them, at every rank, by name in the summary and in the verdicts.
    for rank in ("1", "2"):
        held = summary["ranks"][rank]["heldout_tasks"]["triangle"]
        assert {"generated", "trained", "ridge", "few_shot_lora", "oracle_single", "nearest_task", "retrieval_mix",
                "mean_training", "base"} <= set(held["map50"])
        assert {"generated - ridge", "generated - few_shot_lora", "generated - oracle_single", "generated - nearest_task",
                "generated - retrieval_mix"} <= set(held["comparisons"])
        assert summary["ranks"][rank]["heldout_ridge_map50_median"] is not None
        assert summary["ranks"][rank]["heldout_few_shot_lora_map50_median"] is not None
        # hindsight: no single training adapter does better on the task than the one oracle_single picked
        assert held["map50"]["oracle_single"] >= held["map50"]["nearest_task"]
        # best-of-N: one generated sample per held-out task and rank is chosen on the support examples, the
        # one scoring best there (z0 first among equals), and compared with z = 0 on the same resamples
        assert "best_of_n - z0" in held["comparisons"] and "best_of_n - z0" in summary["ranks"][rank]["heldout_comparisons"]
        assert summary["ranks"][rank]["heldout_sample_map50_spread_median"] >= 0
    frame = pd.read_csv(micro_repo / "metrics" / "comparison.csv")
    samples = frame[(frame.source == "generated") & frame.heldout]
    for _, group in samples.groupby(["task", "rank"]):
        chosen = group[group["best_of_n"].astype(str) == "True"]
        assert len(chosen) == 1 and chosen["support_map50"].iloc[0] == group["support_map50"].max()
        ties = group[group["support_map50"] == group["support_map50"].max()]["sample"].astype(str).tolist()
        assert chosen["sample"].astype(str).iloc[0] == ("z0" if "z0" in ties else ties[0])
    assert frame[~frame.heldout]["support_map50"].isna().all()  # a training task has no support selection
    assert (micro_repo / "metrics/plots/report/heldout.png").stat().st_size > 1000
    evaluate_json = json.loads((micro_repo / "metrics/evaluate.json").read_text())
    assert set(evaluate_json["ridge"]) == {"1", "2"} and all(r["lam"] > 0 for r in evaluate_json["ridge"].values())
    boot = (micro_repo / "metrics/bootstrap.csv").read_text().splitlines()
    assert boot[0] == "rank,task,comparison,difference,ci_low,ci_high,verdict,resamples,confidence"
    verdicts = (micro_repo / "metrics/verdicts.txt").read_text().splitlines()
    assert any(v.startswith("rank 2, training tasks: generated vs trained: ") for v in verdicts)
    assert any(v.startswith("rank 2, held-out task triangle (no adapter of it in the generator's data): generated mAP50 ")
               for v in verdicts)
    assert any(v.startswith("rank 2, held-out task triangle: generated vs ridge: ") for v in verdicts)
    assert any(v.startswith("rank 2, held-out task triangle: generated vs few_shot_lora: ") for v in verdicts)
    few = json.loads((micro_repo / "metrics/few_shot.json").read_text())["tasks"]["triangle"]
    for rank in (1, 2):  # the folder evaluate scored is the one the few_shot stage wrote
        assert (micro_repo / f"models/few_shot/triangle-r{rank}/adapter_model.safetensors").is_file()
        assert few[f"r{rank}"]["lr"] in load_params(micro_repo / "params.yaml").few_shot.lrs
    assert {"error_iou_median", "error_iou_checkpoints_median"} <= set(summary["ranks"]["2"])
    with sqlite3.connect(micro_repo / "mlflow.db") as db:
        pairs = db.execute(
            "select t.value, r.value, s.value from tags t join tags r on r.run_uuid = t.run_uuid and r.key = 'rank' "
            "join tags s on s.run_uuid = t.run_uuid and s.key = 'source' where t.key = 'task'").fetchall()
    sources = {(task, rank, source) for task, rank, source in pairs}
    assert ("circle", "2", "trained") in sources and ("circle", "2", "generated") in sources
    with sqlite3.connect(micro_repo / "mlflow.db") as db:  # each trained adapter's run logs the lr it trained at
        lrs = db.execute(
            "select k.value, r.value, p.value from tags t join tags r on r.run_uuid = t.run_uuid and r.key = 'rank' "
            "join tags k on k.run_uuid = t.run_uuid and k.key = 'task' "
            "join params p on p.run_uuid = t.run_uuid and p.key = 'lr' "
            "where t.key = 'stage' and t.value = 'train_lora'").fetchall()
    cfg = load_params(micro_repo / "params.yaml")
    lora = cfg.lora
    # a set: any run with another lr is an extra element (a stage re-run by another test logs the same rows again)
    assert set(lrs) == {(task, str(r), str(lora.optimizer(r).lr)) for task in cfg.data.tasks for r in lora.ranks}
    assert lora.optimizer(1).lr != lora.train.lr  # the default's lr_by_rank reaches the micro profile
    with sqlite3.connect(micro_repo / "mlflow.db") as db:  # the UI opens the runs table, not the GenAI overview
        kind = db.execute("select value from experiment_tags where key = 'mlflow.experimentKind'").fetchall()
    assert kind == [("custom_model_development",)]
    status = run([str(BIN / "dvc"), "status"], micro_repo, env).stdout
    assert "up to date" in status


def test_dvc_push_to_the_default_remote(micro_repo, env):
    """`dvc push` to the default remote sends every output: before it, `dvc status --cloud` lists
    them as new; after it, nothing is missing from the remote."""
    dvc = str(BIN / "dvc")
    before = json.loads(run([dvc, "status", "--cloud", "--json"], micro_repo, env).stdout)
    assert before and set(before.values()) == {"new"}, before
    run([dvc, "push"], micro_repo, env)
    assert json.loads(run([dvc, "status", "--cloud", "--json"], micro_repo, env).stdout) == {}
    remote = micro_repo.parent / "icmlora-dvc-remote"
    assert remote.is_dir() and any(remote.rglob("*"))


@pytest.mark.parametrize("edited", ["src/icmlora/metrics.py", "src/icmlora/cvae.py", "src/icmlora/cli.py"])
def test_editing_a_shared_file_marks_exactly_the_stages_that_import_it(micro_repo, env, tmp_path, edited):
    """`dvc status` after an edit names the stages whose code imports the file, and no others."""
    from e2e_helpers import DVC, clone_sharing_cache
    from test_architecture import STAGES, closure_files

    clone = clone_sharing_cache(micro_repo, tmp_path / "clone", env)
    with open(clone / edited, "a") as fh:
        fh.write("\n# an edit\n")
    status = json.loads(run([DVC, "status", "--json"], clone, env).stdout)
    changed = {name.split("@")[0] for name in status}
    assert changed == {s for s in STAGES if edited in closure_files(s)}, status
