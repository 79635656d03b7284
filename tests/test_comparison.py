"""The paired bootstrap's AP50 equals COCOeval's; differences, intervals and verdicts; error overlap."""

from __future__ import annotations

import random
import warnings
from dataclasses import replace

import numpy as np
import pytest

from icmlora.artifacts.tables import POOLED_HELDOUT, POOLED_TRAINING
from icmlora.comparison import (
    ap50,
    ap50_table,
    bootstrap_counts,
    error_overlap,
    interval,
    paired_bootstrap,
)
from icmlora.florence.format import Box
from icmlora.metrics import detection_metrics


def random_split(rng: random.Random, images: int, noisy: float = 3.0):
    """Boxes to find (a few ignore regions) and predictions near them (some mislabelled, some
    with x2 < x1, as a generating model can write), plus strays."""
    gt, pred = [], []
    for _ in range(images):
        boxes = []
        for _ in range(rng.randint(0, 3)):
            x, y = rng.uniform(0, 50), rng.uniform(0, 50)
            boxes.append(Box("cat", x, y, x + rng.uniform(3, 14), y + rng.uniform(3, 14), ignore=rng.random() < 0.15))
        found = []
        for _ in range(rng.randint(0, 4)):
            if boxes and rng.random() < 0.6:
                t, j = rng.choice(boxes), rng.uniform(-noisy, noisy)
                found.append(Box(rng.choice(["cat", "cat", "dog"]), t.x1 + j, t.y1 + j, t.x2 + j, t.y2 - j,
                                 round(rng.random(), 2)))
            else:
                x, y = rng.uniform(0, 50), rng.uniform(0, 50)
                found.append(Box("cat", x, y, x + 8, y + 8, round(rng.random(), 2)))
        gt.append(boxes)
        pred.append(found)
    return gt, pred


def test_ap50_on_every_image_once_is_cocoeval_map50():
    rng = random.Random(0)
    checked = 0
    for _ in range(200):
        gt, pred = random_split(rng, rng.randint(1, 12))
        if not any(b.label == "cat" and not b.ignore for boxes in gt for b in boxes):
            continue
        expected = detection_metrics(gt, pred, [(64, 64)] * len(gt))["map50"]
        assert ap50(ap50_table(gt, pred, "cat"))[0] == expected
        checked += 1
    assert checked > 150


def test_resample_counts_weight_images_as_if_drawn_that_often():
    rng = random.Random(1)
    gt, pred = random_split(rng, 8)
    counts = np.array([[2, 0, 1, 1, 3, 0, 1, 0]], dtype=float)
    drawn = [i for i, c in enumerate(counts[0]) for _ in range(int(c))]
    materialized = detection_metrics([gt[i] for i in drawn], [pred[i] for i in drawn])["map50"]
    assert ap50(ap50_table(gt, pred, "cat"), counts)[0] == pytest.approx(materialized, abs=1e-12)


def test_bootstrap_counts_are_seeded_and_draw_every_image_count_times():
    a = bootstrap_counts(30, 50, np.random.default_rng(7))
    assert a.shape == (50, 30) and (a.sum(axis=1) == 30).all()
    assert np.array_equal(a, bootstrap_counts(30, 50, np.random.default_rng(7)))


def test_verdicts_read_from_the_interval():
    assert interval(np.full(100, 0.2), 0.95)[2] == "better"
    assert interval(np.full(100, -0.2), 0.95)[2] == "worse"
    low, high, verdict = interval(np.linspace(-0.1, 0.3, 1000), 0.95)
    assert verdict == "indistinguishable" and low == pytest.approx(-0.09, abs=1e-3) and high == pytest.approx(0.29, abs=1e-3)


