"""Detection metrics: COCO mAP (pycocotools, called directly) plus precision/recall/F1 at IoU 0.5.

Both COCO datasets are built in memory (``COCO.loadRes`` would crash on an empty result list),
and mAP50-95/mAP50/mAP75 are read from the accumulated precision array the way ``summarize()``
computes ``stats[0:3]``: area "all", at most 100 detections per image (COCO's cap; the extra
detections still count in precision). Only the "all" area range is evaluated: the three
numbers are unchanged and ``evaluate()`` does a quarter of the work.

Ground-truth ignore regions (``Box.ignore``: VOC ``difficult``, COCO ``iscrowd``) are neither
boxes to find nor grounds for a false positive: the mAPs pass them to COCOeval as ``iscrowd``
(its rule: a detection inside one is ignored), and the greedy matching drops a detection that
finds no box to match but overlaps an ignore region of its label at IoU >= 0.5 (VOC's rule for
``difficult``). ``num_gt`` counts the boxes to find.
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from icmlora.florence.format import Box

AGNOSTIC_LABEL = "object"
MATCH_IOU = 0.5


def detection_metrics(
    ground_truth: Sequence[Sequence[Box]],
    predictions: Sequence[Sequence[Box]],
    sizes: Sequence[tuple[int, int]] | None = None,
    *,
    class_agnostic: bool = False,
) -> dict[str, float]:
    """COCO mAP50-95/mAP50/mAP75 and greedy precision/recall/F1 at IoU 0.5.

    ``ground_truth[i]`` and ``predictions[i]`` are the boxes of image ``i``; ``sizes[i]`` is
    its ``(width, height)``. Predictions are ranked by ``Box.score``. Categories are the union
    of GT and predicted labels; mAP averages over categories that have GT, so a predicted
    label absent from the GT only lowers precision. ``class_agnostic`` maps every label to
    one class. Metrics that are undefined (no GT, no predictions) are 0.0.
    """
    if len(ground_truth) != len(predictions):
        raise ValueError(
            f"ground_truth has {len(ground_truth)} images but predictions has {len(predictions)}"
        )
    if sizes is not None and len(sizes) != len(ground_truth):
        raise ValueError(f"sizes has {len(sizes)} entries but there are {len(ground_truth)} images")

    def label(box: Box) -> str:
        return AGNOSTIC_LABEL if class_agnostic else box.label

    num_gt = sum(1 for boxes in ground_truth for box in boxes if not box.ignore)
    num_pred = sum(len(boxes) for boxes in predictions)
    matched = [_greedy_matches(g, p, label) for g, p in zip(ground_truth, predictions)]
    tp, ignored = sum(m[0] for m in matched), sum(m[1] for m in matched)
    counted = num_pred - ignored
    precision = tp / counted if counted else 0.0
    recall = tp / num_gt if num_gt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0

    if num_gt and num_pred:
        map50_95, map50, map75 = _coco_maps(ground_truth, predictions, sizes, label)
    else:
        # pycocotools crashes on an empty result list, and nothing can be found without GT.
        map50_95 = map50 = map75 = 0.0

    return {
        "map50_95": map50_95,
        "map50": map50,
        "map75": map75,
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "num_images": len(ground_truth),
        "num_gt": num_gt,
        "num_pred": num_pred,
    }


def box_iou(a: Box, b: Box) -> float:
    """Continuous IoU, no "+1" pixel convention (as pycocotools' bbox IoU)."""
    iw = min(a.x2, b.x2) - max(a.x1, b.x1)
    ih = min(a.y2, b.y2) - max(a.y1, b.y1)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter
    return inter / union if union > 0 else 0.0


def _greedy_matches(gt: Sequence[Box], pred: Sequence[Box], label) -> tuple[int, int]:
    """(matched predictions, ignored predictions) of one image; see ``greedy_assignment``."""
    matched, ignored = greedy_assignment(gt, pred, label)
    return len(matched), len(ignored)


def greedy_assignment(gt: Sequence[Box], pred: Sequence[Box], label=lambda box: box.label
                      ) -> tuple[dict[int, int], set[int]]:
    """One image at IoU 0.5, per label: predictions by descending score each take the unmatched
    box to find of highest IoU >= 0.5; one that finds none but overlaps an ignore region at
    IoU >= 0.5 is ignored. Returns ({prediction index: ground-truth index}, ignored prediction
    indices): the other predictions are false positives, the other boxes to find are missed."""
    matched: dict[int, int] = {}
    ignored: set[int] = set()
    if not gt or not pred:
        return matched, ignored
    # Plain Python: a few boxes per image, where numpy's per-call overhead would dominate.
    unmatched: dict[str, list[int]] = defaultdict(list)
    regions: dict[str, list[Box]] = defaultdict(list)
    for g, box in enumerate(gt):
        if box.ignore:
            regions[label(box)].append(box)
        else:
            unmatched[label(box)].append(g)
    for p in sorted(range(len(pred)), key=lambda i: -pred[i].score):  # stable: ties keep input order
        box = pred[p]
        candidates = unmatched.get(label(box))
        best, best_iou = -1, MATCH_IOU
        for j, g in enumerate(candidates or ()):
            iou = box_iou(box, gt[g])
            if iou >= best_iou and (best < 0 or iou > best_iou):
                best, best_iou = j, iou
        if best >= 0:
            matched[p] = candidates.pop(best)
        elif any(box_iou(box, r) >= MATCH_IOU for r in regions.get(label(box), ())):
            ignored.add(p)
    return matched, ignored


def _coco_maps(ground_truth, predictions, sizes, label) -> tuple[float, float, float]:
    labels = sorted({label(b) for boxes in (*ground_truth, *predictions) for b in boxes})
    category_ids = {name: i + 1 for i, name in enumerate(labels)}
    images = []
    for i in range(len(ground_truth)):
        record = {"id": i + 1}
        if sizes is not None:
            record["width"], record["height"] = int(sizes[i][0]), int(sizes[i][1])
        images.append(record)
    categories = [{"id": cid, "name": name} for name, cid in category_ids.items()]

    def annotations(per_image, with_score: bool) -> list[dict]:
        anns = []
        for image_index, boxes in enumerate(per_image):
            for box in boxes:
                w, h = float(box.x2 - box.x1), float(box.y2 - box.y1)
                ann = {
                    # Ids start at 1: COCOeval stores the matched GT id in dtMatches and treats
                    # 0 as "unmatched", so a GT with id 0 would never count as found.
                    "id": len(anns) + 1,
                    "image_id": image_index + 1,
                    "category_id": category_ids[label(box)],
                    "bbox": [float(box.x1), float(box.y1), w, h],
                    "area": w * h,
                    "iscrowd": int(box.ignore),
                }
                if with_score:
                    ann["score"] = float(box.score)
                anns.append(ann)
        return anns

    gt_annotations = annotations(ground_truth, False)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = _in_memory_coco(images, categories, gt_annotations)
        coco_dt = _in_memory_coco(images, categories, annotations(predictions, True))
        evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
        params = evaluator.params
        # Categories without GT get -1 and are left out of the mean anyway, so evaluating
        # them changes nothing; skipping them keeps a broken adapter that invents hundreds of
        # labels from costing (images x labels) evaluateImg calls.
        params.catIds = sorted({ann["category_id"] for ann in gt_annotations})
        params.areaRng, params.areaRngLbl = [[0.0, 1e10]], ["all"]
        evaluator.evaluate()
        evaluator.accumulate()

    # precision: [iou thresholds, recall thresholds, categories, area ranges, max dets]
    precision = evaluator.eval["precision"][:, :, :, 0, params.maxDets.index(100)]
    iou_thresholds = params.iouThrs

    def mean_ap(values: np.ndarray) -> float:
        valid = values[values > -1]  # as summarize(): -1 marks a category without GT
        return float(valid.mean()) if valid.size else 0.0

    def at(threshold: float) -> np.ndarray:
        return precision[np.isclose(iou_thresholds, threshold)]

    return mean_ap(precision), mean_ap(at(0.5)), mean_ap(at(0.75))


def _in_memory_coco(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    coco.createIndex()
    return coco
