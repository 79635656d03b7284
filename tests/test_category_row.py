"""The embedded default's tasks (``task_kind: category_row``): (category, row) pairs that write the
category's word, and held-out tasks that are new combinations of what training tasks teach."""

import pytest
from params_helpers import default_params, params_dict, with_changes

from icmlora.artifacts import BASE_SPLIT
from icmlora.errors import InputError
from icmlora.florence.format import read_annotations
from icmlora.stages.prepare import prepare


def test_the_defaults_held_out_tasks_are_new_combinations_only():
    cfg = default_params()
    assert cfg.data.synthetic.task_kind == "category_row"
    training = [cfg.task_attributes(t) for t in cfg.training_tasks()]
    labels = {cfg.task_label(t) for t in cfg.training_tasks()}
    # The paper's setting stays recognisable: six or more training tasks, each a detection category
    # written with its category's own word, at ranks 1, 2, 4 and 8.
    assert len(training) >= 6 and len(cfg.heldout_tasks) >= 2 and cfg.lora.ranks == [1, 2, 4, 8]
    assert all(cfg.task_label(t) == cfg.task_attributes(t)["category"] for t in cfg.data.tasks)
    for task in cfg.heldout_tasks:
        wants = cfg.task_attributes(task)
        assert wants not in training, task  # new ...
        assert any(a["category"] == wants["category"] for a in training), task  # ... but its category
        assert any(a["row"] == wants["row"] for a in training), task  # and its row are taught
        assert cfg.task_label(task) in labels, task  # and a training adapter writes its word


@pytest.mark.parametrize("heldout, message", [
    (["circle-top", "circle-middle", "circle-bottom"], "has category 'circle', which no training task has"),
    (["circle-top", "square-top", "triangle-top"], "has row 'top', which no training task has"),
])
def test_a_held_out_value_no_training_task_has_is_refused(heldout, message):
    with pytest.raises(InputError, match=message) as err:
        with_changes(params_dict(None), {"heldout_tasks": heldout})
    assert "heldout_tasks" in str(err.value)


@pytest.mark.parametrize("task, why", [("circle", "not a category_row task"), ("blob-top", "not a category_row task"),
                                       ("circle-left", "not a category_row task")])
def test_a_task_that_is_no_category_row_pair_is_refused(task, why):
    with pytest.raises(InputError, match=why) as err:
        with_changes(params_dict(None), {"data.tasks": ["circle-top", "square-top", task], "heldout_tasks": []})
    assert repr(task) in str(err.value)


def test_prepare_writes_the_category_word_and_names_base_boxes_by_the_categorys_hue(tmp_path):
    cfg = with_changes(params_dict(None), {"data.synthetic.train_images": 150, "data.synthetic.valid_images": 60})
    out = tmp_path / "prepared"
    summary = prepare(cfg, out)
    assert summary["task_labels"] == {t: t.split("-")[0] for t in cfg.data.tasks}
    hue = {"circle": "red", "square": "green", "triangle": "blue"}  # three categories, evenly spaced hues
    assert set(summary["base_labels"].values()) == set(hue.values())
    boxes_of = {}
    for ex in read_annotations(out / BASE_SPLIT / "train" / "annotations.jsonl", check_images=False):
        assert {b.label for b in ex.boxes} <= set(hue.values())
        boxes_of[ex.image] = ex.boxes
    rows, cell = cfg.data.synthetic.family.rows, cfg.data.synthetic.image_size // 3
    for task in ("circle-top", "circle-middle"):  # a training task and a held-out one
        category, row = task.split("-")
        examples = read_annotations(out / task / "train" / "annotations.jsonl", check_images=False)
        assert examples and {b.label for ex in examples for b in ex.boxes} == {category}
        for ex in examples:  # exactly the image's objects of that category (its hue) in that row
            want = sorted(b.xyxy for b in boxes_of[ex.image]
                          if b.label == hue[category] and int(b.y1 // cell) == rows.index(row))
            assert sorted(b.xyxy for b in ex.boxes) == want
