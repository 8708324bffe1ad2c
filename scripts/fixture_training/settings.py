"""What one training run is told: :class:`TrainSettings`, and the learning-rate schedule they define."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation and stopping settings of one run (all recorded in the training log and the model card)."""

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
    sigma_start: float = 30.0
    """Width in bins of PaliGemma's smoothed location targets at the start (it narrows to 1.5 at the end)."""
    render_min: float = 0.2
    render_max: float = 0.5
    """Training canvases are drawn at this share of their size (aspect kept). The model sees a ~100-px square
    either way; a small canvas costs a fraction of a full-size one to draw and to resize."""
    full_size_share: float = 0.1
    """Share of training canvases drawn at full size, so the model also sees the aliasing of large screenshots."""
    attn_weight: float = 1.0
    """Weight of the attention-supervision loss (0 turns it off; see :func:`.supervision.attention_loss`)."""
    attn_layer: int = 1
    """Language-model layer whose first ``attn_heads`` heads are supervised."""
    attn_heads: int = 1
    edge_layer: int = 2
    """PaliGemma: the first ``edge_heads`` heads of layer ``edge_layer`` are also taught to look, from each position
    predicting a ``<loc>`` token, at the edge that token places (see :func:`.paligemma.edge_bands`)."""
    edge_heads: int = 2
    edges_from: float = 0.0
    """Share of training after which the edge heads are supervised (before: every supervised head looks at the
    whole object, which teaches which object a prompt means sooner)."""
    digit_slip: float = 0.2
    """Molmo2: share of coordinates trained after a one-off hundreds digit (see :func:`.molmo2.slip_digits`)."""
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
