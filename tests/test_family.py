"""The task family (tasks the generator has not seen): its params, its data, and that nothing of
a held-out task reaches the generator's training data or the normalization statistics."""

import shutil

import pytest
import torch
from params_helpers import params_dict, with_changes

from icmlora.artifacts import BASE_SPLIT, checkpoints_dir
from icmlora.artifacts.adapters import read_adapter
from icmlora.artifacts.generators import read_generator
from icmlora.artifacts.lora_matrix import read_lora_matrix
from icmlora.artifacts.task_vectors import write_task_vectors
from icmlora.data.family import split_cell
from icmlora.data.synthetic import generate_family_split
from icmlora.errors import InputError
from icmlora.florence.format import read_annotations
from icmlora.stages.collect_params import collect_params
from icmlora.stages.prepare import prepare
from icmlora.stages.train_cvae import train_cvae


def family_params(**changes):
    """params.yaml + profiles/family.yaml, with dotted-key changes."""
    return with_changes(params_dict("family"), changes)


def _attributes(cfg, task):
    return split_cell(task, cfg.data.synthetic.family.hues, cfg.data.synthetic.family.rows)


def test_family_profile_holds_out_new_combinations_only():
    cfg = family_params()
    training = [_attributes(cfg, t) for t in cfg.training_tasks()]
    assert len(training) >= 24 and len(cfg.heldout_tasks) >= 6
    for task in cfg.heldout_tasks:
        hue, row = _attributes(cfg, task)
        assert any(h == hue for h, _ in training) and any(r == row for _, r in training), task
        assert (hue, row) not in training
    # One label word: every held-out task writes the word every training task writes.
    assert {cfg.task_label(t) for t in cfg.data.tasks} == {cfg.data.synthetic.family.label}


@pytest.mark.parametrize("heldout, message", [
    (["red-top", "red-middle", "red-bottom"], "has hue 'red', which no training task has"),
    (["red-top", "orange-top", "yellow-top", "green-top", "teal-top", "cyan-top", "azure-top", "blue-top",
      "magenta-top", "pink-top"], "has row 'top', which no training task has"),
])
def test_a_held_out_value_no_training_task_has_is_refused(heldout, message):
    with pytest.raises(InputError, match=message) as err:
        family_params(heldout_tasks=heldout)
    assert "heldout_tasks" in str(err.value)


@pytest.mark.parametrize("profile", ["family", "family-sharp"])
def test_the_folds_hold_every_task_out_once_each_a_new_combination(repo, profile):
    """bench/family_folds.py's folds: disjoint, every task held out in exactly one, each fold a valid
    params.yaml (its held-out tasks new combinations of a hue and a row its training tasks keep)."""
    import importlib.util

    from icmlora.config import params_from_dict

    spec = importlib.util.spec_from_file_location("folds_bench", repo / "bench" / "family_folds.py")
    folds = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(folds)
    raw = params_dict(profile)
    cfg = params_from_dict(raw)
    held = [folds.fold_tasks(cfg, fold) for fold in range(3)]
    assert sorted(t for fold in held for t in fold) == sorted(cfg.data.tasks)
    assert all(len(fold) == cfg.data.synthetic.family.hues for fold in held)  # one per hue
    for fold in held:
        params_from_dict({**raw, "heldout_tasks": fold})  # refused if a hue or a row lost its training tasks


def test_a_task_outside_the_family_is_refused():
    with pytest.raises(InputError, match="'circle' is not a family task"):
        family_params(**{"data.tasks": ["circle", "red-top"], "heldout_tasks": []})


def test_family_images_put_each_object_in_its_row_with_both_kinds_of_near_miss():
    cfg = family_params()
    syn = cfg.data.synthetic
    items = generate_family_split(syn, 80, seed=3)
    again = generate_family_split(syn, 80, seed=3)
    assert [b for _, b in items] == [b for _, b in again]
    cell = syn.image_size // len(syn.family.rows)
    same_hue_other_row = same_row_other_hue = 0
    for image, boxes in items:
        assert syn.objects_per_image[0] <= len(boxes) <= syn.objects_per_image[1]
        for box in boxes:
            hue, row = _attributes(cfg, box.label)
            top = syn.family.rows.index(row) * cell
            assert top < box.y1 < box.y2 < top + cell, (box, row)  # inside its row's cells, off the edges
        cells = [_attributes(cfg, b.label) for b in boxes]
        same_hue_other_row += any(h == h2 and r != r2 for (h, r) in cells for (h2, r2) in cells)
        same_row_other_hue += any(h != h2 and r == r2 for (h, r) in cells for (h2, r2) in cells)
    # The two distractors a (hue, row) task must leave out are both common.
    assert same_hue_other_row > 30 and same_row_other_hue > 30, (same_hue_other_row, same_row_other_hue)


