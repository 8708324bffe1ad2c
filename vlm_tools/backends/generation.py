"""Batched greedy generation for the local backends: per-row stopping and limits, and greedy that inherits nothing.

Imported only when a local backend loads (it imports torch and transformers at module level). Why greedy must
inherit nothing from a checkpoint: :func:`neutral_generation_config`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from ..errors import Cancelled, ModelError
from .base import Request


class RowStopping(StoppingCriteria):
    """Stop each row of a batch on its own: at its own token limit, at EOS, or when its cancel event is set.

    ``generate`` runs until every row is finished; this criterion marks a row finished as soon as *that* row is
    done, so a short answer does not wait for a long one to be cut and a cancelled request stops at the next
    token while the rest of the batch goes on. It also records which rows it stopped because of cancellation
    (:attr:`cancelled`), which ``generate`` itself cannot tell apart from a normal finish.

    Args:
        prompt_length: length of the (padded) prompt; tokens past it are new.
        max_new_tokens: per-row limit on new tokens.
        cancel: per-row events; a set event stops that row.
        eos_token_ids: ids that end a row naturally (a row that ended so is never reported cancelled).
    """

    def __init__(
        self,
        prompt_length: int,
        max_new_tokens: Sequence[int],
        cancel: Sequence[threading.Event],
        eos_token_ids: Iterable[int] = (),
    ) -> None:
        if len(max_new_tokens) != len(cancel):
            raise ValueError("max_new_tokens and cancel must have one entry per row")
        self.prompt_length = prompt_length
        self.max_new_tokens = [max(1, int(n)) for n in max_new_tokens]
        self.cancel = list(cancel)
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.done = [False] * len(self.cancel)
        self.cancelled = [False] * len(self.cancel)

    def __call__(self, input_ids: torch.LongTensor, scores: Any = None, **kwargs: Any) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_length
        # One host sync per step; the batch is small and the check must see the actual last token.
        last_tokens = input_ids[:, -1].tolist()
        for row, token in enumerate(last_tokens):
            if self.done[row]:
                continue
            # A row that reached EOS or its limit has a complete answer: keep it even if cancel came late.
            if token in self.eos_token_ids or generated >= self.max_new_tokens[row]:
                self.done[row] = True
            elif self.cancel[row].is_set():
                self.done[row] = True
                self.cancelled[row] = True
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def generate_rows(
    model: Any,
    inputs: Mapping[str, Any],
    requests: Sequence[Request],
    *,
    eos_token_ids: Iterable[int],
    pad_token_id: int,
) -> list[list[int] | Cancelled]:
    """Greedy-generate for a prepared, left-padded batch; one list of new token ids (or ``Cancelled``) per row.

    Each row's tokens are cut at its own ``max_new_tokens`` and at its first EOS (EOS and the padding that
    ``generate`` writes after a finished row are dropped). Rows whose ``cancel`` event stopped them come back as
    :class:`~vlm_tools.errors.Cancelled`.
    """
    eos = frozenset(int(t) for t in eos_token_ids)
    prompt_length = int(inputs["input_ids"].shape[1])
    limits = [max(1, int(r.max_new_tokens)) for r in requests]
    stopping = RowStopping(prompt_length, limits, [r.cancel for r in requests], eos)
    with torch.inference_mode():
        sequences = model.generate(
            **inputs,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max(limits),
            stopping_criteria=StoppingCriteriaList([stopping]),
            pad_token_id=pad_token_id,
            eos_token_id=sorted(eos) or None,
            return_dict_in_generate=False,
        )
    new_tokens = sequences[:, prompt_length:].tolist()
    rows: list[list[int] | Cancelled] = []
    for index, tokens in enumerate(new_tokens):
        if stopping.cancelled[index]:
            rows.append(Cancelled("the request was cancelled while the model was generating"))
            continue
        rows.append(cut_row(tokens, limits[index], eos))
    return rows


def cut_row(tokens: Sequence[int], limit: int, eos_token_ids: Iterable[int]) -> list[int]:
    """The first ``limit`` tokens of a row, ending before its first EOS token."""
    eos = frozenset(eos_token_ids)
    kept: list[int] = []
    for token in tokens[:limit]:
        if token in eos:
            break
        kept.append(int(token))
    return kept


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the checkpoint's generation-config EOS ids and the tokenizer's EOS."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        ids: list[int] = []
    elif isinstance(configured, int):
        ids = [configured]
    else:
        ids = [int(t) for t in configured]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise ModelError("the model declares no end-of-sequence token; its generation_config.json is incomplete")
    return ids


def pad_token_id(model: Any, tokenizer: Any, eos_token_ids: Sequence[int]) -> int:
    """The id ``generate`` pads finished rows with: the checkpoint's, the tokenizer's, or an EOS id."""
    pad = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_token_ids)
    return int(pad)


def neutral_generation_config(model: Any, eos_token_ids: Sequence[int], pad: int) -> GenerationConfig:
    """A generation config with the model's BOS, stop and padding ids and nothing else: nothing for
    ``generate`` to inherit from the checkpoint's ``generation_config.json``.

    *Greedy means greedy.* A checkpoint's ``generation_config.json`` may set ``repetition_penalty``,
    ``no_repeat_ngram_size``, ``min_new_tokens``, ``suppress_tokens``, sampling… and ``generate`` fills every value a
    call leaves unset from the model's ``generation_config`` — even from a config passed explicitly. A repetition
    penalty is poison for digit-heavy point output. So a loaded model's ``generation_config`` is replaced by this
    one (its stop and padding ids, nothing else), and :func:`generate_rows` asks for greedy decoding in so many words.
    """
    bos = getattr(getattr(model, "generation_config", None), "bos_token_id", None)
    return GenerationConfig(bos_token_id=bos, eos_token_id=list(eos_token_ids), pad_token_id=pad)


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of token rows, padded on the left to the longest."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[index, width - len(row) :] = 1
    return ids, mask


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows, as ``generate`` derives them: counted from each row's first token."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)
