import json

import pytest
from params_helpers import category_params

from icmlora.artifacts import BASE_SPLIT as AGNOSTIC_TASK
from icmlora.data.synthetic import generate_split
from icmlora.errors import InputError
from icmlora.florence.format import read_annotations
from icmlora.stages.prepare import prepare


def _micro(repo, **changes):
    return category_params(**{"data.synthetic.train_images": 40, "data.synthetic.valid_images": 12, **changes})


def test_synthetic_split_is_deterministic_and_holds_distractors(repo):
    cfg = _micro(repo, **{"data.synthetic.objects_per_image": [2, 3]}).data
    a = generate_split(cfg.synthetic, cfg.tasks, 20, seed=7)
    b = generate_split(cfg.synthetic, cfg.tasks, 20, seed=7)
    assert [boxes for _, boxes in a] == [boxes for _, boxes in b]
    assert all(x.tobytes() == y.tobytes() for (x, _), (y, _) in zip(a, b))
    for image, boxes in a:
        labels = [box.label for box in boxes]
        assert len(labels) == len(set(labels)) >= 2  # distinct categories: every task image has distractors
        for box in boxes:
            assert 0 <= box.x1 < box.x2 <= image.width and 0 <= box.y1 < box.y2 <= image.height


@pytest.mark.parametrize("category_colours", [True, False])
def test_category_colours_give_each_category_its_hue(repo, category_colours):
    import colorsys

    cfg = _micro(repo, **{"data.synthetic.category_colours": category_colours, "data.synthetic.noise_sigma": 0.0,
                          "data.synthetic.base_labels": "hue" if category_colours else "object"}).data
    hues: dict[str, list[float]] = {}
    categories = ["circle", "square", "ring"]
    for image, boxes in generate_split(cfg.synthetic, categories, 30, seed=3):
        for box in boxes:  # the centre pixel of a filled circle or square (a ring's is background) is the object's colour
            if box.label == "ring":
                continue
            r, g, b = image.getpixel((int((box.x1 + box.x2) / 2), int((box.y1 + box.y2) / 2)))
            hues.setdefault(box.label, []).append(colorsys.rgb_to_hsv(r / 255, g / 255, b / 255)[0])
    for label, values in hues.items():
        expected = categories.index(label) / len(categories)
        near = [min(abs(h - expected), 1 - abs(h - expected)) < 0.04 for h in values]
        assert all(near) if category_colours else not all(near), (label, values)


def test_grid_variant_aligns_objects(repo):
    cfg = _micro(repo, **{"data.synthetic.grid": True}).data
    cell = cfg.synthetic.image_size // cfg.synthetic.grid_cells
    for _, boxes in generate_split(cfg.synthetic, cfg.tasks, 10, seed=1):
        for box in boxes:
            assert int(box.x1) // cell == int(box.x2 - 1) // cell


def test_prepare_writes_per_task_splits_with_only_that_tasks_boxes(repo, tmp_path):
    cfg = _micro(repo)
    out = tmp_path / "prepared"
    summary = prepare(cfg, out)
    assert set(summary["tasks"]) == {AGNOSTIC_TASK, *cfg.data.tasks}
    for task in cfg.data.tasks:
        for split in ("train", "valid"):
            examples = read_annotations(out / task / split / "annotations.jsonl")  # also opens every image
            assert examples and all(box.label == task for ex in examples for box in ex.boxes)
            assert summary["tasks"][task][split]["images"] == len(examples)
    # The base's split: every object of every image, named by its category's hue, never by the task.
    hues = {"circle": "red", "square": "yellow", "triangle": "green", "cross": "cyan", "ring": "blue", "star": "magenta"}
    assert summary["base_labels"] == {t: hues[t] for t in cfg.data.tasks}
    agnostic = read_annotations(out / AGNOSTIC_TASK / "train" / "annotations.jsonl")
    assert len(agnostic) == 40
    per_task = {t: {ex.image: sorted(b.xyxy for b in ex.boxes)
                    for ex in read_annotations(out / t / "train" / "annotations.jsonl", check_images=False)}
                for t in cfg.data.tasks}
    for ex in agnostic:
        for box in ex.boxes:
            task = next(t for t, h in summary["base_labels"].items() if h == box.label)
            assert box.xyxy in per_task[task][ex.image]
        # A fixed order (top to bottom, left to right), so the target text is a function of the image.
        assert [(b.y1, b.x1) for b in ex.boxes] == sorted((b.y1, b.x1) for b in ex.boxes)
    assert json.loads((out / "summary.json").read_text()) == summary


def test_base_labels_object_is_class_agnostic(repo, tmp_path):
    cfg = _micro(repo, **{"data.synthetic.base_labels": "object"})
    summary = prepare(cfg, tmp_path / "prepared")
    agnostic = read_annotations(tmp_path / "prepared" / AGNOSTIC_TASK / "train" / "annotations.jsonl")
    assert {b.label for ex in agnostic for b in ex.boxes} == {"object"}
    assert all([(b.y1, b.x1) for b in ex.boxes] == sorted((b.y1, b.x1) for b in ex.boxes) for ex in agnostic)  # reading order
    assert set(summary["base_labels"].values()) == {"object"}


