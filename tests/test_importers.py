"""Importers read tiny real-format sources (JSONL, VOC XML, COCO JSON, PNG/JPEG) from tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from icmlora.data.importers import load_coco, load_florence_jsonl, load_source, load_voc
from icmlora.errors import InputError


def make_image(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (120, 30, 200)).save(path)
    return path


def write_lines(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return path


def xyxy(box):
    return pytest.approx(box.xyxy)


# --- Florence JSONL ----------------------------------------------------------------------


def test_florence_both_variants_boxes_in_pixels(tmp_path):
    make_image(tmp_path / "img" / "a.png", 200, 100)
    b = make_image(tmp_path / "elsewhere" / "b.png", 400, 300)
    write_lines(tmp_path / "train.jsonl", [
        {"image": "img/a.png", "prefix": "<OD>",
         "suffix": "dog<loc_100><loc_200><loc_500><loc_900>cat<loc_0><loc_0><loc_9><loc_9>"},
    ])  # fmt: skip
    # The reference README variant: absolute image_path, width/height, spaces around labels.
    write_lines(tmp_path / "valid.jsonl", [
        {"id": "b", "image_path": str(b), "height": 300, "width": 400,
         "suffix": "dog<loc_0><loc_0><loc_999><loc_999> person<loc_50><loc_30><loc_150><loc_200>"},
    ])  # fmt: skip
    out = load_florence_jsonl(tmp_path, ["dog", "person"])
    [a_img] = out["train"]
    assert a_img.path == (tmp_path / "img" / "a.png") and a_img.path.is_absolute()
    assert (a_img.width, a_img.height) == (200, 100)
    assert [bx.label for bx in a_img.boxes] == ["dog"]  # cat is not requested
    assert xyxy(a_img.boxes[0]) == (100.5 * 0.2, 200.5 * 0.1, 500.5 * 0.2, 900.5 * 0.1)
    [b_img] = out["valid"]
    assert [bx.label for bx in b_img.boxes] == ["dog", "person"]
    assert xyxy(b_img.boxes[1]) == (50.5 * 0.4, 30.5 * 0.3, 150.5 * 0.4, 200.5 * 0.3)


def test_florence_folder_layout_filters_and_sorts(tmp_path):
    for name in ("c", "a", "b"):
        make_image(tmp_path / "train" / "images" / f"{name}.png", 64, 64)
    make_image(tmp_path / "valid" / "images" / "v.png", 64, 64)
    box = "<loc_10><loc_10><loc_500><loc_500>"
    write_lines(tmp_path / "train" / "annotations.jsonl", [
        {"image": "images/c.png", "suffix": f"dog{box}"},
        {"image": "images/a.png", "suffix": f"cat{box}"},  # no requested category: dropped
        {"image": "images/b.png", "suffix": f"dog{box}dog{box}"},
    ])  # fmt: skip
    write_lines(tmp_path / "valid" / "annotations.jsonl", [{"image": "images/v.png", "suffix": f"dog{box}"}])
    out = load_source("florence_jsonl", tmp_path, ["dog"])
    assert [im.path.name for im in out["train"]] == ["b.png", "c.png"]
    assert [len(im.boxes) for im in out["train"]] == [2, 1]
    assert len(out["valid"]) == 1


def test_florence_reports_every_problem_with_file_and_line(tmp_path):
    make_image(tmp_path / "ok.png", 100, 100)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    box = "<loc_1><loc_2><loc_3><loc_4>"
    train = write_lines(tmp_path / "train.jsonl", [
        {"image": "ok.png", "suffix": f"dog{box}"},
        '{"image": "ok.png", "suffix": ',  # line 2: malformed JSON
        {"image": "missing.png", "suffix": f"dog{box}"},  # line 3
        {"image": "broken.png", "suffix": f"dog{box}"},  # line 4
        {"image": "ok.png", "suffix": "dog<loc_1><loc_2><loc_1000><loc_4>"},  # line 5
        {"image": "ok.png", "suffix": "dog<loc_500><loc_2><loc_100><loc_4>"},  # line 6: x2 < x1
        {"image": "ok.png", "width": 640, "height": 480, "suffix": f"dog{box}"},  # line 7
    ])  # fmt: skip
    make_image(tmp_path / "v.png", 100, 100)
    write_lines(tmp_path / "valid.jsonl", [{"image": "v.png", "suffix": f"dog{box}"}])
    with pytest.raises(InputError) as err:
        load_florence_jsonl(tmp_path, ["dog", "zebra"])
    problems = err.value.problems
    assert len(problems) == 7
    for lineno, words in [(2, "malformed JSON"), (3, "not found"), (4, "unreadable"), (5, "<loc_1000>"),
                          (6, "x2 < x1"), (7, "640x480")]:  # fmt: skip
        assert any(p.startswith(f"{train}:{lineno}:") and words in p for p in problems), (lineno, problems)
    assert any("'zebra'" in p and "it has: dog" in p for p in problems)
    assert "7 problems" in str(err.value)


def test_florence_missing_split_names_expected_layout(tmp_path):
    make_image(tmp_path / "ok.png", 10, 10)
    write_lines(tmp_path / "train.jsonl", [{"image": "ok.png", "suffix": "dog<loc_1><loc_2><loc_3><loc_4>"}])
    with pytest.raises(InputError) as err:
        load_florence_jsonl(tmp_path, ["dog"])
    [problem] = err.value.problems
    assert "valid.jsonl" in problem and "valid/annotations.jsonl" in problem


# --- PASCAL VOC ----------------------------------------------------------------------------


def voc_xml(path: Path, filename: str, size: tuple[int, int], objects: list[tuple]) -> None:
    objs = "".join(
        f"<object><name>{name}</name><difficult>{int(difficult)}</difficult><bndbox><xmin>{x1}</xmin>"
        f"<ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
        for name, x1, y1, x2, y2, difficult in objects
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
        f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>"
    )


def voc_source(root: Path, train: dict, val: dict, size=(50, 40)) -> Path:
    for image_id, objects in {**train, **val}.items():
        make_image(root / "JPEGImages" / f"{image_id}.jpg", *size)
        voc_xml(root / "Annotations" / f"{image_id}.xml", f"{image_id}.jpg", size, objects)
    write_lines(root / "ImageSets" / "Main" / "train.txt", list(train))
    write_lines(root / "ImageSets" / "Main" / "val.txt", list(val))
    return root


def test_voc_boxes_splits_and_difficult(tmp_path):
    root = voc_source(tmp_path, {
        "2008_000002": [("dog", 1, 1, 50, 40, False), ("dog", 5, 5, 9, 9, True), ("cat", 2, 2, 3, 3, False)],
        "2008_000001": [("cat", 2, 2, 3, 3, False)],
    }, {"2008_000003": [("dog", 10, 20, 30, 40, False)]})  # fmt: skip
    out = load_voc(root, ["dog"])
    [im] = out["train"]  # the cat-only image is dropped
    assert im.path == root / "JPEGImages" / "2008_000002.jpg" and (im.width, im.height) == (50, 40)
    assert [xyxy(b) for b in im.boxes] == [(0, 0, 50, 40), (4, 4, 9, 9)]  # 1-based inclusive -> continuous
    assert [b.ignore for b in im.boxes] == [False, True]  # the difficult dog: an ignore region, not deleted
    assert [xyxy(b) for b in out["valid"][0].boxes] == [(9, 19, 30, 40)]
    both = load_voc(root, ["dog", "cat"])
    assert [b.label for b in both["train"][1].boxes] == ["dog", "dog", "cat"]
    assert [im.path.stem for im in both["train"]] == ["2008_000001", "2008_000002"]


def test_voc_clips_within_one_pixel(tmp_path):
    root = voc_source(tmp_path, {"a": [("dog", 0, 1, 51, 40, False)]}, {"b": [("dog", 1, 1, 2, 2, False)]})
    [im] = load_voc(root, ["dog"])["train"]
    assert xyxy(im.boxes[0]) == (0, 0, 50, 40)


def test_voc_reports_every_problem(tmp_path):
    root = voc_source(tmp_path, {
        "outside": [("dog", 1, 1, 60, 40, False)],
        "flipped": [("dog", 30, 1, 10, 40, False)],
        "noimage": [("dog", 1, 1, 5, 5, False)],
        "badxml": [],
        "noxml": [],
    }, {"ok": [("dog", 1, 1, 5, 5, False)]})  # fmt: skip
    (root / "JPEGImages" / "noimage.jpg").unlink()
    (root / "Annotations" / "badxml.xml").write_text("<annotation><object>")
    (root / "Annotations" / "noxml.xml").unlink()
    with pytest.raises(InputError) as err:
        load_voc(root, ["dog", "horse"])
    problems, ann = err.value.problems, root / "Annotations"
    train_txt = root / "ImageSets" / "Main" / "train.txt"
    assert len(problems) == 6, problems
    assert any(p.startswith(f"{ann / 'outside.xml'}: object 1 (dog)") and "outside the 50x40" in p for p in problems)
    assert any(p.startswith(f"{ann / 'flipped.xml'}: object 1 (dog)") and "x2 < x1" in p for p in problems)
    noimage = f"{ann / 'noimage.xml'} (listed at {train_txt}:3)"
    assert any(noimage in p and "noimage.jpg not found" in p for p in problems)
    assert any(p.startswith(f"{ann / 'badxml.xml'}: malformed XML") for p in problems)
    assert any(p.startswith(f"{train_txt}:5:") and "noxml.xml not found" in p for p in problems)
    assert any("'horse'" in p and "it has: dog" in p for p in problems)


def test_voc_missing_layout(tmp_path):
    (tmp_path / "Annotations").mkdir()
    with pytest.raises(InputError) as err:
        load_source("voc", tmp_path, ["dog"])
    assert len(err.value.problems) == 3  # train.txt, val.txt, and 'dog' absent
    assert all("ImageSets/Main/{train,val}.txt" in p for p in err.value.problems[:2])


# --- COCO ----------------------------------------------------------------------------------


def coco_source(root: Path, split_folder: str, images: list[tuple], annotations: list[tuple]) -> Path:
    """images: (id, file_name, w, h); annotations: (id, image_id, category_id, bbox, iscrowd)."""
    for _, name, w, h in images:
        make_image(root / split_folder / name, w, h)
    stem = split_folder if split_folder != "images" else "val2017"
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / f"instances_{stem}.json").write_text(json.dumps({
        "images": [{"id": i, "file_name": n, "width": w, "height": h} for i, n, w, h in images],
        "annotations": [{"id": a, "image_id": i, "category_id": c, "bbox": b, "iscrowd": crowd, "area": 1}
                        for a, i, c, b, crowd in annotations],
        "categories": [{"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}, {"id": 1, "name": "person"}],
    }, indent=1))  # fmt: skip
    return root


def test_coco_boxes_splits_and_crowd(tmp_path):
    coco_source(tmp_path, "train2017", [(7, "b.jpg", 64, 48), (3, "a.jpg", 64, 48), (9, "c.jpg", 64, 48)], [
        (1, 7, 18, [10, 5, 20.5, 30], 0), (2, 7, 17, [0, 0, 5, 5], 0),
        (3, 3, 18, [0, 0, 64, 48], 0), (4, 9, 18, [0, 0, 64, 48], 1),  # crowd: kept as an ignore region
    ])  # fmt: skip
    coco_source(tmp_path, "images", [(1, "v.jpg", 32, 32)], [(5, 1, 1, [1, 2, 3, 4], 0)])  # falls back to images/
    out = load_coco(tmp_path, ["dog", "person"])
    assert [im.path.name for im in out["train"]] == ["a.jpg", "b.jpg", "c.jpg"]
    assert [(bx.ignore, xyxy(bx)) for bx in out["train"][2].boxes] == [(True, (0, 0, 64, 48))]
    assert not out["train"][0].boxes[0].ignore
    b = out["train"][1]
    assert (b.width, b.height) == (64, 48) and b.path == tmp_path / "train2017" / "b.jpg"
    assert [(bx.label, xyxy(bx)) for bx in b.boxes] == [("dog", (10, 5, 30.5, 35))]
    assert xyxy(out["valid"][0].boxes[0]) == (1, 2, 4, 6)


def test_coco_reports_every_problem(tmp_path):
    coco_source(tmp_path, "train2017", [(1, "a.jpg", 64, 48), (2, "gone.jpg", 64, 48), (3, "c.jpg", 64, 48)], [
        (11, 1, 18, [60, 0, 10, 10], 0),  # 6 px past the right edge
        (12, 1, 18, [0, 0, -5, 10], 0),  # negative width
        (13, 1, 18, [0, 0, 64.5, 48.5], 0),  # within 1 px: clipped, fine
        (14, 2, 18, [0, 0, 5, 5], 0),  # image file missing
        (15, 3, 18, "oops", 0),
    ])  # fmt: skip
    (tmp_path / "train2017" / "gone.jpg").unlink()
    (tmp_path / "annotations" / "instances_val2017.json").write_text('{"images": [\n  }')
    with pytest.raises(InputError) as err:
        load_source("coco", tmp_path, ["dog", "zebra"])
    problems = err.value.problems
    train, val = (tmp_path / "annotations" / f"instances_{s}2017.json" for s in ("train", "val"))
    assert len(problems) == 6, problems
    assert any(p.startswith(f"{train}: annotation id 11:") and "outside the 64x48" in p for p in problems)
    assert any(p.startswith(f"{train}: annotation id 12:") and "x2 < x1" in p for p in problems)
    assert any(p.startswith(f"{train}: image id 2:") and "gone.jpg not found" in p for p in problems)
    assert any(p.startswith(f"{train}: annotation id 15:") and "bbox" in p for p in problems)
    assert any(p.startswith(f"{val}:2: malformed JSON") for p in problems)
    assert any("'zebra'" in p and "it has: cat, dog, person" in p for p in problems)


def test_coco_layout_problems(tmp_path):
    with pytest.raises(InputError) as err:
        load_coco(tmp_path, ["dog"])
    assert any("instances_train*.json" in p and "instances_{train,val}<suffix>.json" in p for p in err.value.problems)
    coco_source(tmp_path, "train2017", [(1, "a.jpg", 8, 8)], [(1, 1, 18, [0, 0, 2, 2], 0)])
    (tmp_path / "train2017" / "a.jpg").unlink()
    (tmp_path / "train2017").rmdir()  # neither train2017/ nor images/
    for name in ("instances_val2014.json", "instances_valminusminival2014.json"):
        (tmp_path / "annotations" / name).write_text("{}")
    with pytest.raises(InputError) as err:
        load_coco(tmp_path, ["dog"])
    [folder, ambiguous] = err.value.problems
    assert folder.startswith(f"{tmp_path / 'annotations' / 'instances_train2017.json'}: image folder")
    assert "ambiguous (instances_val2014.json, instances_valminusminival2014.json)" in ambiguous


def test_unknown_kind_and_missing_root(tmp_path):
    with pytest.raises(InputError, match="unknown data source kind"):
        load_source("yolo", tmp_path, ["dog"])
    with pytest.raises(InputError) as err:
        load_source("voc", tmp_path / "nope", [])
    assert len(err.value.problems) == 2


# --- real datasets' conventions ------------------------------------------------------------


def test_zero_area_boxes_are_dropped_and_listed(tmp_path):
    """COCO w = 0, VOC xmin == xmax and equal <loc_N> bins: no prediction can match such a box."""
    coco_source(tmp_path / "coco", "train2017", [(1, "a.jpg", 64, 48)], [
        (11, 1, 18, [10, 5, 0, 30], 0), (12, 1, 18, [10, 5, 20, 30], 0),
        (14, 1, 18, [64.5, 5, 0.4, 30], 0)])  # fmt: skip  (a sliver past the edge: clipped to nothing)
    coco_source(tmp_path / "coco", "val2017", [(2, "v.jpg", 64, 48)], [(13, 2, 18, [1, 1, 5, 5], 0)])
    coco = load_coco(tmp_path / "coco", ["dog"])
    assert [len(im.boxes) for im in coco["train"]] == [1]
    where = tmp_path / "coco" / "annotations" / "instances_train2017.json"
    assert coco.dropped == [f"{where}: annotation id 11: box 'dog' has zero width or height",
                            f"{where}: annotation id 14: box 'dog' has zero width or height inside the image"]
    voc = voc_source(tmp_path / "voc", {"a": [("dog", 7, 1, 7, 40, False), ("dog", 1, 1, 5, 5, False)]},
                     {"b": [("dog", 1, 1, 5, 5, False)]})
    out = load_voc(voc, ["dog"])
    assert [len(im.boxes) for im in out["train"]] == [1] and len(out.dropped) == 1
    assert out.dropped[0].startswith(f"{voc / 'Annotations' / 'a.xml'}: object 1 (dog)")
    make_image(tmp_path / "fl" / "a.png", 100, 100)
    write_lines(tmp_path / "fl" / "train.jsonl", [
        {"image": "a.png", "suffix": "dog<loc_5><loc_5><loc_5><loc_50>dog<loc_1><loc_1><loc_9><loc_9>"}])
    write_lines(tmp_path / "fl" / "valid.jsonl", [{"image": "a.png", "suffix": "dog<loc_1><loc_1><loc_9><loc_9>"}])
    with pytest.raises(InputError, match="in both the train and the valid split"):  # (the same image: see below)
        load_florence_jsonl(tmp_path / "fl", ["dog"])
    make_image(tmp_path / "fl" / "b.png", 100, 100)
    write_lines(tmp_path / "fl" / "valid.jsonl", [{"image": "b.png", "suffix": "dog<loc_1><loc_1><loc_9><loc_9>"}])
    fl = load_florence_jsonl(tmp_path / "fl", ["dog"])
    assert [len(im.boxes) for im in fl["train"]] == [1]
    assert fl.dropped == [f"{tmp_path / 'fl' / 'train.jsonl'}:1: box 0 ('dog') has zero width or height"]


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    bom = "\ufeff"
    make_image(tmp_path / "fl" / "a.png", 64, 64)
    make_image(tmp_path / "fl" / "b.png", 64, 64)
    for split, image in (("train", "a.png"), ("valid", "b.png")):
        line = json.dumps({"image": image, "suffix": "dog<loc_1><loc_1><loc_9><loc_9>"})
        (tmp_path / "fl" / f"{split}.jsonl").write_text(bom + line + "\n", encoding="utf-8")
    assert len(load_florence_jsonl(tmp_path / "fl", ["dog"])["train"]) == 1
    voc = voc_source(tmp_path / "voc", {"a": [("dog", 1, 1, 5, 5, False)]}, {"b": [("dog", 1, 1, 5, 5, False)]})
    for name in ("train.txt", "val.txt"):
        path = voc / "ImageSets" / "Main" / name
        path.write_text(bom + path.read_text(), encoding="utf-8")
    xml = voc / "Annotations" / "a.xml"
    xml.write_bytes(bom.encode() + xml.read_bytes())
    out = load_voc(voc, ["dog"])
    assert [im.path.stem for im in out["train"]] == ["a"] and len(out["valid"]) == 1
    coco = coco_source(tmp_path / "coco", "train2017", [(1, "a.jpg", 64, 48)], [(1, 1, 18, [1, 1, 5, 5], 0)])
    coco_source(coco, "val2017", [(2, "v.jpg", 64, 48)], [(2, 2, 18, [1, 1, 5, 5], 0)])
    ann = coco / "annotations" / "instances_train2017.json"
    ann.write_text(bom + ann.read_text(), encoding="utf-8")
    assert len(load_coco(coco, ["dog"])["train"]) == 1
    from icmlora.florence.format import read_annotations

    assert len(read_annotations(tmp_path / "fl" / "train.jsonl")) == 1


def test_an_image_in_both_splits_is_an_error_naming_both_places(tmp_path):
    voc = voc_source(tmp_path / "voc", {"a": [("dog", 1, 1, 5, 5, False)], "b": [("dog", 1, 1, 5, 5, False)]},
                     {"b": [("dog", 1, 1, 5, 5, False)]})
    with pytest.raises(InputError) as err:
        load_voc(voc, ["dog"])
    lists = voc / "ImageSets" / "Main"
    [problem] = err.value.problems
    assert problem.startswith(f"{lists / 'train.txt'}:2 and {lists / 'val.txt'}:1: image ")
    assert "b.jpg is in both the train and the valid split" in problem
    coco = coco_source(tmp_path / "coco", "images", [(1, "same.jpg", 64, 48)], [(1, 1, 18, [1, 1, 5, 5], 0)])
    (coco / "annotations" / "instances_val2017.json").rename(coco / "annotations" / "instances_train2017.json")
    coco_source(coco, "images", [(4, "same.jpg", 64, 48)], [(2, 4, 18, [1, 1, 5, 5], 0)])
    with pytest.raises(InputError, match=r"instances_train2017.json: image id 1 and .*instances_val2017.json: image id 4"):
        load_coco(coco, ["dog"])


def test_florence_ignore_indices_mark_ignore_regions(tmp_path):
    """A line's ``ignore`` indices mark exactly those boxes (counted in the suffix, requested
    label or not) as ignore regions, in the boxes read in pixels; an index past the boxes or an
    ``ignore`` that is not a list is an error naming the line."""
    ok = tmp_path / "ok"
    make_image(ok / "a.png", 100, 100)
    make_image(ok / "b.png", 100, 100)
    first, second, third = ("<loc_0><loc_0><loc_99><loc_99>", "<loc_200><loc_200><loc_299><loc_299>",
                            "<loc_500><loc_500><loc_599><loc_599>")
    write_lines(ok / "train.jsonl", [{"image": "a.png", "suffix": f"dog{first}cat{second}dog{third}", "ignore": [2]}])
    write_lines(ok / "valid.jsonl", [{"image": "b.png", "suffix": f"dog{first}dog{second}", "ignore": [0]}])
    out = load_florence_jsonl(ok, ["dog"])
    [a_img], [b_img] = out["train"], out["valid"]
    # Box 2 of a.png is its second dog (the cat at index 1 is not requested): only it is ignored.
    assert [(b.label, b.ignore) for b in a_img.boxes] == [("dog", False), ("dog", True)]
    assert a_img.boxes[1].xyxy == pytest.approx((50.05, 50.05, 59.95, 59.95))  # the third box's pixels
    assert [(b.label, b.ignore) for b in b_img.boxes] == [("dog", True), ("dog", False)]
    assert b_img.boxes[0].xyxy == pytest.approx((0.05, 0.05, 9.95, 9.95))

    make_image(tmp_path / "a.png", 100, 100)
    make_image(tmp_path / "b.png", 100, 100)
    box = "<loc_1><loc_1><loc_9><loc_9>"
    write_lines(tmp_path / "train.jsonl", [{"image": "a.png", "suffix": f"dog{box}dog{box}", "ignore": [1]},
                                           {"image": "b.png", "suffix": f"dog{box}", "ignore": [3]}])
    write_lines(tmp_path / "valid.jsonl", [{"image": "b.png", "suffix": f"dog{box}", "ignore": "all"}])
    with pytest.raises(InputError) as err:
        load_florence_jsonl(tmp_path, ["dog"])
    assert any(p.startswith(f"{tmp_path / 'train.jsonl'}:2:") and "names boxes [3]" in p for p in err.value.problems)
    assert any(p.startswith(f"{tmp_path / 'valid.jsonl'}:1:") and "list of box indices" in p for p in err.value.problems)
