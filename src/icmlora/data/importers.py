"""Importers: a Florence JSONL, PASCAL VOC or COCO source -> images with boxes in pixels.

The prepare stage calls ``load_source(kind, root, categories)`` and gets a ``Source``:
``source["train"]`` and ``source["valid"]`` hold every image that holds at least one box of a
requested category, with only the boxes of requested categories, sorted by image path.

The real datasets' conventions, each a policy:
- Ignore regions are kept, marked ``Box.ignore``: VOC ``<difficult>1</difficult>`` objects and
  COCO ``iscrowd: 1`` annotations (and a Florence line's ``ignore`` indices). Scoring treats
  them as ignore regions; ``data.ignore_regions`` decides whether training keeps them as
  targets or drops their images.
- A box of zero width or height in the source's own coordinates (COCO ``w = 0``, VOC
  ``xmin == xmax``, equal ``<loc_N>`` bins) can never be matched: it is dropped, and each one
  is listed in ``Source.dropped`` (prepare's summary counts them).
- A UTF-8 byte-order mark at the start of a file (Windows editors write one) is accepted.
- An image in both the train and the valid split would leak validation into training: an
  error naming both places.

Every problem in a source (malformed lines, missing images, bad boxes, unknown categories,
a wrong layout) is collected and raised as one InputError, so a user fixes them in one go.
Only the images that are returned are opened (header + ``verify``, no decoding): reading
COCO train2017 for a couple of categories does not touch its other 100k images.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from icmlora.artifacts import ANNOTATIONS_FILE, SPLITS
from icmlora.errors import InputError
from icmlora.florence.format import IGNORE_KEY, Box, mark_ignored, parse_suffix

log = logging.getLogger(__name__)

# Boxes at most this far outside the image (rounding in the source's tools) are clipped.
CLIP_TOLERANCE_PX = 1.0
FLORENCE_LAYOUT = "expected <root>/{train,valid}.jsonl or <root>/{train,valid}/annotations.jsonl"
VOC_LAYOUT = "expected <root>/Annotations/<id>.xml, <root>/JPEGImages/<id>.jpg, <root>/ImageSets/Main/{train,val}.txt"
COCO_LAYOUT = (
    "expected <root>/annotations/instances_{train,val}<suffix>.json, "
    "images in <root>/{train,val}<suffix>/ or <root>/images/"
)


@dataclass
class SourceImage:
    path: Path  # absolute path of the image file
    width: int
    height: int
    boxes: list[Box]  # the boxes of requested categories, labelled with the source's names
    where: str = ""  # where the source lists it (file:line, or file: image id)


@dataclass
class Source:
    """The images of each split, and the degenerate boxes dropped on the way (where each was)."""

    splits: dict[str, list[SourceImage]]
    dropped: list[str] = field(default_factory=list)

    def __getitem__(self, split: str) -> list[SourceImage]:
        return self.splits[split]


def load_source(kind: str, root: Path, categories: list[str]) -> Source:
    loaders = {"florence_jsonl": load_florence_jsonl, "voc": load_voc, "coco": load_coco}
    if kind not in loaders:
        raise InputError(f"unknown data source kind {kind!r}", [f"use one of: {', '.join(loaders)}"])
    return loaders[kind](Path(root), categories)


# --- shared checks -----------------------------------------------------------------------


def _start(root: Path, categories: list[str], layout: str) -> Path:
    root = Path(os.path.abspath(root))  # abspath, not resolve: keep the user's symlinks
    problems = []
    if not root.is_dir():
        problems.append(f"{root}: source folder not found ({layout})")
    if not categories:
        problems.append("no categories requested: list the source's category names to import")
    if problems:
        raise InputError(f"cannot read data source {root}", problems)
    return root


def _image_size(path: Path, where: str, problems: list[str]) -> tuple[int, int] | None:
    """The image's (width, height), or None with a problem if it is missing or unreadable."""
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()  # cheap integrity check (PNG chunk CRCs); no pixel decoding
        return size
    except FileNotFoundError:
        problems.append(f"{where}: image {path} not found; fix the path or add the file")
    except Exception as exc:  # PIL raises many types for broken files
        problems.append(f"{where}: image {path} is unreadable ({exc.__class__.__name__}: {exc}); replace it")
    return None


