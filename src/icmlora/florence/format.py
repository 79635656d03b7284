"""The Florence-2 detection format, and the one parser of its ``label<loc_..>x4`` text.

An annotations file holds one JSON object per line with ``image``, ``prefix``, ``suffix``.
``suffix`` is ``label<loc_x1><loc_y1><loc_x2><loc_y2>label<loc_...>...``: box corners quantized
to 1000 bins of the image width/height exactly as transformers' ``Florence2PostProcessor``
does (``floor(x / (W / 1000))`` clamped to 0..999; the inverse is the bin centre
``(q + 0.5) * W / 1000``). We keep the centre as a float: the transformers post-processor
truncates it to an int, which costs whole pixels on small images.

``parse_pieces`` reads that grammar from a sequence of pieces, each a location bin (``Loc``) or
a piece of text (a string, or a token id), and is the only parser: ``parse_suffix`` feeds it
the pieces of a text (ground truth, strict), ``florence.predict`` the generated tokens with
their probabilities (scored boxes), and task vectors the positions where the base names an
object.

The reference code's variant with ``image_path``/``height``/``width`` is read too.
``image`` is a path relative to the annotations file's folder.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from icmlora.errors import InputError

NUM_BINS = 1000
OD_PROMPT = "<OD>"
# An annotations line may list the indices (0-based, in ``suffix`` order) of its boxes that are
# ignore regions. The suffix still holds them: a training target names every object there.
IGNORE_KEY = "ignore"
_LOC_TEXT = re.compile(r"(<loc_\d+>)")
_SPECIAL_TEXT = ("<s>", "</s>", "<pad>")


@dataclass(frozen=True)
class Box:
    """A box in pixels, corners (x1, y1, x2, y2), with its label and (for predictions) a
    confidence score; ground-truth boxes keep the default 1.0. ``ignore`` marks a ground-truth
    ignore region (VOC ``difficult``, COCO ``iscrowd``): scoring counts a detection of it
    neither as a true nor as a false positive, and it is not a box to find."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    score: float = 1.0
    ignore: bool = False

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass
class Example:
    """One image with its prompt and target boxes."""

    image: str  # relative to the annotations file's folder
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)
    prefix: str = OD_PROMPT

    @property
    def suffix(self) -> str:
        return encode_suffix(self.boxes, self.width, self.height)

    def to_json(self) -> dict:
        record = {
            "image": self.image,
            "prefix": self.prefix,
            "suffix": self.suffix,
            "width": self.width,
            "height": self.height,
        }
        ignored = [i for i, box in enumerate(self.boxes) if box.ignore]
        if ignored:
            record[IGNORE_KEY] = ignored
        return record


def quantize(value: float, size: float) -> int:
    """Pixel coordinate -> bin index, as ``Florence2PostProcessor.quantize``."""
    return int(min(max(math.floor(value / (size / NUM_BINS)), 0), NUM_BINS - 1))


def dequantize(bin_index: int, size: float) -> float:
    """Bin index -> pixel coordinate of the bin centre (a float; transformers truncates it)."""
    return (bin_index + 0.5) * size / NUM_BINS


def encode_suffix(boxes: list[Box], width: int, height: int) -> str:
    parts = []
    for b in boxes:
        q = (quantize(b.x1, width), quantize(b.y1, height), quantize(b.x2, width), quantize(b.y2, height))
        parts.append(b.label + "".join(f"<loc_{v}>" for v in q))
    return "".join(parts)


class Loc(int):
    """A ``<loc_N>`` piece: its bin N."""


@dataclass(frozen=True)
class ParsedBox:
    """One box of a parsed sequence: its label, its four bins, and where they were."""

    label: str
    bins: tuple[int, int, int, int]
    label_positions: tuple[int, ...]  # indices of the label's pieces in the sequence
    loc_positions: tuple[int, ...]  # indices of the four locations
    opens_phrase: bool  # the first box after its label (later boxes of a phrase reuse the label)

    def box(self, width: float, height: float, score: float = 1.0) -> Box:
        q = self.bins
        return Box(self.label, dequantize(q[0], width), dequantize(q[1], height), dequantize(q[2], width),
                   dequantize(q[3], height), score)


