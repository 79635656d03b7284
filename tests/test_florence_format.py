import json

import pytest
from PIL import Image

from icmlora.florence.format import (
    Box, Example, Loc, ParsedBox, dequantize, encode_suffix, mark_ignored, parse_pieces, parse_suffix, quantize,
    read_annotations, text_pieces, write_annotations,
)
from icmlora.images import pack_path
from icmlora.errors import InputError


@pytest.mark.parametrize("size", [64, 640, 1000, 333])
def test_quantize_matches_bin_edges(size):
    for value in [0.0, 0.3, size / 2, size - 0.01, float(size)]:
        q = quantize(value, size)
        assert 0 <= q <= 999
        assert abs(dequantize(q, size) - min(value, size - size / 2000)) <= size / 1000


def test_suffix_round_trip_keeps_bin_centres():
    boxes = [Box("dog", 10.2, 20.7, 30.1, 45.9), Box("cat", 0, 0, 64, 64)]
    text = encode_suffix(boxes, 64, 64)
    assert text.startswith("dog<loc_159><loc_323><loc_470><loc_717>cat<loc_0>")
    back = parse_suffix(text, 64, 64, strict=True)
    for a, b in zip(boxes, back):
        assert a.label == b.label
        for u, v in zip(a.xyxy, b.xyxy):
            assert abs(u - v) <= 64 / 1000


def test_round_trip_through_the_transformers_post_processor(repo):
    """box -> tokens -> Florence2Processor.post_process_generation -> box within one bin."""
    from params_helpers import micro_params

    from icmlora.florence.model import build_tiny_processor

    processor = build_tiny_processor(["dog", "cat"], 64, micro_params().base.tiny)
    width, height = 1000, 800  # one bin >= 0.8 px, so transformers' int truncation stays within a bin
    boxes = [Box("dog", 12.3, 40.6, 500.9, 700.2), Box("cat", 900.0, 10.0, 999.0, 790.0)]
    text = "</s><s>" + encode_suffix(boxes, width, height) + "</s>"
    parsed = processor.post_process_generation(text, task="<OD>", image_size=(width, height))["<OD>"]
    assert parsed["labels"] == ["dog", "cat"]
    for box, got in zip(boxes, parsed["bboxes"]):
        for u, v, size in zip(box.xyxy, got, (width, height, width, height)):
            assert abs(u - v) <= size / 1000 + 1e-9
    ours = parse_suffix(text, width, height)
    for got, mine in zip(parsed["bboxes"], ours):
        assert [int(v) for v in mine.xyxy] == got  # ours keeps the fraction transformers truncates


def test_lenient_parse_skips_what_the_post_processor_skips():
    text = "dog<loc_1><loc_2><loc_3>cat<loc_1><loc_2><loc_3><loc_4><loc_5>"
    boxes = parse_suffix(text, 100, 100)
    assert [b.label for b in boxes] == ["cat"]


@pytest.mark.parametrize(
    "suffix, message",
    [
        ("dog<loc_1><loc_2><loc_1000><loc_4>", "out of range"),
        ("dog<loc_50><loc_2><loc_10><loc_4>", "x2 < x1"),
        ("dog<loc_1><loc_2><loc_3>", "box cut short: 3 <loc_N>"),
        ("dog<loc_1><loc_2><loc_3>cat<loc_1><loc_2><loc_3><loc_4>", "'dog' has a box cut short"),
        ("<loc_1><loc_2><loc_3><loc_4>", "has no label"),
        ("dog<loc_1><loc_2><loc_3><loc_4> trailing", "after the last box"),
    ],
)
def test_strict_parse_rejects_bad_ground_truth(suffix, message):
    with pytest.raises(ValueError, match=message):
        parse_suffix(suffix, 64, 64, strict=True)


