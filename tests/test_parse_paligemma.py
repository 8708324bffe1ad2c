"""PaliGemma 2 output parsing: one named edge case per row, exact normalised numbers."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlm_tools.parsing.paligemma import parse_detections, strip_special


def loc(*bins: int) -> str:
    return "".join(f"<loc{b:04d}>" for b in bins)


def box(y0: int, x0: int, y1: int, x1: int, label: str | None) -> tuple[float, float, float, float, str | None]:
    """Expected box from bins in PaliGemma's order (y first), as normalised (x0, y0, x1, y1, label)."""
    return (x0 / 1024, y0 / 1024, x1 / 1024, y1 / 1024, label)


SEG16 = "".join(f"<seg{i:03d}>" for i in range(16))

DETECTIONS = [
    ("single_box", loc(256, 128, 768, 896) + " cat", [box(256, 128, 768, 896, "cat")]),
    (
        "two_boxes_cell_phone_remote",
        loc(100, 200, 300, 400) + " cell phone ; " + loc(500, 600, 700, 800) + " remote",
        [box(100, 200, 300, 400, "cell phone"), box(500, 600, 700, 800, "remote")],
    ),
    ("label_with_spaces", loc(0, 0, 512, 512) + " big red fire truck", [box(0, 0, 512, 512, "big red fire truck")]),
    (
        "label_containing_semicolon_kept",
        loc(10, 20, 30, 40) + " salt; pepper ; " + loc(50, 60, 70, 80) + " cup",
        [box(10, 20, 30, 40, "salt; pepper"), box(50, 60, 70, 80, "cup")],
    ),
    (
        "same_label_twice",
        loc(44, 131, 958, 909) + " cat ; " + loc(112, 497, 893, 982) + " cat",
        [box(44, 131, 958, 909, "cat"), box(112, 497, 893, 982, "cat")],
    ),
    ("eos_and_padding", loc(1, 2, 3, 4) + " dog<eos><pad><pad>", [box(1, 2, 3, 4, "dog")]),
    ("text_after_eos_ignored", loc(1, 2, 3, 4) + " dog<eos>" + loc(5, 6, 7, 8) + " cat", [box(1, 2, 3, 4, "dog")]),
    (
        "echoed_prompt_with_image_tokens",
        "<image><image><bos>detect cat ; dog\n" + loc(10, 10, 20, 20) + " cat ; " + loc(30, 30, 40, 40) + " dog<eos>",
        [box(10, 10, 20, 20, "cat"), box(30, 30, 40, 40, "dog")],
    ),
    ("echoed_prompt_bos_only", "<bos>detect cat\n" + loc(10, 10, 20, 20) + " cat", [box(10, 10, 20, 20, "cat")]),
    ("segment_output_seg_tokens_skipped", loc(100, 100, 900, 900) + SEG16 + " cat", [box(100, 100, 900, 900, "cat")]),
    (
        "segment_two_objects",
        loc(1, 1, 9, 9) + SEG16 + " a ; " + loc(2, 2, 8, 8) + " " + SEG16 + " b",
        [box(1, 1, 9, 9, "a"), box(2, 2, 8, 8, "b")],
    ),
    ("truncated_after_two_locs", loc(1, 2, 3, 4) + " cat ; " + loc(100, 200), [box(1, 2, 3, 4, "cat")]),
    ("truncated_inside_a_token", loc(1, 2, 3, 4) + " cat ; <loc0100><loc02", [box(1, 2, 3, 4, "cat")]),
    ("only_three_locs", loc(1, 2, 3) + " cat", []),
    ("inverted_y_dropped", loc(800, 100, 200, 900) + " cat", []),
    ("inverted_x_dropped", loc(100, 900, 800, 200) + " cat", []),
    (
        "inverted_dropped_valid_kept",
        loc(800, 100, 200, 900) + " bad ; " + loc(100, 100, 200, 200) + " good",
        [box(100, 100, 200, 200, "good")],
    ),
    ("zero_size_box_kept", loc(512, 512, 512, 512) + " dot", [box(512, 512, 512, 512, "dot")]),
    ("extreme_bins", loc(0, 0, 1023, 1023) + " all", [box(0, 0, 1023, 1023, "all")]),
    ("bin_1024_is_the_edge", loc(0, 0, 1024, 1024) + " all", [box(0, 0, 1024, 1024, "all")]),
    ("bin_over_1024_dropped", "<loc0000><loc0000><loc1025><loc0500> cat", []),
    ("huge_bin_dropped", "<loc0000><loc0000><loc99999><loc0500> cat", []),
    ("whitespace_between_tokens", "<loc0100> <loc0200> <loc0300> <loc0400> cat", [box(100, 200, 300, 400, "cat")]),
    ("no_label", loc(1, 2, 3, 4), [box(1, 2, 3, 4, None)]),
    ("eight_locs_in_a_row", loc(1, 2, 3, 4, 5, 6, 7, 8) + " b", [box(1, 2, 3, 4, None), box(5, 6, 7, 8, "b")]),
    ("label_whitespace_collapsed", loc(1, 2, 3, 4) + "   traffic \n light  ", [box(1, 2, 3, 4, "traffic light")]),
    ("empty_output", "", []),
    ("unrelated_text", "I cannot see any cat in this picture.", []),
    ("caption_not_detection", "a cat sitting on a mat<eos>", []),
    ("seg_tokens_only", SEG16, []),
]


