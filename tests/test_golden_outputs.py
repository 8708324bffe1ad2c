"""The parsers against a golden corpus of what real models printed (``tests/golden/real_outputs.json``).

Each case is an exact output string from a public source — model cards, AI2's and Google's repositories and
notebooks, transformers' integration tests, other projects' tests and logs that recorded real answers — with its
source and what the source says it means: the points (normalised), boxes, labels, counts and text. Cases marked
``format example`` are the output format's own examples in AI2's repositories (its formatter's tests and its UI's
parser tests): the format the released models were trained to write. Variants the server does not read (video
frames, ``<tracks>``) are cases too, and must yield no points.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlm_tools.backends.base import Request, Task
from vlm_tools.families import get_family
from vlm_tools.parsing import molmo, molmo2

CORPUS = json.loads((Path(__file__).parent / "golden" / "real_outputs.json").read_text())
CASES = CORPUS["cases"]
IMAGE = Image.new("RGB", (8, 8))


def request_for(case: dict[str, Any]) -> Request:
    spec = case["request"]
    return Request(
        Task(spec["task"]), IMAGE, text=spec.get("text", ""), labels=tuple(spec.get("labels", ())), max_points=100,
    )  # fmt: skip


def all_points(case: dict[str, Any]) -> list[Any]:
    """Every point of an output, over all its images (Molmo 0924 answers about one image only)."""
    if case["family"] == "molmo2":
        return molmo2.parse_points(case["output"], image_index=None)
    return molmo.parse_points(case["output"])


def test_the_corpus_is_large_enough_and_cites_every_case() -> None:
    by_family = {f: [c for c in CASES if c["family"] == f] for f in ("molmo2", "molmo", "paligemma")}
    assert len(CASES) >= 40 and all(by_family.values())
    for case in CASES:
        assert case["source"] and case["output"] and case["kind"], case["id"]
    assert len({c["id"] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_each_real_output_reads_as_its_source_says(case: dict[str, Any]) -> None:
    family = get_family(case["family"])
    output = family.interpret(request_for(case), case["output"])
    expected = case["expected"]
    if "points" in expected:
        got = [(p.x, p.y, p.label) for p in output.points]
        want = [(x, y, label) for x, y, label in expected["points"]]
        assert len(got) == len(want), (got, want)
        for (gx, gy, glabel), (wx, wy, wlabel) in zip(got, want, strict=True):
            assert gx == pytest.approx(wx, abs=1e-9) and gy == pytest.approx(wy, abs=1e-9)
            assert glabel == wlabel
    if "stated_count" in expected:  # a counting answer's points are as many as it says (over all its images)
        assert len(all_points(case)) == expected["stated_count"]
    if "source_points" in expected:  # the source's own reading of the string
        got_flat = [v for p in output.points for v in (p.x, p.y)]
        assert got_flat == pytest.approx([v for p in expected["source_points"] for v in p])
    if "boxes" in expected:
        got = [(b.x0, b.y0, b.x1, b.y1, b.label) for b in output.boxes]
        assert got == [tuple(b) for b in expected["boxes"]]
    if "text" in expected:
        assert output.text == expected["text"]


@pytest.mark.parametrize(
    "case", [c for c in CASES if "points_all_images" in c["expected"]], ids=lambda c: c["id"]
)
def test_multi_image_outputs_give_every_images_points_when_asked(case: dict[str, Any]) -> None:
    got = [(p.x, p.y, p.label) for p in all_points(case)]
    assert got == [tuple(p) for p in case["expected"]["points_all_images"]]


def test_variants_not_read_are_listed_with_why() -> None:
    not_read = [c for c in CASES if "not_read" in c["expected"]]
    assert not_read and all(c["expected"]["points"] == [] and c["expected"]["not_read"] for c in not_read)
    assert {e["id"] for e in CORPUS["excluded"]}.isdisjoint(c["id"] for c in CASES)
