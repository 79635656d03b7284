"""Packed images (``icmlora.images``): what prepare writes and every stage reads."""

import io
import tarfile

import numpy as np
import pytest
from params_helpers import default_params
from PIL import Image

from icmlora.artifacts.annotations import read_split
from icmlora.errors import InputError
from icmlora.images import PackWriter, load_images, pack_path, png_bytes
from icmlora.stages.prepare import prepare


def _image(i: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(i).integers(0, 256, (12, 16, 3), dtype=np.uint8))


def test_a_packed_image_reads_as_the_loose_file_does(tmp_path):
    folder = tmp_path / "_images" / "train"
    folder.mkdir(parents=True)
    with PackWriter(pack_path(folder)) as pack:
        for i in range(3):
            pack.add(f"{i:06d}.png", png_bytes(_image(i)))
    _image(1).save(folder / "000001.png")  # a loose file of a member's name is read from the file
    _image(9).save(folder / "loose.png")
    (tmp_path / "x").mkdir()  # annotations name images through ../ (circle/train/../../_images/train/...)
    paths = [folder / "000002.png", folder / "loose.png", tmp_path / "x" / ".." / "_images" / "train" / "000000.png",
             folder / "000001.png"]
    images = load_images(paths)
    for image, expected in zip(images, [2, 9, 0, 1]):
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.asarray(_image(expected)))
    with tarfile.open(pack_path(folder)) as tar:  # a plain tar
        assert tar.getnames() == ["000000.png", "000001.png", "000002.png"]


def test_a_missing_image_names_the_path_and_the_pack(tmp_path):
    folder = tmp_path / "valid"
    with pytest.raises(FileNotFoundError, match="no pack .*valid.tar holding 000001.png"):
        load_images([folder / "000001.png"])
    with PackWriter(pack_path(folder)) as pack:
        pack.add("000000.png", png_bytes(_image(0)))
    with pytest.raises(FileNotFoundError, match="valid.tar has no member '000001.png'"):
        load_images([folder / "000000.png", folder / "000001.png"])


def test_a_pack_rejects_member_names_that_are_paths_or_repeats(tmp_path):
    with PackWriter(tmp_path / "p.tar") as pack:
        pack.add("a.png", b"x")
        for bad in ["../a.png", "sub/a.png", "a.png", ""]:
            with pytest.raises(ValueError, match="bad or repeated member name"):
                pack.add(bad, b"x")


def test_a_rewritten_pack_is_read_anew(tmp_path):
    """The member index is kept per process, keyed by the pack's size and time: a pack written
    again (a re-run prepare) is indexed again, not read at stale offsets."""
    folder = tmp_path / "train"
    for version in (0, 1):
        with PackWriter(pack_path(folder)) as pack:
            if version:
                pack.add("pad.png", png_bytes(_image(5)) * 3)
            pack.add("000000.png", png_bytes(_image(version)))
        (image,) = load_images([folder / "000000.png"])
        assert np.array_equal(np.asarray(image), np.asarray(_image(version)))


def test_prepare_packs_each_split_and_its_annotations_read_from_the_pack(repo, tmp_path):
    cfg = default_params(**{"data.synthetic.train_images": 20, "data.synthetic.valid_images": 12})
    prepare(cfg, tmp_path / "prepared")
    images = tmp_path / "prepared" / "_images"
    assert sorted(p.name for p in images.iterdir()) == ["train.tar", "valid.tar"]
    with tarfile.open(images / "valid.tar") as tar:
        assert tar.getnames() == [f"{i:06d}.png" for i in range(12)]
        assert {(m.mtime, m.uid, m.gid, m.mode) for m in tar.getmembers()} == {(0, 0, 0, 0o644)}
        first = Image.open(io.BytesIO(tar.extractfile("000000.png").read())).convert("RGB")
    examples, folder = read_split("_agnostic", "valid", tmp_path / "prepared")
    loaded = load_images([folder / e.image for e in examples])
    assert len(loaded) == 12 and all(im.size == (e.width, e.height) for im, e in zip(loaded, examples))
    assert np.array_equal(np.asarray(loaded[0]), np.asarray(first))


def test_a_damaged_pack_or_member_is_an_input_error_naming_it(tmp_path):
    folder = tmp_path / "train"
    with PackWriter(pack_path(folder)) as pack:
        pack.add("000000.png", b"not an image")
    with pytest.raises(InputError, match=r"member '000000.png' of .*train.tar is not a readable image"):
        load_images([folder / "000000.png"])
    pack_path(folder).write_bytes(pack_path(folder).read_bytes()[:700])  # cut inside the member's header block
    with pytest.raises(InputError, match=r"train.tar: not a readable image pack .*dvc repro prepare"):
        load_images([folder / "000000.png"])


def test_annotations_whose_images_are_packed_validate_and_name_a_missing_member(tmp_path):
    """read_annotations (a user's file, images checked) reads sizes from the pack, and a missing
    image names the file and the pack it is not in."""
    from icmlora.florence.format import read_annotations

    folder = tmp_path / "_images" / "valid"
    folder.parent.mkdir()
    with PackWriter(pack_path(folder)) as pack:
        pack.add("000000.png", png_bytes(_image(0)))
    (tmp_path / "task").mkdir()
    lines = ['{"image": "../_images/valid/000000.png", "suffix": "circle<loc_1><loc_2><loc_30><loc_40>"}']
    (tmp_path / "task" / "a.jsonl").write_text("\n".join(lines) + "\n")
    (example,) = read_annotations(tmp_path / "task" / "a.jsonl")
    assert (example.width, example.height) == (16, 12)
    lines.append('{"image": "../_images/valid/000009.png", "suffix": "circle<loc_1><loc_2><loc_30><loc_40>"}')
    (tmp_path / "task" / "a.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as err:
        read_annotations(tmp_path / "task" / "a.jsonl")
    assert any(":2: image" in p and "no member '000009.png' in a pack" in p and "valid.tar" in p
               for p in err.value.problems)
