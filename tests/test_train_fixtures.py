"""The fixture trainer's targets say what the real parsers read back, and its presets are the committed runs.

``scripts/train_fixtures.py`` (code in ``scripts/fixture_training/``) made the committed grounding models; CI never
trains, but the answers it teaches and the attention regions it supervises are checked here so a change to the
trainer cannot silently teach a format the parsers read differently, and each preset is held against the training
log of the fixture it made.
"""

from __future__ import annotations

import json
import random
import shlex
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import pytest
import torch

from vlm_tools.parsing.molmo2 import parse_points
from vlm_tools.parsing.paligemma import parse_detections
from vlm_tools import scenes as ui_scenes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from fixture_training import molmo2, paligemma, supervision
from fixture_training.presets import PRESETS
from fixture_training.runner import stage_command
from fixture_training.settings import TrainSettings

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "models"

DIGITS = torch.arange(100, 110)
"""Stand-in token ids of the digits 0–9 (``slip_digits`` only maps ids to digits)."""


def _scene(seed: int, size: tuple[int, int]) -> ui_scenes.Scene:
    return ui_scenes.random_scene(random.Random(seed), size)


@pytest.mark.parametrize("size", [(1280, 720), (600, 900), (333, 333)], ids=str)
def test_paligemma_answer_parses_back_to_the_box(size: tuple[int, int]) -> None:
    scene = _scene(1, size)
    (box,) = parse_detections(paligemma.paligemma_answer(scene))
    x0, y0, x1, y1 = scene.target.box
    width, height = size
    assert box.label == scene.target.name
    for got, want in ((box.x0, x0 / width), (box.y0, y0 / height), (box.x1, x1 / width), (box.y1, y1 / height)):
        assert abs(got - want) <= 1 / paligemma.LOC_BINS


@pytest.mark.parametrize("size", [(1280, 720), (600, 900)], ids=str)
def test_molmo2_answer_parses_back_to_the_centre(size: tuple[int, int]) -> None:
    scene = _scene(2, size)
    (point,) = parse_points(molmo2.molmo2_answer(scene))
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
        targets, inputs = molmo2.slip_digits(answer, DIGITS, random.Random(seed), share=0.5)
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
    assert molmo2.slip_digits(answer, DIGITS, random.Random(0), share=0.0) == (answer, answer)


def test_digit_values_centre_the_true_hundreds_and_the_read_tens() -> None:
    truth = [int(DIGITS[int(c)]) for c in "11904500"]
    slipped = [int(DIGITS[int(c)]) for c in "11999500"]  # targets after reading an 8
    values = molmo2.digit_values(slipped, len(slipped), DIGITS, truth)
    assert values[2].item() == pytest.approx(9.045)
    assert values[3].item() == pytest.approx(9.95)
    assert torch.isnan(values[[0, 1, 4, 7]]).all()


def test_patch_coverage_is_the_covered_share_of_each_cell() -> None:
    cover = supervision.patch_coverage((0, 0, 50, 100), (100, 100), 2).view(2, 2)
    assert cover.tolist() == [[1.0, 0.0], [1.0, 0.0]]
    half = supervision.patch_coverage((0, 0, 25, 50), (100, 100), 2).view(2, 2)
    assert half.tolist() == [[0.5, 0.0], [0.0, 0.0]]


def test_edge_bands_lie_on_the_edges_their_tokens_place() -> None:
    top, left, bottom, right = paligemma.edge_bands((20, 30, 60, 70), (100, 100), grid=10)
    assert top == (20, 25, 60, 35) and bottom == (20, 65, 60, 75)
    assert left == (15, 30, 25, 70) and right == (55, 30, 65, 70)
    # Clipped to the canvas at its borders.
    top, left, _, _ = paligemma.edge_bands((0, 0, 10, 10), (100, 100), grid=10)
    assert top[1] == 0 and left[0] == 0


# --- the presets are the committed runs ---------------------------------------------------------------------------

DELETED_SETTINGS = {"curriculum": False, "multi_label": False, "attn_edges": True}
"""Settings the trainer no longer has, with the value every committed run used (the behaviour it now hard-wires)."""

DELETED_ARCHITECTURE = {"digit_code": True}
"""Architecture fields likewise removed, with the value the committed runs used."""