def parse_pieces(pieces: Sequence[object], decode: Callable[[list], str], *, strict: bool = False) -> list[ParsedBox]:
    """Boxes from a sequence of pieces: ``Loc`` bins, text pieces, or None (skipped).

    The grammar is the post-processor's: a phrase (text pieces) names the boxes whose four
    locations follow it; a phrase with 4k locations names k boxes; a box interrupted by text is
    dropped, and so is a box with no phrase before it. ``decode`` turns a phrase's pieces into
    its label. Lenient (model output) it skips what it cannot read, as the post-processor does,
    and a bin >= 1000; ``strict`` (ground truth) raises ValueError instead, and on x2 < x1 or
    y2 < y1 and text after the last box.
    """
    boxes: list[ParsedBox] = []
    phrase: list[int] = []  # positions of the text pieces read since the last location
    label, label_at, opens = "", (), False
    locs: list[int] = []
    for i, piece in enumerate(pieces):
        if piece is None:
            continue
        if isinstance(piece, Loc):
            if not locs and phrase:  # the phrase before this run of locations is the label
                label, label_at, opens, phrase = decode([pieces[j] for j in phrase]).strip(), tuple(phrase), True, []
            locs.append(i)
            if len(locs) < 4:
                continue
            bins = tuple(int(pieces[j]) for j in locs)
            if strict:
                _check_box(label, bins)
            if label and max(bins) < NUM_BINS:
                boxes.append(ParsedBox(label, bins, label_at, tuple(locs), opens))
                opens = False
            locs = []
        else:
            if locs:  # a phrase interrupting a box: the partial box is dropped
                if strict:
                    raise ValueError(f"{label!r} has a box cut short: {len(locs)} <loc_N>, not 4")
                locs = []
            if not phrase:
                label, label_at = "", ()
            phrase.append(i)
    if strict and locs:
        raise ValueError(f"{label!r} has a box cut short: {len(locs)} <loc_N>, not 4")
    if strict and phrase and decode([pieces[j] for j in phrase]).strip():
        raise ValueError(f"unexpected text {decode([pieces[j] for j in phrase])!r} after the last box")
    return boxes


def _check_box(label: str, bins: tuple[int, ...]) -> None:
    if not label:
        raise ValueError(f"a box {list(bins)} has no label before it")
    if max(bins) >= NUM_BINS:
        raise ValueError(f"<loc_{max(bins)}> is out of range (bins are 0..{NUM_BINS - 1})")
    if bins[2] < bins[0] or bins[3] < bins[1]:
        raise ValueError(f"box {list(bins)} of {label!r} has x2 < x1 or y2 < y1")


def text_pieces(text: str) -> list[object]:
    """The pieces of a Florence text: ``Loc`` for each ``<loc_N>``, strings between them."""
    for token in _SPECIAL_TEXT:
        text = text.replace(token, "")
    return [Loc(int(part[5:-1])) if _LOC_TEXT.fullmatch(part) else part for part in _LOC_TEXT.split(text) if part]


def parse_suffix(text: str, width: int, height: int, *, strict: bool = False) -> list[Box]:
    """Target or generated text -> boxes in pixels (bin centres); see ``parse_pieces``."""
    return [p.box(width, height) for p in parse_pieces(text_pieces(text), "".join, strict=strict)]


def mark_ignored(boxes: list[Box], ignored) -> list[Box]:
    """``boxes`` with the ones at the indices ``ignored`` (an annotation line's ``ignore`` list)
    marked as ignore regions; ValueError if that is not a list of indices into ``boxes``."""
    if not isinstance(ignored, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ignored):
        raise ValueError(f"'{IGNORE_KEY}' must be a list of box indices, got {ignored!r}")
    bad = [i for i in ignored if not 0 <= i < len(boxes)]
    if bad:
        raise ValueError(f"'{IGNORE_KEY}' names boxes {bad}, but the suffix has {len(boxes)} (indices from 0)")
    return [replace(box, ignore=True) if i in ignored else box for i, box in enumerate(boxes)]


def read_annotations(path: str | Path, *, check_images: bool = True) -> list[Example]:
    """Read and validate a Florence JSONL file; every problem is reported at once."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: annotations file not found")
    examples: list[Example] = []
    problems: list[str] = []
    # utf-8-sig: a byte-order mark (as Windows editors write) is read as nothing.
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: expected a JSON object, got {type(record).__name__}")
            continue
        image = record.get("image", record.get("image_path"))
        missing = [k for k, v in (("image", image), ("suffix", record.get("suffix"))) if v is None]
        if missing:
            problems.append(f"{where}: missing key(s) {', '.join(missing)} (need image or image_path, prefix, suffix)")
            continue
        image_path = path.parent / image
        width, height = record.get("width"), record.get("height")
        if check_images or width is None or height is None:
            try:
                from icmlora.images import open_image, pack_path

                with open_image(image_path) as im:  # a loose file, or packed (icmlora.images)
                    width, height = im.size
            except FileNotFoundError:
                problems.append(f"{where}: image {image_path} not found (no such file, and no member "
                                f"{image_path.name!r} in a pack {pack_path(image_path.parent)})")
                continue
            except Exception as exc:  # PIL raises several types for unreadable files
                problems.append(f"{where}: image {image_path} is unreadable ({exc.__class__.__name__}: {exc})")
                continue
        try:
            boxes = mark_ignored(parse_suffix(record["suffix"], int(width), int(height), strict=True),
                                 record.get(IGNORE_KEY, []))
        except ValueError as exc:
            problems.append(f"{where}: bad suffix: {exc}")
            continue
        examples.append(Example(str(image), int(width), int(height), boxes, record.get("prefix", OD_PROMPT)))
    if problems:
        raise InputError(f"{path}: invalid annotations", problems)
    return examples


def write_annotations(path: str | Path, examples: list[Example]) -> None:
    """Write examples as JSONL (caller handles atomicity at the folder level)."""
    with open(path, "w", encoding="utf-8") as fh:
        for ex in examples:
            fh.write(json.dumps(ex.to_json()) + "\n")
