"""Grounding accuracy through the real tools: the trained fixture models find what they are asked for.

The main tests run the accuracy suite (:func:`vlm_tools.evaluation.run_eval`, the code behind ``vlm-tools eval``)
on held-out scenes at three sizes (landscape, portrait, square) with the committed fixture models loaded, and
assert the targets: at least 95 % of points inside their target and a mean detect IoU of at least 0.7 on every
size.
The rest pins down the pieces it stands on: the scene generator's promises, the scoring arithmetic, argument
checking, and that the suite does fail on a model that cannot ground.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from pathlib import Path

import pytest

from vlm_tools.errors import InvalidArgument
from vlm_tools.evaluation import box_iou, median, parse_sizes, point_in_box, run_eval, scene_seed
from vlm_tools.settings import Settings
from vlm_tools import scenes as ui_scenes

FIXTURES = Path(__file__).parent / "fixtures" / "models"
MOLMO2 = FIXTURES / "molmo2-ui"
PALIGEMMA = FIXTURES / "paligemma-ui"
SIZES = "1280x720,600x900,1000x1000"


def _args(out: Path, count: int, sizes: str = SIZES, seed: int = 1234) -> argparse.Namespace:
    return argparse.Namespace(seed=seed, count=count, sizes=sizes, out=str(out), min_inside=0.95, min_iou=0.7)


def _settings(tmp_path: Path, *models: Path, **extra: object) -> Settings:
    return Settings(
        model=tuple(str(m) for m in models), device="cpu", allow_path=(tmp_path,), log_level="warning", **extra
    )  # type: ignore[arg-type]


# --- the suite on the trained models ----------------------------------------------------------------------------


def test_molmo2_fixture_points_inside_the_target_on_every_size(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    printed = io.StringIO()
    code = run_eval(_settings(tmp_path, MOLMO2), _args(out, count=20), stdout=printed)
    report = json.loads(out.read_text())
    table = printed.getvalue()
    assert code == 0, table
    assert report["passed"] is True
    assert [(r["width"], r["height"]) for r in report["sizes"]] == [(1280, 720), (600, 900), (1000, 1000)]
    for size in report["sizes"]:
        point, detect = size["point"], size["detect"]
        assert point["scenes"] == 20 and point["errors"] == 0
        assert point["inside"] >= 0.95, table
        assert point["median_error"] < 0.05, table
        assert point["models"] == [str(MOLMO2)] and point["point_source"] == ["native"]
        assert "unsupported_by_model" in detect["skipped"]  # Molmo2 points; it does not box
    assert "| 1280×720 |" in table and "result: PASS" in table


def test_both_fixtures_served_together_meet_every_target(tmp_path: Path) -> None:
    """The production routing: points from Molmo2 (native), boxes from PaliGemma, through one server."""
    out = tmp_path / "report.json"
    printed = io.StringIO()
    code = run_eval(_settings(tmp_path, MOLMO2, PALIGEMMA), _args(out, count=20), stdout=printed)
    report = json.loads(out.read_text())
    table = printed.getvalue()
    assert code == 0, table
    assert report["passed"] is True
    for size in report["sizes"]:
        point, detect = size["point"], size["detect"]
        assert point["scenes"] == detect["scenes"] == 20
        assert point["errors"] == detect["errors"] == 0
        assert point["inside"] >= 0.95, table
        assert detect["mean_iou"] >= 0.7, table
        assert point["models"] == [str(MOLMO2)] and point["point_source"] == ["native"]
        assert detect["models"] == [str(PALIGEMMA)]
    assert "result: PASS" in table


def test_suite_fails_a_model_that_cannot_ground(tmp_path: Path, tiny_molmo2_dir: Path) -> None:
    """A random Molmo2 (right family, right format, no skill) must not pass; detect is skipped, not failed."""
    out = tmp_path / "report.json"
    settings = _settings(tmp_path, tiny_molmo2_dir, max_new_tokens=24)
    code = run_eval(settings, _args(out, count=3, sizes="640x480"), stdout=io.StringIO())
    report = json.loads(out.read_text())
    assert code == 1
    assert report["passed"] is False
    size = report["sizes"][0]
    assert size["point"]["inside"] < 0.95
    assert "unsupported_by_model" in size["detect"]["skipped"]


# --- scoring and arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
        ((0, 0, 10, 10), (5, 0, 15, 10), 50 / 150),
        ((0, 0, 10, 10), (10, 10, 20, 20), 0.0),
        ((0, 0, 10, 10), (2, 2, 4, 4), 4 / 100),
        ((0, 0, 0, 0), (0, 0, 0, 0), 0.0),
    ],
    ids=["identical", "half-overlap", "touching-corner", "contained", "empty"],
)
def test_box_iou(a: tuple[float, ...], b: tuple[float, ...], expected: float) -> None:
    assert box_iou(a, b) == pytest.approx(expected)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("point", "inside"),
    [((5, 5), True), ((0, 0), True), ((10, 10), True), ((10.01, 5), False), ((5, -0.01), False)],
    ids=["centre", "top-left-edge", "bottom-right-edge", "just-right", "just-above"],
)
def test_point_in_box(point: tuple[float, float], inside: bool) -> None:
    assert point_in_box(point, (0, 0, 10, 10)) is inside


@pytest.mark.parametrize(
    ("values", "expected"), [([3.0, 1.0, 2.0], 2.0), ([4.0, 1.0, 3.0, 2.0], 2.5)], ids=["odd", "even"]
)
def test_median(values: list[float], expected: float) -> None:
    assert median(values) == expected


def test_parse_sizes_reads_a_list() -> None:
    assert parse_sizes(" 1280x720, 600X900 ") == [(1280, 720), (600, 900)]


@pytest.mark.parametrize(
    "text", ["1280", "1280x", "axb", "1280x720,", "-5x10", "10x10", "100000x100"],
    ids=["no-x", "no-height", "letters", "trailing-comma", "negative", "too-small", "too-large"],
)  # fmt: skip
def test_parse_sizes_refuses_bad_sizes(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_sizes(text)


def test_sizes_draw_different_scenes() -> None:
    assert len({scene_seed(1234, s) for s in [(1280, 720), (720, 1280), (1000, 1000)]}) == 3


# --- the scene generator ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(1280, 720), (600, 900), (1000, 1000), (320, 200)], ids=str)
def test_scenes_keep_their_promises(size: tuple[int, int]) -> None:
    for scene in ui_scenes.scenes(99, 30, size):
        colours = [o.colour for o in scene.objects]
        assert scene.size == size
        assert 2 <= len(scene.objects) <= 5
        assert len(set(colours)) == len(colours), "each object has its own colour, so a description names one"
        assert scene.target in scene.objects
        for i, obj in enumerate(scene.objects):
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]
            for other in scene.objects[i + 1 :]:
                assert box_iou(obj.box, other.box) == 0.0
        # The target is really drawn where its box says, in its colour.
        assert scene.image.getpixel(_probe(scene.target)) == ui_scenes.PALETTE[scene.target.colour]


def _probe(obj: ui_scenes.SceneObject) -> tuple[int, int]:
    """A pixel that must be the object's fill: its centre, or for a labelled button a spot left of the word."""
    cx, cy = obj.center
    if obj.text:
        return int(obj.box[0] + obj.border + 2), int(cy)
    return int(cx), int(cy)


def test_same_seed_same_pixels() -> None:
    first = [s.image.tobytes() for s in ui_scenes.scenes(5, 3, (300, 200))]
    again = [s.image.tobytes() for s in ui_scenes.scenes(5, 3, (300, 200))]
    assert first == again


def test_scene_html_places_every_object_with_a_click_recorder() -> None:
    rng = random.Random(3)
    objects, target = ui_scenes.random_layout(rng, (800, 600))
    page = ui_scenes.scene_html(objects, ui_scenes.random_background(rng))
    for obj in objects:
        assert f'data-name="{obj.name}"' in page
        assert f"left:{obj.box[0]}px" in page and f"top:{obj.box[1]}px" in page
    assert "window.clicks" in page
    assert objects[target].name in page
