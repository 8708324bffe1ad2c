"""Prompts read on from a kept prefix: the key/value cache of the tokens that depend on the image alone.

A follow-up question on a Molmo2 image need not read its ~1,200 image tokens again; how a batch is laid out to
start from the kept prefixes: :func:`continue_from_prefixes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from .generation import left_padded


@dataclass(frozen=True)
class Prefix:
    """The language model's keys and values over a prompt's leading tokens.

    Attributes:
        token_ids: the tokens the cache covers.
        layers: per decoder layer, ``(keys, values)``, each ``(heads, len(token_ids), head_dim)``.
    """

    token_ids: tuple[int, ...]
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def nbytes(self) -> int:
        """Device memory it takes."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer)


def prefixes_from_cache(cache: Any, rows: Sequence[Sequence[int]]) -> list[Prefix]:
    """Split the cache of one pass over left-padded ``rows`` into one :class:`Prefix` per row (its padding dropped,
    its tensors copied out so the batch's cache can go)."""
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        # A sliding-window layer keeps only the last keys: the prefix would be cut, so it cannot be kept.
        raise ValueError("the language model has sliding-window attention layers; their cache holds only a window")
    width = max(len(row) for row in rows)
    layers = [(layer.keys, layer.values) for layer in cache.layers]
    return [
        Prefix(
            tuple(row),
            tuple(
                (keys[i, :, width - len(row) :].clone(), values[i, :, width - len(row) :].clone())
                for keys, values in layers
            ),
        )
        for i, row in enumerate(rows)
    ]


def continue_from_prefixes(
    prefixes: Sequence[Prefix], turns: Sequence[Sequence[int]], *, pad_token_id: int, config: Any, device: Any = "cpu"
) -> dict[str, Any]:
    """``generate`` inputs for rows ``prefix + turn`` whose prefixes are already read: the full ``input_ids`` and
    ``attention_mask`` on ``device`` and a cache holding every row's prefix (each layer where its prefix tensors are).

    A Molmo2 prompt whose template puts the image before the prompt starts with the same tokens for every question
    (BOS, any fixed text, the image's tokens), then the user's turn; those tokens attend to each other (the image's
    bidirectionally), never to the text after them. So the language model's keys and values over that prefix are a
    function of the image alone, and a follow-up question on the same image need not read its ~1,200 image tokens
    again: this lays a batch out so that ``generate`` starts from the kept prefixes and reads only each row's own
    turn.

    Rows of a batch hold prefixes and turns of different lengths. The cache handed to ``generate`` must be one tensor
    per layer, so each row is laid out as::

        [padding | prefix (cached) | hole | turn (read now)]

    left padding before the prefix so that every row's prefix ends at the same column, and a hole of padding before
    the turn so that every row's turn ends at the last column. Padding and hole are masked out; ``generate`` derives
    position ids from the attention mask, so the prefix sits at positions ``0 … P-1`` and the turn right after it —
    exactly where the row's tokens sit when read in one pass, left-padded. Not for PaliGemma: its image tokens and
    prompt form one bidirectional prefix, so the image's keys depend on the question.
    """
    if len(prefixes) != len(turns) or not prefixes:
        raise ValueError("one prefix and one turn per row, at least one row")
    # Each part left-padded on its own: the left padding of the turns is the hole after each prefix.
    prefix_ids, prefix_mask = left_padded([p.token_ids for p in prefixes], pad_token_id)
    turn_ids, turn_mask = left_padded(turns, pad_token_id)
    ids, mask = torch.cat([prefix_ids, turn_ids], dim=1), torch.cat([prefix_mask, turn_mask], dim=1)
    head = prefix_ids.shape[1]
    cache_layers = []
    for layer in range(len(prefixes[0].layers)):
        stacked = []
        for part in (0, 1):  # keys, values
            sample = prefixes[0].layers[layer][part]
            tensor = sample.new_zeros((len(prefixes), sample.shape[0], head, sample.shape[-1]))
            for i, prefix in enumerate(prefixes):
                tensor[i, :, head - len(prefix.token_ids) :] = prefix.layers[layer][part]
            stacked.append(tensor)
        cache_layers.append(tuple(stacked))
    return {
        "input_ids": ids.to(device), "attention_mask": mask.to(device),
        "cache": DynamicCache(ddp_cache_data=cache_layers, config=config),
    }  # fmt: skip
