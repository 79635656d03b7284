"""How two adapters' detections are compared: AP50 on resampled images (a paired bootstrap)
and the overlap of their errors (function-space novelty).

``ap50_table`` reduces one model's predictions on a split to what AP50 needs: each detection's
image, score and outcome, matched exactly as COCOeval matches them at IoU 0.5 (its ``bbIou``,
its ordering rules, iscrowd for ignore regions), and the boxes to find per image. ``ap50``
then computes COCOeval's 101-point AP50 for any number of resamples at once, each resample a
vector of per-image counts: with every count 1 it equals ``detection_metrics``' mAP50 on a
split with one category (a task's valid split), and two models scored on the same resamples
give a paired difference.

``error_overlap`` is the measure Zeng et al. (2025) use to tell a weight generator that copies
its training data from one that generalizes, for detection: the IoU of two models' error sets
on a split, errors being the boxes a model misses and the false positives it makes (two false
positives are the same error if they have the same label and overlap at IoU >= 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from icmlora.artifacts.tables import POOLED_HELDOUT, POOLED_TRAINING
from icmlora.florence.format import Box
from icmlora.metrics import MATCH_IOU, box_iou, greedy_assignment

RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCOeval's p.recThrs
MAX_DETECTIONS = 100  # COCOeval's maxDets[-1]
AREA_RANGE = 1e10  # COCOeval's area range "all": [0, 1e10]


@dataclass(frozen=True)
class AP50Table:
    """One model's detections of one category on a split, in COCOeval's accumulate order."""

    image: np.ndarray  # [n] int, the image of each detection (sorted by descending score)
    true_positive: np.ndarray  # [n] bool
    false_positive: np.ndarray  # [n] bool (a detection matching an ignore region is neither)
    to_find: np.ndarray  # [images] int, boxes to find per image (ignore regions excluded)


def _coco_iou(d: Box, g: Box) -> float:
    """pycocotools' bbIou on the [x, y, w, h] boxes ``detection_metrics`` builds; an ignore
    region is a crowd: intersection over the detection's area."""
    dx, dy, dw, dh = float(d.x1), float(d.y1), float(d.x2 - d.x1), float(d.y2 - d.y1)
    gx, gy, gw, gh = float(g.x1), float(g.y1), float(g.x2 - g.x1), float(g.y2 - g.y1)
    w = min(dx + dw, gx + gw) - max(dx, gx)
    h = min(dy + dh, gy + gh) - max(dy, gy)
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    union = dw * dh if g.ignore else dw * dh + gw * gh - inter
    return inter / union


def ap50_table(ground_truth: Sequence[Sequence[Box]], predictions: Sequence[Sequence[Box]], label: str) -> AP50Table:
    """COCOeval's evaluateImg (IoU 0.5, area "all", 100 detections) and accumulate order for ``label``."""
    images, scores, matched, ignored, to_find = [], [], [], [], []
    for index, (gt, pred) in enumerate(zip(ground_truth, predictions)):
        gts = [g for g in gt if g.label == label]
        gts = [gts[i] for i in np.argsort([g.ignore for g in gts], kind="mergesort")]  # ignore regions last
        dts = [d for d in pred if d.label == label]
        dts = [dts[i] for i in np.argsort([-d.score for d in dts], kind="mergesort")][:MAX_DETECTIONS]
        to_find.append(sum(not g.ignore for g in gts))
        taken = [False] * len(gts)
        for d in dts:
            best_iou, m = min(MATCH_IOU, 1 - 1e-10), -1
            for j, g in enumerate(gts):
                if taken[j] and not g.ignore:
                    continue
                if m > -1 and not gts[m].ignore and g.ignore:
                    break
                iou = _coco_iou(d, g)
                if iou < best_iou:
                    continue
                best_iou, m = iou, j
            if m > -1:
                taken[m] = True
            # COCOeval also ignores an unmatched detection whose area is outside the range
            # [0, 1e10]: a generated box with x2 < x1 has a negative one.
            area = float(d.x2 - d.x1) * float(d.y2 - d.y1)
            images.append(index)
            scores.append(d.score)
            matched.append(m > -1)
            ignored.append(gts[m].ignore if m > -1 else not 0 <= area <= AREA_RANGE)
    order = np.argsort(-np.asarray(scores, dtype=float), kind="mergesort")
    matched_a, ignored_a = np.asarray(matched, bool)[order], np.asarray(ignored, bool)[order]
    return AP50Table(np.asarray(images, int)[order], matched_a & ~ignored_a, ~matched_a & ~ignored_a,
                     np.asarray(to_find, int))


def ap50(table: AP50Table, counts: np.ndarray | None = None) -> np.ndarray:
    """AP50 for each row of ``counts`` [resamples, images] (how often each image is drawn; None:
    every image once, a [1] array). COCOeval's accumulate with each image's detections and boxes
    weighted by its count; 0.0 where a resample has no box to find (COCOeval's -1, as
    ``detection_metrics`` reports it)."""
    counts = np.ones((1, len(table.to_find))) if counts is None else np.asarray(counts, float)
    weight = counts[:, table.image]  # [R, n]
    tp = np.cumsum(weight * table.true_positive, axis=1)
    fp = np.cumsum(weight * table.false_positive, axis=1)
    to_find = counts @ table.to_find
    out = np.zeros(len(counts))
    if tp.shape[1] == 0:
        return out
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / to_find[:, None]
    precision = tp / (tp + fp + np.spacing(1))
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # interpolated: max to the right
    for r in range(len(counts)):
        if to_find[r] <= 0:
            continue
        at = np.searchsorted(recall[r], RECALL_THRESHOLDS, side="left")
        reached = at < len(recall[r])
        out[r] = np.where(reached, precision[r, np.minimum(at, len(recall[r]) - 1)], 0.0).mean()
    return out


