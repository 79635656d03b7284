import json

import pytest
from PIL import Image

from icmlora.florence.format import (
    Box, Example, Loc, dequantize, encode_suffix, parse_pieces, parse_suffix, quantize, read_annotations,
    write_annotations,
)
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
