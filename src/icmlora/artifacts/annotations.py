"""data/prepared/: per-task detection datasets in Florence JSONL (``icmlora.florence.format``).

    data/prepared/_images/{train,valid}.tar               every image once, packed (``icmlora.images``)
    data/prepared/_agnostic/{train,valid}/annotations.jsonl   the base model's pre-training split
    data/prepared/<task>/{train,valid}/annotations.jsonl      images holding <task>, only its boxes
    data/prepared/summary.json                            base labels, counts per task and split

``image`` in each JSONL line is relative to that file's folder (``../../_images/<split>/<name>``),
so an image shared by several tasks is stored, hashed and pushed once; ``icmlora.images.load_images``
reads it from the split's pack (or a loose file of that path: ``tar xf`` the pack in _images/<split>/).
"""

from __future__ import annotations

from pathlib import Path

from icmlora.artifacts import ANNOTATIONS_FILE, IMAGES_SUBDIR, PREPARED_DIR, split_dir
from icmlora.florence.format import Example, read_annotations, write_annotations

# The name every box gets in a class-agnostic base split (synthetic ``base_labels: object``, and
# every imported source): the base model learns to box objects, never to name a task.
AGNOSTIC_LABEL = "object"


def images_dir(split: str, prepared: Path = PREPARED_DIR) -> Path:
    return Path(prepared) / IMAGES_SUBDIR / split


def image_ref(split: str, name: str) -> str:
    """How an annotations file of a split folder names an image of ``images_dir(split)``."""
    return f"../../{IMAGES_SUBDIR}/{split}/{name}"


def read_split(task: str, split: str, prepared: Path = PREPARED_DIR) -> tuple[list[Example], Path]:
    """(examples, the folder their ``image`` paths are relative to)."""
    folder = split_dir(task, split, prepared)
    return read_annotations(folder / ANNOTATIONS_FILE, check_images=False), folder


def write_split(task: str, split: str, examples: list[Example], prepared: Path) -> Path:
    """Write one split's annotations (``prepared`` is the stage's temporary folder: the caller
    renames the whole folder into place when every split is written)."""
    folder = split_dir(task, split, prepared)
    folder.mkdir(parents=True)
    write_annotations(folder / ANNOTATIONS_FILE, examples)
    return folder