def test_prepare_is_deterministic(repo, tmp_path):
    cfg = _micro(repo)
    prepare(cfg, tmp_path / "a")
    prepare(cfg, tmp_path / "b")
    for rel in ["circle/train/annotations.jsonl", "_images/valid.tar", "_images/train.tar"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_unknown_synthetic_category_is_an_error_and_nothing_is_written(repo, tmp_path):
    cfg = category_params(**{"data.tasks": ["circle", "dog"], "heldout_tasks": ["dog"]})
    with pytest.raises(InputError, match="'dog' is not one of"):
        prepare(cfg, tmp_path / "prepared")
    assert not (tmp_path / "prepared").exists()
    assert not list(tmp_path.iterdir())  # no temporary folder left behind


def test_task_without_examples_is_an_error(repo, tmp_path):
    cfg = category_params(**{"data.synthetic.train_images": 1, "data.synthetic.valid_images": 1,
                            "data.synthetic.objects_per_image": [1, 1]})
    with pytest.raises(InputError, match="has no .* examples"):
        prepare(cfg, tmp_path / "prepared")


def test_cli_exits_2_with_a_clear_message(repo, tmp_path, capsys):
    from icmlora.cli import main

    params = tmp_path / "params.yaml"
    params.write_text((repo / "params.yaml").read_text().replace("seed: 2024", "seed: many"))
    assert main(["prepare", "--params", str(params), "--out", str(tmp_path / "p")]) == 2
    assert "seed: input should be a valid integer, got 'many'" in capsys.readouterr().err


def test_stage_module_runs_as_a_program_and_exits_2_on_bad_params(repo, tmp_path):
    """dvc.yaml runs `python -m icmlora.stages.<stage>`: the same clear error, status 2, nothing written."""
    import subprocess
    import sys

    params = tmp_path / "params.yaml"
    params.write_text((repo / "params.yaml").read_text().replace("seed: 2024", "seed: -1"))
    proc = subprocess.run([sys.executable, "-m", "icmlora.stages.prepare", "--params", str(params), "--out",
                           str(tmp_path / "p")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("icmlora prepare: error: ") and "seed: input should be greater than or equal to 0" in proc.stderr
    assert not (tmp_path / "p").exists()


def _jsonl_source(root):
    """A Florence JSONL source in the real format: a difficult (ignore) dog, a zero-area dog, a BOM,
    a two-word category."""
    from PIL import Image

    root.mkdir()
    for name in ("a", "b", "c", "v"):
        Image.new("RGB", (64, 64), (200, 40, 40)).save(root / f"{name}.png")
    box, other = "<loc_100><loc_100><loc_500><loc_500>", "<loc_600><loc_600><loc_900><loc_900>"
    train = [
        {"image": "a.png", "suffix": f"dog{box}hot dog{other}", "ignore": [0]},
        {"image": "b.png", "suffix": f"dog{box}dog<loc_7><loc_7><loc_7><loc_50>"},
        {"image": "c.png", "suffix": f"hot dog{box}"},
    ]
    (root / "train.jsonl").write_text("\ufeff" + "\n".join(json.dumps(r) for r in train) + "\n", encoding="utf-8")
    valid = [{"image": "v.png", "suffix": f"dog{box}hot dog{other}", "ignore": [1]}]
    (root / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in valid) + "\n")
    return root


@pytest.mark.parametrize("policy", ["keep", "drop_images"])
def test_ignore_regions_keep_their_flag_and_the_policy_decides_training(tmp_path, policy):
    source = _jsonl_source(tmp_path / "source")
    cfg = category_params(**{"data.source": "florence_jsonl", "data.root": str(source), "data.tasks": ["dog", "hot dog"],
                            "heldout_tasks": ["hot dog"], "data.ignore_regions": policy})
    summary = prepare(cfg, tmp_path / "prepared")
    dog_train = read_annotations(tmp_path / "prepared" / "dog" / "train" / "annotations.jsonl")
    if policy == "keep":  # the difficult dog stays a training target, flagged
        assert [[b.ignore for b in ex.boxes] for ex in dog_train] == [[True], [False]]
        assert json.loads((tmp_path / "prepared/dog/train/annotations.jsonl").read_text().splitlines()[0])["ignore"] == [0]
    else:  # its image is dropped from training
        assert [[b.ignore for b in ex.boxes] for ex in dog_train] == [[False]]
    # Scoring needs the flag: the valid split keeps it under either policy.
    (hot_valid,) = read_annotations(tmp_path / "prepared" / "hot dog" / "valid" / "annotations.jsonl")
    assert [(b.label, b.ignore) for b in hot_valid.boxes] == [("hot dog", True)]
    assert summary["dropped_degenerate_boxes"] == 1 and summary["ignore_regions"] == policy
    assert summary["tasks"]["hot dog"]["valid"] == {"images": 1, "boxes": 1, "ignore_regions": 1}