EARLIER_COMMANDS = {
    "molmo2-ui": [
        (
            "python scripts/train_fixtures.py molmo2 --out stage-1 --steps 4000 --max-minutes 75 "
            "--check-every 400 --check-count 24 --curriculum no --arch max_crops=1"
        ),
    ],
    "paligemma-ui": [
        (
            "python scripts/train_fixtures.py paligemma --out stage-1 --steps 9000 --max-minutes 75 "
            "--check-every 500 --check-count 24 --image-size 112 --curriculum no --multi-label no --attn-heads 3 "
            "--edges-from 0.3 --edge-layer 2 --edge-heads 2 --arch loc_high=8"
        ),
    ],
}
"""The commands of the earlier stages as their training logs recorded them before the presets existed (their logs
keep only the command of an earlier stage, since rewritten to the preset's): the values they set, with the trainer's
defaults for the rest, are what each preset's earlier stages must carry."""


def _log(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name / "training_log.json").read_text())


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(values))  # tuples as lists, as the log has them


def _old_command_values(command: str, family: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The settings and architecture fields an old ``train_fixtures.py FAMILY ...`` command line set."""
    words = shlex.split(command)
    assert words[2] == family
    settings: dict[str, Any] = {}
    architecture: dict[str, Any] = {}
    kinds = {f.name: type(f.default) for f in fields(TrainSettings)}
    size = paligemma.PaliGemmaSize() if family == "paligemma" else molmo2.Molmo2Size()
    for flag, value in zip(words[3::2], words[4::2], strict=True):
        name = flag.removeprefix("--").replace("-", "_")
        if name in ("out", "resume"):
            continue
        if name in ("curriculum", "multi_label"):
            assert value == "no" and DELETED_SETTINGS[name] is False
        elif name == "image_size":
            architecture["image_size" if family == "paligemma" else "crop_size"] = int(value)
        elif name == "arch":
            field, _, text = value.partition("=")
            architecture[field] = type(getattr(size, field))(text)
        else:
            settings[name] = kinds[name](value)
    return settings, architecture


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_last_stage_of_each_preset_is_the_committed_run(name: str) -> None:
    preset, record = PRESETS[name], _log(name)
    assert (record["family"], record["preset"], record["stage"]) == (preset.family, name, len(preset.stages))
    assert record["command"] == stage_command(name, f"tests/fixtures/models/{name}", None, len(preset.stages), {})
    kept = {k: v for k, v in record["settings"].items() if k not in DELETED_SETTINGS}
    assert _jsonable(asdict(preset.stages[-1])) == kept
    assert {k: record["settings"][k] for k in DELETED_SETTINGS} == DELETED_SETTINGS
    architecture = {k: v for k, v in record["architecture"].items() if k not in DELETED_ARCHITECTURE}
    assert _jsonable(asdict(preset.architecture)) == architecture
    assert all(record["architecture"].get(k, v) == v for k, v in DELETED_ARCHITECTURE.items())


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_the_earlier_stages_of_each_preset_are_the_committed_runs(name: str) -> None:
    preset, record = PRESETS[name], _log(name)
    earlier = record["previous_stages"]
    assert len(earlier) == len(preset.stages) - 1 == len(EARLIER_COMMANDS[name])
    for number, (stage, recorded, old) in enumerate(zip(preset.stages, earlier, EARLIER_COMMANDS[name]), start=1):
        assert (recorded["preset"], recorded["stage"]) == (name, number)
        assert recorded["command"] == stage_command(name, f"tests/fixtures/models/{name}", None, number, {})
        settings, architecture = _old_command_values(old, preset.family)
        # Exactly: every value the old command set, and the trainer's defaults for everything else.
        assert asdict(stage) == asdict(TrainSettings(**settings))
        assert asdict(preset.architecture) == asdict(type(preset.architecture)(**architecture))


def test_stage_commands_name_the_preset_the_stage_and_every_override() -> None:
    command = stage_command("molmo2-ui", "out dir", "work", 2, {"steps": 30, "max_minutes": 0.5})
    assert shlex.split(command)[2:] == [
        "train", "molmo2-ui", "--out", "out dir", "--work", "work", "--stage", "2", "--steps", "30",
        "--max-minutes", "0.5",
    ]  # fmt: skip


def test_the_command_line_trains_every_preset_with_the_overrides() -> None:
    import train_fixtures

    parser = train_fixtures._parser()
    for name in PRESETS:
        args = parser.parse_args(["train", name, "--out", "out", "--stage", "2", "--steps", "30", "--max-minutes", "1"])
        assert (args.preset, args.out, args.stage, args.steps, args.max_minutes) == (name, Path("out"), 2, 30, 1.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "no-such-preset", "--out", "out"])
