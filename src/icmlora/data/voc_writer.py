"""`icmlora synth-voc OUT`: write a synthetic detection dataset as a real PASCAL VOC2012 folder.

    icmlora synth-voc data/scale-voc/VOC2012 --tasks dog cat --train 12 --valid 6

The folder is what VOC2012 is on disk, so the pipeline imports it through the VOC path
(``data.source: voc``, ``data.root: <OUT>``), exactly as it imports a user's own copy:

    <OUT>/JPEGImages/<id>.jpg          JPEG images at VOC's sizes (500x375, 375x500, 500x333, ...)
    <OUT>/Annotations/<id>.xml         VOC XML: <size>, and per object <name>, <difficult>, <bndbox>
    <OUT>/ImageSets/Main/train.txt     image ids of each split
    <OUT>/ImageSets/Main/val.txt

Objects are the synthetic source's shapes (filled, high-contrast, each task its own hue); task
``i`` of ``--tasks`` is drawn as shape ``i`` of ``circle, square, triangle, ...``, so any VOC
category name can stand for a shape. Boxes follow VOC's convention: 1-based, inclusive pixels.
Deterministic: the same arguments and seed write the same bytes. Not a stage: the scale profile's
make target runs it before ``dvc repro``; the folder is then a dependency of ``prepare``.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from types import SimpleNamespace
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw

from icmlora.data.synthetic import SHAPES, _colour, _draw
from icmlora.errors import InputError
from icmlora.files import atomic_dir

# The commonest VOC2012 image sizes (width, height).
VOC_SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 400), (500, 281))


# The synthetic source's category colours (each task its own hue), as its colour function reads them.
HUE_COLOURS = SimpleNamespace(category_colours=True)


def _image(rng: np.random.Generator, tasks: list[str], object_size: tuple[int, int]) -> tuple[Image.Image, list]:
    width, height = VOC_SIZES[int(rng.integers(len(VOC_SIZES)))]
    image = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 91, size=3)))
    draw = ImageDraw.Draw(image)
    want = int(rng.integers(1, len(tasks) + 1))
    placed: list[tuple[int, int, int, int]] = []  # x, y, size, task index
    for label in rng.choice(len(tasks), size=want, replace=False):
        for _ in range(50):
            s = int(rng.integers(object_size[0], min(object_size[1], width, height) + 1))
            x, y = int(rng.integers(0, width - s + 1)), int(rng.integers(0, height - s + 1))
            if all(x + s + 2 <= px or px + ps + 2 <= x or y + s + 2 <= py or py + ps + 2 <= y for px, py, ps, _ in placed):
                placed.append((x, y, s, int(label)))
                _draw(draw, SHAPES[int(label)], x, y, s, _colour(rng, HUE_COLOURS, int(label), len(tasks)))
                break
    return image, placed


def _xml(image_id: str, width: int, height: int, objects: list[tuple[str, int, int, int]]) -> str:
    parts = [f"<annotation>\n  <folder>VOC2012</folder>\n  <filename>{image_id}.jpg</filename>\n"
             f"  <size>\n    <width>{width}</width>\n    <height>{height}</height>\n    <depth>3</depth>\n  </size>\n"
             "  <segmented>0</segmented>\n"]
    for name, x, y, s in objects:
        # VOC pixels are 1-based and inclusive: the shape covers columns x..x+s-1 (0-based).
        parts.append(f"  <object>\n    <name>{escape(name)}</name>\n    <pose>Unspecified</pose>\n"
                     "    <truncated>0</truncated>\n    <difficult>0</difficult>\n"
                     f"    <bndbox>\n      <xmin>{x + 1}</xmin>\n      <ymin>{y + 1}</ymin>\n"
                     f"      <xmax>{x + s}</xmax>\n      <ymax>{y + s}</ymax>\n    </bndbox>\n  </object>\n")
    return "".join(parts) + "</annotation>\n"


def write_voc(out: Path, tasks: list[str], train: int, valid: int, seed: int = 0,
              object_size: tuple[int, int] = (60, 220)) -> dict[str, int]:
    """Write the folder (replacing ``out`` as a whole, never half-written); returns images per split."""
    if not tasks or len(tasks) > len(SHAPES) or len(set(tasks)) != len(tasks):
        raise InputError(f"synth-voc: --tasks needs 1 to {len(SHAPES)} distinct names, got {tasks}")
    if train < 1 or valid < 1:
        raise InputError(f"synth-voc: --train and --valid must be at least 1, got {train} and {valid}")
    rng = np.random.default_rng(seed)
    with atomic_dir(out) as tmp:
        for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
            (tmp / sub).mkdir(parents=True)
        counts = {}
        for split, count in (("train", train), ("val", valid)):
            ids = []
            for i in range(count):
                image_id = f"2012_{split}_{i:06d}"
                image, placed = _image(rng, tasks, object_size)
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=90)
                (tmp / "JPEGImages" / f"{image_id}.jpg").write_bytes(buffer.getvalue())
                objects = [(tasks[label], x, y, s) for x, y, s, label in placed]
                (tmp / "Annotations" / f"{image_id}.xml").write_text(_xml(image_id, *image.size, objects), encoding="utf-8")
                ids.append(image_id)
            (tmp / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
            counts[split] = count
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(prog="icmlora synth-voc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the VOC2012 folder to write (replaced if it exists)")
    parser.add_argument("--tasks", nargs="+", required=True, help="category names, one shape each")
    parser.add_argument("--train", type=int, default=12, help="train images (default: 12)")
    parser.add_argument("--valid", type=int, default=6, help="val images (default: 6)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    counts = write_voc(args.out, args.tasks, args.train, args.valid, args.seed)
    print(f"synth-voc: wrote {args.out} ({counts['train']} train + {counts['val']} val JPEG images with VOC XML, "
          f"tasks {', '.join(args.tasks)})")
    return counts
