"""Running a preset: each stage trained in order, stage n > 1 resuming from stage n - 1's saved best weights.

Stages before the last are saved under a work directory (``WORK/stage-N``); the last one is saved to ``--out``.
Every stage's training log records the command that reruns that stage alone, so a log says exactly how to
remake its checkpoint.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .loop import Recipe, train
from .molmo2 import molmo2_recipe
from .paligemma import paligemma_recipe
from .presets import PRESETS
from .records import load_weights, save, training_record
from .settings import TrainSettings

log = logging.getLogger("train_fixtures")

RECIPES: dict[str, Callable[[Any, TrainSettings], Recipe]] = {"paligemma": paligemma_recipe, "molmo2": molmo2_recipe}
"""How each family's recipe is built from its architecture and settings."""

OVERRIDES: dict[str, type] = {
    "steps": int,
    "check_every": int,
    "check_count": int,
    "max_minutes": float,
    "min_steps": int,
}
"""Settings a command line may override for every stage of a preset (for short runs); the rest are the preset's."""


REPO = Path(__file__).resolve().parents[2]


def default_work(preset: str) -> Path:
    """Where the stages before the last are saved when no work directory is given: ``.fixture-stages/PRESET`` in
    the repository (git ignores it), never beside the committed fixtures."""
    return REPO / ".fixture-stages" / preset


def stage_dir(work: Path, number: int) -> Path:
    """Where stage ``number`` is saved (unless it is the last stage, which is saved to ``--out``)."""
    return work / f"stage-{number}"


def stage_command(preset: str, out: str, work: str | None, number: int, overrides: Mapping[str, int | float]) -> str:
    """The command line that runs stage ``number`` of ``preset`` alone, as recorded in its training log."""
    words = ["python", "scripts/train_fixtures.py", "train", preset, "--out", out]
    if work is not None:
        words += ["--work", work]
    words += ["--stage", str(number)]
    for name, value in overrides.items():
        words += ["--" + name.replace("_", "-"), f"{value:g}" if isinstance(value, float) else str(value)]
    return shlex.join(words)


def run_stage(
    preset: str, number: int, out: Path, resume: Path | None, command: str, overrides: Mapping[str, Any]
) -> None:
    """Train stage ``number`` (from 1) of ``preset``, starting from the weights saved in ``resume`` (when given),
    and save it with its training log and model card to ``out``."""
    chosen = PRESETS[preset]
    settings = replace(chosen.stages[number - 1], **overrides)
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    recipe = RECIPES[chosen.family](chosen.architecture, settings)
    previous = load_weights(recipe.model, resume) if resume else None
    log.info("%s stage %d: %d parameters", preset, number, sum(p.numel() for p in recipe.model.parameters()))
    outcome = train(recipe, settings)
    record = training_record(recipe, settings, outcome, (preset, number, command), previous)
    save(recipe, record, out)


def run_preset(
    preset: str,
    out: Path,
    work: Path | None,
    only: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> None:
    """Run every stage of ``preset`` in order (or only stage ``only``, resuming from the previous stage's directory
    under ``work``); the last stage is saved to ``out``. ``overrides`` replace settings of every stage run."""
    overrides = dict(overrides or {})
    count = len(PRESETS[preset].stages)
    if only is not None and not 1 <= only <= count:
        raise SystemExit(f"{preset} has stages 1 to {count}, not {only}")
    stages_at = work or default_work(preset)
    for number in range(1, count + 1) if only is None else (only,):
        resume = stage_dir(stages_at, number - 1) if number > 1 else None
        if resume is not None and not (resume / "model.safetensors").is_file():
            raise SystemExit(f"stage {number} resumes from stage {number - 1}, but {resume} holds no saved model")
        target = out if number == count else stage_dir(stages_at, number)
        command = stage_command(preset, str(out), None if work is None else str(work), number, overrides)
        run_stage(preset, number, target, resume, command, overrides)
