"""End to end with a real-format source: `dvc repro` of the micro profile on a Florence JSONL
import whose categories have two-word names (COCO's `traffic light`, `fire hydrant` ...), whose
train file starts with a UTF-8 byte-order mark, with ignore regions and a zero-area box."""

from __future__ import annotations

import csv
import json
import sqlite3

import pytest
from e2e_helpers import DVC, commit_all, micro_copy, run
from params_helpers import micro_params

from icmlora.artifacts import final_adapter_dir, lora_metrics_file
from icmlora.data.synthetic import generate_split

pytestmark = [pytest.mark.slow, pytest.mark.long]

NAMES = {"circle": "big circle", "square": "small square"}


def write_source(root):
    """64x64 synthetic images relabelled with two-word names; every 4th image's first box an
    ignore region; one zero-area box; a BOM at the start of train.jsonl."""
    from icmlora.florence.format import Example

    synthetic = micro_params().data.synthetic
    (root / "images").mkdir(parents=True)
    counts = {"ignore": 0}
    for split, count, seed in (("train", 48, 1), ("valid", 16, 2)):
        lines = []
        for i, (image, boxes) in enumerate(generate_split(synthetic, list(NAMES), count, seed)):
            name = f"{split}-{i:03d}.png"
            image.save(root / "images" / name)
            renamed = [b.__class__(NAMES[b.label], b.x1, b.y1, b.x2, b.y2, ignore=(i % 4 == 0 and j == 0))
                       for j, b in enumerate(boxes)]
            counts["ignore"] += sum(b.ignore for b in renamed)
            record = Example(f"images/{name}", image.width, image.height, renamed).to_json()
            if split == "train" and i == 1:
                record["suffix"] += "big circle<loc_10><loc_10><loc_10><loc_40>"  # zero width
            lines.append(json.dumps(record))
        text = "\n".join(lines) + "\n"
        (root / f"{split}.jsonl").write_text(("\ufeff" if split == "train" else "") + text, encoding="utf-8")
    return counts


@pytest.fixture(scope="module")
def spaced_repo(repo, tmp_path_factory, e2e_env):
    base = tmp_path_factory.mktemp("spaced")
    counts = write_source(base / "source")
    dest = micro_copy(repo, base / "repo")
    from icmlora.profile import apply_profile

    profile = base / "spaced.yaml"
    profile.write_text(
        f"data:\n  source: florence_jsonl\n  root: {base / 'source'}\n  tasks: [{', '.join(NAMES.values())}]\n"
        "heldout_tasks: [small square]\nlora:\n  ranks: [1]\n  cross_task_ranks: [1]\n"
        "task_vectors:\n  reference_rank: 1\nevaluate:\n  cross_task_ranks: [1]\n")
    apply_profile(dest / "params.yaml", profile)
    commit_all(dest, "a two-word source")
    run([DVC, "repro"], dest, e2e_env)
    return dest, counts


def test_two_word_task_names_work_end_to_end(spaced_repo, e2e_env):
    repo, counts = spaced_repo
    for task in NAMES.values():
        assert (final_adapter_dir(task, 1, 0, repo / "models" / "lora") / "adapter_model.safetensors").is_file()
        assert (repo / "models" / "generated" / f"{task}-r1" / "sample-z0" / "adapter_config.json").is_file()
        assert json.loads(lora_metrics_file(task, 1, 0, repo / "metrics" / "lora").read_text())["task"] == task
    rows = list(csv.DictReader((repo / "metrics" / "comparison.csv").open()))
    assert {r["task"] for r in rows} == set(NAMES.values())
    with sqlite3.connect(repo / "mlflow.db") as db:
        tasks = {v for (v,) in db.execute("select value from tags where key = 'task'")}
    assert set(NAMES.values()) <= tasks
    summary = json.loads((repo / "data" / "prepared" / "summary.json").read_text())
    assert summary["dropped_degenerate_boxes"] == 1
    flagged = sum(summary["tasks"]["_agnostic"][split]["ignore_regions"] for split in ("train", "valid"))
    assert flagged == counts["ignore"] > 0
    assert "up to date" in run([DVC, "status"], repo, e2e_env).stdout
