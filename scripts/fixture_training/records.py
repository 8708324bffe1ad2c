"""Saving a run: the checkpoint, its training log (``training_log.json``) and model card; loading one to resume."""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .card import directory_bytes, model_card
from .loop import Recipe
from .settings import TrainSettings

log = logging.getLogger("train_fixtures")

STAGE_KEYS = ("preset", "stage", "command", "steps_run", "best_step", "stop_reason", "minutes", "machine")
"""What the training log keeps of each earlier stage (under ``previous_stages``)."""


def load_weights(model: torch.nn.Module, directory: Path) -> dict[str, Any] | None:
    """Load the weights of a fixture saved earlier into ``model`` (same architecture); return its training record."""
    from transformers import AutoModelForImageTextToText

    trained = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32)
    model.load_state_dict(trained.state_dict(), strict=True)
    log_path = directory / "training_log.json"
    return json.loads(log_path.read_text()) if log_path.is_file() else None


def stage_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The part of a finished stage's record the next stage's log keeps."""
    return {k: record.get(k) for k in STAGE_KEYS}


def training_record(
    recipe: Recipe,
    settings: TrainSettings,
    outcome: dict[str, Any],
    stage: tuple[str, int, str],
    previous: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The training log of one stage: what made it (``stage`` is preset name, stage number and the command that
    runs it), the software and machine, and ``outcome`` (see :func:`.loop.train`). ``previous`` is the record of
    the stage it resumed from, whose own stages are kept."""
    import transformers

    preset, number, command = stage
    record = {
        "family": recipe.name,
        "preset": preset,
        "stage": number,
        "command": command,
        "settings": asdict(settings),
        "architecture": recipe.architecture,
        "parameters": sum(p.numel() for p in recipe.model.parameters()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, torch threads: {torch.get_num_threads()}",
        **outcome,
    }
    if previous is not None:
        record["previous_stages"] = [*previous.get("previous_stages", []), stage_summary(previous)]
    return record


def save(recipe: Recipe, record: dict[str, Any], out: Path) -> None:
    """Save model + processor like a hub checkpoint, the training log ``record`` and the model card to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    recipe.save_checkpoint(out)
    (out / "training_log.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(record, directory_bytes(out)))
    log.info("saved %s (%d parameters) to %s", recipe.name, record["parameters"], out)
