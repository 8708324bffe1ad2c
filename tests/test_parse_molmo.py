"""Molmo (0924) percent-point parsing: one named edge case per row, exact normalised numbers."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vlm_tools.parsing.molmo import clean_text, parse_points

CUP = '<point x="63.3" y="85.8" alt="cup">cup</point>'
CUPS = '<points x1="9.1" y1="11.7" x2="17.2" y2="41.3" alt="cups">cups</points>'

POINTS = [
    ("reference_point", CUP, [(0.633, 0.858, "cup")]),
    ("reference_points", CUPS, [(0.091, 0.117, "cups"), (0.172, 0.413, "cups")]),
    (
        "several_elements",
        f"Here: {CUP} and {CUPS}.",
        [(0.633, 0.858, "cup"), (0.091, 0.117, "cups"), (0.172, 0.413, "cups")],
    ),
    ("attribute_order_y_first", '<point y="85.8" alt="cup" x="63.3">cup</point>', [(0.633, 0.858, "cup")]),
    ("single_quotes", "<point x='63.3' y='85.8' alt='cup'>cup</point>", [(0.633, 0.858, "cup")]),
    ("mixed_quotes", '<point x=\'63.3\' y="85.8" alt="cup">cup</point>', [(0.633, 0.858, "cup")]),
    ("integer_values", '<point x="50" y="25" alt="a">a</point>', [(0.5, 0.25, "a")]),
    ("scale_edges", '<point x="0" y="100" alt="a">a</point>', [(0.0, 1.0, "a")]),
    ("over_100_dropped", '<point x="100.1" y="50" alt="a">a</point>', []),
    ("one_of_points_over_100", '<points x1="150" y1="10" x2="20" y2="30" alt="a">a</points>', [(0.2, 0.3, "a")]),
    ("negative_dropped", '<point x="-5" y="50" alt="a">a</point>', []),
    ("exponent_dropped", '<point x="1e1" y="50" alt="a">a</point>', []),
    ("not_a_number_dropped", '<point x="left" y="50" alt="a">a</point>', []),
    ("missing_y_dropped", '<point x="10" alt="a">a</point>', []),
    ("numbered_missing_half", '<points x1="10" y1="20" x2="30" alt="a">a</points>', [(0.1, 0.2, "a")]),
    (
        "numbered_order_is_numeric",
        '<points x10="10" y10="10" x2="2" y2="2" x1="1" y1="1" alt="a">a</points>',
        [(0.01, 0.01, "a"), (0.02, 0.02, "a"), (0.1, 0.1, "a")],
    ),
    ("whitespace_inside_value", '<point x=" 40.5 " y="20" alt="a">a</point>', [(0.405, 0.2, "a")]),
    ("label_from_inner_text", '<point x="10" y="20">the mug</point>', [(0.1, 0.2, "the mug")]),
    ("no_label_self_closing", '<point x="10" y="20"/>', [(0.1, 0.2, None)]),
    ("truncated_in_y_value", '<point x="63.3" y="85', []),
    ("truncated_in_second_pair", '<points x1="9.1" y1="11.7" x2="17.2" y2="4', [(0.091, 0.117, None)]),
    ("truncated_in_alt", '<point x="63.3" y="85.8" alt="cu', [(0.633, 0.858, None)]),
    ("truncated_before_closing_tag", '<point x="63.3" y="85.8" alt="cup">cu', [(0.633, 0.858, "cup")]),
    ("uppercase_tag", '<POINT X="63.3" Y="85.8" ALT="cup">cup</POINT>', [(0.633, 0.858, "cup")]),
    ("empty_output", "", []),
    ("unrelated_text", "There is no cup in the image.", []),
    ("molmo2_format_not_read", '<points coords="1 1 073 160" alt="boats">boats</points>', []),
    ("html_like_text", "<p>x=1 y=2</p>", []),
]


@pytest.mark.parametrize(("raw", "expected"), [c[1:] for c in POINTS], ids=[c[0] for c in POINTS])
def test_parse_points(raw: str, expected: list[tuple[float, float, str | None]]) -> None:
    points = parse_points(raw)
    assert len(points) == len(expected)
    for got, (x, y, label) in zip(points, expected, strict=True):
        assert math.isclose(got.x, x)
        assert math.isclose(got.y, y)
        assert got.label == label


def test_counting_answer() -> None:
    raw = 'Counting the <points x1="10" y1="10" x2="20" y2="20" alt="cars">cars</points> shows a total of 2.'
    assert len(parse_points(raw)) == 2
    assert clean_text(raw) == "Counting the cars shows a total of 2."


@pytest.mark.parametrize("bad", [None, b"x", 3], ids=["none", "bytes", "int"])
def test_non_str_is_a_caller_error(bad: object) -> None:
    for fn in (parse_points, clean_text):
        with pytest.raises(TypeError):
            fn(bad)  # type: ignore[operator]


VALID = f"Sure! {CUP} and {CUPS} and " + "<point x='100' y='0.5' alt='edge'>edge</point>."


def test_every_truncation_gives_a_prefix_of_the_full_result() -> None:
    """Output cut anywhere never yields a point the full output does not contain (no half-numbers)."""
    full = [(p.x, p.y) for p in parse_points(VALID)]
    assert len(full) == 4
    for cut in range(len(VALID) + 1):
        got = [(p.x, p.y) for p in parse_points(VALID[:cut])]
        assert got == full[: len(got)], cut


PIECES = ["<point", "<points", " x=", " y=", " x1=", " y1=", " x2=", " y2=", ' alt="', '"', "'", ">",
          "</point>", "</points>", "/>", "<", "63.3", "100", "100.5", "-1", ".", "5", " ", "\n", "cup", "total of ",
          "é"]  # fmt: skip


TEXT = st.lists(st.sampled_from(PIECES), max_size=40).map("".join) | st.text(max_size=60)


@given(raw=TEXT)
def test_any_text_gives_only_points_the_text_spells(raw: str) -> None:
    """Whatever the text, every point is in range and each coordinate is a percentage the text holds."""
    spelt = {round(float(n), 6) for n in re.findall(r"\d+(?:\.\d+)?", raw)}
    for p in parse_points(raw):
        assert 0.0 <= p.x <= 1.0 and 0.0 <= p.y <= 1.0
        assert round(p.x * 100, 6) in spelt and round(p.y * 100, 6) in spelt
    assert "<|im_end|>" not in clean_text(raw)


PERCENT = st.integers(0, 1000).map(lambda tenths: tenths / 10)


@given(points=st.lists(st.tuples(PERCENT, PERCENT), min_size=1, max_size=12))
def test_written_points_read_back(points: list[tuple[float, float]]) -> None:
    """Points written as Molmo writes them (x1, y1, x2, y2… in percent) read back exactly, in order."""
    attrs = " ".join(f'x{i}="{x:.1f}" y{i}="{y:.1f}"' for i, (x, y) in enumerate(points, start=1))
    raw = f'<points {attrs} alt="cars">cars</points>' if len(points) > 1 else (
        f'<point x="{points[0][0]:.1f}" y="{points[0][1]:.1f}" alt="cars">cars</point>'
    )  # fmt: skip
    got = parse_points(raw)
    assert [(round(p.x * 100, 6), round(p.y * 100, 6)) for p in got] == [(round(x, 6), round(y, 6)) for x, y in points]
    assert {p.label for p in got} == {"cars"}