def test_read_annotations_reports_every_problem_with_file_and_line(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"")
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    lines = [
        json.dumps({"image": "ok.png", "prefix": "<OD>", "suffix": "dog<loc_1><loc_2><loc_3><loc_4>"}),
        "{not json",
        json.dumps({"image": "missing.png", "prefix": "<OD>", "suffix": "dog<loc_1><loc_2><loc_3><loc_4>"}),
        json.dumps({"image": "broken.png", "prefix": "<OD>", "suffix": ""}),
        json.dumps({"image": "ok.png", "prefix": "<OD>", "suffix": "dog<loc_1><loc_2><loc_3><loc_1234>"}),
        json.dumps({"image": "ok.png", "prefix": "<OD>", "suffix": "dog<loc_9><loc_2><loc_3><loc_4>"}),
        json.dumps({"prefix": "<OD>"}),
    ]
    path = tmp_path / "annotations.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as err:
        read_annotations(path)
    problems = err.value.problems
    assert len(problems) == 6
    for lineno, needle in [(2, "malformed JSON"), (3, "not found"), (4, "unreadable"), (5, "out of range"),
                           (6, "x2 < x1"), (7, "missing key")]:
        assert any(p.startswith(f"{path}:{lineno}: ") and needle in p for p in problems), (lineno, problems)


def test_write_then_read_round_trip(tmp_path):
    Image.new("RGB", (32, 48)).save(tmp_path / "a.png")
    examples = [Example("a.png", 32, 48, [Box("cat", 1, 2, 30, 40)])]
    write_annotations(tmp_path / "annotations.jsonl", examples)
    (back,) = read_annotations(tmp_path / "annotations.jsonl")
    assert (back.width, back.height, back.suffix) == (32, 48, examples[0].suffix)


def test_reference_readme_variant_is_read(tmp_path):
    Image.new("RGB", (640, 480)).save(tmp_path / "img.jpg")
    record = {"id": "image_0001", "image_path": "img.jpg", "height": 480, "width": 640,
              "suffix": "dog<loc_120><loc_85><loc_340><loc_250> person<loc_50><loc_30><loc_150><loc_200>"}
    (tmp_path / "a.jsonl").write_text(json.dumps(record) + "\n")
    (ex,) = read_annotations(tmp_path / "a.jsonl")
    assert [b.label for b in ex.boxes] == ["dog", "person"]


def test_one_grammar_for_text_and_tokens():
    """The text parser and the token parser are the same function over pieces: a phrase names the
    boxes whose locations follow it, several boxes may share a phrase, a box cut short is dropped."""
    text = "red<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><loc_7><loc_8>blue<loc_9><loc_9>green<loc_0><loc_0><loc_5><loc_5>"
    by_text = parse_pieces(
        [Loc(int(p[5:-1])) if p.startswith("<loc_") else p for p in
         ["red", *[f"<loc_{i}>" for i in range(1, 9)], "blue", "<loc_9>", "<loc_9>", "green", *["<loc_0>"] * 2,
          *["<loc_5>"] * 2]], "".join)
    assert [(p.label, p.bins, p.opens_phrase) for p in by_text] == [
        ("red", (1, 2, 3, 4), True), ("red", (5, 6, 7, 8), False), ("green", (0, 0, 5, 5), True)]
    assert [b.label for b in parse_suffix(text, 100, 100)] == ["red", "red", "green"]
    # Token ids stand for text pieces; None pieces (<s>) are skipped; positions index the sequence.
    ids = [None, 7, Loc(1), Loc(2), Loc(3), Loc(4)]
    (parsed,) = parse_pieces(ids, lambda pieces: {7: "cat"}[pieces[0]])
    assert parsed.label_positions == (1,) and parsed.loc_positions == (2, 3, 4, 5)