def _read_text(path: Path) -> str:
    """A text file's content; a UTF-8 byte-order mark at its start is dropped."""
    return path.read_text(encoding="utf-8-sig")


def _pixel_box(label, x1, y1, x2, y2, width, height, where, problems, *, ignore=False, zero_extent=False,
               dropped: list[str]) -> Box | None:
    """A validated box clipped to the image, or None: with a problem, or (``zero_extent``: no
    width or no height in the source's coordinates) dropped and listed in ``dropped``."""
    if x2 < x1 or y2 < y1:
        problems.append(f"{where}: box {label!r} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) has x2 < x1 or y2 < y1")
        return None
    if zero_extent:
        dropped.append(f"{where}: box {label!r} has zero width or height")
        return None
    tol = CLIP_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        problems.append(
            f"{where}: box {label!r} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside the "
            f"{width}x{height} image by more than {tol:g} px; fix the box or the image size"
        )
        return None
    box = Box(label, max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)), ignore=ignore)
    if box.x2 <= box.x1 or box.y2 <= box.y1:  # a sliver just outside the image, clipped to nothing
        dropped.append(f"{where}: box {label!r} has zero width or height inside the image")
        return None
    return box


def _check_categories(categories: list[str], seen: set[str], root: Path, problems: list[str]) -> None:
    available = ", ".join(sorted(seen)) or "none"
    for name in categories:
        if name not in seen:
            problems.append(f"{root}: category {name!r} does not occur in the source (it has: {available})")


def _finish(root: Path, kind: str, result: dict[str, list[SourceImage]], problems: list[str],
            dropped: list[str]) -> Source:
    in_train = {im.path: im.where for im in result.get("train", [])}
    for im in result.get("valid", []):
        if im.path in in_train:
            problems.append(f"{in_train[im.path]} and {im.where}: image {im.path} is in both the train and the valid "
                            "split (validation would leak into training); keep it in one")
    if problems:
        raise InputError(f"{root}: invalid {kind} source", problems)
    for images in result.values():
        images.sort(key=lambda im: str(im.path))
    log.info("%s source %s: %s", kind, root, ", ".join(f"{len(v)} {k} images" for k, v in result.items()))
    for line in dropped:
        log.warning("dropped a degenerate box: %s", line)
    return Source(result, dropped)


# --- Florence JSONL ------------------------------------------------------------------------


def load_florence_jsonl(root: Path, categories: list[str]) -> dict[str, list[SourceImage]]:
    """``image``/``prefix``/``suffix`` lines, or the reference ``image_path``/``width``/``height``."""
    root = _start(root, categories, FLORENCE_LAYOUT)
    wanted, seen, problems, dropped = set(categories), set(), [], []
    result: dict[str, list[SourceImage]] = {}
    for split in SPLITS:
        result[split] = []
        candidates = [root / f"{split}.jsonl", root / split / ANNOTATIONS_FILE]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            tried = f"neither {split}.jsonl nor {split}/{ANNOTATIONS_FILE} exists"
            problems.append(f"{root}: no {split} annotations: {tried} ({FLORENCE_LAYOUT})")
            continue
        for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
            if line.strip():
                image = _florence_line(line, f"{path}:{lineno}", path.parent, wanted, seen, problems, dropped)
                if image is not None:
                    result[split].append(image)
    _check_categories(categories, seen, root, problems)
    return _finish(root, "florence_jsonl", result, problems, dropped)


