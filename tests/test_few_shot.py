"""The held-out baseline few_shot_lora (icmlora.few_shot, stage few_shot): what it may read, how it
chooses, and what it writes."""

from __future__ import annotations

import json

import pytest
import torch

from icmlora import few_shot as fs
from icmlora.artifacts import few_shot_dir
from icmlora.artifacts.adapters import read_adapter
from icmlora.artifacts.annotations import read_split
from icmlora.artifacts.base_model import read_base_model
from icmlora.config import FewShotParams
from icmlora.errors import InputError
from icmlora.runtime import make_accelerator
from icmlora.stages.few_shot import few_shot

from spread import within
from test_lora_batch import TOLERANCE  # measured there: the joined pass against the lone one


def test_folds_split_the_support_examples_into_disjoint_non_empty_parts():
    folds = fs.fold_indices(7, 3)
    assert folds == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(i for f in folds for i in f) == list(range(7))
    with pytest.raises(InputError, match="few_shot.folds is 5"):
        fs.fold_indices(4, 5)


def test_candidate_steps_end_at_the_run_length():
    def params(steps, every):
        return FewShotParams(lrs=[1e-3], steps=steps, select_every=every, folds=2, seed=0)

    assert fs.stops(params(200, 50)) == [50, 100, 150, 200]
    assert fs.stops(params(210, 50)) == [50, 100, 150, 200, 210]
    assert fs.stops(params(30, 50)) == [30]


def test_the_best_mean_wins_and_ties_go_to_fewer_steps_then_the_smaller_lr():
    assert fs.choose({(1e-3, 50): 0.2, (1e-3, 100): 0.5, (5e-3, 50): 0.4}) == (1e-3, 100)
    assert fs.choose({(5e-3, 100): 0.5, (5e-3, 50): 0.5, (1e-3, 100): 0.5}) == (5e-3, 50)
    assert fs.choose({(5e-3, 50): 0.5, (1e-3, 50): 0.5}) == (1e-3, 50)


@pytest.mark.slow
def test_few_shot_trains_and_chooses_on_the_support_examples_only(setting, tmp_path, monkeypatch):
    """Every example a few-shot LoRA trains on or is chosen by is one of the k support examples (the
    first task_vectors.examples of the held-out task's train split, what its task vector reads); each
    fold's training leaves its held-back examples out; the final adapter trains on all k; no valid
    image is ever read. The output is a PEFT folder per rank with the rank's LoRA tensors."""
    cfg, root, _ = setting
    task = cfg.heldout_tasks[0]
    k = cfg.task_vectors.examples
    support = [e.image for e in read_split(task, "train", root / "prepared")[0][:k]]
    trained_on: list[list[str]] = []
    scored_on: list[list[str]] = []
    real_train, real_map50 = fs.train, fs.map50

    def train(model, processor, dataset, *args, **kwargs):
        trained_on.append([e.image for e in dataset.examples])
        return real_train(model, processor, dataset, *args, **kwargs)

    def map50(model, processor, examples, images, predict_params):
        scored_on.append([e.image for e in examples])
        return real_map50(model, processor, examples, images, predict_params)

    monkeypatch.setattr(fs, "train", train)
    monkeypatch.setattr(fs, "map50", map50)
    out = tmp_path / "few_shot"
    records = few_shot(cfg, root / "prepared", root / "base", out, tmp_path / "fs.json", tmp_path / "timing.json")

    folds = cfg.few_shot.folds  # a fold's runs, every rank with every lr, in one pass; then each rank's final
    assert len(trained_on) == folds + len(cfg.lora.ranks)
    for i, kept in enumerate(trained_on[:folds]):  # fold i held back
        held = [support[j] for j in fs.fold_indices(k, folds)[i]]
        assert sorted(kept + held) == sorted(support) and not set(kept) & set(held)
    assert trained_on[folds:] == [support] * len(cfg.lora.ranks)  # the chosen settings train on all k
    assert scored_on and all(set(s) <= set(support) for s in scored_on)
    written = json.loads((tmp_path / "fs.json").read_text())
    assert written["tasks"] == records and set(records) == {task}
    for rank in cfg.lora.ranks:
        record = records[task][f"r{rank}"]
        assert record["support"] == support
        assert record["lr"] in cfg.few_shot.lrs and record["steps"] in fs.stops(cfg.few_shot)
        assert len(record["cv_map50"]) == len(cfg.few_shot.lrs) * len(fs.stops(cfg.few_shot))
        weights, config = read_adapter(few_shot_dir(task, rank, out))
        assert config["r"] == rank and weights
        assert all("lora_A" in n or "lora_B" in n for n in weights)
        assert all(t.shape[0] == rank for n, t in weights.items() if "lora_A" in n)
        assert any(torch.count_nonzero(t) for n, t in weights.items() if "lora_B" in n)  # trained: B moved off 0
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert set(timing["adapters"][task]) == {f"r{r}" for r in cfg.lora.ranks}


