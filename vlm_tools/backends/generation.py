"""Batched greedy generation shared by the local backends: device/dtype choice, per-row stopping, OOM care.

Imported only when a local backend loads (it imports torch and transformers at module level). Everything a
local backend needs to turn a batch of prepared inputs into one token list per request lives here, so the
PaliGemma and Molmo2 backends differ only in how they build prompts and inputs.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..errors import Cancelled, ConfigurationError, VlmToolsError
from .base import Outcome, Request

_Row = TypeVar("_Row")

log = logging.getLogger(__name__)


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
        )
    if not isinstance(sequences, torch.Tensor):  # a GenerateOutput when the generation config asks for dicts
        sequences = sequences.sequences
    new_tokens = sequences[:, prompt_length:].tolist()
    rows: list[list[int] | Cancelled] = []
    for index, tokens in enumerate(new_tokens):
        if stopping.cancelled[index]:
            rows.append(Cancelled("the request was cancelled while the model was generating"))
            continue
        rows.append(cut_row(tokens, limits[index], eos))
    return rows


def run_rows(
    requests: Sequence[Request],
    prompt: Callable[[Request], str],
    generate: Callable[[Sequence[Request], list[str]], Sequence[_Row | Cancelled]],
    finish: Callable[[Request, _Row], Outcome],
) -> list[Outcome]:
    """The shape of every local ``run_batch``: one outcome per request, in order.

    A request cancelled before the start, or whose prompt cannot be built, fails alone in its slot; the rest are
    generated together in one ``generate(requests, prompts)`` call, and each row becomes ``finish(request, row)``
    (a ``Cancelled`` row stays as it is).
    """
    outcomes: list[Outcome | None] = [None] * len(requests)
    live: list[int] = []
    prompts: list[str] = []
    for index, request in enumerate(requests):
        if request.cancel.is_set():
            outcomes[index] = Cancelled("the request was cancelled before the model started on it")
            continue
        try:
            prompts.append(prompt(request))
        except VlmToolsError as error:  # a bad request fails alone, the rest of the batch runs
            outcomes[index] = error
            continue
        live.append(index)
    if live:
        rows = generate([requests[i] for i in live], prompts)
        for index, row in zip(live, rows, strict=True):
            outcomes[index] = row if isinstance(row, Cancelled) else finish(requests[index], row)
    assert all(outcome is not None for outcome in outcomes)  # every slot was filled above
    return outcomes  # type: ignore[return-value]


def cut_row(tokens: Sequence[int], limit: int, eos_token_ids: Iterable[int]) -> list[int]:
    """The first ``limit`` tokens of a row, ending before its first EOS token."""
    eos = frozenset(eos_token_ids)
    kept: list[int] = []
    for token in tokens[:limit]:
        if token in eos:
            break
        kept.append(int(token))
    return kept


# --- where and how a model runs ---------------------------------------------------------------------------


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_device(setting: str) -> str:
    """The device to load onto: the setting itself, or for ``auto`` CUDA, then MPS, then CPU.

    An explicit device that this machine lacks is a configuration error, not a silent fallback.
    """
    if setting == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _mps_available():
            return "mps"
        return "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("--device cuda was asked for but no CUDA GPU is visible: use --device auto or cpu")
    if setting == "mps" and not _mps_available():
        raise ConfigurationError("--device mps was asked for but MPS is not available: use --device auto or cpu")
    if setting not in ("cuda", "mps", "cpu"):
        raise ConfigurationError(f"unknown device {setting!r}: use auto, cuda, mps or cpu")
    return setting


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    """Weights dtype: the setting, or for ``auto`` bfloat16 on CUDA and float32 elsewhere (CPU bf16 is slow)."""
    if setting == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    try:
        return _DTYPES[setting]
    except KeyError:
        raise ConfigurationError(f"unknown dtype {setting!r}: use auto, bfloat16, float16 or float32") from None


def quantization_config(setting: str, device: str) -> Any | None:
    """A bitsandbytes config for ``4bit`` / ``8bit`` (CUDA only), or ``None`` for ``none``."""
    if setting in ("none", "", None):
        return None
    if setting not in ("4bit", "8bit"):
        raise ConfigurationError(f"unknown quantisation {setting!r}: use none, 4bit or 8bit")
    if device != "cuda":
        raise ConfigurationError(
            f"--quantize {setting} needs a CUDA GPU (bitsandbytes); this machine has none: "
            "drop --quantize or run on a GPU host"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigurationError(
            f"--quantize {setting} needs bitsandbytes, which is not installed: pip install 'vlm-tools[quantize]'"
        )
    from transformers import BitsAndBytesConfig

    if setting == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def placement_kwargs(settings_device: str, settings_dtype: str, settings_quantize: str) -> tuple[str, dict[str, Any]]:
    """Resolve device, dtype and quantisation into ``from_pretrained`` keyword arguments.

    Returns the device and the kwargs. Quantised models are placed by ``device_map`` (bitsandbytes places
    weights while loading); others are loaded on CPU and moved with ``.to(device)`` by the caller.
    """
    device = resolve_device(settings_device)
    dtype = resolve_dtype(settings_dtype, device)
    quant = quantization_config(settings_quantize, device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": 0}
    return device, kwargs


# --- memory -----------------------------------------------------------------------------------------------


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` means the device ran out of memory."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def free_memory() -> None:
    """Collect garbage and hand cached CUDA memory back after an out-of-memory error."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
