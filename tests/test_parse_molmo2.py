"""Molmo2 output parsing: one named edge case per row, exact normalised numbers."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlm_tools.parsing.molmo2 import clean_text, parse_points

BOATS = '<points coords="1 1 073 160 2 173 600" alt="boats">the boats</points>'
COUNTING = (
    'Counting the <points coords="1 1 073 160 2 173 600 3 500 999" alt="boats">the boats</points> shows a total of 3.'
)

POINTS = [
    ("reference_example", BOATS, 1, [(0.073, 0.160, "boats"), (0.173, 0.600, "boats")]),
    ("single_point", '<points coords="1 1 500 500" alt="cup">cup</points>', 1, [(0.5, 0.5, "cup")]),
    (
        "counting_phrase",
        COUNTING,
        1,
        [(0.073, 0.160, "boats"), (0.173, 0.600, "boats"), (0.5, 0.999, "boats")],
    ),
    (
        "several_elements",
        'A <points coords="1 1 100 200" alt="cat">cat</points> and a '
        '<points coords="1 1 300 400" alt="dog">dog</points>.',
        1,
        [(0.1, 0.2, "cat"), (0.3, 0.4, "dog")],
    ),
    (
        "two_images_tab_default_first",
        '<points coords="1 1 073 160\t2 1 500 500 2 250 750" alt="boats">boats</points>',
        1,
        [(0.073, 0.160, "boats")],
    ),
    (
        "two_images_tab_all",
        '<points coords="1 1 073 160\t2 1 500 500 2 250 750" alt="boats">boats</points>',
        None,
        [(0.073, 0.160, "boats"), (0.5, 0.5, "boats"), (0.25, 0.75, "boats")],
    ),
    (
        "two_images_tab_second",
        '<points coords="1 1 073 160\t2 1 500 500 2 250 750" alt="boats">boats</points>',
        2,
        [(0.5, 0.5, "boats"), (0.25, 0.75, "boats")],
    ),
    (
        "other_group_separators",
        '<points coords="1 1 100 100;2 1 200 200,3 1 300 300:4 1 400 400" alt="x">x</points>',
        None,
        [(0.1, 0.1, "x"), (0.2, 0.2, "x"), (0.3, 0.3, "x"), (0.4, 0.4, "x")],
    ),
    ("only_another_image", '<points coords="2 1 500 500" alt="cup">cup</points>', 1, []),
    (
        "truncated_inside_a_number",
        '<points coords="1 1 073 160 2 173 6',
        1,
        [(0.073, 0.160, None)],
    ),
    (
        "truncated_after_a_number",
        '<points coords="1 1 073 160 2 173 600 ',
        1,
        [(0.073, 0.160, None), (0.173, 0.600, None)],
    ),
    (
        "truncated_mid_triplet",
        '<points coords="1 1 073 160 2 173 ',
        1,
        [(0.073, 0.160, None)],
    ),
    (
        "truncated_in_alt",
        '<points coords="1 1 073 160" alt="bo',
        1,
        [(0.073, 0.160, None)],
    ),
    (
        "truncated_before_closing_tag",
        '<points coords="1 1 073 160" alt="boats">the bo',
        1,
        [(0.073, 0.160, "boats")],
    ),
    ("truncated_in_tag_name", "Here: <poin", 1, []),
    (
        "out_of_range_dropped",
        '<points coords="1 1 1001 500 2 100 100 3 500 1500" alt="x">x</points>',
        1,
        [(0.1, 0.1, "x")],
    ),
    ("scale_edges", '<points coords="1 1 000 1000" alt="x">x</points>', 1, [(0.0, 1.0, "x")]),
    ("unpadded_coordinate_rejected", '<points coords="1 1 73 160 2 100 200" alt="x">x</points>', 1, [(0.1, 0.2, "x")]),
    ("decimal_coordinate_rejected", '<points coords="1 1 07.5 160" alt="x">x</points>', 1, []),
    ("singular_point_tag", '<point coords="1 1 250 750" alt="door">door</point>', 1, [(0.25, 0.75, "door")]),
    ("label_from_inner_text", '<points coords="1 1 250 750">the door</points>', 1, [(0.25, 0.75, "the door")]),
    ("no_label", '<points coords="1 1 250 750"/>', 1, [(0.25, 0.75, None)]),
    ("single_quotes", "<points coords='1 1 250 750' alt='door'>door</points>", 1, [(0.25, 0.75, "door")]),
    (
        "attribute_order_alt_first",
        '<points alt="door" coords="1 1 250 750">door</points>',
        1,
        [(0.25, 0.75, "door")],
    ),
    (
        "html_entity_in_alt",
        '<points coords="1 1 250 750" alt="Tom &amp; Jerry">x</points>',
        1,
        [(0.25, 0.75, "Tom & Jerry")],
    ),
    ("chat_special_after", BOATS + "<|im_end|>", 1, [(0.073, 0.160, "boats"), (0.173, 0.600, "boats")]),
    ("empty_output", "", 1, []),
    ("unrelated_text", "There are no boats in this image.", 1, []),
    ("molmo_0924_format_not_read", '<point x="63.3" y="85.8" alt="cup">cup</point>', 1, []),
    ("coords_garbage", '<points coords="boats here" alt="x">x</points>', 1, []),
]


@pytest.mark.parametrize(("raw", "image", "expected"), [c[1:] for c in POINTS], ids=[c[0] for c in POINTS])
def test_parse_points(raw: str, image: int | None, expected: list[tuple[float, float, str | None]]) -> None:
    points = parse_points(raw, image_index=image)
    assert len(points) == len(expected)
    for got, (x, y, label) in zip(points, expected, strict=True):
        assert math.isclose(got.x, x)
        assert math.isclose(got.y, y)
        assert got.label == label


CLEAN = [
    ("counting_markup_replaced", COUNTING, "Counting the the boats shows a total of 3."),
    ("plain_answer_with_end_token", "A red boat.<|im_end|>", "A red boat."),
    ("text_after_end_token_dropped", "Yes.<|im_end|><|im_start|>user", "Yes."),
    ("unclosed_element_swallows_rest", 'Here <points coords="1 1 100 100" alt="x">x and', "Here"),
    ("self_closing_element_removed", 'Here <points coords="1 1 100 100"/> it is.', "Here it is."),
    ("line_breaks_kept", "Line one\nLine two", "Line one\nLine two"),
    ("text_without_markup_unchanged", " Answer :  yes , 2 . ", "Answer :  yes , 2 ."),
    (
        "echoed_chat_prompt_dropped",
        "<|im_start|>user\nDescribe this image.<|im_end|>\n<|im_start|>assistant\nA boat.<|im_end|>",
        "A boat.",
    ),
]


@pytest.mark.parametrize(("raw", "expected"), [c[1:] for c in CLEAN], ids=[c[0] for c in CLEAN])
def test_clean_text(raw: str, expected: str) -> None:
    assert clean_text(raw) == expected


@pytest.mark.parametrize("bad", [None, b"x", 1.5], ids=["none", "bytes", "float"])
def test_non_str_is_a_caller_error(bad: object) -> None:
    for fn in (parse_points, clean_text):
        with pytest.raises(TypeError):
            fn(bad)  # type: ignore[operator]


VALID = (
    'Sure. <points coords="1 1 073 160 2 173 600\t2 1 500 500 2 1000 000" alt="boats">the boats</points> and '
    '<points coords="1 1 999 001" alt="sun">the sun</points>. Counting shows a total of 3.'
)


def test_every_truncation_gives_a_prefix_of_the_full_result() -> None:
    """Output cut anywhere never yields a point the full output does not contain (no half-numbers)."""
    full = [(p.x, p.y) for p in parse_points(VALID, image_index=None)]
    assert len(full) == 5
    for cut in range(len(VALID) + 1):
        got = [(p.x, p.y) for p in parse_points(VALID[:cut], image_index=None)]
        assert got == full[: len(got)], cut


PIECES = ['<points coords="', "<point coords='", '"', "'", " alt=", ">", "</points>", "</point>", "<", "/>", "1 ",
          "2 ", "073 ", "1000 ", "1001 ", "99 ", "\t", ";", ":", ",", " ", "boats", "total of ", "5", "<|im_end|>",
          "&amp;", "\n", "é", "="]  # fmt: skip


TEXT = st.lists(st.sampled_from(PIECES), max_size=40).map("".join) | st.text(max_size=60)


@given(raw=TEXT)
def test_any_text_gives_only_points_the_text_spells(raw: str) -> None:
    """Whatever the text, every point is in range and each coordinate is a 3–4 digit number the text holds."""
    spelt = {int(n) for n in re.findall(r"\d{3,4}", raw) if int(n) <= 1000}
    for image in (1, None):
        for p in parse_points(raw, image_index=image):
            assert 0.0 <= p.x <= 1.0 and 0.0 <= p.y <= 1.0
            assert round(p.x * 1000) in spelt and round(p.y * 1000) in spelt
    assert "<|im_end|>" not in clean_text(raw)


POINT = st.tuples(st.integers(0, 1000), st.integers(0, 1000))


@given(points=st.lists(POINT, min_size=1, max_size=12), label=st.sampled_from(["boats", "the red button", "a & b"]))
def test_written_points_read_back(points: list[tuple[int, int]], label: str) -> None:
    """Points written as Molmo2 writes them (ids from 1, zero-padded) read back exactly, in order."""
    coords = " ".join(f"{i} {x:03d} {y:03d}" for i, (x, y) in enumerate(points, start=1))
    escaped = label.replace("&", "&amp;")
    raw = f'Counting the <points coords="1 {coords}" alt="{escaped}">{escaped}</points> shows a total of {len(points)}.'
    got = parse_points(raw)
    assert [(round(p.x * 1000), round(p.y * 1000)) for p in got] == points
    assert {p.label for p in got} == {label}
    for cut in range(0, len(raw) + 1, 7):  # cut anywhere: a prefix of the points, never a half-number
        prefix = [(round(p.x * 1000), round(p.y * 1000)) for p in parse_points(raw[:cut])]
        assert prefix == points[: len(prefix)]


@pytest.mark.parametrize(
    ("raw", "unread"),
    [
        ('<points coords="1 1 073 160 2 173 600" alt="boats">the boats</points>', 0),
        ("There are none.", 0),
        ('<point x="61.5" y="40.2" alt="cup">cup</point>', 1),  # Molmo 0924's percent syntax
        ('<tracks coords="0.0 1 500 500">car</tracks>', 1),  # video tracking: not read from an image
        ('<points coords="1 1 1500 160" alt="x">x</points>', 1),  # over 1000: the only point dropped
        ('<points coords="1 1 500 500 2 1500 500" alt="x">x</points>', 0),  # one of two dropped: the element gave a point
        ('<points alt="x">x</points>', 1),  # no coordinates at all
    ],
    ids=["read", "none", "percent-syntax", "tracks", "out-of-range", "partly-read", "no-coords"],
)
def test_unread_markup_counts_elements_that_gave_no_point(raw: str, unread: int) -> None:
    from vlm_tools.parsing.molmo2 import unread_markup

    assert unread_markup(raw) == unread
