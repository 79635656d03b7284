"""Images on disk, loose or packed.

``prepare`` packs each split's images into one uncompressed tar, data/prepared/_images/<split>.tar:
DVC then hashes and stats one file per split instead of one per image, which is what a no-op
`dvc repro` spent most of its time on (once per stage that depends on data/prepared). Annotations
still name an image by its path (``../../_images/train/000123.png``); ``load_images`` opens that
file when it exists, and otherwise reads the member of that name from the pack beside its folder
(``_images/train.tar``). A pack is a plain tar (``tar tf`` lists it, ``tar xf`` unpacks it into
the loose layout, which reads the same); reading never extracts: a member's bytes are read at
their offset and decoded by PIL, so no member name is ever used as a path.
"""

from __future__ import annotations

import io
import tarfile
from collections import defaultdict
from pathlib import Path

from PIL import Image

PACK_SUFFIX = ".tar"


def pack_path(folder: Path) -> Path:
    """The pack that stands for ``folder``'s images: ``<folder>.tar`` beside it."""
    folder = Path(folder)
    return folder.with_name(folder.name + PACK_SUFFIX)


class PackWriter:
    """Writes a pack member by member, byte for byte the same for the same members in the same
    order (no times, owners or modes of the machine that wrote it)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._tar = tarfile.open(self.path, "w", format=tarfile.USTAR_FORMAT)
        self._names: set[str] = set()

    def add(self, name: str, data: bytes) -> None:
        if "/" in name or name in ("", ".", "..") or name in self._names:
            raise ValueError(f"{self.path}: bad or repeated member name {name!r}")
        self._names.add(name)
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> "PackWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# {pack (resolved): ((mtime_ns, size), {member name: (offset, size)})}: read once per process.
_INDEX: dict[Path, tuple[tuple[int, int], dict[str, tuple[int, int]]]] = {}


def pack_index(pack: Path) -> dict[str, tuple[int, int]]:
    """{member name: (byte offset, size)} of a pack's files (re-read when the pack changes)."""
    pack = Path(pack).resolve()
    stat = pack.stat()
    key = (stat.st_mtime_ns, stat.st_size)
    cached = _INDEX.get(pack)
    if cached is None or cached[0] != key:
        with tarfile.open(pack, "r:") as tar:
            members = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
        cached = _INDEX[pack] = (key, members)
    return cached[1]


def open_image(path: Path) -> Image.Image:
    """The image at ``path`` as PIL opens it (not yet decoded; the caller closes it): the loose
    file, else the member of that name in its folder's pack. FileNotFoundError names both."""
    path = Path(path)
    if path.is_file():
        return Image.open(path)
    pack = pack_path(path.parent)
    if not pack.is_file():
        raise FileNotFoundError(f"{path}: no such image file, and no pack {pack} holding {path.name}")
    index = pack_index(pack)
    if path.name not in index:
        raise FileNotFoundError(f"{path}: no such image file, and {pack} has no member {path.name!r}")
    offset, size = index[path.name]
    with open(pack, "rb") as f:
        f.seek(offset)
        return Image.open(io.BytesIO(f.read(size)))


def load_images(paths: list[Path]) -> list[Image.Image]:
    """The images at ``paths``, as RGB, in order: a loose file where there is one, else the member
    of that name in its folder's pack."""
    images: list[Image.Image | None] = [None] * len(paths)
    packed: dict[Path, list[tuple[int, str]]] = defaultdict(list)
    for i, path in enumerate(map(Path, paths)):
        if path.is_file():
            with Image.open(path) as im:
                images[i] = im.convert("RGB")
        else:
            packed[pack_path(path.parent)].append((i, path.name))
    for pack, wanted in packed.items():
        if not pack.is_file():
            path = paths[wanted[0][0]]
            raise FileNotFoundError(f"{path}: no such image file, and no pack {pack} holding {Path(path).name}")
        index = pack_index(pack)
        with open(pack, "rb") as f:
            for i, name in wanted:
                if name not in index:
                    raise FileNotFoundError(f"{paths[i]}: no such image file, and {pack} has no member {name!r}")
                offset, size = index[name]
                f.seek(offset)
                with Image.open(io.BytesIO(f.read(size))) as im:
                    images[i] = im.convert("RGB")
    return images  # type: ignore[return-value]
