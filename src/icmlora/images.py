"""Images on disk, loose or packed.

``prepare`` packs each split's images into one uncompressed tar, data/prepared/_images/<split>.tar:
DVC then hashes and stats one file per split instead of one per image, which is what a no-op
`dvc repro` spent most of its time on (once per stage that depends on data/prepared). Annotations
still name an image by its path (``../../_images/train/000123.png``); ``load_images`` opens that
file when it exists, and otherwise reads the member of that name from the pack beside its folder
(``_images/train.tar``). A pack is a plain tar of bare file names (``tar tf`` lists it; ``mkdir
train && tar xf train.tar -C train`` gives the loose layout, which reads the same; a pack made by
hand must hold bare names too, not ``./name``). Reading never extracts: a member's bytes are read
at their offset and decoded by PIL, so no member name is ever used as a path.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import defaultdict
from pathlib import Path

from PIL import Image

from icmlora.errors import InputError

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


# {pack (resolved): (identity, {member name: (offset, size)})}: each pack indexed once per process.
_INDEX: dict[Path, tuple[tuple[int, ...], dict[str, tuple[int, int]]]] = {}


class _Pack:
    """An open pack and its member index, both of the same file (a pack replaced between the two
    is not read at the old one's offsets: the index is keyed by the open file's identity)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "rb")
        stat = os.fstat(self.file.fileno())
        identity = (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size)
        key = self.path.resolve()
        cached = _INDEX.get(key)
        if cached is None or cached[0] != identity:
            try:
                with tarfile.open(fileobj=self.file, mode="r:") as tar:
                    members = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
            except tarfile.TarError as exc:
                self.file.close()
                raise InputError(f"{self.path}: not a readable image pack ({exc}); run `dvc repro prepare` "
                                 "(or `dvc checkout data/prepared`) to write it again") from exc
            cached = _INDEX[key] = (identity, members)
        self.index = cached[1]

    def read(self, name: str, path: Path) -> Image.Image:
        """Member ``name`` decoded (``path``: how the caller named it, for errors)."""
        if name not in self.index:
            raise FileNotFoundError(f"{path}: no such image file, and {self.path} has no member {name!r}")
        offset, size = self.index[name]
        self.file.seek(offset)
        try:
            return Image.open(io.BytesIO(self.file.read(size)))
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise InputError(f"{path}: member {name!r} of {self.path} is not a readable image ({exc})") from exc

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "_Pack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _pack_of(path: Path) -> Path:
    pack = pack_path(path.parent)
    if not pack.is_file():
        raise FileNotFoundError(f"{path}: no such image file, and no pack {pack} holding {path.name}")
    return pack


def open_image(path: Path) -> Image.Image:
    """The image at ``path`` as PIL opens it (not yet decoded; the caller closes it): the loose
    file, else the member of that name in its folder's pack. FileNotFoundError names both."""
    path = Path(path)
    if path.is_file():
        return Image.open(path)
    with _Pack(_pack_of(path)) as pack:
        return pack.read(path.name, path)


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
    for wanted in packed.values():
        with _Pack(_pack_of(Path(paths[wanted[0][0]]))) as pack:
            for i, name in wanted:
                with pack.read(name, paths[i]) as im:
                    images[i] = im.convert("RGB")
    return images  # type: ignore[return-value]
