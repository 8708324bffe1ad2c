"""Train the tiny grounding fixture models committed under ``tests/fixtures/models/``.

Two models, each a few MB, each trained for minutes on a CPU to do one real, simple grounding job on the synthetic
screenshots of :mod:`vlm_tools.testing.ui_scenes`:

* ``paligemma-ui`` — a PaliGemma 2 (SigLIP + Gemma 2) that answers ``detect red button`` with one box in its native
  ``<locY0><locX0><locY1><locX1> red button`` format;
* ``molmo2-ui`` — a Molmo2 that answers ``Point to the red button.`` with its native
  ``<points coords="1 1 XXX YYY" alt="red button">red button</points>`` at the centre of the target.

Training and serving cannot drift apart: prompts come from the families' own ``prompt()``, inputs are built with
the same processor calls, chat template, padding side and position ids as the backends build them for
``generate``, and the held-out checks decode greedily through the real backend classes and read the answers with
the real parsers. The loss covers only the answer tokens (prompt, image and padding are -100). Location bins are
ordinal, so PaliGemma's four ``<loc>`` targets are Gaussian-smoothed over neighbouring bins (a sharp one-hot on a
1024-way choice teaches "near" nothing); the Gaussian narrows as training goes on.

Usage (the committed models were made with the commands in their MODEL_CARD.md)::

    python scripts/train_fixtures.py paligemma --out tests/fixtures/models/paligemma-ui
    python scripts/train_fixtures.py molmo2 --out tests/fixtures/models/molmo2-ui

Deterministic for a given ``--seed`` and thread count on one machine (CI never trains; it loads the committed
directories). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# OpenMP threads that spin while waiting burn the CPU other processes need, and a descheduled spinner stalls every
# step on a shared machine; passive waiting keeps step times steady. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

from vlm_tools.backends.base import Backend, Request, Task
from vlm_tools.backends.families import get_family
from vlm_tools.evaluation import box_iou, point_in_box
from vlm_tools.testing import ui_scenes
from vlm_tools.testing.ui_scenes import Scene

log = logging.getLogger("train_fixtures")

CHECK_SIZES: tuple[tuple[int, int], ...] = ((1280, 720), (600, 900), (1000, 1000))
"""Canvas sizes of the held-out check (the accuracy suite's default sizes)."""

CHECK_SEED_OFFSET = 7919
"""Held-out check scenes come from ``seed + CHECK_SEED_OFFSET`` (training draws from ``seed``; the accuracy suite
defaults to 1234): three disjoint streams."""


# --- settings ---------------------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    """Optimisation and stopping settings of one run (all recorded in the model card)."""

    steps: int = 5000
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 150
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1
    check_every: int = 500
    check_count: int = 24
    """Held-out scenes per check size."""
    max_minutes: float = 55.0
    stop_iou: float = 0.80
    """Early stop when the mean IoU reaches this on every check size (PaliGemma)."""
    stop_inside: float = 0.99
    """Early stop when this share of points/box centres lands inside the target on every check size."""
    min_steps: int = 600
    """Never stop before this many steps (a lucky early check is not convergence)."""
    curriculum: bool = True
    """Grow the number of objects per scene over training (see :func:`training_scene`); off: 2–5 from the start."""
    sigma_start: float = 30.0
    """Width in bins of PaliGemma's smoothed location targets at the start (it narrows to 1.5 at the end)."""
    render_min: float = 0.2
    render_max: float = 0.5
    """Training canvases are drawn at this share of their size (aspect kept). The model sees a ~100-px square
    either way; a small canvas costs a fraction of a full-size one to draw and to resize."""
    full_size_share: float = 0.1
    """Share of training canvases drawn at full size, so the model also sees the aliasing of large screenshots."""
    attn_weight: float = 1.0
    """Weight of the attention-supervision loss (0 turns it off; see :func:`attention_loss`)."""
    attn_layer: int = 1
    """Language-model layer whose first ``attn_heads`` heads are supervised."""
    attn_heads: int = 1
    attn_edges: bool = True
    """PaliGemma: also supervise the first ``edge_heads`` heads of layer ``edge_layer`` to look, from each position
    predicting a ``<loc>`` token, at the edge that token places (see :func:`edge_bands`)."""
    edge_layer: int = 2
    edge_heads: int = 2
    edges_from: float = 0.0
    """Share of training after which the edge heads are supervised (before: every supervised head looks at the
    whole object, which teaches which object a prompt means sooner)."""
    multi_label: bool = False
    """PaliGemma: often name several objects in one prompt (see :func:`paligemma_labels`); off: only the target,
    as the accuracy suite asks. Several labels teach more positions per image but make the model find the k-th
    named object for the k-th box, a harder lookup than the colour-and-shape match the suite needs."""
    digit_slip: float = 0.2
    """Molmo2: share of coordinates trained after a one-off hundreds digit (see :func:`_slip_digits`)."""
    causal_share: float = 0.5
    """PaliGemma: share of training rows that read their image and prompt causally instead of as one bidirectional
    prefix. transformers runs PaliGemma with the prefix bidirectional, as Google trained it; vLLM's CPU attention
    runs it causally (it has no prefix-LM masks). A fixture taught both answers the same through either."""


def lr_factor(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    progress = min(1.0, (step - settings.warmup) / max(1, settings.steps - settings.warmup))
    return settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def answer_logits(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], settings: TrainSettings, progress: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of the answer positions and the tokens they must predict (flattened, padding dropped), and the
    attention-supervision loss of this forward pass (0 when it is off).

    Answers sit at the end of every row (prompts are left-padded, answers follow them), so the model is asked
    for the logits of the last ``n + 1`` positions only (``logits_to_keep``): the vocabulary projection of the
    image and prompt positions would be wasted work. Logits at position t predict the token at t + 1.
    """
    labels = batch["labels"]
    answer_width = int((labels != -100).sum(1).max())
    # Keys starting with "_" carry loss bookkeeping, not model inputs.
    inputs = {k: v for k, v in batch.items() if k != "labels" and not k.startswith("_")}
    supervise = settings.attn_weight > 0 and "_attn_target" in batch
    output = model(**inputs, logits_to_keep=answer_width + 1, output_attentions=supervise)
    logits = output.logits[:, :-1]
    targets = labels[:, -answer_width:]
    mask = targets != -100
    extra = torch.zeros(())
    if supervise:
        positions = batch["_image_positions"]
        attention = output.attentions[settings.attn_layer][:, : settings.attn_heads]
        extra = settings.attn_weight * attention_loss(attention, batch["_attn_target"], positions)
        if "_attn_target_edges" in batch and settings.edge_heads > 0 and progress >= settings.edges_from:
            # A later layer, knowing which object is meant, reads the edge each <loc> token places.
            edges = output.attentions[settings.edge_layer][:, : settings.edge_heads]
            extra = extra + settings.attn_weight * attention_loss(edges, batch["_attn_target_edges"], positions)
    return logits[mask].float(), targets[mask], extra


def attention_loss(attention: torch.Tensor, target: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between where some heads of one layer look and where the target is.

    ``attention`` is ``[rows, heads, T, T]``: the supervised heads. ``positions`` (``[rows, G*G]``, the batch's
    ``_image_positions``) says which sequence positions hold the image's patch tokens, row-major over the model's
    G×G view of the whole image; ``target`` (``[rows, T, G*G]``, the batch's ``_attn_target``) holds, for each
    position that predicts a coordinate token, the share of each patch covered by the region those coordinates
    describe (zero rows elsewhere).

    Why: finding "the red one" among several objects means matching a colour word against image patches, an
    interaction a tiny model trained from scratch only stumbles on after many thousands of steps of the answer
    loss alone (the answer is an average of all objects until then). Telling one head where to look makes the
    lookup a direct, well-conditioned target; what the rest of the network does with it is learnt from the
    answer loss as usual. The supervision shapes training only: the saved model is an unmodified checkpoint.
    """
    rows, heads, length, _ = attention.shape
    looked = attention
    index = positions[:, None, None, :].expand(rows, heads, length, positions.shape[1])
    on_patches = looked.gather(3, index)  # [rows, heads, T, G*G]
    weights = target / target.sum(-1, keepdim=True).clamp_min(1e-9)
    supervised = target.sum(-1) > 0  # [rows, T]
    if not supervised.any():
        return torch.zeros(())
    per_position = -(weights[:, None] * torch.log(on_patches + 1e-6)).sum(-1)  # [rows, heads, T]
    return per_position.permute(0, 2, 1)[supervised].mean()


def add_attention_targets(
    batch: dict[str, torch.Tensor],
    scenes: Sequence[Scene],
    boxes: Sequence[Sequence[tuple[float, float, float, float]]],
    coordinate_tokens: torch.Tensor,
    patch_token: int,
    grid: int,
    per_object: int,
    key: str = "_attn_target",
) -> None:
    """Add ``_image_positions`` and the attention target ``key`` (see :func:`attention_loss`) to ``batch``.

    ``coordinate_tokens`` (``[rows, T]``) marks the answer tokens that are coordinates; every ``per_object`` of
    them in a row describe the next box of ``boxes[row]``. The position before each such token predicts it.
    The first ``grid*grid`` ``patch_token`` positions of a row are its whole-image view.
    """
    rows, length = batch["input_ids"].shape
    patches = grid * grid
    positions = torch.zeros((rows, patches), dtype=torch.long)
    target = torch.zeros((rows, length, patches))
    for row in range(rows):
        at = (batch["input_ids"][row] == patch_token).nonzero().flatten()[:patches]
        if len(at) != patches:
            raise RuntimeError(f"expected {patches} image tokens, found {len(at)}")
        positions[row] = at
        for count, position in enumerate(coordinate_tokens[row].nonzero().flatten().tolist()):
            box = boxes[row][count // per_object]
            target[row, position - 1] = patch_coverage(box, scenes[row].size, grid)
    batch["_image_positions"] = positions
    batch[key] = target


def patch_coverage(box: tuple[float, float, float, float], size: tuple[int, int], grid: int) -> torch.Tensor:
    """``[grid*grid]``, row-major: the share of each cell of a ``grid``×``grid`` view of the whole (squashed)
    image that ``box`` (pixels of an image of ``size``) covers."""
    width, height = size
    edges = torch.arange(grid + 1, dtype=torch.float32) / grid
    x0, y0, x1, y1 = box[0] / width, box[1] / height, box[2] / width, box[3] / height
    cover_x = (torch.minimum(edges[1:], torch.tensor(x1)) - torch.maximum(edges[:-1], torch.tensor(x0))).clamp_min(0)
    cover_y = (torch.minimum(edges[1:], torch.tensor(y1)) - torch.maximum(edges[:-1], torch.tensor(y0))).clamp_min(0)
    return (cover_y[:, None] * cover_x[None, :]).flatten() * grid * grid


def position_ids_from_mask(attention_mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Position ids exactly as ``generate`` derives them from a left-padded mask (padding gets 0), plus ``offset``
    (PaliGemma counts from 1)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0) + offset


def _frequencies(count: int, low: float, high: float) -> torch.Tensor:
    """``count`` frequencies spaced geometrically from ``low`` to ``high`` (cycles per image side)."""
    if count == 1:
        return torch.tensor([low])
    return low * (high / low) ** (torch.arange(count, dtype=torch.float32) / (count - 1))


def position_code_2d(grid: int, dim: int) -> torch.Tensor:
    """A ``[grid*grid, dim]`` sine/cosine code of each patch centre's normalised (x, y), row-major.

    Initialises the learnt patch position embeddings: a tiny model then knows where each patch is from the first
    step. Frequencies are in cycles per image side, the same units as :func:`loc_code`, so the code of "x = 0.3"
    looks alike on the vision side and on the location-token side and a linear map can carry one to the other.
    """
    freqs = _frequencies(dim // 4, 0.5, grid / 2)
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    xs = centres.repeat(grid)[:, None] * freqs[None, :] * 2 * math.pi
    ys = centres.repeat_interleave(grid)[:, None] * freqs[None, :] * 2 * math.pi
    table = torch.cat([xs.sin(), xs.cos(), ys.sin(), ys.cos()], dim=1)
    return F.pad(table, (0, dim - table.shape[1]))


def loc_code(bins: int, dim: int, high: float = 64.0) -> torch.Tensor:
    """A ``[bins, dim]`` sine/cosine code of each bin's normalised coordinate ``(b + 0.5) / bins``.

    Initialises the embeddings of PaliGemma's location tokens (tied to its output head): neighbouring bins start
    out similar, so what the model learns about one bin carries over to its neighbours instead of each of the 1024
    being learnt alone.
    """
    freqs = _frequencies(dim // 2, 0.5, high)
    angles = ((torch.arange(bins, dtype=torch.float32) + 0.5) / bins)[:, None] * freqs[None, :] * 2 * math.pi
    return F.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, dim - 2 * (dim // 2)))


# --- shared training loop ---------------------------------------------------------------------------------------


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


EASY_CANVAS = (400, 300)
"""The one canvas of the curriculum's first phase."""


def training_scene(rng: random.Random, progress: float, settings: TrainSettings) -> Scene:
    """A training scene at ``progress`` (0..1) through training.

    A curriculum over what makes grounding hard. Until the model can read a position at all, the best it can do
    with several objects (not yet knowing which one a prompt means) or with ever-changing canvas shapes (whose
    squashed model inputs and, for Molmo2, crop layouts differ) is to answer an average, and it learns nothing.
    So the first 10 % of training shows ONE object on one small 4:3 canvas — the position read-out is learnt in a
    few hundred steps there — then one object on every training canvas size (landscape, portrait, square; drawn at
    50–100 % scale) until 25 %, then 1–3 objects, and from 40 % on the full 2–5. Smaller renders are cheaper to
    draw and preprocess and look the same once shrunk to the model's input; full-size ones keep the model used to
    the aliasing of large screenshots scaled down.
    """
    if progress < 0.10:
        return ui_scenes.random_scene(rng, EASY_CANVAS, count=1)
    width, height = rng.choice(ui_scenes.TRAINING_SIZES)
    scale = 1.0 if rng.random() < settings.full_size_share else rng.uniform(settings.render_min, settings.render_max)
    if progress < 0.25:
        count = 1
    elif progress < 0.40:
        count = rng.randint(1, 3)
    else:
        count = rng.randint(2, 5)
    return ui_scenes.random_scene(rng, (round(width * scale), round(height * scale)), count=count)


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
            requests = [_request(recipe.task, s, max_new_tokens) for s in chunk]
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


def _request(task: Task, scene: Scene, max_new_tokens: int) -> Request:
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
        text = f"{r.mode + ' ' if r.mode else ''}{r.size[0]}x{r.size[1]}: inside {r.inside:.1%} err {r.median_error:.3f}"
        if r.mean_iou is not None:
            text += f" IoU {r.mean_iou:.3f} R@.5 {r.recall50:.0%}"
        parts.append(text)
    return " | ".join(parts)


def train(recipe: Recipe, settings: TrainSettings) -> dict[str, Any]:
    """Run the optimisation with periodic held-out checks; leave the best-checked weights in ``recipe.model``."""
    model = recipe.model
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n and "position" not in n]
    no_decay = [
        p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n and "position" not in n)
    ]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: lr_factor(step, settings))
    if settings.attn_weight > 0:
        model.set_attn_implementation("eager")  # the supervised attention weights must be materialised
    rng = random.Random(settings.seed)
    started = time.monotonic()
    best: tuple[float, int, dict[str, torch.Tensor], list[CheckResult]] | None = None
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    step = 0
    stop_reason = "planned steps done"
    for step in range(1, settings.steps + 1):
        model.train()
        stage = step / settings.steps if settings.curriculum else 1.0
        batch_scenes = [training_scene(rng, stage, settings) for _ in range(settings.batch_size)]
        batch = recipe.build_batch(batch_scenes)
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
            model.eval()
            results = check(recipe, settings)
            score = _score(results)
            history.append({"step": step, "minutes": round(elapsed, 2), "loss": round(sum(losses[-25:]) / len(losses[-25:]), 4),
                            "check": [asdict(r) for r in results]})  # fmt: skip
            log.info("check at step %d: %s", step, _describe(results))
            if best is None or score >= best[0]:
                best = (score, step, {k: v.detach().clone() for k, v in model.state_dict().items()}, results)
            if step >= settings.min_steps and _targets_met(results, settings):
                stop_reason = "held-out targets met"
                break
            if out_of_time:
                stop_reason = f"time budget of {settings.max_minutes} min reached"
                break
    assert best is not None
    # The attention implementation is not saved with the model (the loader picks its own), so the model is left
    # on eager: switching back is not possible for every part (Gemma 2 has no SDPA path).
    model.load_state_dict(best[2])
    model.eval()
    return {
        "steps_run": step,
        "best_step": best[1],
        "stop_reason": stop_reason,
        "minutes": round((time.monotonic() - started) / 60, 2),
        "final_check": [asdict(r) for r in best[3]],
        "history": history,
    }


# --- PaliGemma ------------------------------------------------------------------------------------------------

LOC_BINS = 1024


@dataclass
class PaliGemmaSize:
    """Architecture of the trained PaliGemma."""

    image_size: int = 140
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 96
    text_layers: int = 4
    text_heads: int = 3
    text_head_dim: int = 32
    """32: the narrowest head vLLM's CPU attention takes."""
    init_std: float = 0.1
    """Weight init of the Gemma 2 text model: about 1/sqrt(text_hidden). Gemma's own 0.02 suits a width of
    thousands; at 96 it leaves attention scores near zero and uniform, and the model sits for hundreds of steps
    before its attention learns to single out an object."""
    loc_high: float = 64.0
    """Highest frequency (cycles per image side) of the location tokens' initial code (see :func:`loc_code`)."""


PALIGEMMA_WORDS = ("detect", *(f"▁{w}" for w in (*ui_scenes.PALETTE, *ui_scenes.SHAPES)))
"""Whole-word tokens of the PaliGemma tokenizer (``▁`` is a space): a prompt reads ``detect ▁red ▁button`` rather
than 17 characters, as it does with the real Gemma vocabulary. Everything else still spells out by character or
byte, so any text tokenises."""


def paligemma_shape(size: PaliGemmaSize) -> Any:
    """The hub-layout builder's shape for ``size``."""
    from vlm_tools.testing.tiny_paligemma import PaliGemmaShape

    return PaliGemmaShape(
        image_size=size.image_size, vision_hidden=size.vision_hidden, vision_layers=size.vision_layers,
        vision_heads=size.vision_heads, vision_intermediate=size.vision_hidden * 4, text_hidden=size.text_hidden,
        text_layers=size.text_layers, text_heads=size.text_heads, text_kv_heads=size.text_heads,
        text_head_dim=size.text_head_dim, text_intermediate=size.text_hidden * 4, init_std=size.init_std,
    )  # fmt: skip


def build_paligemma(size: PaliGemmaSize, seed: int) -> tuple[torch.nn.Module, Any]:
    """A fresh PaliGemma 2 of ``size`` in the hub's layout (Gemma-shaped tokenizer, the real processor) whose
    vocabulary spells each of :data:`PALIGEMMA_WORDS` as one token."""
    from vlm_tools.testing.tiny_paligemma import new_model

    model, processor = new_model(paligemma_shape(size), seed=seed, words=PALIGEMMA_WORDS)
    tokenizer = processor.tokenizer
    grid = size.image_size // 14
    with torch.no_grad():
        model.model.vision_tower.embeddings.position_embedding.weight.copy_(
            0.5 * position_code_2d(grid, size.vision_hidden)
        )
        # Location-token rows of the (tied) embedding get the bin code, at the norm the other rows have.
        table = model.get_input_embeddings().weight
        loc0 = tokenizer.convert_tokens_to_ids("<loc0000>")
        code = loc_code(LOC_BINS, size.text_hidden, high=size.loc_high)
        table[loc0 : loc0 + LOC_BINS] = code * (table.norm(dim=1).mean() / code.norm(dim=1).mean())
    return model, processor


def edge_bands(
    box: tuple[float, float, float, float], size: tuple[int, int], grid: int
) -> list[tuple[float, float, float, float]]:
    """The four regions a box's ``<loc>`` tokens (y0, x0, y1, x1) are read from: one patch-thick bands along the
    top, left, bottom and right edges, centred on the edge and as long as the box's side.

    A head that averages the patches of the whole object reads its centre; an edge token needs the patches the
    edge crosses, where the vision tower sees the transition."""
    width, height = size
    x0, y0, x1, y1 = box
    half_w, half_h = width / grid / 2, height / grid / 2

    def clip(b: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        return max(0.0, b[0]), max(0.0, b[1]), min(float(width), b[2]), min(float(height), b[3])

    return [
        clip((x0, y0 - half_h, x1, y0 + half_h)),
        clip((x0 - half_w, y0, x0 + half_w, y1)),
        clip((x0, y1 - half_h, x1, y1 + half_h)),
        clip((x1 - half_w, y0, x1 + half_w, y1)),
    ]


def loc_tokens(box: tuple[float, float, float, float], size: tuple[int, int]) -> str:
    """A pixel box as PaliGemma's four location tokens: y0, x0, y1, x1, each a bin of 1024 over its side."""
    width, height = size
    x0, y0, x1, y1 = box
    bins = [min(LOC_BINS - 1, max(0, round(v * LOC_BINS))) for v in (y0 / height, x0 / width, y1 / height, x1 / width)]
    return "".join(f"<loc{b:04d}>" for b in bins)


def paligemma_labels(scene: Scene, rng: random.Random | None = None) -> list[ui_scenes.SceneObject]:
    """The objects a detect prompt names: the target alone, or (when ``rng`` is given) often several objects of the
    scene in random order — PaliGemma's ``detect a ; b ; c`` form, answered box after box.

    Naming every object half the time is the densest supervision the answer format allows: each step teaches the
    position of every object on the canvas, not just one, for the price of one image and a few more tokens.
    """
    objects = [scene.target]
    others = [o for o in scene.objects if o is not scene.target]
    if rng is None or not others:
        return objects
    roll = rng.random()
    if roll < 0.5:
        objects += others
    elif roll < 0.7:
        objects += rng.sample(others, rng.randint(1, min(2, len(others))))
    rng.shuffle(objects)
    return objects


def paligemma_answer(scene: Scene, objects: Sequence[ui_scenes.SceneObject] | None = None) -> str:
    """The detect answer naming ``objects`` (default: the target): ``<loc…>×4 label`` per object, ``" ; "`` between."""
    return " ; ".join(f"{loc_tokens(o.box, scene.size)} {o.name}" for o in (objects or [scene.target]))


def paligemma_recipe(size: PaliGemmaSize, settings: TrainSettings) -> Recipe:
    """PaliGemma: ``detect {colour} {shape}`` → one box, inputs built as :class:`PaliGemmaBackend` builds them."""
    from vlm_tools.backends.paligemma_local import IMAGE_TOKEN, PaliGemmaBackend

    model, processor = build_paligemma(size, settings.seed)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"  # as the backend sets it
    family = get_family("paligemma")
    loc0 = tokenizer.convert_tokens_to_ids("<loc0000>")
    _check_paligemma_tokens(tokenizer)

    label_rng = random.Random(settings.seed + 1)
    attention_rng = random.Random(settings.seed + 2)
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    grid = size.image_size // 14

    def build_batch(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
        named = [paligemma_labels(s, label_rng if settings.multi_label else None) for s in scenes]
        requests = [
            Request(Task.DETECT, s.image, labels=tuple(o.name for o in objects))
            for s, objects in zip(scenes, named, strict=True)
        ]
        prompts = [IMAGE_TOKEN + family.prompt(r) for r in requests]
        # The same processor call as PaliGemmaBackend._generate, plus the answer as PaliGemma's "suffix": the
        # processor appends it after the prompt's "\n" with <eos>, marks it token_type 1 and masks the rest in labels.
        answers = [paligemma_answer(s, objects) for s, objects in zip(scenes, named, strict=True)]
        inputs = processor(
            text=prompts, images=[s.image for s in scenes], suffix=answers, return_tensors="pt", padding="longest"
        )
        inputs["position_ids"] = position_ids_from_mask(inputs["attention_mask"], offset=1)
        # A row whose token types are all 1 reads its prefix causally (see TrainSettings.causal_share).
        causal = torch.tensor([attention_rng.random() < settings.causal_share for _ in scenes])
        inputs["token_type_ids"] = inputs["token_type_ids"].masked_fill(causal[:, None], 1)
        batch = dict(inputs)
        if settings.attn_weight > 0:
            # The positions predicting an object's four <loc> tokens look at that object: at the whole of it, or
            # (attn_edges) each at the edge its token places.
            is_loc = (batch["labels"] >= loc0) & (batch["labels"] < loc0 + LOC_BINS)
            boxes = [[o.box for o in objects] for objects in named]
            add_attention_targets(batch, scenes, boxes, is_loc, image_token, grid, per_object=4)
            if settings.attn_edges:
                regions = [
                    [e for o in objects for e in edge_bands(o.box, s.size, grid)] for s, objects in zip(scenes, named)
                ]
                add_attention_targets(batch, scenes, regions, is_loc, image_token, grid, 1, key="_attn_target_edges")
        return batch

    def loss(batch: dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        logits, wanted, extra = answer_logits(model, batch, settings, progress)
        logp = F.log_softmax(logits, dim=-1)
        per_token = -logp.gather(1, wanted[:, None]).squeeze(1)
        is_loc = (wanted >= loc0) & (wanted < loc0 + LOC_BINS)
        if is_loc.any():
            # Gaussian over neighbouring bins, sigma_start (30) bins wide at the start (an answer roughly right earns
            # credit while the model learns where things are) narrowing geometrically to 1.5 (sharp answers).
            sigma = settings.sigma_start * (1.5 / settings.sigma_start) ** progress
            grid = torch.arange(LOC_BINS, dtype=torch.float32)
            centre = (wanted[is_loc] - loc0).float()[:, None]
            soft = torch.exp(-0.5 * ((grid[None, :] - centre) / sigma) ** 2)
            soft = soft / soft.sum(1, keepdim=True)
            per_token = per_token.clone()
            per_token[is_loc] = -(soft * logp[is_loc][:, loc0 : loc0 + LOC_BINS]).sum(1)
        return per_token.mean() + extra

    class CausalPaliGemmaBackend(PaliGemmaBackend):
        """The backend with the prompt read causally, as vLLM's CPU attention reads it (no prefix-LM mask)."""

        def prepare_inputs(self, requests: Sequence[Request], prompts: Sequence[str]) -> Any:
            inputs = super().prepare_inputs(requests, prompts)
            inputs["token_type_ids"] = torch.ones_like(inputs["token_type_ids"])
            return inputs

    def make_backends() -> dict[str, Backend]:
        kinds = {"prefix": PaliGemmaBackend} | ({"causal": CausalPaliGemmaBackend} if settings.causal_share else {})
        return {mode: kind("training", model, processor, device="cpu", max_batch_size=8) for mode, kind in kinds.items()}

    def save_checkpoint(path: Path) -> None:
        from vlm_tools.testing.tiny_paligemma import save_hub_checkpoint

        save_hub_checkpoint(model, processor, path)

    return Recipe(
        "paligemma", model, processor, make_backends, build_batch, loss, Task.DETECT, save_checkpoint, asdict(size)
    )


def _check_paligemma_tokens(tokenizer: Any) -> None:
    """Every answer the model is taught must tokenise and decode back exactly (loc tokens whole, labels intact)."""
    rng = random.Random(1)
    for _ in range(50):
        scene = ui_scenes.random_scene(rng)
        objects = paligemma_labels(scene, rng)
        text = paligemma_answer(scene, objects)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if back != text or sum(tokenizer.convert_ids_to_tokens(i).startswith("<loc") for i in ids) != 4 * len(objects):
            raise RuntimeError(f"the PaliGemma tokenizer does not round-trip {text!r} (got {back!r})")
    words = tokenizer.convert_ids_to_tokens(tokenizer("detect red button", add_special_tokens=False)["input_ids"])
    if words != ["detect", "▁red", "▁button"]:
        raise RuntimeError(f"the PaliGemma tokenizer splits 'detect red button' into {words}")


# --- Molmo2 ---------------------------------------------------------------------------------------------------


@dataclass
class Molmo2Size:
    """Architecture and image tiling of the trained Molmo2."""

    crop_size: int = 112
    max_crops: int = 2
    overlap_margins: tuple[int, int] = (2, 2)
    pooling: tuple[int, int] = (1, 1)
    """Patches per image token (rows, columns). Molmo2-4B pools 2×2; here each 14-px patch keeps its own token,
    so the low-resolution view is an 8×8 grid rather than 4×4, which a model this small reads positions from
    far sooner."""
    vision_hidden: int = 64
    vision_layers: int = 3
    text_hidden: int = 96
    text_layers: int = 4
    heads: int = 4
    """Attention heads of the vision tower and adapter."""
    text_heads: int = 3
    """Text attention heads, each 32 wide (the narrowest vLLM's CPU attention takes)."""
    init_std: float = 0.1
    """Weight init of every part: about 1/sqrt(text_hidden) (see :attr:`PaliGemmaSize.init_std`)."""
    digit_code: bool = True
    """Start the digit tokens' embeddings as an ordinal code (see :func:`build_molmo2`)."""


def molmo2_answer(scene: Scene) -> str:
    """Molmo2's native answer for the scene's target: one point at its centre, 0–1000, three digits."""
    width, height = scene.size
    cx, cy = scene.target.center
    x = min(999, max(0, round(cx / width * 1000)))
    y = min(999, max(0, round(cy / height * 1000)))
    name = scene.target.name
    return f'<points coords="1 1 {x:03d} {y:03d}" alt="{name}">{name}</points>'


def _molmo2_corpus() -> list[str]:
    """What the tokenizer's merges are learnt from: every prompt and answer shape the model is taught, the other
    tasks' prompts, and the chat markup."""
    from vlm_tools.backends.families import Molmo2 as Molmo2Family

    lines = []
    rng = random.Random(0)
    for colour in ui_scenes.PALETTE:
        for shape in ui_scenes.SHAPES:
            name = f"{colour} {shape}"
            lines.append(Molmo2Family.point_instruction(name))
            x, y = rng.randint(0, 999), rng.randint(0, 999)
            lines.append(f'<points coords="1 1 {x:03d} {y:03d}" alt="{name}">{name}</points>')
    lines += [
        Molmo2Family.brief_caption, Molmo2Family.detailed_caption, Molmo2Family.ocr_instruction,
        "What is in the picture? How many objects are there? Answer in English.",
        "There is nothing like that in the image.", "user\n assistant\n system\n Image 1 Image 2",
    ]  # fmt: skip
    return lines * 4


def molmo2_shape(size: Molmo2Size) -> Any:
    """The hub-layout builder's shape for ``size``: two ViT layers read (the deepest and the first), like the
    hub's two of 27."""
    from vlm_tools.testing.tiny_molmo2 import Molmo2Shape

    return Molmo2Shape(
        crop_size=size.crop_size, max_crops=size.max_crops, overlap_margins=size.overlap_margins,
        pooling=size.pooling, vision_hidden=size.vision_hidden, vision_heads=size.heads,
        vision_intermediate=size.vision_hidden * 4, vit_layers=(-2, -(size.vision_layers + 1)),
        vit_declared_layers=size.vision_layers + 1, text_hidden=size.text_hidden, text_layers=size.text_layers,
        text_heads=size.text_heads, text_kv_heads=size.text_heads, text_head_dim=size.text_hidden // size.text_heads,
        text_intermediate=size.text_hidden * 4, adapter_intermediate=size.text_hidden * 2, init_std=size.init_std,
    )  # fmt: skip


def build_molmo2(size: Molmo2Size, seed: int) -> tuple[torch.nn.Module, Any]:
    """A fresh Molmo2 of ``size`` in the hub's layout (Qwen2-shaped tokenizer whose merges are learnt from the
    prompts and answers taught, the real processor and chat template)."""
    from vlm_tools.testing.tiny_molmo2 import new_model

    model, processor = new_model(molmo2_shape(size), seed=seed, corpus=_molmo2_corpus())
    model.set_attn_implementation("sdpa")
    ids = processor.tokenizer.convert_tokens_to_ids
    grid = size.crop_size // 14
    with torch.no_grad():
        model.model.vision_tower.positional_embedding.copy_(0.5 * position_code_2d(grid, size.vision_hidden))
        if size.digit_code:
            # Digits are ordinal: the rows of "0".."9" (input and output) start as a code of the digit's value
            # over 0..1 (0.05, 0.15, ...), at the norm of the other rows, so "7" starts out near "6" and "8".
            digit_rows = ids([str(d) for d in range(10)])
            code = loc_code(10, size.text_hidden, high=5.0)
            for table in (model.get_input_embeddings().weight, model.lm_head.weight):
                table[digit_rows] = code * (table.norm(dim=1).mean() / code.norm(dim=1).mean())
    return model, processor


def molmo2_recipe(size: Molmo2Size, settings: TrainSettings) -> Recipe:
    """Molmo2: its point prompt → its native points; prompt inputs from :meth:`Molmo2Backend.prepare_inputs`."""
    from vlm_tools.backends.molmo2_local import Molmo2Backend

    model, processor = build_molmo2(size, settings.seed)
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    family = get_family("molmo2")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    _check_molmo2_tokens(tokenizer)
    digit_ids = torch.tensor(tokenizer.convert_tokens_to_ids([str(d) for d in range(10)]))
    patch_id = tokenizer.convert_tokens_to_ids("<im_patch>")
    grid = size.crop_size // 14 // size.pooling[0]

    def make_backend() -> Molmo2Backend:
        return Molmo2Backend("training", model, processor, device="cpu", max_batch_size=8)

    builder = make_backend()
    noise_rng = random.Random(settings.seed + 1)

    def build_batch(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
        requests = [_request(Task.POINT, s, 1) for s in scenes]
        # The exact inputs generate() gets: chat template, crops, left padding, control-token sanitising.
        prompt = builder.prepare_inputs(requests, [family.prompt(r) for r in requests])
        answers = [tokenizer(molmo2_answer(s), add_special_tokens=False)["input_ids"] + [eos] for s in scenes]
        # What the model reads (``inputs``) may differ from what it must predict (``answers``): see _slip_digits.
        truths = answers
        slipped = [_slip_digits(a, digit_ids, noise_rng, settings.digit_slip) for a in answers]
        answers = [target for target, _ in slipped]
        inputs = [read for _, read in slipped]
        width = max(len(a) for a in answers)
        rows = len(scenes)
        answer_ids = torch.full((rows, width), pad, dtype=torch.long)
        read_ids = torch.full((rows, width), pad, dtype=torch.long)
        answer_mask = torch.zeros((rows, width), dtype=torch.long)
        for i, (answer, read) in enumerate(zip(answers, inputs)):
            answer_ids[i, : len(answer)] = torch.tensor(answer)
            read_ids[i, : len(read)] = torch.tensor(read)
            answer_mask[i, : len(answer)] = 1
        batch = dict(prompt)
        batch["input_ids"] = torch.cat([prompt["input_ids"], read_ids], dim=1)
        batch["attention_mask"] = torch.cat([prompt["attention_mask"], answer_mask], dim=1)
        batch["mm_token_type_ids"] = torch.cat(
            [prompt["mm_token_type_ids"], torch.zeros_like(answer_ids, dtype=prompt["mm_token_type_ids"].dtype)], dim=1
        )
        batch.pop("token_type_ids", None)
        batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
        labels = torch.full_like(batch["input_ids"], -100)
        labels[:, prompt["input_ids"].shape[1] :] = answer_ids.masked_fill(answer_mask == 0, -100)
        batch["labels"] = labels
        batch["_digit_value"] = torch.stack([_digit_values(a, width, digit_ids, t) for a, t in zip(answers, truths)])
        if settings.attn_weight > 0:
            # The positions predicting the six digits of the point look at the target; the whole-image
            # (low-resolution) view's patches come first.
            start = prompt["input_ids"].shape[1]
            coordinates = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
            digit_set = set(digit_ids.tolist())
            for row, answer in enumerate(answers):
                digits = [i for i, token in enumerate(answer) if token in digit_set]
                for i in digits[2:8]:
                    coordinates[row, start + i] = True
            boxes = [[s.target.box] for s in scenes]
            add_attention_targets(batch, scenes, boxes, coordinates, patch_id, grid, per_object=6)
        return batch

    def loss(batch: dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        logits, wanted, extra = answer_logits(model, batch, settings)
        logp = F.log_softmax(logits, dim=-1)
        per_token = -logp.gather(1, wanted[:, None]).squeeze(1)
        block = batch["labels"][:, -batch["_digit_value"].shape[1] :]
        values = batch["_digit_value"][block != -100]
        smooth = ~torch.isnan(values)
        if smooth.any():
            # Hundreds and tens digits of a coordinate are ordinal: a Gaussian over the ten digits around the true
            # continuous value (7.345 for the hundreds digit of 734) teaches "near" as well as "right"; 0.8 digits
            # wide at the start, 0.15 (practically one-hot) at the end.
            sigma = 0.8 * (0.15 / 0.8) ** progress
            centres = torch.arange(10, dtype=torch.float32) + 0.5
            soft = torch.softmax(-0.5 * ((centres[None, :] - values[smooth][:, None]) / sigma) ** 2, dim=1)
            per_token = per_token.clone()
            per_token[smooth] = -(soft * logp[smooth][:, digit_ids]).sum(1)
        return per_token.mean() + extra

    def save_checkpoint(path: Path) -> None:
        from vlm_tools.testing.tiny_molmo2 import save_hub_checkpoint

        save_hub_checkpoint(model, processor, molmo2_shape(size), path)

    return Recipe(
        "molmo2", model, processor, lambda: {"": make_backend()}, build_batch, loss, Task.POINT, save_checkpoint,
        asdict(size),
    )


def _digit_values(
    answer: Sequence[int], width: int, digit_ids: torch.Tensor, truth: Sequence[int] | None = None
) -> torch.Tensor:
    """Per answer position: the continuous value of a coordinate's hundreds or tens digit (NaN elsewhere).

    The answer's digit tokens are, in order, the image index, the point id, then x and y with three digits each.
    ``truth`` (default ``answer``) gives the hundreds digits' values: after a slipped hundreds digit (see
    :func:`_slip_digits`) the hundreds target is still the true one, the tens target the corrected one.
    """
    truth = answer if truth is None else truth
    values = torch.full((width,), float("nan"))
    digit_of = {int(token): d for d, token in enumerate(digit_ids.tolist())}
    digits = [i for i, token in enumerate(answer) if token in digit_of]
    for start in (2, 5):
        true, written = (sum(digit_of[a[digits[start + k]]] * 10 ** (2 - k) for k in range(3)) for a in (truth, answer))
        values[digits[start]] = (true + 0.5) / 100  # hundreds digit: 7.345 for 734
        values[digits[start + 1]] = (written % 100 + 0.5) / 10  # tens digit: 3.45 for 734
    return values


def _slip_digits(
    answer: Sequence[int], digit_ids: torch.Tensor, rng: random.Random, share: float
) -> tuple[list[int], list[int]]:
    """Teach the model to finish a coordinate whose hundreds digit it got wrong: returns (targets, inputs).

    Trained on correct prefixes only, a model that writes 8 for the hundreds of 0.904 finishes with the tens and
    units of 904 ("800", 104 off) instead of the nearest value that starts with 8 ("899"). For ``share`` of the
    coordinates the model READS a hundreds digit one off (it still must PREDICT the right one there), and the
    digits after it are the nearest value under that prefix — a one-step form of scheduled sampling.
    """
    targets, read = list(answer), list(answer)
    digit_of = {int(token): d for d, token in enumerate(digit_ids.tolist())}
    digits = [i for i, token in enumerate(answer) if token in digit_of]
    for start in (2, 5):
        if rng.random() >= share:
            continue
        h = digit_of[answer[digits[start]]]
        slipped = h + rng.choice((-1, 1))
        if not 0 <= slipped <= 9:
            continue
        nearest = slipped * 100 + (99 if slipped < h else 0)
        read[digits[start]] = int(digit_ids[slipped])
        for k, d in ((1, nearest // 10 % 10), (2, nearest % 10)):
            targets[digits[start + k]] = read[digits[start + k]] = int(digit_ids[d])
    return targets, read


def _check_molmo2_tokens(tokenizer: Any) -> None:
    """Every answer must round-trip exactly, with one token per coordinate digit."""
    rng = random.Random(2)
    for _ in range(50):
        text = molmo2_answer(ui_scenes.random_scene(rng))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        back = tokenizer.decode(ids, skip_special_tokens=True)
        coords = text.split('"')[1]
        digit_tokens = sum(tokenizer.decode([i]).strip().isdigit() for i in ids)
        if back != text or digit_tokens < sum(c.isdigit() for c in coords):
            raise RuntimeError(f"the Molmo2 tokenizer does not round-trip {text!r} (got {back!r})")


# --- saving -----------------------------------------------------------------------------------------------------


def _directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def load_weights(model: torch.nn.Module, directory: Path) -> dict[str, Any] | None:
    """Load the weights of a fixture saved earlier into ``model`` (same architecture); return its training record."""
    from transformers import AutoModelForImageTextToText

    trained = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32)
    model.load_state_dict(trained.state_dict(), strict=True)
    log_path = directory / "training_log.json"
    return json.loads(log_path.read_text()) if log_path.is_file() else None


def _stage_summary(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("command", "steps_run", "best_step", "stop_reason", "minutes", "machine")
    return {k: record.get(k) for k in keys}


def save(
    recipe: Recipe,
    settings: TrainSettings,
    outcome: dict[str, Any],
    out: Path,
    argv: Sequence[str],
    previous: dict[str, Any] | None = None,
) -> None:
    """Save model + processor like a hub checkpoint, a training log and the model card.

    ``previous`` is the record of the run this one resumed from; its stages are kept in this record.
    """
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    recipe.save_checkpoint(out)
    params = sum(p.numel() for p in recipe.model.parameters())
    record = {
        "family": recipe.name,
        "command": "python scripts/train_fixtures.py " + " ".join(shlex.quote(a) for a in argv),
        "settings": asdict(settings),
        "architecture": recipe.architecture,
        "parameters": params,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, torch threads: {torch.get_num_threads()}",
        **outcome,
    }
    if previous is not None:
        record["previous_stages"] = [*previous.get("previous_stages", []), _stage_summary(previous)]
    (out / "training_log.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(record, _directory_bytes(out)))
    log.info("saved %s (%d parameters) to %s", recipe.name, params, out)


def _recipe(record: dict[str, Any]) -> str:
    """How the fixture was trained, in words, from the settings its log recorded (for the model card)."""
    s = record["settings"]
    scale = (
        f"Canvases are drawn at {s['render_min']:.0%}–{s['render_max']:.0%} of their size ({s['full_size_share']:.0%} "
        "at full size): the model sees a ~100-px square either way, and small canvases are several times cheaper to "
        "draw and resize."
    )
    if s["curriculum"]:
        schedule = (
            "Curriculum: the first 10 % of steps show one object on a 400×300 canvas; then one object on every "
            "training canvas size until 25 %, 1–3 objects until 40 %, and 2–5 objects (the accuracy suite's scenes) "
            "from there on."
        )
    else:
        schedule = "No curriculum: every training scene has 2–5 objects (as the accuracy suite's scenes do)."
    heads = s.get("attn_heads", 1)
    layer = ("first", "second", "third", "fourth")[s["attn_layer"]] if s["attn_layer"] < 4 else f"#{s['attn_layer']}"
    who = "the first head" if heads == 1 else f"the first {heads} heads"
    are = "is" if heads == 1 else "are"
    if record["family"] == "paligemma":
        where = "at the image patches the described object covers (cross-entropy against the patches' coverage)"
        labels = (
            "; half the prompts name every object of the scene and a fifth one or two more (`detect a ; b ; c`, "
            "answered box after box, in PaliGemma's own multi-label format)"
            if s.get("multi_label", True)
            else ", naming the target only (as the accuracy suite asks)"
        )
        edge_heads = s.get("edge_heads", 0) if s.get("attn_edges") else 0
        if edge_heads:
            ordinal = ("first", "second", "third", "fourth")
            when = f"from {s['edges_from']:.0%} of the steps on" if s.get("edges_from") else "throughout"
            where += (
                f"; and, {when}, the first {edge_heads} heads of the {ordinal[s['edge_layer']]} layer at the patches "
                "along the edge that token places (a one-patch band across the top edge for y0, the left edge for "
                "x0, …). The first layer finds which object is meant, the later one reads where its edges are: a "
                "head averaging the whole object reads its centre, not its extent"
            )
        return (
            "Data: scenes from `ui_scenes` at the training canvas sizes (landscape, portrait, square). Prompt: "
            f"`FAMILIES['paligemma'].prompt(...)` for `detect {{colour}} {{shape}}`{labels}. Inputs: the same `PaliGemmaProcessor` call as `PaliGemmaBackend` (left padding, "
            "`<image>` + prompt), the answer as the processor's `suffix`, position ids from the attention mask as "
            "`generate` derives them. Loss: cross-entropy on answer tokens only; each `<loc>` target Gaussian-smoothed "
            f"over neighbouring bins (sigma {s['sigma_start']:g} bins narrowing geometrically to 1.5). Tokenizer: the "
            "tiny byte-fallback Gemma vocabulary plus whole-word tokens for `detect` and the colour and shape words. "
            "Init: patch position embeddings and `<loc>` token embeddings start as sine/cosine codes of their "
            "normalised position; Gemma weights at std 0.1 (about 1/sqrt(width)). Attention supervision (weight "
            f"{s['attn_weight']:g}): in training only, {who} of the {layer} Gemma layer {are} also taught to look, from "
            f"each position that predicts a `<loc>` token, {where}; the saved checkpoint is an unmodified PaliGemma."
            f"\n\n{schedule} {scale}"
        )
    slip = s.get("digit_slip", 0.0)
    slipped = (
        f" In {slip:.0%} of coordinates the model reads a hundreds digit one off from the truth (it must still "
        "predict the true one) and learns to finish with the nearest value under that prefix (`8` for 0.904 → "
        "`899`, not `804`): a one-step form of scheduled sampling, so one wrong digit costs a few pixels, not a "
        "tenth of the image."
        if slip
        else ""
    )
    return (
        "Data: scenes from `ui_scenes` at the training canvas sizes (landscape, portrait, square). Prompt: "
        "`FAMILIES['molmo2'].prompt(...)` for the point task (`Point to the {colour} {shape}.`). Inputs: "
        "`Molmo2Backend.prepare_inputs` (chat template, overlapping crops + low-resolution view, left padding), the "
        "answer and `<|im_end|>` appended, position ids from the attention mask as `generate` derives them. Loss: "
        "cross-entropy on answer tokens only; the hundreds and tens digits of each coordinate Gaussian-smoothed over "
        f"neighbouring digits (0.8 digits wide narrowing to 0.15).{slipped} Tokenizer: byte-level BPE learnt from "
        "the prompts and answers, one token per digit so coordinates always spell the same way. Init: patch position "
        "embeddings start as a sine/cosine code of their normalised position, the digit tokens' input and output "
        "rows as an ordinal code of the digit; all weights at std 0.1. Each 14-px patch is its own image token (no "
        f"2×2 pooling). Attention supervision (weight {s['attn_weight']:g}): in training only, {who} of the {layer} "
        f"text layer {are} also taught to look, from each position that predicts a coordinate digit, at the patches of "
        "the low-resolution view the target covers; the saved checkpoint is an unmodified Molmo2."
        f"\n\n{schedule} {scale}"
    )


def _stages(record: dict[str, Any]) -> str:
    """Earlier stages this model was resumed from (``--resume``), as card lines; empty for a one-stage run."""
    lines = []
    for number, stage in enumerate(record.get("previous_stages", []), start=1):
        lines.append(
            f"- Stage {number}: `{stage['command']}` — {stage['steps_run']} steps (weights from step "
            f"{stage['best_step']}), {stage['minutes']} min on {stage['machine']}; then, resumed from its weights:"
        )
    return "\n".join(lines) + ("\n" if lines else "")


def _table(rows: Sequence[dict[str, Any]], with_iou: bool) -> str:
    modes = any(r.get("mode") for r in rows)
    header = ("| attention " if modes else "") + "| size | scenes | centre inside target | median centre error (÷ max(w, h)) |"
    rule = ("| --- " if modes else "") + "| --- | --- | --- | --- |"
    if with_iou:
        header += " mean IoU | recall@IoU 0.5 |"
        rule += " --- | --- |"
    lines = [header, rule]
    for r in rows:
        line = f"| {r['mode']} " if modes else ""
        line += f"| {r['size'][0]}×{r['size'][1]} | {r['count']} | {r['inside']:.1%} | {r['median_error']:.4f} |"
        if with_iou:
            line += f" {r['mean_iou']:.3f} | {r['recall50']:.1%} |"
        lines.append(line)
    return "\n".join(lines)


def _eval_section(report: dict[str, Any], command: str) -> str:
    """The accuracy-suite table (``vlm-tools eval`` JSON) for the card."""
    lines = [
        "## Accuracy suite (served through the MCP tools)",
        "",
        f"Command: `{command}`",
        "",
        "| size | scenes | points inside target | median centre error (÷ max(w, h)) | detect mean IoU | recall@IoU 0.5 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["sizes"]:
        point, detect = r["point"], r["detect"]
        inside = "—" if point["inside"] is None else f"{point['inside']:.1%}"
        error = "—" if point["median_error"] is None else f"{point['median_error']:.4f}"
        iou = "—" if detect["mean_iou"] is None else f"{detect['mean_iou']:.3f}"
        recall = "—" if detect["recall50"] is None else f"{detect['recall50']:.1%}"
        lines.append(f"| {r['width']}×{r['height']} | {point['scenes']} | {inside} | {error} | {iou} | {recall} |")
    first = report["sizes"][0]
    lines += [
        "",
        (
            f"Points from {', '.join(first['point']['models']) or '—'}; boxes from "
            f"{', '.join(first['detect']['models']) or '—'}. Seed {report['seed']}; result: "
            f"{'PASS' if report['passed'] else 'FAIL'}."
        ),
    ]
    return "\n".join(lines)


def model_card(
    record: dict[str, Any],
    size_bytes: int,
    evaluation: tuple[dict[str, Any], str] | None = None,
    copied_to: str | None = None,
) -> str:
    """The model card: what the model is for, exactly how it was made, and how well it did. ``copied_to`` names
    where the saved directory was moved after training, when the card is rewritten there."""
    moved = f"; its output directory was then copied to `{copied_to}`" if copied_to else ""
    task = (
        "`detect {colour} {shape}` → `<locY0><locX0><locY1><locX1> {colour} {shape}`"
        if record["family"] == "paligemma"
        else '`Point to the {colour} {shape}.` → `<points coords="1 1 XXX YYY" alt="…">…</points>`'
    )
    s = record["settings"]
    card = f"""# {record["family"]} UI-grounding test fixture

A {record["parameters"]:,}-parameter {record["family"]} model trained from scratch on synthetic UI screenshots
(`vlm_tools/testing/ui_scenes.py`: coloured buttons and shapes on plain or gradient backgrounds) for ONE job:
{task}. It exists so the test-suite can prove that pixels survive the whole trip (image → processor → model →
tokens → parser → pixels → frame → click) with a model that actually grounds. It knows nothing else; do not use it
for anything but tests and demos. Load it like a hub checkpoint: `vlm-tools serve --model <this directory>`.

## How it was made

{_stages(record)}- Command: `{record["command"]}` (from the repository root{moved})
- Seed: {s["seed"]} (training scenes from `random.Random({s["seed"]})`; held-out checks from seed + {CHECK_SEED_OFFSET};
  the accuracy suite defaults to seed 1234)
- Steps: {record["steps_run"]} run, weights from step {record["best_step"]} kept ({record["stop_reason"]}); batch
  {s["batch_size"]}; AdamW lr {s["lr"]} (warm-up {s["warmup"]} steps, cosine to {s["min_lr_ratio"]}×), weight decay
  {s["weight_decay"]}, gradient clip {s["grad_clip"]}
- Wall time: {record["minutes"]} min on {record["machine"]} (torch {record["torch"]}, transformers
  {record["transformers"]}, Python {record["python"]})
- Architecture: `{json.dumps(record["architecture"])}`
- Size on disk: {size_bytes / 1e6:.1f} MB

{_recipe(record)}

## Final held-out check (greedy decoding through the real backend class, real parser)

{_table(record["final_check"], record["family"] == "paligemma")}

The full learning curve is in `training_log.json`.
"""
    if evaluation is not None:
        card += "\n" + _eval_section(*evaluation) + "\n"
    return card


# --- command line -----------------------------------------------------------------------------------------------


def write_card(directory: Path, eval_report: Path | None, eval_command: str | None) -> None:
    """Rewrite ``directory/MODEL_CARD.md`` from its ``training_log.json`` (and an eval report, when given)."""
    record = json.loads((directory / "training_log.json").read_text())
    evaluation = None
    if eval_report is not None:
        evaluation = (json.loads(eval_report.read_text()), eval_command or "vlm-tools eval")
    saved = Path(shlex.split(record["command"])[shlex.split(record["command"]).index("--out") + 1])
    copied_to = None
    if saved.resolve() != directory.resolve():
        root = Path(__file__).resolve().parents[1]
        copied_to = (
            str(directory.resolve().relative_to(root)) if directory.resolve().is_relative_to(root) else str(directory)
        )
    (directory / "MODEL_CARD.md").write_text(model_card(record, _directory_bytes(directory), evaluation, copied_to))


def main(argv: Sequence[str] | None = None) -> int:
    """Train one fixture model and save it (``paligemma`` / ``molmo2``), or rewrite a model card (``card``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if argv[:1] == ["card"]:
        card = argparse.ArgumentParser(description="Rewrite a fixture's MODEL_CARD.md from its training log.")
        card.add_argument("directory", type=Path)
        card.add_argument("--eval-report", type=Path, help="JSON written by `vlm-tools eval --out`.")
        card.add_argument("--eval-command", help="The command that wrote it.")
        args = card.parse_args(argv[1:])
        write_card(args.directory, args.eval_report, args.eval_command)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=("paligemma", "molmo2"))
    parser.add_argument("--out", type=Path, required=True, help="Directory to save the model to.")
    defaults = TrainSettings()
    for name, value in asdict(defaults).items():
        kind = _yes_no if isinstance(value, bool) else type(value)
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=value)
    parser.add_argument("--image-size", type=int, help="PaliGemma input size / Molmo2 crop size (multiple of 14).")
    parser.add_argument(
        "--arch", action="append", default=[], metavar="FIELD=VALUE",
        help="Override one architecture field (PaliGemmaSize / Molmo2Size), e.g. --arch max_crops=1.",
    )  # fmt: skip
    parser.add_argument("--resume", type=Path, help="Start from the weights of a fixture saved earlier (same size).")
    args = parser.parse_args(argv)
    settings = TrainSettings(**{name: getattr(args, name) for name in asdict(defaults)})
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    if args.family == "paligemma":
        overrides = _arch_overrides(PaliGemmaSize, args.arch, {"image_size": args.image_size})
        recipe = paligemma_recipe(PaliGemmaSize(**overrides), settings)
    else:
        overrides = _arch_overrides(Molmo2Size, args.arch, {"crop_size": args.image_size})
        recipe = molmo2_recipe(Molmo2Size(**overrides), settings)
    previous = load_weights(recipe.model, args.resume) if args.resume else None
    log.info("%s: %d parameters", recipe.name, sum(p.numel() for p in recipe.model.parameters()))
    outcome = train(recipe, settings)
    save(recipe, settings, outcome, args.out, argv, previous)
    return 0


def _arch_overrides(kind: type, pairs: Sequence[str], extra: dict[str, Any]) -> dict[str, Any]:
    """``FIELD=VALUE`` strings as keyword arguments of the dataclass ``kind``, converted to its fields' types."""
    defaults = asdict(kind())
    overrides = {k: v for k, v in extra.items() if v is not None}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in defaults:
            raise SystemExit(f"--arch: {kind.__name__} has no field {name!r} (fields: {', '.join(defaults)})")
        current = defaults[name]
        if isinstance(current, tuple):
            overrides[name] = tuple(type(current[0])(v) for v in value.split(","))
        elif isinstance(current, bool):
            overrides[name] = _yes_no(value)
        else:
            overrides[name] = type(current)(value)
    return overrides


def _yes_no(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, not {text!r}")


if __name__ == "__main__":
    sys.exit(main())
