"""The training loop both families share: training scenes, the held-out check and the optimisation in :func:`train`."""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlm_tools.backends.base import Backend, Request, Task
from vlm_tools.evaluation import box_iou, point_in_box
from vlm_tools import scenes as ui_scenes
from vlm_tools.scenes import Scene

from .settings import TrainSettings, lr_factor

log = logging.getLogger("train_fixtures")

CHECK_SIZES: tuple[tuple[int, int], ...] = ((1280, 720), (600, 900), (1000, 1000))
"""Canvas sizes of the held-out check (the accuracy suite's default sizes)."""

CHECK_SEED_OFFSET = 7919
"""Held-out check scenes come from ``seed + CHECK_SEED_OFFSET`` (training draws from ``seed``; the accuracy suite
defaults to 1234): three disjoint streams."""


@dataclass
class CheckResult:
    """Held-out accuracy at one canvas size."""

    size: tuple[int, int]
    count: int
    inside: float
    """Share of points (or box centres) inside the target's box."""
    median_error: float
    """Median distance from the target's centre, as a share of max(width, height)."""
    mean_iou: float | None = None
    recall50: float | None = None
    mode: str = ""
    """How the model ran: ``""`` as its backend runs it; for PaliGemma ``"prefix"`` (image and prompt one
    bidirectional prefix, as transformers runs it) or ``"causal"`` (as vLLM's CPU attention runs it)."""


@dataclass
class Recipe:
    """What differs between the two families; the loop in :func:`train` is shared."""

    name: str
    model: torch.nn.Module
    processor: Any
    make_backends: Callable[[], dict[str, Backend]]
    """The backends the held-out check decodes through, by :attr:`CheckResult.mode`."""
    build_batch: Callable[[Sequence[Scene]], dict[str, torch.Tensor]]
    loss: Callable[[dict[str, torch.Tensor], float], torch.Tensor]
    task: Task
    save_checkpoint: Callable[[Path], None]
    architecture: dict[str, Any] = field(default_factory=dict)


def check(recipe: Recipe, settings: TrainSettings, max_new_tokens: int = 40) -> list[CheckResult]:
    """Greedy-decode held-out scenes through the real backend class (in each of the recipe's modes) and score what
    its parser read."""
    return [
        result
        for mode, backend in recipe.make_backends().items()
        for result in _check_one(recipe, backend, mode, settings, max_new_tokens)
    ]