def test_prepare_writes_the_family_label_and_names_base_boxes_by_hue(tmp_path):
    cfg = family_params(**{"data.synthetic.train_images": 120, "data.synthetic.valid_images": 60})
    out = tmp_path / "prepared"
    summary = prepare(cfg, out)
    assert summary["task_labels"] == {t: "target" for t in cfg.data.tasks}
    boxes_of = {}
    for ex in read_annotations(out / BASE_SPLIT / "train" / "annotations.jsonl", check_images=False):
        assert all(b.label in {h for h, _ in map(lambda t: _attributes(cfg, t), cfg.data.tasks)} for b in ex.boxes)
        boxes_of[ex.image] = ex.boxes
    cell = cfg.data.synthetic.image_size // 3
    for task in ("red-top", "orange-top"):  # a training task and a held-out one: the same label word
        hue, row = _attributes(cfg, task)
        examples = read_annotations(out / task / "train" / "annotations.jsonl", check_images=False)
        assert examples and {b.label for ex in examples for b in ex.boxes} == {"target"}
        for ex in examples:  # exactly the image's objects of that hue in that row
            want = sorted(b.xyxy for b in boxes_of[ex.image]
                          if b.label == hue and int(b.y1 // cell) == cfg.data.synthetic.family.rows.index(row))
            assert sorted(b.xyxy for b in ex.boxes) == want


def test_nothing_of_a_held_out_task_reaches_the_generator(setting, tmp_path):
    """Change every checkpoint of the held-out task (triangle) and its task vector: the normalization
    statistics, the training rows and the trained generator stay exactly the same."""
    cfg, root, _ = setting
    cfg = with_changes(params_dict(), {"cvae.train.epochs": 2, "cvae.condition_head": 4})
    assert cfg.heldout_tasks == ["triangle"]
    other = tmp_path / "lora"
    shutil.copytree(root / "lora", other)
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import save_file

    changed = 0
    for folder in checkpoints_dir("triangle", 1, 0, other).iterdir():
        weights, _ = read_adapter(folder)
        save_file({k: 3 * v + 1 for k, v in weights.items()}, str(folder / SAFETENSORS_WEIGHTS_NAME))
        changed += 1
    assert changed == 3
    vectors = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    examples = torch.randn(3 * 4, 8, generator=torch.Generator().manual_seed(1))
    runs = {}
    for name, lora in (("original", root / "lora"), ("changed", other)):
        if name == "changed":
            vectors[2] += 5.0
            examples[8:] -= 5.0
        write_task_vectors(cfg.data.tasks, vectors, {"icl_match": examples}, {"method": "icl"},
                           tmp_path / name / "tv.safetensors", tmp_path / name / "tv.json")
        manifest = collect_params(cfg, 1, lora, tmp_path / name / "matrix")
        train_cvae(cfg, 1, tmp_path / name / "matrix", tmp_path / name / "tv.safetensors", tmp_path / name / "cvae",
                   tmp_path / name / "state", tmp_path / name / "metrics")
        matrix = read_lora_matrix(1, tmp_path / name / "matrix")
        runs[name] = (manifest, matrix, read_generator(1, tmp_path / name / "cvae"))
    (m1, x1, g1), (m2, x2, g2) = runs["original"], runs["changed"]
    held = x1.task_index == cfg.data.tasks.index("triangle")
    assert held.sum() == 3 and not torch.equal(x1.rows[held], x2.rows[held])  # the change is there ...
    assert m1["normalization"] == m2["normalization"] and torch.equal(x1.manifest.center, x2.manifest.center)
    assert torch.equal(x1.rows[~held], x2.rows[~held])  # ... and reaches no statistic nor training row
    assert torch.equal(g1.cond_mean, g2.cond_mean) and torch.equal(g1.cond_scale, g2.cond_scale)
    s1, s2 = g1.model.state_dict(), g2.model.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert g1.meta["train_tasks"] == ["circle", "square"] and g1.meta["rows"] == 6
