"""The Florence-2 detection format: one JSON object per line with ``image``, ``prefix``, ``suffix``.

``suffix`` is ``label<loc_x1><loc_y1><loc_x2><loc_y2>label<loc_...>...``: box corners quantized
to 1000 bins of the image width/height exactly as transformers' ``Florence2PostProcessor``
does (``floor(x / (W / 1000))`` clamped to 0..999; the inverse is the bin centre
``(q + 0.5) * W / 1000``). We keep the centre as a float: the transformers post-processor
truncates it to an int, which costs whole pixels on small images.

The reference code's variant with ``image_path``/``height``/``width`` is read too.
``image`` is a path relative to the annotations file's folder.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from icmlora.errors import InputError

NUM_BINS = 1000
OD_PROMPT = "<OD>"
ANNOTATIONS_FILE = "annotations.jsonl"
_LOC = re.compile(r"<loc_(\d+)>")
# Same shape as transformers' parser: a phrase (no '<') followed by four or more <loc_N>.
_PHRASE = re.compile(r"([^<]+)((?:<loc_\d+>){4,})")


@dataclass(frozen=True)
class Box:
    """A box in pixels, corners (x1, y1, x2, y2), with its label and (for predictions) a
    confidence score; ground-truth boxes keep the default 1.0."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float
    score: float = 1.0

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
        return {
            "image": self.image,
            "prefix": self.prefix,
            "suffix": self.suffix,
            "width": self.width,
            "height": self.height,
        }


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


def parse_suffix(text: str, width: int, height: int, *, strict: bool = False) -> list[Box]:
    """Target or generated text -> boxes in pixels (bin centres).

    ``strict`` (for ground truth) raises ValueError on a ``<loc_N>`` with N > 999, on
    x2 < x1 or y2 < y1, and on text that is not ``label<loc>x4`` groups; model output is
    parsed leniently, the way the transformers post-processor does.
    """
    text = text.replace("<s>", "").replace("</s>", "").replace("<pad>", "")
    boxes: list[Box] = []
    consumed = 0
    for m in _PHRASE.finditer(text):
        if strict and text[consumed : m.start()].strip():
            raise ValueError(f"unexpected text {text[consumed:m.start()]!r} before a box")
        consumed = m.end()
        # A broken box ("<loc_3>cat") leaves "loc_3>" in the phrase; the label is what follows.
        label = m.group(1).split(">")[-1].strip()
        bins = [int(v) for v in _LOC.findall(m.group(2))]
        if strict and len(bins) % 4:
            raise ValueError(f"{label!r} has {len(bins)} <loc_N> tokens, not a multiple of 4")
        for i in range(0, len(bins) - len(bins) % 4, 4):
            q = bins[i : i + 4]
            if max(q) >= NUM_BINS:
                if strict:
                    raise ValueError(f"<loc_{max(q)}> is out of range (bins are 0..{NUM_BINS - 1})")
                continue
            if strict and (q[2] < q[0] or q[3] < q[1]):
                raise ValueError(f"box {q} of {label!r} has x2 < x1 or y2 < y1")
            boxes.append(
                Box(label, dequantize(q[0], width), dequantize(q[1], height), dequantize(q[2], width), dequantize(q[3], height))
            )
    if strict and text[consumed:].strip():
        raise ValueError(f"unexpected text {text[consumed:]!r} after the last box")
    return boxes


def read_annotations(path: str | Path, *, check_images: bool = True) -> list[Example]:
    """Read and validate a Florence JSONL file; every problem is reported at once."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: annotations file not found")
    examples: list[Example] = []
    problems: list[str] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
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
                from PIL import Image

                with Image.open(image_path) as im:
                    width, height = im.size
            except FileNotFoundError:
                problems.append(f"{where}: image {image_path} not found")
                continue
            except Exception as exc:  # PIL raises several types for unreadable files
                problems.append(f"{where}: image {image_path} is unreadable ({exc.__class__.__name__}: {exc})")
                continue
        try:
            boxes = parse_suffix(record["suffix"], int(width), int(height), strict=True)
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