def _florence_line(line, where, folder, wanted, seen, problems, dropped) -> SourceImage | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        problems.append(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})")
        return None
    if not isinstance(record, dict):
        problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
        return None
    image, suffix = record.get("image", record.get("image_path")), record.get("suffix")
    if not isinstance(image, str) or not isinstance(suffix, str):
        problems.append(f"{where}: needs string keys 'image' (or 'image_path') and 'suffix'")
        return None
    try:
        # Bin indices do not depend on the image size: parse once to validate and learn the
        # labels, open the image only if it is kept, then parse again in its pixels.
        labels = {b.label for b in mark_ignored(parse_suffix(suffix, 1000, 1000, strict=True), record.get(IGNORE_KEY, []))}
    except ValueError as exc:
        problems.append(f"{where}: bad suffix: {exc}")
        return None
    seen |= labels
    if not labels & wanted:
        return None
    path = Path(os.path.abspath(folder / image))  # an absolute `image` replaces `folder`
    size = _image_size(path, where, problems)
    if size is None:
        return None
    stated = (record.get("width"), record.get("height"))
    if stated != (None, None) and stated != size:
        sizes = f"{stated[0]}x{stated[1]} disagree with image {path} ({size[0]}x{size[1]})"
        problems.append(f"{where}: width/height {sizes}; fix or drop them")
        return None
    boxes = []
    for index, b in enumerate(mark_ignored(parse_suffix(suffix, *size, strict=True), record.get(IGNORE_KEY, []))):
        if b.label not in wanted:
            continue
        if b.x2 == b.x1 or b.y2 == b.y1:  # equal bins
            dropped.append(f"{where}: box {index} ({b.label!r}) has zero width or height")
            continue
        boxes.append(b)
    return SourceImage(path, size[0], size[1], boxes, where) if boxes else None


# --- PASCAL VOC ----------------------------------------------------------------------------


def load_voc(root: Path, categories: list[str]) -> Source:
    """VOC XML. Objects marked ``<difficult>1</difficult>`` are kept as ignore regions, as the
    VOC evaluation treats them."""
    root = _start(root, categories, VOC_LAYOUT)
    wanted, seen, problems, dropped = set(categories), set(), [], []
    result: dict[str, list[SourceImage]] = {}
    for split, list_name in (("train", "train.txt"), ("valid", "val.txt")):
        result[split] = []
        list_path = root / "ImageSets" / "Main" / list_name
        if not list_path.is_file():
            problems.append(f"{list_path}: {split} image list not found ({VOC_LAYOUT})")
            continue
        lines = _read_text(list_path).splitlines()
        for lineno, line in enumerate(tqdm(lines, desc=f"voc {split}", disable=None), start=1):
            if line.strip():
                where = f"{list_path}:{lineno}"
                image = _voc_image(root, line.split()[0], where, wanted, seen, problems, dropped)
                if image is not None:
                    result[split].append(image)
    _check_categories(categories, seen, root, problems)
    return _finish(root, "voc", result, problems, dropped)


def _voc_image(root, image_id, where, wanted, seen, problems, dropped) -> SourceImage | None:
    xml_path = root / "Annotations" / f"{image_id}.xml"
    try:
        tree = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        problems.append(f"{where}: annotation {xml_path} not found")
        return None
    except ET.ParseError as exc:
        problems.append(f"{xml_path}: malformed XML ({exc}); listed at {where}")
        return None
    # Only top-level <object>s: person "layout" <part>s nest their own <bndbox>.
    objects = [(i, o, (o.findtext("name") or "").strip()) for i, o in enumerate(tree.findall("object"), 1)]
    seen |= {name for _, _, name in objects}
    difficult = {i for i, o, _ in objects if o.findtext("difficult", "0").strip() == "1"}
    kept = [(i, o, n) for i, o, n in objects if n in wanted]
    if not kept:
        return None
    path = root / "JPEGImages" / f"{image_id}.jpg"
    if not path.is_file() and tree.findtext("filename"):
        path = root / "JPEGImages" / tree.findtext("filename").strip()
    size = _image_size(path, f"{xml_path} (listed at {where})", problems)
    if size is None:
        return None
    stated = tuple((tree.findtext(f"size/{k}") or "").strip() for k in ("width", "height"))
    # A few real VOC files carry size 0 or none: only a stated, non-zero size must agree.
    if all(v.isdigit() and v != "0" for v in stated) and tuple(map(int, stated)) != size:
        problems.append(f"{xml_path}: <size> {stated[0]}x{stated[1]} disagrees with image {path} ({size[0]}x{size[1]})")
        return None
    boxes = []
    for index, obj, name in kept:
        obj_where = f"{xml_path}: object {index} ({name})"
        try:
            xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            problems.append(f"{obj_where}: <bndbox> needs numeric xmin, ymin, xmax, ymax")
            continue
        # VOC pixels are 1-based and inclusive: pixel columns xmin..xmax cover [xmin-1, xmax).
        box = _pixel_box(name, xmin - 1, ymin - 1, xmax, ymax, size[0], size[1], obj_where, problems,
                         ignore=index in difficult, zero_extent=xmin == xmax or ymin == ymax, dropped=dropped)
        if box is not None:
            boxes.append(box)
    return SourceImage(path, size[0], size[1], boxes, where) if boxes else None