@pytest.mark.parametrize(("raw", "expected"), [c[1:] for c in DETECTIONS], ids=[c[0] for c in DETECTIONS])
def test_parse_detections(raw: str, expected: list[tuple[float, float, float, float, str | None]]) -> None:
    boxes = parse_detections(raw)
    assert len(boxes) == len(expected)
    for got, (x0, y0, x1, y1, label) in zip(boxes, expected, strict=True):
        assert math.isclose(got.x0, x0)
        assert math.isclose(got.y0, y0)
        assert math.isclose(got.x1, x1)
        assert math.isclose(got.y1, y1)
        assert got.label == label


def test_order_is_y_first() -> None:
    """The first token is y_min, not x_min: a wide, short box must come out wide and short."""
    (b,) = parse_detections(loc(400, 0, 600, 1024) + " bar")
    assert (b.x0, b.x1) == (0.0, 1.0)
    assert math.isclose(b.y0, 400 / 1024) and math.isclose(b.y1, 600 / 1024)


STRIP = [
    ("caption_with_eos", "a cat sitting on a bench<eos>", None, "a cat sitting on a bench"),
    ("padding_both_sides", "<pad><pad>a cat<eos><pad>", None, "a cat"),
    ("echoed_prompt_layout", "<image><image><bos>caption en\na cat<eos>", None, "a cat"),
    ("echoed_prompt_given", "caption en\na cat", "caption en", "a cat"),
    ("prompt_words_without_newline_kept", "caption en is what it says", "caption en", "caption en is what it says"),
    ("ocr_keeps_line_breaks", "Line one\nLine two<eos>", "ocr", "Line one\nLine two"),
    ("loc_and_seg_tokens_removed", "<loc0001><seg002> hello", None, "hello"),
    ("surrounding_whitespace", "  \n spaced out \n ", None, "spaced out"),
    ("html_in_text_kept", "<div>hi</div>", None, "<div>hi</div>"),
    ("empty", "", None, ""),
    ("only_specials", "<bos><eos><pad>", None, ""),
    ("echo_cut_before_newline", "<bos>answer en what is", None, ""),
]


@pytest.mark.parametrize(("raw", "prompt", "expected"), [c[1:] for c in STRIP], ids=[c[0] for c in STRIP])
def test_strip_special(raw: str, prompt: str | None, expected: str) -> None:
    assert strip_special(raw, prompt) == expected


