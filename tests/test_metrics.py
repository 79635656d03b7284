"""Detection metrics: COCO mAP via pycocotools and greedy precision/recall/F1 at IoU 0.5.

Expected mAPs are derived by hand from COCO's rule: precision is made monotone from the
right, then read at 101 recall thresholds 0.00..1.00 (the first point whose recall reaches
each threshold; 0 beyond the highest recall) and averaged.
"""

from __future__ import annotations

import contextlib
import io
import random
from dataclasses import replace

import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from icmlora.florence.format import Box
from icmlora.metrics import box_iou, detection_metrics, greedy_assignment

MAPS = ("map50_95", "map50", "map75")
RATES = ("precision", "recall", "f1")


def cat(x1=10.0, y1=10.0, x2=50.0, y2=50.0, score=1.0, label="cat") -> Box:
    return Box(label, x1, y1, x2, y2, score)


FAR = dict(x1=200.0, y1=200.0, x2=240.0, y2=240.0)  # overlaps nothing


def assert_metrics(result: dict, **expected: float) -> None:
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("class_agnostic", [False, True])
def test_perfect_predictions_score_one(class_agnostic):
    gt = [
        [cat(), Box("dog", 60.5, 5.25, 90.75, 40.5)],
        [Box("dog", 0.0, 0.0, 3.5, 2.5)],  # sub-pixel box
        [],
    ]
    sizes = [(100, 80), (16, 16), (32, 32)]
    result = detection_metrics(gt, gt, sizes, class_agnostic=class_agnostic)
    assert_metrics(result, **{k: 1.0 for k in MAPS + RATES})
    assert (result["num_images"], result["num_gt"], result["num_pred"]) == (3, 3, 3)
    assert all(isinstance(result[k], float) for k in MAPS + RATES)


@pytest.mark.parametrize(
    "gt, pred",
    [
        ([[cat()], [cat(), cat(label="dog")]], [[], []]),  # nothing predicted
        ([[], []], [[], []]),  # nothing at all
        ([[], []], [[cat()], []]),  # no GT anywhere, only false positives
        ([], []),  # no images
    ],
    ids=["no-predictions", "empty", "no-gt", "no-images"],
)
def test_degenerate_inputs_give_zeros(gt, pred):
    result = detection_metrics(gt, pred)
    assert_metrics(result, **{k: 0.0 for k in MAPS + RATES})
    assert result["num_gt"] == sum(map(len, gt)) and result["num_pred"] == sum(map(len, pred))


@pytest.mark.parametrize("empty_images", [1, 3])
def test_false_positives_on_images_without_gt_lower_precision(empty_images):
    gt = [[cat()]] + [[] for _ in range(empty_images)]
    pred = [[cat(score=0.9)]] + [[cat(score=0.5)] for _ in range(empty_images)]
    result = detection_metrics(gt, pred)
    precision = 1 / (1 + empty_images)
    # The false positives rank below the only TP, so AP stays 1.
    assert_metrics(result, map50=1.0, map50_95=1.0, precision=precision, recall=1.0,
                   f1=2 * precision / (precision + 1))


@pytest.mark.parametrize("class_agnostic, expected", [(False, 0.0), (True, 1.0)])
def test_wrong_label(class_agnostic, expected):
    result = detection_metrics([[cat()]], [[cat(label="dog")]], class_agnostic=class_agnostic)
    assert_metrics(result, **{k: expected for k in MAPS + RATES})


def test_label_absent_from_gt_only_costs_precision():
    result = detection_metrics([[cat()]], [[cat(), cat(score=0.99, label="unicorn", **FAR)]])
    assert_metrics(result, map50_95=1.0, map50=1.0, map75=1.0, precision=0.5, recall=1.0)


@pytest.mark.parametrize(
    "y2, map50, map75, map50_95, precision",
    [
        # IoU 0.625: passes thresholds 0.50, 0.55, 0.60 of the ten -> 3/10.
        (35.0, 1.0, 0.0, 0.3, 1.0),
        # IoU 0.45: below every threshold.
        (28.0, 0.0, 0.0, 0.0, 0.0),
    ],
    ids=["iou-0.625", "iou-0.45"],
)
def test_localization_thresholds(y2, map50, map75, map50_95, precision):
    # GT 40x40; the prediction keeps x and the top edge, so IoU = (y2 - 10) / 40.
    result = detection_metrics([[cat()]], [[cat(y2=y2)]])
    assert_metrics(result, map50=map50, map75=map75, map50_95=map50_95, precision=precision)