# --- COCO ----------------------------------------------------------------------------------


def load_coco(root: Path, categories: list[str]) -> Source:
    """COCO instances JSON; crowd annotations (``iscrowd=1``) are kept as ignore regions, as
    COCO's evaluation treats them."""
    root = _start(root, categories, COCO_LAYOUT)
    wanted, seen, problems, dropped = set(categories), set(), [], []
    result: dict[str, list[SourceImage]] = {}
    for split, prefix in (("train", "train"), ("valid", "val")):
        result[split] = []
        matches = sorted((root / "annotations").glob(f"instances_{prefix}*.json"))
        if len(matches) != 1:
            found = ", ".join(p.name for p in matches)
            what = f"are ambiguous ({found}); keep one there" if matches else f"not found ({COCO_LAYOUT})"
            problems.append(f"{root / 'annotations'}/instances_{prefix}*.json: {split} annotations {what}")
            continue
        result[split] = _coco_split(matches[0], root, wanted, seen, problems, dropped)
    _check_categories(categories, seen, root, problems)
    return _finish(root, "coco", result, problems, dropped)


def _coco_split(json_path, root, wanted, seen, problems, dropped) -> list[SourceImage]:
    try:
        data = json.loads(_read_text(json_path))
        names = {c["id"]: str(c["name"]).strip() for c in data["categories"]}
        images = {im["id"]: im for im in data["images"]}
        annotations = data["annotations"]
    except json.JSONDecodeError as exc:
        problems.append(f"{json_path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})")
        return []
    except (KeyError, TypeError) as exc:
        needs = "needs 'images', 'annotations' and 'categories' with ids"
        problems.append(f"{json_path}: not a COCO instances file ({needs}; {exc!r})")
        return []
    seen |= set(names.values())
    per_image = defaultdict(list)  # image id -> [(where, label, bbox)], in file order
    for ann in annotations:
        label = names.get(ann.get("category_id"))
        if label not in wanted:
            continue
        where = f"{json_path}: annotation id {ann.get('id')}"
        if ann.get("image_id") not in images:
            problems.append(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        elif not _is_xywh(ann.get("bbox")):
            problems.append(f"{where}: bbox must be [x, y, width, height] numbers, got {ann.get('bbox')!r}")
        else:
            per_image[ann["image_id"]].append((where, label, ann["bbox"], ann.get("iscrowd", 0) == 1))
    # instances_train2017.json -> train2017/, else images/; only needed if images are kept.
    image_dir = root / json_path.stem[len("instances_") :]
    if per_image and not image_dir.is_dir():
        if not (root / "images").is_dir():
            problems.append(f"{json_path}: image folder {image_dir} not found ({COCO_LAYOUT})")
            return []
        image_dir = root / "images"
    out = []
    for image_id, anns in tqdm(per_image.items(), desc=f"coco {json_path.stem}", disable=None):
        record = images[image_id]
        path = Path(os.path.abspath(image_dir / record.get("file_name", "")))
        where = f"{json_path}: image id {image_id}"
        size = _image_size(path, where, problems)
        if size is None:
            continue
        if (record.get("width"), record.get("height")) != size:
            stated, found = f"{record.get('width')}x{record.get('height')}", f"{size[0]}x{size[1]}"
            problems.append(f"{where}: width/height {stated} disagree with image {path} ({found})")
            continue
        boxes = [_pixel_box(label, x, y, x + w, y + h, *size, at, problems, ignore=crowd, zero_extent=w == 0 or h == 0,
                            dropped=dropped) for at, label, (x, y, w, h), crowd in anns]
        boxes = [b for b in boxes if b is not None]
        if boxes:
            out.append(SourceImage(path, size[0], size[1], boxes, where))
    return out


def _is_xywh(bbox) -> bool:
    return isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