def test_a_folds_runs_trained_in_one_pass_train_as_each_would_alone(setting):
    """``fit`` trains a fold's runs, every rank with every candidate lr, in one pass: each run's
    snapshots are the ones it gets trained alone (the same initial A, its own lr and dropout
    generator), LoRA dropout on, every tensor within test_lora_batch's TOLERANCE of its spread
    (measured here: 0, bit for bit); and each adapter really got its own lr (the lrs' snapshots differ)."""
    cfg, root, _ = setting
    lrs, ranks = list(cfg.few_shot.lrs), list(cfg.lora.ranks)
    assert len(lrs) > 1 and len(ranks) > 1 and cfg.lora.dropout > 0
    base, processor = read_base_model(root / "base")
    examples, folder = fs.support_examples(cfg.heldout_tasks[0], cfg.task_vectors.examples, root / "prepared")
    accelerator = make_accelerator(cfg.runtime)
    common = (examples[1:], folder, cfg.lora)
    runs = [(rank, lr) for rank in ranks for lr in lrs]
    joint, base = fs.fit(base, processor, *common, runs, cfg.few_shot, cfg.runtime, 11, accelerator)
    assert set(joint) == set(runs)
    for run in runs:
        alone, base = fs.fit(base, processor, *common, [run], cfg.few_shot, cfg.runtime, 11, accelerator)
        assert joint[run].snapshots.keys() == alone[run].snapshots.keys() == set(fs.stops(cfg.few_shot))
        for step, weights in alone[run].snapshots.items():
            assert weights.keys() == joint[run].snapshots[step].keys() and weights
            for key, t in weights.items():
                assert t.shape == joint[run].snapshots[step][key].shape
                worst = ((t - joint[run].snapshots[step][key]).abs().max() / t.std()).item()
                assert within("few_shot: runs in one pass vs alone (of the tensor's spread)", worst, TOLERANCE), \
                    (run, step, key, worst)
    last = max(fs.stops(cfg.few_shot))
    first, second = (joint[(ranks[0], lr)].snapshots[last] for lr in lrs[:2])
    assert all(not torch.equal(first[k], second[k]) for k in first if "lora_B" in k)


def test_runtime_lora_batch_sets_how_many_runs_train_a_pass_and_changes_no_choice(setting, monkeypatch):
    """``runtime.lora_batch`` runs a pass (3 of a fold's 4 here: passes of 3 and 1; 1: each alone, the
    code before runs trained together), against 0 (all in one pass): the same choices and cross-validated
    mAP50s, and the same final adapters within TOLERANCE of each tensor's spread."""
    cfg, root, _ = setting
    ranks = list(cfg.lora.ranks)
    runs_a_fold = len(ranks) * len(cfg.few_shot.lrs)
    assert runs_a_fold == 4
    passes: list[int] = []
    real_fit = fs.fit

    def fit(base, processor, examples, folder, lora, runs, *args):
        passes.append(len(runs))
        return real_fit(base, processor, examples, folder, lora, runs, *args)

    monkeypatch.setattr(fs, "fit", fit)
    base, processor = read_base_model(root / "base")
    out = {}
    for batch in (0, 3, 1):
        runtime = cfg.runtime.model_copy(update={"lora_batch": batch})
        passes.clear()
        out[batch], base = fs.select_and_fit(base, processor, cfg.heldout_tasks[0], ranks, cfg.lora, cfg.few_shot,
                                             runtime, cfg.predict, cfg.task_vectors.examples, 11,
                                             make_accelerator(runtime), root / "prepared")
        finals = [1] * len(ranks)  # each rank's chosen setting, alone
        assert passes == {0: [4], 3: [3, 1], 1: [1] * 4}[batch] * cfg.few_shot.folds + finals
    for batch in (3, 1):
        for rank in ranks:
            weights, record, _ = out[batch][rank]
            reference, expected, _ = out[0][rank]
            assert record == expected
            for key, t in reference.items():
                worst = ((t - weights[key]).abs().max() / t.std()).item()
                assert within("few_shot: runs in one pass vs alone (of the tensor's spread)", worst, TOLERANCE), key