def _check_one(
    recipe: Recipe, backend: Backend, mode: str, settings: TrainSettings, max_new_tokens: int
) -> list[CheckResult]:
    results = []
    for size in CHECK_SIZES:
        scenes = list(
            ui_scenes.scenes(settings.seed + CHECK_SEED_OFFSET + size[0] * 7 + size[1], settings.check_count, size)
        )
        inside, errors, ious = [], [], []
        for start in range(0, len(scenes), 8):
            chunk = scenes[start : start + 8]
            requests = [request_for(recipe.task, s, max_new_tokens) for s in chunk]
            for scene, outcome in zip(chunk, backend.run_batch(requests), strict=True):
                if isinstance(outcome, BaseException):
                    raise outcome
                width, height = scene.size
                box = scene.target.box
                point = None
                if outcome.points:
                    point = (outcome.points[0].x * width, outcome.points[0].y * height)
                elif outcome.boxes:
                    centre = outcome.boxes[0].center()
                    point = (centre.x * width, centre.y * height)
                inside.append(point is not None and point_in_box(point, box))
                cx, cy = scene.target.center
                errors.append(math.dist(point, (cx, cy)) / max(width, height) if point else 1.0)
                if recipe.task is Task.DETECT:
                    if outcome.boxes:
                        b = outcome.boxes[0]
                        ious.append(box_iou((b.x0 * width, b.y0 * height, b.x1 * width, b.y1 * height), box))
                    else:
                        ious.append(0.0)
        errors.sort()
        results.append(
            CheckResult(
                size,
                len(scenes),
                sum(inside) / len(inside),
                errors[len(errors) // 2],
                sum(ious) / len(ious) if ious else None,
                sum(i >= 0.5 for i in ious) / len(ious) if ious else None,
                mode,
            )
        )
    return results


def request_for(task: Task, scene: Scene, max_new_tokens: int) -> Request:
    """The request the accuracy suite makes for ``scene``'s target: detect it by name, or point to it."""
    name = scene.target.name
    if task is Task.DETECT:
        return Request(Task.DETECT, scene.image, labels=(name,), max_new_tokens=max_new_tokens)
    return Request(Task.POINT, scene.image, text=name, max_new_tokens=max_new_tokens)


def _targets_met(results: Sequence[CheckResult], settings: TrainSettings) -> bool:
    return all(
        r.inside >= settings.stop_inside and (r.mean_iou is None or r.mean_iou >= settings.stop_iou) for r in results
    )


def _score(results: Sequence[CheckResult]) -> float:
    """One number to keep the best checkpoint by: the worst size's inside share plus its IoU."""
    return min(r.inside + (r.mean_iou or 0.0) for r in results)


def _describe(results: Sequence[CheckResult]) -> str:
    parts = []
    for r in results:
        text = (
            f"{r.mode + ' ' if r.mode else ''}{r.size[0]}x{r.size[1]}: inside {r.inside:.1%} err {r.median_error:.3f}"
        )
        if r.mean_iou is not None:
            text += f" IoU {r.mean_iou:.3f} R@.5 {r.recall50:.0%}"
        parts.append(text)
    return " | ".join(parts)


def training_scene(rng: random.Random, settings: TrainSettings) -> Scene:
    """A training scene: 2–5 objects (as the accuracy suite's scenes have) on one of the training canvas sizes
    (landscape, portrait, square), drawn at ``render_min``–``render_max`` of its size or, for ``full_size_share``
    of scenes, at full size.

    Smaller renders are cheaper to draw and preprocess and look the same once shrunk to the model's input;
    full-size ones keep the model used to the aliasing of large screenshots scaled down. The order of the draws
    from ``rng`` is part of what makes a run reproducible: keep it.
    """
    width, height = rng.choice(ui_scenes.TRAINING_SIZES)
    scale = 1.0 if rng.random() < settings.full_size_share else rng.uniform(settings.render_min, settings.render_max)
    count = rng.randint(2, 5)
    return ui_scenes.random_scene(rng, (round(width * scale), round(height * scale)), count=count)


def _optimiser(model: torch.nn.Module, settings: TrainSettings) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW with weight decay on the matrices only (not on embeddings, position tables, norms or biases), and the
    warm-up + cosine schedule of :func:`.settings.lr_factor`."""

    def decays(name: str, parameter: torch.nn.Parameter) -> bool:
        return parameter.ndim >= 2 and "embed" not in name and "position" not in name

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    no_decay = [p for n, p in model.named_parameters() if not decays(n, p)]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: lr_factor(step, settings))
    return optimiser, schedule


@dataclass
class _Best:
    """The best-checked weights so far."""

    score: float
    step: int
    state: dict[str, torch.Tensor]
    results: list[CheckResult]


def _run_check(
    recipe: Recipe, settings: TrainSettings, step: int, elapsed: float, losses: Sequence[float], best: _Best | None
) -> tuple[dict[str, Any], list[CheckResult], _Best]:
    """One held-out check: its history entry, its results, and the best weights after it."""
    recipe.model.eval()
    results = check(recipe, settings)
    score = _score(results)
    recent = losses[-25:]
    entry = {"step": step, "minutes": round(elapsed, 2), "loss": round(sum(recent) / len(recent), 4),
             "check": [asdict(r) for r in results]}  # fmt: skip
    log.info("check at step %d: %s", step, _describe(results))
    if best is None or score >= best.score:
        state = {k: v.detach().clone() for k, v in recipe.model.state_dict().items()}
        best = _Best(score, step, state, results)
    return entry, results, best


def train(recipe: Recipe, settings: TrainSettings) -> dict[str, Any]:
    """Run the optimisation with periodic held-out checks; leave the best-checked weights in ``recipe.model``."""
    model = recipe.model
    optimiser, schedule = _optimiser(model, settings)
    if settings.attn_weight > 0:
        model.set_attn_implementation("eager")  # the supervised attention weights must be materialised
    rng = random.Random(settings.seed)
    started = time.monotonic()
    best: _Best | None = None
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    step = 0
    stop_reason = "planned steps done"
    for step in range(1, settings.steps + 1):
        model.train()
        batch = recipe.build_batch([training_scene(rng, settings) for _ in range(settings.batch_size)])
        loss = recipe.loss(batch, step / settings.steps)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        elapsed = (time.monotonic() - started) / 60
        if step % 25 == 0:
            log.info(
                "step %d loss %.4f lr %.2e (%.1f min)", step, sum(losses[-25:]) / 25, schedule.get_last_lr()[0], elapsed
            )
        out_of_time = elapsed >= settings.max_minutes
        if step % settings.check_every == 0 or step == settings.steps or out_of_time:
            entry, results, best = _run_check(recipe, settings, step, elapsed, losses, best)
            history.append(entry)
            if step >= settings.min_steps and _targets_met(results, settings):
                stop_reason = "held-out targets met"
                break
            if out_of_time:
                stop_reason = f"time budget of {settings.max_minutes} min reached"
                break
    assert best is not None
    # The attention implementation is not saved with the model (the loader picks its own), so the model is left
    # on eager: switching back is not possible for every part (Gemma 2 has no SDPA path).
    model.load_state_dict(best.state)
    model.eval()
    return {
        "steps_run": step,
        "best_step": best.step,
        "stop_reason": stop_reason,
        "minutes": round((time.monotonic() - started) / 60, 2),
        "final_check": [asdict(r) for r in best.results],
        "history": history,
    }