def test_ignore_regions_round_trip_through_the_annotations_file(tmp_path):
    from dataclasses import replace

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    boxes = [Box("cat", 1, 2, 30, 20), replace(Box("cat", 3, 3, 9, 9), ignore=True)]
    write_annotations(tmp_path / "annotations.jsonl", [Example("a.png", 32, 32, boxes)])
    record = json.loads((tmp_path / "annotations.jsonl").read_text())
    assert record["ignore"] == [1] and record["suffix"].count("cat") == 2  # still a training target
    (back,) = read_annotations(tmp_path / "annotations.jsonl")
    assert [b.ignore for b in back.boxes] == [False, True]
    plain = Example("a.png", 32, 32, boxes[:1]).to_json()
    assert "ignore" not in plain  # files without ignore regions are unchanged
    (tmp_path / "bad.jsonl").write_text(json.dumps({**record, "ignore": [2]}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:1: bad suffix: 'ignore' names boxes \[2\]"):
        read_annotations(tmp_path / "bad.jsonl")


def test_bins_at_known_values():
    # At width 1000 a bin is one pixel; at 2000, two.
    assert [quantize(v, 1000) for v in (-3.0, 0.0, 0.99, 1.0, 998.5, 999.0, 1000.0, 1500.0)] == [0, 0, 0, 1, 998, 999, 999, 999]
    assert [quantize(v, 2000) for v in (1.99, 2.0, 1999.0)] == [0, 1, 999]
    assert (dequantize(0, 1000), dequantize(999, 1000), dequantize(3, 2000)) == (0.5, 999.5, 7.0)


def test_encode_suffix_and_to_json_exactly():
    boxes = [Box("dog", 0, 0, 1000, 2000), Box("cat", 500, 250, 750, 625, ignore=True)]
    suffix = "dog<loc_0><loc_0><loc_999><loc_999>cat<loc_500><loc_125><loc_750><loc_312>"
    assert encode_suffix(boxes, 1000, 2000) == suffix
    assert Example("a.png", 1000, 2000, boxes, prefix="<OD> ").to_json() == {
        "image": "a.png", "prefix": "<OD> ", "suffix": suffix, "width": 1000, "height": 2000, "ignore": [1]}
    assert Example("a.png", 1000, 2000).to_json() == {"image": "a.png", "prefix": "<OD>", "suffix": "", "width": 1000,
                                                      "height": 2000}


def test_a_parsed_box_is_placed_at_its_bin_centres():
    parsed = ParsedBox("dog", (0, 1, 2, 3), (0,), (1, 2, 3, 4), True)
    assert parsed.box(1000, 2000, 0.7) == Box("dog", 0.5, 3.0, 2.5, 7.0, 0.7)
    assert parsed.box(1000, 2000).score == 1.0
    assert parse_suffix("<s>dog<loc_0><loc_1><loc_2><loc_3></s><pad>", 1000, 2000) == [Box("dog", 0.5, 3.0, 2.5, 7.0)]
    assert text_pieces("<s>dog<loc_7></s><pad>x") == ["dog", Loc(7), "x"] and type(text_pieces("<loc_7>")[0]) is Loc


@pytest.mark.parametrize("suffix, message", [
    ("dog<loc_1><loc_2><loc_1000><loc_4>", "<loc_1000> is out of range (bins are 0..999)"),
    ("dog<loc_50><loc_2><loc_10><loc_4>", "box [50, 2, 10, 4] of 'dog' has x2 < x1 or y2 < y1"),
    ("dog<loc_1><loc_50><loc_10><loc_4>", "box [1, 50, 10, 4] of 'dog' has x2 < x1 or y2 < y1"),
    ("dog<loc_1><loc_2><loc_3>", "'dog' has a box cut short: 3 <loc_N>, not 4"),
    ("dog<loc_1><loc_2>cat<loc_1><loc_2><loc_3><loc_4>", "'dog' has a box cut short: 2 <loc_N>, not 4"),
    ("<loc_1><loc_2><loc_3><loc_4>", "a box [1, 2, 3, 4] has no label before it"),
    ("dog<loc_1><loc_2><loc_3><loc_4> trailing", "unexpected text ' trailing' after the last box"),
])
def test_strict_parse_messages_in_full(suffix, message):
    with pytest.raises(ValueError) as err:
        parse_suffix(suffix, 64, 64, strict=True)
    assert str(err.value) == message


def test_lenient_parse_keeps_what_strict_refuses_only_where_the_post_processor_does():
    # x2 < x1 is kept (scored as a box), a bin of 1000 and a labelless box are dropped; trailing text is fine;
    # a new phrase after a box opens a new label, and a single space does not.
    assert parse_suffix("dog<loc_50><loc_2><loc_10><loc_4>", 1000, 1000) == [Box("dog", 50.5, 2.5, 10.5, 4.5)]
    assert parse_suffix("dog<loc_1><loc_2><loc_1000><loc_4>cat<loc_1><loc_2><loc_3><loc_4> x", 1000, 1000) == [
        Box("cat", 1.5, 2.5, 3.5, 4.5)]
    assert parse_suffix("<loc_1><loc_2><loc_3><loc_4>", 1000, 1000) == []
    assert parse_suffix("dog<loc_1><loc_2><loc_3><loc_4> <loc_5><loc_6><loc_7><loc_8>", 1000, 1000) == [
        Box("dog", 1.5, 2.5, 3.5, 4.5)]
    parsed = parse_pieces(["dog", Loc(1), Loc(2), Loc(3), Loc(4), "cat", None, Loc(5), Loc(6), Loc(7), Loc(8)], "".join)
    assert [(p.label, p.label_positions, p.loc_positions, p.opens_phrase) for p in parsed] == [
        ("dog", (0,), (1, 2, 3, 4), True), ("cat", (5,), (7, 8, 9, 10), True)]


@pytest.mark.parametrize("ignored, message", [
    ("x", "'ignore' must be a list of box indices, got 'x'"),
    ([True], "'ignore' must be a list of box indices, got [True]"),
    ([0, 2, -1], "'ignore' names boxes [2, -1], but the suffix has 2 (indices from 0)"),
])
def test_mark_ignored_messages(ignored, message):
    boxes = [Box("cat", 0, 0, 1, 1), Box("cat", 0, 0, 2, 2)]
    with pytest.raises(ValueError) as err:
        mark_ignored(boxes, ignored)
    assert str(err.value) == message
    assert [b.ignore for b in mark_ignored(boxes, [1])] == [False, True]


def test_read_annotations_problems_in_full(tmp_path):
    Image.new("RGB", (64, 32)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    good = "dog<loc_1><loc_2><loc_3><loc_4>"
    lines = ["{not json", "[1]", json.dumps({"prefix": "<OD>"}), json.dumps({"image": "ok.png"}),
             json.dumps({"image": "missing.png", "suffix": good}), json.dumps({"image": "broken.png", "suffix": good}),
             json.dumps({"image": "ok.png", "suffix": "dog<loc_1><loc_2><loc_3>"}), "",
             json.dumps({"image": "ok.png", "suffix": good, "ignore": 1})]
    path = tmp_path / "annotations.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as err:
        read_annotations(path)
    assert err.value.summary == f"{path}: invalid annotations"
    problems = [p.replace(str(path), "FILE").replace(str(tmp_path), "DIR") for p in err.value.problems]
    assert problems[:5] == [
        "FILE:1: malformed JSON (Expecting property name enclosed in double quotes at column 2)",
        "FILE:2: expected a JSON object, got list",
        "FILE:3: missing key(s) image, suffix (need image or image_path, prefix, suffix)",
        "FILE:4: missing key(s) suffix (need image or image_path, prefix, suffix)",
        "FILE:5: image DIR/missing.png not found (no such file, and no member 'missing.png' in a pack "
        f"{pack_path(tmp_path)})".replace(str(tmp_path), "DIR"),
    ]
    assert problems[5].startswith("FILE:6: image DIR/broken.png is unreadable (UnidentifiedImageError: ")
    assert problems[6:] == ["FILE:7: bad suffix: 'dog' has a box cut short: 3 <loc_N>, not 4",
                            "FILE:9: bad suffix: 'ignore' must be a list of box indices, got 1"]
    with pytest.raises(InputError) as err:
        read_annotations(tmp_path / "none.jsonl")
    assert str(err.value) == f"{tmp_path / 'none.jsonl'}: annotations file not found"


def test_read_annotations_takes_the_sizes_written_unless_told_to_check_the_images(tmp_path):
    Image.new("RGB", (64, 32)).save(tmp_path / "ok.png")
    record = {"image": "ok.png", "suffix": "dog<loc_0><loc_0><loc_999><loc_999>", "width": 1000, "height": 2000}
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(record) + "\n").encode())  # with a byte-order mark
    (checked,) = read_annotations(path)
    (trusted,) = read_annotations(path, check_images=False)
    assert (checked.width, checked.height, checked.prefix) == (64, 32, "<OD>")
    assert (trusted.width, trusted.height) == (1000, 2000)
    assert trusted.boxes == [Box("dog", 0.5, 1.0, 999.5, 1999.0)] and trusted.image == "ok.png"
    path.write_text(json.dumps({"image": "ok.png", "suffix": "", "width": 1000}) + "\n")
    (unsized,) = read_annotations(path, check_images=False)  # no height written: read from the image
    assert (unsized.width, unsized.height) == (64, 32)