def bootstrap_counts(images: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """[resamples, images]: how often each image is drawn in each resample (with replacement)."""
    draws = rng.integers(0, images, size=(resamples, images))
    return np.stack([np.bincount(row, minlength=images) for row in draws]).astype(float)


def interval(differences: np.ndarray, confidence: float) -> tuple[float, float, str]:
    """The percentile interval of bootstrap differences, and the verdict it supports: better
    (the whole interval above 0), worse (below), indistinguishable (it holds 0)."""
    tail = (1 - confidence) / 2
    low, high = (float(v) for v in np.quantile(differences, [tail, 1 - tail]))
    verdict = "better" if low > 0 else "worse" if high < 0 else "indistinguishable"
    return low, high, verdict


def _errors(gt: Sequence[Box], pred: Sequence[Box]) -> tuple[set[int], list[Box]]:
    """(indices of missed boxes to find, false-positive boxes) of one image."""
    matched, ignored = greedy_assignment(gt, pred)
    found = set(matched.values())
    missed = {g for g, box in enumerate(gt) if not box.ignore and g not in found}
    false = [box for p, box in enumerate(pred) if p not in matched and p not in ignored]
    return missed, false


def error_overlap(ground_truth: Sequence[Sequence[Box]], a: Sequence[Sequence[Box]], b: Sequence[Sequence[Box]]) -> float:
    """IoU of two models' error sets on a split (1.0 when neither makes an error)."""
    shared = union = 0
    for gt, pa, pb in zip(ground_truth, a, b):
        missed_a, false_a = _errors(gt, pa)
        missed_b, false_b = _errors(gt, pb)
        same_false = 0
        free = list(false_b)
        for box in sorted(false_a, key=lambda x: -x.score):
            hit = next((j for j, other in enumerate(free)
                        if other.label == box.label and box_iou(box, other) >= MATCH_IOU), None)
            if hit is not None:
                free.pop(hit)
                same_false += 1
        common = len(missed_a & missed_b) + same_false
        shared += common
        union += len(missed_a) + len(false_a) + len(missed_b) + len(false_b) - common
    return shared / union if union else 1.0


# The comparisons a generated adapter is judged by: the trained adapter it stands in for, and
# the baselines it must beat to be more than a copy (``evaluate`` defines each source).
COMPARED = ("trained", "avg_checkpoint", "noise", "wrong_task")
COMPARED_HELDOUT = ("ridge", "few_shot_lora", "oracle_single", "nearest_task", "retrieval_mix", "mean_training", "base")


def paired_bootstrap(tables: dict[tuple[str, str, str], AP50Table], tasks: list[str], heldout: set[str],
                     counts: dict[str, np.ndarray], confidence: float) -> list[dict]:
    """Rows of (task, comparison, difference, ci_low, ci_high, verdict) for one rank.

    ``tables`` maps (task, source, sample) to an AP50 table; "generated" is the mean over its
    samples. Every source of a task is scored on the same resamples (``counts[task]``), so a
    difference is paired. Pooled rows average the per-task differences resample by resample.
    """
    rows, per_task = [], {}
    for task in tasks:
        def series(source: str) -> tuple[float, np.ndarray]:
            keys = [k for k in tables if k[0] == task and k[1] == source]
            observed = float(np.mean([ap50(tables[k])[0] for k in keys]))
            return observed, np.mean([ap50(tables[k], counts[task]) for k in keys], axis=0)

        generated = series("generated")
        for other in COMPARED + (COMPARED_HELDOUT if task in heldout else ()):
            if not any(k[0] == task and k[1] == other for k in tables):
                continue
            baseline = series(other)
            diff = generated[1] - baseline[1]
            per_task[(task, other)] = (generated[0] - baseline[0], diff)
            rows.append(_row(task, other, generated[0] - baseline[0], diff, confidence))
    for pooled, group in ((POOLED_TRAINING, [t for t in tasks if t not in heldout]), (POOLED_HELDOUT, sorted(heldout))):
        for other in COMPARED + COMPARED_HELDOUT:
            found = [per_task[(t, other)] for t in group if (t, other) in per_task]
            if found:
                rows.append(_row(pooled, other, float(np.mean([f[0] for f in found])),
                                 np.mean([f[1] for f in found], axis=0), confidence))
    return rows


def best_of_n_rows(tables: dict[tuple[str, str, str], AP50Table], chosen: dict[str, str], counts: dict[str, np.ndarray],
                   confidence: float, z0: str = "z0") -> list[dict]:
    """Rows of ``best_of_n - z0`` per task of ``chosen`` ({task: the generated sample chosen on its support
    examples}) and pooled over them (``POOLED_HELDOUT``): the chosen sample against the z = 0 sample, on
    the same resamples."""
    per = {}
    for task, name in chosen.items():
        a, b = tables[(task, "generated", name)], tables[(task, "generated", z0)]
        per[task] = (float(ap50(a)[0] - ap50(b)[0]), ap50(a, counts[task]) - ap50(b, counts[task]))
    rows = [_row(task, "", d, r, confidence, "best_of_n - z0") for task, (d, r) in per.items()]
    if per:
        rows.append(_row(POOLED_HELDOUT, "", float(np.mean([d for d, _ in per.values()])),
                         np.mean([r for _, r in per.values()], axis=0), confidence, "best_of_n - z0"))
    return rows


def _row(task: str, other: str, difference: float, resampled: np.ndarray, confidence: float, name: str | None = None) -> dict:
    low, high, verdict = interval(resampled, confidence)
    return {"task": task, "comparison": name or f"generated - {other}", "difference": difference, "ci_low": low,
            "ci_high": high, "verdict": verdict}
