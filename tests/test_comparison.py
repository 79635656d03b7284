"""The paired bootstrap's AP50 equals COCOeval's; differences, intervals and verdicts; error overlap."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest

from icmlora.artifacts.tables import POOLED_TRAINING
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