def test_paired_bootstrap_sees_a_real_difference_and_no_difference():
    rng = random.Random(2)
    gt, good = random_split(rng, 60, noisy=0.5)
    bad = [[replace(b, label="dog") for b in boxes[: len(boxes) // 2]] for boxes in good]  # finds far less
    counts = {"cat": bootstrap_counts(60, 500, np.random.default_rng(0))}
    tables = {("cat", "generated", "z0"): ap50_table(gt, good, "cat"), ("cat", "trained", "-"): ap50_table(gt, good, "cat"),
              ("cat", "noise", "-"): ap50_table(gt, bad, "cat")}
    rows = {r["comparison"]: r for r in paired_bootstrap(tables, ["cat"], set(), counts, 0.95) if r["task"] == "cat"}
    same = rows["generated - trained"]
    assert (same["difference"], same["ci_low"], same["ci_high"], same["verdict"]) == (0.0, 0.0, 0.0, "indistinguishable")
    assert rows["generated - noise"]["verdict"] == "better" and rows["generated - noise"]["ci_low"] > 0
    pooled = [r for r in paired_bootstrap(tables, ["cat"], set(), counts, 0.95) if r["task"] == POOLED_TRAINING]
    assert {r["comparison"] for r in pooled} == {"generated - trained", "generated - noise"}


def test_error_overlap():
    gt = [[Box("cat", 0, 0, 10, 10), Box("cat", 20, 20, 30, 30)], [Box("cat", 0, 0, 10, 10)]]
    first = [[Box("cat", 0, 0, 10, 10, 0.9), Box("cat", 40, 40, 50, 50, 0.8)], []]  # misses 2, one false positive
    assert error_overlap(gt, first, first) == 1.0
    perfect = [[gt[0][0], gt[0][1]], [gt[1][0]]]
    assert error_overlap(gt, perfect, perfect) == 1.0  # no errors at all: nothing differs
    assert error_overlap(gt, first, perfect) == 0.0
    # Same misses, a different false positive: shared 2 of (3 + 3 - 2) errors.
    other = [[Box("cat", 0, 0, 10, 10, 0.9), Box("cat", 0, 40, 10, 50, 0.8)], []]
    assert error_overlap(gt, first, other) == pytest.approx(2 / 4)


def test_same_false_positives_are_paired_highest_score_first_at_iou_half_and_above():
    """A's false positives, by descending score, each take the first free one of B's that has its
    label and overlaps it at IoU >= 0.5 (exactly 0.5 counts)."""
    c1, c2 = Box("cat", 0, 0, 10, 10, 0.5), Box("cat", 4, 0, 14, 10, 0.5)
    weak, strong = Box("cat", 2, 0, 12, 10, 0.3), Box("cat", 0, 0, 10, 10, 0.9)  # IoU 2/3 with both; 1 and 3/7
    no_boxes = [[]]
    # strong first takes c1, weak then takes c2: both shared, 2 of (2 + 2 - 2) errors.
    assert error_overlap(no_boxes, [[weak, strong]], [[c1, c2]]) == 1.0
    # weak first (listed first, or by ascending score) would take c1 and leave strong unpaired: 1 / 3.
    half = Box("cat", 0, 0, 10, 5, 0.5)  # IoU exactly 0.5 with strong
    assert error_overlap(no_boxes, [[strong]], [[half]]) == 1.0
    assert error_overlap(no_boxes, [[strong]], [[replace(half, label="dog")]]) == 0.0
    assert error_overlap(no_boxes, [[strong]], [[Box("cat", 0, 0, 10, 4.9, 0.5)]]) == 0.0


def test_bootstrap_counts_draw_the_first_and_the_last_image_too():
    counts = bootstrap_counts(2, 200, np.random.default_rng(0))
    assert counts.dtype == np.float64 and set(np.unique(counts)) == {0.0, 1.0, 2.0}
    assert (counts[:, 0] == 2).any() and (counts[:, 1] == 2).any()


def _two_images(label: str):
    gt = [[Box(label, 0, 0, 10, 10)], [Box(label, 20, 20, 30, 30)]]
    both = [[replace(gt[0][0], score=0.9)], [replace(gt[1][0], score=0.9)]]  # finds every box: AP50 1
    first = [both[0], []]  # finds image 0's box only
    return gt, both, first


def test_paired_bootstrap_rows_on_hand_computed_resamples():
    """Two images with one box each; three resamples: each image once, image 0 twice, image 1 twice.
    AP50 per resample: a model finding both boxes 1, 1, 1; one finding image 0's only 51/101 (recall
    0.5 reaches 51 of COCO's 101 recall thresholds), 1, 0; one finding nothing 0, 0, 0. The generated
    adapter is the mean of its samples; pooled rows average the tasks' differences resample by resample;
    baselines of held-out tasks (nearest_task) are compared for held-out tasks only."""
    counts = np.array([[1, 1], [2, 0], [0, 2]], dtype=float)
    first_ap = np.array([51 / 101, 1.0, 0.0])
    tables = {}
    for task in ("cat", "dog"):
        gt, both, first = _two_images(task)
        tables[(task, "generated", "z0")] = ap50_table(gt, both, task)
        tables[(task, "generated", "z1")] = ap50_table(gt, first, task)
        tables[(task, "trained", "-")] = ap50_table(gt, first, task)
        tables[(task, "nearest_task", "-")] = ap50_table(gt, [[], []], task)
    assert ap50(tables[("cat", "trained", "-")], counts) == pytest.approx(first_ap, abs=1e-12)
    rows = paired_bootstrap(tables, ["cat", "dog"], {"dog"}, {"cat": counts, "dog": counts}, 0.5)
    by = {(r["task"], r["comparison"]): r for r in rows}
    assert list(by) == [("cat", "generated - trained"), ("dog", "generated - trained"),
                        ("dog", "generated - nearest_task"), (POOLED_TRAINING, "generated - trained"),
                        (POOLED_HELDOUT, "generated - trained"), (POOLED_HELDOUT, "generated - nearest_task")]
    generated = (1.0 + first_ap) / 2
    for key, resampled, observed in [
        (("cat", "generated - trained"), generated - first_ap, (1 - 51 / 101) / 2),
        (("dog", "generated - nearest_task"), generated, (1 + 51 / 101) / 2),
        ((POOLED_TRAINING, "generated - trained"), generated - first_ap, (1 - 51 / 101) / 2),
        ((POOLED_HELDOUT, "generated - nearest_task"), generated, (1 + 51 / 101) / 2),
    ]:
        row = by[key]
        assert row["difference"] == pytest.approx(observed, abs=1e-12), key
        low, high = np.quantile(resampled, [0.25, 0.75])
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high), abs=1e-12), key
    assert by[(POOLED_HELDOUT, "generated - nearest_task")]["verdict"] == "better"


def _map50(gt, pred) -> float:
    return detection_metrics(gt, pred, [(64, 64)] * len(gt))["map50"]


FAR_BOX = Box("cat", 50, 50, 60, 60, 0.5)


def _edge_case(case: str):
    """(ground truth, predictions, expected AP50 or None) of one image."""
    g = Box("cat", 0, 0, 10, 10)
    if case == "ties":
        # 61 detections, all but one at score 0.5: the box is found by the third in score order
        # (the 0.9 one, then the first two at 0.5 in their input order).
        pred = [FAR_BOX] * 61
        pred[7], pred[1] = replace(FAR_BOX, score=0.9), replace(g, score=0.5)
        return [[g]], [pred], 1 / 3
    if case == "gt_order":
        # 20 boxes to find and 20 ignore regions, interleaved; the detections' box pair sits at
        # positions 20 and 22: the stronger detection overlaps both equally (IoU 2/3) and, as
        # COCOeval, takes the later one in the given order, which leaves the weaker its box (IoU 1
        # there, 3/7 with the other). An unstable sort of the boxes would swap the pair.
        gt = [Box("cat", 100 + 20 * i, 100, 110 + 20 * i, 110, ignore=i % 2 == 1) for i in range(40)]
        gt[20], gt[22] = g, Box("cat", 4, 0, 14, 10)
        return [gt], [[Box("cat", 2, 0, 12, 10, 0.9), replace(g, score=0.8)]], None
    g_crowd = Box("cat", 20, 20, 40, 40, ignore=True)
    return {
        "iou_half": ([[g]], [[Box("cat", 0, 0, 10, 5, 0.9)]], 1.0),
        "one_pixel": ([[Box("cat", 0, 0, 1, 10)]], [[Box("cat", 0, 0, 1, 10, 0.9)]], 1.0),
        "one_pixel_high": ([[Box("cat", 0, 0, 10, 1)]], [[Box("cat", 0, 0, 10, 1, 0.9)]], 1.0),
        # The first detection overlaps both boxes, the second only the first box.
        "best_box": ([[g, Box("cat", 0, 0, 10, 16)]], [[Box("cat", 0, 0, 10, 16, 0.9), Box("cat", 0, 0, 10, 7, 0.8)]],
                     1.0),
        # A detection that matched a box to find stops there: an ignore region it overlaps as well is not taken.
        "found_before_ignored": ([[g, replace(g, ignore=True)]], [[replace(g, score=0.9)]], 1.0),
        "zero_area": ([[g]], [[Box("cat", 30, 30, 40, 30, 0.9), replace(g, score=0.5)]], 0.5),
        "huge": ([[g]], [[Box("cat", 0, 0, 1e5, 1e5, 0.9), replace(g, score=0.5)]], 0.5),
        "crowd_sliver": ([[g, g_crowd]], [[Box("cat", 25, 20, 25, 40, 0.9), replace(g, score=0.5)]], 0.5),
        "crowd_flat": ([[g, g_crowd]], [[Box("cat", 20, 25, 40, 25, 0.9), replace(g, score=0.5)]], 0.5),
    }[case]


@pytest.mark.parametrize("case", ["iou_half", "one_pixel", "one_pixel_high", "best_box", "found_before_ignored",
                                  "zero_area", "huge", "crowd_sliver", "crowd_flat", "ties", "gt_order"])
def test_ap50_matches_cocoeval_on_edge_cases(case):
    """COCOeval's rules where a shortcut would differ: IoU exactly 0.5 matches; a 1-px box is a box;
    a detection takes the box of highest IoU, not the first above 0.5, and never an ignore region
    after a box to find; an unmatched detection of area 0 or exactly 1e10 is a false positive (outside
    [0, 1e10] it would be ignored); so is a zero-width or zero-height detection inside an ignore
    region (no area to be inside); equal scores and boxes keep their order (a stable sort)."""
    gt, pred, expected = _edge_case(case)
    table = ap50_table(gt, pred, "cat")
    got = ap50(table)
    assert got.shape == (1,) and table.to_find.dtype.kind == "i"
    assert got[0] == pytest.approx(_map50(gt, pred), abs=1e-12)
    if expected is not None:
        assert got[0] == pytest.approx(expected, abs=1e-12)
    else:
        assert list(table.true_positive) == [True, True]


def test_ap50_of_a_resample_without_boxes_to_find_is_zero_and_warns_nothing():
    """Image 0 holds the box, image 1 only a false positive: a resample of image 1 alone has nothing
    to find (0, no 0/0 warning), and the resamples after it are computed all the same."""
    gt = [[Box("cat", 0, 0, 10, 10)], []]
    pred = [[Box("cat", 0, 0, 10, 10, 0.9)], [Box("cat", 0, 0, 10, 10, 0.8)]]
    table = ap50_table(gt, pred, "cat")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = ap50(table, np.array([[0, 2], [1, 1], [2, 0]]))
    assert list(got) == pytest.approx([0.0, 1.0, 1.0], abs=1e-12)
    empty = ap50_table([], [], "cat")
    assert empty.to_find.dtype.kind == "i" and list(ap50(empty)) == [0.0]