@pytest.mark.parametrize(
    "gt, pred, ap, precision, recall",
    [
        # TP (0.9) then FP (0.1): precision [1, .5], recall [1, 1] -> every threshold reads 1.
        ([[cat()]], [[cat(score=0.9), cat(score=0.1, **FAR)]], 1.0, 0.5, 1.0),
        # FP (0.9) then TP (0.1): precision [0, .5] -> envelope [.5, .5] -> AP .5.
        ([[cat()]], [[cat(score=0.1), cat(score=0.9, **FAR)]], 0.5, 0.5, 1.0),
        # A duplicate is a false positive, like any second hit on a matched GT.
        ([[cat()]], [[cat(score=0.9), cat(score=0.8)]], 1.0, 0.5, 1.0),
        # Two GT; TP .9, FP .8, TP .7: recall [.5, .5, 1], envelope [1, 2/3, 2/3]; thresholds
        # 0.00..0.50 (51) read 1, 0.51..1.00 (50) read 2/3 -> (51 + 100/3) / 101 = 253/303.
        (
            [[cat(), cat(x1=100.0, x2=140.0)]],
            [[cat(score=0.9), cat(score=0.8, **FAR), cat(x1=100.0, x2=140.0, score=0.7)]],
            253 / 303, 2 / 3, 1.0,
        ),
    ],
    ids=["tp-first", "fp-first", "duplicate", "two-gt"],
)
def test_score_ranking(gt, pred, ap, precision, recall):
    result = detection_metrics(gt, pred)
    # Matched boxes are exact, so every IoU threshold gives the same AP.
    assert_metrics(result, map50_95=ap, map50=ap, map75=ap, precision=precision, recall=recall)


def test_greedy_matching_prefers_highest_iou():
    # The top-scored prediction overlaps both GT boxes (IoU .6 with the first, .78 with the
    # second) and must take the second; the other prediction only overlaps the first
    # (IoU .9). Taking the first GT above 0.5 would leave one TP instead of two.
    gt = [[cat(x1=0.0, x2=40.0), cat(x1=15.0, x2=55.0)]]
    pred = [[cat(x1=10.0, x2=50.0, score=0.9), cat(x1=-2.0, x2=38.0, score=0.8)]]
    assert_metrics(detection_metrics(gt, pred), precision=1.0, recall=1.0)


@pytest.mark.parametrize(
    "gt, pred, sizes, message",
    [([[cat()], []], [[cat()]], None, r"^ground_truth has 2 images but predictions has 1$"),
     ([[cat()]], [[cat()]], [(10, 10), (10, 10)], r"^sizes has 2 entries but there are 1 images$")],
    ids=["predictions", "sizes"],
)
def test_length_mismatch_raises(gt, pred, sizes, message):
    """A list of the wrong length is refused up front, with a message that names both counts
    (not some later error of a zip or an index)."""
    with pytest.raises(ValueError, match=message):
        detection_metrics(gt, pred, sizes)


def _reference_stats(gt, pred):
    """pycocotools' textbook path: loadRes, all area ranges, summarize()."""
    labels = sorted({b.label for boxes in gt + pred for b in boxes})
    ids = {name: i + 1 for i, name in enumerate(labels)}

    def record(i, b):
        return {"image_id": i + 1, "category_id": ids[b.label], "score": b.score,
                "bbox": [b.x1, b.y1, b.x2 - b.x1, b.y2 - b.y1]}

    annotations = [record(i, b) for i, boxes in enumerate(gt) for b in boxes]
    for n, ann in enumerate(annotations, start=1):
        ann.update(id=n, area=ann["bbox"][2] * ann["bbox"][3], iscrowd=0)
    dataset = {"images": [{"id": i + 1} for i in range(len(gt))], "annotations": annotations,
               "categories": [{"id": c, "name": n} for n, c in ids.items()]}
    results = [record(i, b) for i, boxes in enumerate(pred) for b in boxes]
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats[:3]


def test_matches_pycocotools_summarize_on_random_data():
    rng = random.Random(0)
    labels = ["circle", "square", "star"]

    def jitter(v):
        return v + rng.uniform(-4, 4)

    gt, pred = [], []
    for _ in range(40):
        g = []
        for _ in range(rng.randint(0, 4)):
            x, y = rng.uniform(0, 150), rng.uniform(0, 150)
            g.append(cat(x, y, x + rng.uniform(2, 60), y + rng.uniform(2, 60),
                         label=rng.choice(labels)))
        p = [Box(b.label if rng.random() < 0.85 else "blob", jitter(b.x1), jitter(b.y1),
                 jitter(b.x2), jitter(b.y2), rng.random()) for b in g if rng.random() < 0.8]
        if rng.random() < 0.5:
            x = rng.uniform(0, 150)
            p.append(cat(x, x, x + 20, x + 20, rng.random(), rng.choice(labels)))
        gt.append(g)
        pred.append(p)
    result = detection_metrics(gt, pred)
    assert [result[k] for k in MAPS] == pytest.approx(list(_reference_stats(gt, pred)), abs=1e-12)
    assert 0.0 < result["map50_95"] < result["map50"] < 1.0


