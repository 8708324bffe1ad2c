"""The fixture trainer's targets say what the real parsers read back.

``scripts/train_fixtures.py`` made the committed grounding models; CI never trains, but the answers it teaches
and the attention regions it supervises are checked here so a change to the trainer cannot silently teach a
format the parsers read differently.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from vlm_tools.parsing.molmo2 import parse_points
from vlm_tools.parsing.paligemma import parse_detections
from vlm_tools.testing import ui_scenes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_fixtures as tf

DIGITS = torch.arange(100, 110)
"""Stand-in token ids of the digits 0–9 (``_slip_digits`` only maps ids to digits)."""


def _scene(seed: int, size: tuple[int, int]) -> ui_scenes.Scene:
    return ui_scenes.random_scene(random.Random(seed), size)


@pytest.mark.parametrize("size", [(1280, 720), (600, 900), (333, 333)], ids=str)
def test_paligemma_answer_parses_back_to_the_box(size: tuple[int, int]) -> None:
    scene = _scene(1, size)
    (box,) = parse_detections(tf.paligemma_answer(scene))
    x0, y0, x1, y1 = scene.target.box
    width, height = size
    assert box.label == scene.target.name
    for got, want in ((box.x0, x0 / width), (box.y0, y0 / height), (box.x1, x1 / width), (box.y1, y1 / height)):
        assert abs(got - want) <= 1 / tf.LOC_BINS


@pytest.mark.parametrize("size", [(1280, 720), (600, 900)], ids=str)
def test_molmo2_answer_parses_back_to_the_centre(size: tuple[int, int]) -> None:
    scene = _scene(2, size)
    (point,) = parse_points(tf.molmo2_answer(scene))
    cx, cy = scene.target.center
    assert point.label == scene.target.name
    assert abs(point.x - cx / size[0]) <= 0.0006 and abs(point.y - cy / size[1]) <= 0.0006


def _digits(answer: list[int]) -> str:
    return "".join(str(t - 100) for t in answer)


@pytest.mark.parametrize(
    ("value", "read", "finish"),
    [("904", "8", "899"), ("239", "3", "300"), ("050", "1", "100"), ("950", "8", "899")],
    ids=["low-slip-finishes-high", "high-slip-finishes-low", "from-zero", "from-nine"],
)
def test_slipped_hundreds_digit_is_finished_at_the_nearest_value(value: str, read: str, finish: str) -> None:
    answer = [int(DIGITS[int(c)]) for c in "11" + value + "500"]
    for seed in range(200):  # find a draw that slips x to the wanted digit and leaves y alone
        targets, inputs = tf._slip_digits(answer, DIGITS, random.Random(seed), share=0.5)
        if _digits(inputs)[2] == read and _digits(inputs)[5:] == "500":
            break
    else:
        pytest.fail("no draw slipped x to the wanted digit")
    assert _digits(inputs)[2:5] == finish
    # The model must still predict the TRUE hundreds digit, then the finish consistent with what it read.
    assert _digits(targets)[2:5] == value[0] + finish[1:]
    assert _digits(targets)[5:] == _digits(inputs)[5:] == "500"


def test_no_slip_keeps_the_answer() -> None:
    answer = [int(DIGITS[int(c)]) for c in "11734512"]
    assert tf._slip_digits(answer, DIGITS, random.Random(0), share=0.0) == (answer, answer)


def test_digit_values_centre_the_true_hundreds_and_the_read_tens() -> None:
    truth = [int(DIGITS[int(c)]) for c in "11904500"]
    slipped = [int(DIGITS[int(c)]) for c in "11999500"]  # targets after reading an 8
    values = tf._digit_values(slipped, len(slipped), DIGITS, truth)
    assert values[2].item() == pytest.approx(9.045)
    assert values[3].item() == pytest.approx(9.95)
    assert torch.isnan(values[[0, 1, 4, 7]]).all()


def test_patch_coverage_is_the_covered_share_of_each_cell() -> None:
    cover = tf.patch_coverage((0, 0, 50, 100), (100, 100), 2).view(2, 2)
    assert cover.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    half = tf.patch_coverage((0, 0, 25, 50), (100, 100), 2).view(2, 2)
    assert half.tolist() == [[0.5, 0.0], [0.0, 0.0]]


def test_edge_bands_lie_on_the_edges_their_tokens_place() -> None:
    top, left, bottom, right = tf.edge_bands((20, 30, 60, 70), (100, 100), grid=10)
    assert top == (20, 25, 60, 35) and bottom == (20, 65, 60, 75)
    assert left == (15, 30, 25, 70) and right == (55, 30, 65, 70)
    # Clipped to the canvas at its borders.
    top, left, _, _ = tf.edge_bands((0, 0, 10, 10), (100, 100), grid=10)
    assert top[1] == 0 and left[0] == 0
