"""Supervision shared by both families: answer logits, attention targets and loss, position ids, initial codes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vlm_tools.scenes import Scene

from .settings import TrainSettings


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
