"""Stage `prepare`: per-task detection datasets in Florence JSONL.

    python -m icmlora.stages.prepare          # or: icmlora prepare   (reads params.yaml: seed, data)

Builds data/prepared/ (layout: ``icmlora.artifacts.annotations``) in a temporary folder renamed
into place when complete: every image once in _images/<split>.tar (one file per split for DVC to
hash; ``icmlora.images``), the base model's pre-training split
_agnostic/ (every box, none named by its task: named "object", or with the synthetic
``base_labels: hue`` by its hue), one folder per task (images holding it, only its boxes), and
summary.json (base labels, counts per task and split).

An imported source's ignore regions (VOC difficult, COCO crowd; ``icmlora.data.importers``)
keep their flag in every split (the annotations' ``ignore`` key), so scoring ignores them;
``data.ignore_regions: drop_images`` also drops the training images that hold one. Boxes of
zero width or height are dropped; summary.json counts them (``dropped_degenerate_boxes``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from icmlora.artifacts import BASE_SPLIT, PREPARED_DIR, PREPARED_SUMMARY, SPLITS
from icmlora.artifacts.annotations import AGNOSTIC_LABEL, image_ref, images_dir, write_split
from icmlora.config import Params
from icmlora.errors import InputError
from icmlora.files import atomic_dir, write_json
from icmlora.florence.format import Box, Example
from icmlora.images import PackWriter, pack_path, png_bytes
from icmlora.stage_cli import run_stage, stage_parser


def _collect(cfg: Params, out: Path) -> tuple[dict[str, list[tuple[str, int, int, list[Box]]]], list[str]]:
    """Pack every image into out/_images/<split>.tar (``icmlora.images``: annotations name them
    ``../../_images/<split>/<file name>``); return (file name, w, h, boxes) per split, and where the
    source had degenerate boxes (dropped)."""
    records: dict[str, list[tuple[str, int, int, list[Box]]]] = {}
    if cfg.data.source == "synthetic":
        from icmlora.data.family import SHAPES, row_categories
        from icmlora.data.synthetic import generate_family_split, generate_split

        syn = cfg.data.synthetic
        # category_row's task names are checked against SHAPES with the params (config.py)
        key = "data.synthetic.family.shapes" if cfg.is_family() else "data.tasks"
        absent = [t for t in (syn.family.shapes if cfg.is_family() else [] if cfg.is_category_row() else cfg.data.tasks)
                  if t not in SHAPES]
        if absent:
            raise InputError(
                f"params.yaml: {key} names shapes the synthetic source does not draw",
                [f"{key}: {t!r} is not one of {', '.join(SHAPES)}" for t in absent],
            )
        for i, split in enumerate(SPLITS):
            count = syn.train_images if split == "train" else syn.valid_images
            pack = pack_path(images_dir(split, out))
            pack.parent.mkdir(parents=True, exist_ok=True)
            # Distinct seeds per split keep valid images out of the training distribution's samples.
            if cfg.is_family() or cfg.is_category_row():
                categories = row_categories(cfg.data.tasks, syn.family.rows) if cfg.is_category_row() else None
                items = generate_family_split(syn, count, seed=cfg.seed * 1000 + i, categories=categories)
            else:
                items = generate_split(syn, cfg.data.tasks, count, seed=cfg.seed * 1000 + i)
            rows = []
            with PackWriter(pack) as writer:
                for j, (image, boxes) in enumerate(tqdm(items, desc=f"prepare: write {split} images", unit="img")):
                    name = f"{j:06d}.png"
                    writer.add(name, png_bytes(image))
                    rows.append((name, image.width, image.height, boxes))
            records[split] = rows
        return records, []

    from icmlora.data.importers import load_source

    source = load_source(cfg.data.source, Path(cfg.data.root), cfg.data.tasks)
    for split in SPLITS:
        pack = pack_path(images_dir(split, out))
        pack.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        with PackWriter(pack) as writer:
            for j, item in enumerate(tqdm(source[split], desc=f"prepare: pack {split} images", unit="img")):
                name = f"{j:06d}{item.path.suffix.lower()}"
                writer.add(name, item.path.read_bytes())  # the source's own bytes, not re-encoded
                rows.append((name, item.width, item.height, item.boxes))
        records[split] = rows
    return records, source.dropped


def base_labels(cfg: Params) -> dict[str, str]:
    """{category: the name the base model's pre-training split gives it}: ``object`` for every
    category, or with synthetic ``base_labels: hue`` the name of the category's hue. A family's
    categories are its cells (every one is drawn, task or not), each named by its hue band; a
    category_row grid's cells are named by their category's hue."""
    if cfg.is_category_row():
        from icmlora.data.family import cell_name, hue_name, row_categories

        rows = cfg.data.synthetic.family.rows
        categories = row_categories(cfg.data.tasks, rows)
        name = (lambda i: AGNOSTIC_LABEL) if cfg.data.synthetic.base_labels == "object" else \
            (lambda i: hue_name(i, len(categories)))
        return {cell_name(c, r): name(i) for i, c in enumerate(categories) for r in rows}
    if cfg.is_family():
        from icmlora.data.family import cells, split_cell

        family = cfg.data.synthetic.family
        every = cells(family.hues, family.rows)
        if cfg.data.synthetic.base_labels == "object":
            return {c: AGNOSTIC_LABEL for c in every}
        return {c: split_cell(c, family.hues, family.rows)[0] for c in every}
    if cfg.data.source == "synthetic" and cfg.data.synthetic.base_labels == "hue":
        from icmlora.data.family import hue_name

        return {t: hue_name(i, len(cfg.data.tasks)) for i, t in enumerate(cfg.data.tasks)}
    return {t: AGNOSTIC_LABEL for t in cfg.data.tasks}


def _ordered(boxes: list[Box]) -> list[Box]:
    """Top to bottom, then left to right: a fixed order, so that a target text is a function of
    its image. In the source's order the base must guess which object a target names first.
    Measured on the default data (hue names, 1,600 steps, class-agnostic valid mAP50): the
    generator's order 0.60; by hue 0.60 or 0.96 depending on the token ids the tokenizer happened
    to give the hue names (the loss leaves its plateau late, near the end of the schedule); top
    to bottom 0.99 (loss 1.9 by step 400 in two runs with different token ids)."""
    return sorted(boxes, key=lambda b: (b.y1, b.x1))


def _task_examples(rows, split: str, task: str | None, limit: int, names: dict[str, str],
                   drop_ignored: bool, label: str | None = None) -> list[Example]:
    """The examples of ``task`` (None: the base's split, every box named by ``names``): the images
    holding it, only its boxes, written with ``label`` (default: the task's name)."""
    examples = []
    for file_name, w, h, boxes in rows:
        image = image_ref(split, file_name)
        if task is None:
            kept = [replace(b, label=names.get(b.label, AGNOSTIC_LABEL)) for b in _ordered(boxes)]
        else:
            kept = [b if label in (None, task) else replace(b, label=label) for b in _ordered(boxes) if b.label == task]
            if not kept:
                continue
        if drop_ignored and any(b.ignore for b in kept):
            continue
        examples.append(Example(image, w, h, kept))
        if limit and len(examples) >= limit:
            break
    return examples


def prepare(cfg: Params, out_dir: Path = PREPARED_DIR) -> dict:
    """Build the prepared data folder; returns the summary it wrote."""
    names = base_labels(cfg)
    summary: dict = {"source": cfg.data.source, "base_labels": names, "tasks": {}}
    if cfg.is_family() or cfg.is_category_row():
        summary["task_labels"] = {t: cfg.task_label(t) for t in cfg.data.tasks}
    with atomic_dir(out_dir) as tmp:
        records, dropped = _collect(cfg, tmp)
        empty = []
        for task in [None, *cfg.data.tasks]:
            name = BASE_SPLIT if task is None else task
            summary["tasks"][name] = {}
            for split in SPLITS:
                limit = 0 if task is None else (cfg.data.max_train_per_task if split == "train" else cfg.data.max_valid_per_task)
                drop = split == "train" and cfg.data.ignore_regions == "drop_images"
                examples = _task_examples(records[split], split, task, limit, names, drop,
                                          None if task is None else cfg.task_label(task))
                if not examples:
                    empty.append(f"task {name!r} has no {split} examples in source {cfg.data.source!r}")
                write_split(name, split, examples, tmp)
                counts = {"images": len(examples), "boxes": sum(len(e.boxes) for e in examples)}
                ignored = sum(b.ignore for e in examples for b in e.boxes)
                if cfg.data.source != "synthetic":  # the synthetic source has no ignore regions
                    counts["ignore_regions"] = ignored
                summary["tasks"][name][split] = counts
        if empty:
            raise InputError("prepare: some tasks have no examples (check data.tasks and the source)", empty)
        if cfg.data.source != "synthetic":
            summary.update(ignore_regions=cfg.data.ignore_regions, dropped_degenerate_boxes=len(dropped))
        write_json(tmp / PREPARED_SUMMARY.name, summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = stage_parser("prepare", __doc__)
    parser.add_argument("--out", type=Path, default=PREPARED_DIR, help=f"output folder (default: {PREPARED_DIR})")
    args, cfg = parser.parse(argv)
    summary = prepare(cfg, args.out)
    train = summary["tasks"][BASE_SPLIT]["train"]["images"]
    valid = summary["tasks"][BASE_SPLIT]["valid"]["images"]
    dropped = summary.get("dropped_degenerate_boxes")
    print(f"prepare: wrote {args.out} ({len(cfg.data.tasks)} tasks, {train} train + {valid} valid images, "
          f"source {cfg.data.source}" + (f"; dropped {dropped} degenerate boxes" if dropped else "") + ")")
    return summary


if __name__ == "__main__":
    run_stage(main)
