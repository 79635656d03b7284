"""A micro task family through `dvc repro`: every held-out task gets every baseline, its bootstrap
comparisons, the summary's held-out figures, the held-out plot and MLflow runs tagged heldout=true;
bench/family.py reads it back."""

import sys

import pandas as pd
import pytest
from e2e_helpers import DVC, commit_all, e2e_env, micro_copy, mlflow_runs, run

from icmlora.artifacts.tables import POOLED_HELDOUT
from icmlora.profile import apply_profile

pytestmark = [pytest.mark.slow, pytest.mark.long]

MICRO_FAMILY = """\
data:
  tasks: [red-top, red-bottom, green-top, green-bottom, blue-top, blue-bottom]
  synthetic:
    task_kind: family
    objects_per_image: [2, 4]
    family:
      hues: 3
      rows: [top, bottom]
heldout_tasks: [red-top, green-bottom]
lora:
  cross_task_ranks: []
evaluate:
  cross_task_ranks: []
  retrieval_k: 2
cvae:
  condition_head: 4
"""
HELDOUT = ["red-top", "green-bottom"]
BASELINES = ["base", "trained", "nearest_task", "retrieval_mix", "mean_training", "few_shot_lora", "oracle_single"]


@pytest.fixture(scope="module")
def family(repo, tmp_path_factory):
    env = e2e_env()
    dest = micro_copy(repo, tmp_path_factory.mktemp("family") / "repo")
    (dest / "micro-family.yaml").write_text(MICRO_FAMILY)
    apply_profile(dest / "params.yaml", dest / "micro-family.yaml")
    commit_all(dest, "micro family")
    run([DVC, "repro"], dest, env)
    return dest


def test_every_held_out_task_gets_every_baseline(family):
    frame = pd.read_csv(family / "metrics" / "comparison.csv")
    held = frame[frame["heldout"]]
    assert sorted(held["task"].unique()) == sorted(HELDOUT)
    for task in HELDOUT:
        sources = set(held[held["task"] == task]["source"])
        assert set(BASELINES) | {"generated"} <= sources, (task, sources)
        mixes = held[(held["task"] == task) & (held["source"] == "retrieval_mix")]["sample"]
        assert len(mixes) == 2  # one per rank
        for mix in mixes:  # k = 2 training tasks, weights summing to 1, none of them held out
            parts = dict(p.split(":") for p in mix.split("+"))
            assert len(parts) == 2 and abs(sum(map(float, parts.values())) - 1) < 0.02 and not set(parts) & set(HELDOUT)
    assert set(frame[~frame["heldout"]]["source"]).isdisjoint({"nearest_task", "retrieval_mix", "mean_training", "few_shot_lora",
                                                               "oracle_single"})
    paired = pd.read_csv(family / "metrics" / "bootstrap.csv")
    for task in [*HELDOUT, POOLED_HELDOUT]:
        comparisons = set(paired[paired["task"] == task]["comparison"])
        assert {f"generated - {b}" for b in BASELINES} <= comparisons, (task, comparisons)


def test_summary_plot_and_mlflow_runs_of_the_held_out_tasks(family):
    import json

    summary = json.loads((family / "metrics" / "summary.json").read_text())
    rank = summary["ranks"][next(iter(summary["ranks"]))]
    for key in ("heldout_generated_over_trained_median", "heldout_retrieval_mix_map50_median",
                "heldout_mean_training_map50_median", "heldout_nearest_task_map50_median"):
        assert rank[key] is not None, key
    assert {f"generated - {b}" for b in BASELINES} <= set(rank["heldout_comparisons"])
    assert (family / "metrics" / "plots" / "report" / "heldout.png").stat().st_size > 10_000
    runs = [r for r in mlflow_runs(family / "mlflow.db") if r.get("stage") == "evaluate"]
    tagged = {r["task"] for r in runs if r.get("heldout") == "true"}
    assert tagged == set(HELDOUT) and {r["heldout"] for r in runs} == {"true", "false"}


def test_bench_reads_a_generator_seed_back(family, repo):
    sys.path.insert(0, str(repo / "bench"))
    from family import seed_record

    record, table, boot = seed_record(family, 7)
    rank = next(iter(record))
    assert set(record[rank]["target"]) >= {"ratio_met", "better_than_nearest_task", "better_than_retrieval_mix", "met"}
    assert sorted(table["task"].unique()) == sorted(HELDOUT) and set(table["generator_seed"]) == {7}
    assert set(BASELINES) | {"generated"} <= set(table["source"])
    assert POOLED_HELDOUT in set(boot["task"])