def test_ignore_regions_are_neither_found_nor_false_positives():
    """A difficult/crowd object: detecting it costs nothing and gains nothing; missing it too."""
    from dataclasses import replace

    hidden = replace(cat(**FAR), ignore=True)
    gt = [[cat(), hidden]]
    found_both = detection_metrics(gt, [[cat(score=0.9), cat(score=0.95, **FAR)]], [(300, 300)])
    found_one = detection_metrics(gt, [[cat(score=0.9)]], [(300, 300)])
    for result in (found_both, found_one):
        assert_metrics(result, **{k: 1.0 for k in MAPS + RATES})
        assert result["num_gt"] == 1
    assert found_both["num_pred"] == 2
    # The same detection without the flag on the ground truth: a missed box, a found box.
    plain = detection_metrics([[cat(), cat(**FAR)]], [[cat(score=0.9)]], [(300, 300)])
    assert_metrics(plain, recall=0.5, precision=1.0)
    # A detection that matches a box to find is a true positive even inside an ignore region,
    # and an ignore region never turns a wrong-label detection into an ignored one.
    dog = detection_metrics([[cat(), replace(cat(), ignore=True)]], [[cat(score=0.9), cat(label="dog")]], [(300, 300)])
    assert_metrics(dog, precision=0.5, recall=1.0)


def test_an_image_with_only_ignore_regions_scores_no_boxes_to_find():
    from dataclasses import replace

    result = detection_metrics([[replace(cat(), ignore=True)], [cat()]], [[cat(score=0.8)], [cat()]], [(100, 100)] * 2)
    assert result["num_gt"] == 1
    assert_metrics(result, precision=1.0, recall=1.0, map50=1.0)


def test_f1_is_the_harmonic_mean_of_precision_and_recall():
    # Recall 1/2 at precision 1: F1 2/3. Precision 1/2, recall 1/2: F1 1/2 (their sum is not above 1).
    assert_metrics(detection_metrics([[cat(), cat(**FAR)]], [[cat()]]), precision=1.0, recall=0.5, f1=2 / 3)
    assert_metrics(detection_metrics([[cat(), cat(**FAR)]], [[cat(score=0.9), cat(x1=100.0, x2=140.0, score=0.8)]]),
                   precision=0.5, recall=0.5, f1=0.5)


def test_box_iou_on_touching_disjoint_tiny_and_thin_boxes():
    a = Box("cat", 0, 0, 10, 10)
    assert box_iou(a, Box("cat", 20, 0, 30, 10)) == 0.0  # apart in x only: no negative overlap
    assert box_iou(a, Box("cat", 0, 20, 10, 30)) == 0.0
    assert box_iou(a, Box("cat", 10, 0, 20, 10)) == 0.0  # touching
    assert box_iou(a, Box("cat", 0, 0, 10, 5)) == 0.5
    thin = Box("cat", 0, 0, 1, 10)  # one pixel wide (and one pixel high, below)
    assert box_iou(thin, thin) == 1.0 and box_iou(Box("cat", 0, 0, 10, 1), Box("cat", 0, 0, 10, 1)) == 1.0
    tiny = Box("cat", 0, 0, 0.5, 0.5)  # union below one square pixel
    assert box_iou(tiny, tiny) == 1.0 and box_iou(tiny, Box("cat", 0, 0, 0.5, 0.25)) == 0.5


def test_greedy_assignment_by_score_first_box_on_ties_and_iou_half_counts():
    g = Box("cat", 0, 0, 10, 10)
    # The higher score is served first, whatever the input order.
    assert greedy_assignment([g], [replace(g, score=0.3), replace(g, score=0.9)]) == ({1: 0}, set())
    # Equal IoU with two boxes to find: the first box is taken.
    twins = [Box("cat", 0, 0, 10, 10), Box("cat", 0, 0, 10, 10)]
    assert greedy_assignment(twins, [replace(g, score=0.9)]) == ({0: 0}, set())
    # IoU exactly 0.5: a match with a box to find, and with an ignore region (then ignored).
    half = Box("cat", 0, 0, 10, 5, 0.9)
    assert greedy_assignment([g], [half]) == ({0: 0}, set())
    assert greedy_assignment([replace(g, ignore=True)], [Box("cat", 50, 50, 60, 60, 0.8), half]) == ({}, {1})


def test_metrics_print_nothing(capsys):
    detection_metrics([[cat()]], [[cat()]])
    assert capsys.readouterr().out == ""


def test_a_zero_height_box_and_the_area_limit_as_cocoeval():
    """A detection of area 0 is a detection (a false positive here); one of area just above 1e10 is
    outside COCO's area range "all" and, unmatched, not counted in the mAP."""
    flat = Box("cat", 100, 100, 140, 100, 0.9)
    assert_metrics(detection_metrics([[cat()]], [[flat, cat(score=0.5)]]), map50=0.5, precision=0.5)
    huge = Box("cat", 0, 0, 1e5, 100000.000005, 0.9)  # area 1e10 + 0.5
    assert_metrics(detection_metrics([[cat()]], [[huge, cat(score=0.5)]]), map50=1.0, precision=0.5)


def test_a_category_with_only_ignore_regions_is_left_out_of_the_mean():
    gt = [[cat(), Box("dog", 100, 100, 140, 140, ignore=True)]]
    pred = [[cat(score=0.9), Box("dog", 100, 100, 140, 140, 0.8)]]
    assert_metrics(detection_metrics(gt, pred), map50=1.0, map50_95=1.0, precision=1.0, recall=1.0)