@pytest.mark.parametrize("bad", [None, b"<loc0001>", 42, ["x"]], ids=["none", "bytes", "int", "list"])
def test_non_str_is_a_caller_error(bad: object) -> None:
    with pytest.raises(TypeError):
        parse_detections(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        strip_special(bad)  # type: ignore[arg-type]


VALID = (
    "<bos>detect cat ; dog\n"
    + loc(10, 20, 300, 400)
    + " cat ; "
    + loc(100, 200, 900, 1000)
    + SEG16
    + " hot dog ; "
    + loc(5, 6, 7, 8)
    + " dog<eos>"
)


def test_every_truncation_gives_a_prefix_of_the_full_result() -> None:
    """Output cut anywhere never yields a box the full output does not contain, in the same order."""
    full = [(b.x0, b.y0, b.x1, b.y1) for b in parse_detections(VALID)]
    assert len(full) == 3
    for cut in range(len(VALID) + 1):
        got = [(b.x0, b.y0, b.x1, b.y1) for b in parse_detections(VALID[:cut])]
        assert got == full[: len(got)], cut


PIECES = ["<loc", "<loc0", "<lo", "c0002>", "<se", "g001>", "0123>", "<loc1023>", "<loc1024>", "<loc9999>", "<seg01>", "<seg127>", " ; ", ";", "<eos>",
          "<bos>", "<pad>", "<image>", "\n", " ", "cat", "é", ">", "<", "detect", "\x00", "\t"]  # fmt: skip


LOCATIONS = st.lists(st.integers(0, 1100).map(lambda b: f"<loc{b:04d}>"), max_size=9).map("".join)
TEXT = st.tuples(LOCATIONS, st.lists(st.sampled_from(PIECES), max_size=30).map("".join)).map("".join) | st.text(
    max_size=60
)


@given(raw=TEXT)
def test_any_text_gives_only_boxes_the_text_spells(raw: str) -> None:
    """Whatever the text, every box is in range, ordered, and each edge is a bin a <locNNNN> token of it holds."""
    spelt = {int(n) for n in re.findall(r"<loc(\d{1,6})>", raw)}
    for b in parse_detections(raw):
        assert 0.0 <= b.x0 <= b.x1 <= 1.0 and 0.0 <= b.y0 <= b.y1 <= 1.0
        assert {round(v * 1024) for v in (b.x0, b.y0, b.x1, b.y1)} <= spelt
    assert not re.search(r"<(?:loc|seg)\d{1,6}>", strip_special(raw))  # text never carries geometry tokens


BOX = st.tuples(st.integers(0, 1023), st.integers(0, 1023), st.integers(0, 1023), st.integers(0, 1023)).map(
    lambda v: (min(v[0], v[2]), min(v[1], v[3]), max(v[0], v[2]), max(v[1], v[3]))
)
LABEL = st.sampled_from(["cat", "traffic light", "6 of clubs", "a; b"])


@given(boxes=st.lists(st.tuples(BOX, LABEL), min_size=1, max_size=6))
def test_written_boxes_read_back(boxes: list[tuple[tuple[int, int, int, int], str]]) -> None:
    """Boxes written as PaliGemma writes them (y0 x0 y1 x1 bins, ' ; ' between) read back exactly, in order."""
    raw = " ; ".join("".join(f"<loc{v:04d}>" for v in box) + f" {label}" for box, label in boxes)
    got = parse_detections(raw)
    assert [(round(b.y0 * 1024), round(b.x0 * 1024), round(b.y1 * 1024), round(b.x1 * 1024)) for b in got] == [
        box for box, _ in boxes
    ]
    assert [b.label for b in got] == [label for _, label in boxes]


@pytest.mark.parametrize(
    ("raw", "unread"),
    [
        ("<loc0100><loc0200><loc0300><loc0400> cat", 0),
        ("a cat on a mat", 0),
        ("<loc0100><loc0200><loc0300> cat", 1),  # cut short: three location tokens
        ("<loc0500><loc0500><loc0100><loc0100> cat", 1),  # inverted: dropped, not swapped
        ("<loc0100><loc0200><loc0300><loc0400> cat ; <loc0500><loc0500><loc0100><loc0100> dog", 1),
    ],
    ids=["read", "text", "cut-short", "inverted", "one-of-two"],
)
def test_unread_boxes_counts_location_tokens_that_gave_no_box(raw: str, unread: int) -> None:
    from vlm_tools.parsing.paligemma import parse_detections, unread_boxes

    assert unread_boxes(raw, parse_detections(raw)) == unread
