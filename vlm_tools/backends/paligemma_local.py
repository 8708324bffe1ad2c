"""PaliGemma 2 resident in this process: one processor call and one greedy ``generate`` per batch.

How transformers 5.23's ``PaliGemmaProcessor`` lays a prompt out (read from its source): for each text that
contains ``<image>`` it puts ``<bos>`` right after the *last* ``<image>`` and appends ``"\\n"``, then expands each
``<image>`` to ``image_seq_length`` image tokens. Prompts without ``<image>`` also work but log a warning on every
call, so this backend writes the ``<image>`` itself. The processor always returns ``token_type_ids`` (all 0 for a
prompt: the whole prompt is the bidirectional prefix; ``generate`` marks new tokens 1) and, for training, a
``labels`` tensor that must not reach ``generate``. Gemma's tokenizer pads on the left, which a decoder-only
``generate`` needs; ``generate`` derives position ids from the attention mask, so a padded row sees the same
positions as it would alone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import Cancelled
from ..settings import Settings
from . import generation
from .base import Backend, Outcome, Request
from .family import get_family

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"


class PaliGemmaBackend(Backend):
    """A PaliGemma (2) checkpoint kept resident; runs a batch of one task in one ``generate`` call."""

    def __init__(
        self, name: str, model: Any, processor: Any, *, device: str, dtype: torch.dtype, max_batch_size: int
    ) -> None:
        self.name = name
        self.family_impl = get_family("paligemma")
        self.family = self.family_impl.name
        self.native = self.family_impl.native
        self.supported = self.family_impl.supported
        self.max_batch_size = max_batch_size
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # Left padding: every row's last prompt token sits at the end, where generation continues.
        self.tokenizer.padding_side = "left"
        self.device = device
        self.dtype = dtype
        self.eos_token_ids = _eos_ids(model, self.tokenizer)
        self.pad_token_id = int(
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        )
        self._reserved = _reserved_token_pattern(self.tokenizer)

    @classmethod
    def load(cls, model: str, settings: Settings) -> PaliGemmaBackend:
        """Load processor and weights from a hub id or a local directory, placed as ``settings`` say."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .loading import model_unavailable

        device, kwargs = generation.placement_kwargs(settings.device, settings.dtype, settings.quantize)
        try:
            processor = AutoProcessor.from_pretrained(model)
            network = AutoModelForImageTextToText.from_pretrained(model, **kwargs)
        except OSError as error:  # weights or processor files missing, gated, or not downloadable
            raise model_unavailable(model, error) from error
        if "device_map" not in kwargs:
            network = network.to(device)
        network.eval()
        log.info("loaded %s on %s (%s)", model, device, kwargs["dtype"])
        return cls(
            model, network, processor, device=device, dtype=kwargs["dtype"], max_batch_size=settings.max_batch_size
        )

    # --- running ------------------------------------------------------------------------------------------

    def run_batch(self, requests: Sequence[Request]) -> list[Outcome]:
        """Prompt, generate and interpret a batch; a bad or cancelled request fails alone in its slot."""
        return generation.run_rows(
            requests,
            prompt=lambda request: IMAGE_TOKEN + self._neutralise(self.family_impl.prompt(request)),
            generate=self._generate,
            finish=self._interpret,
        )

    def _interpret(self, request: Request, row: list[int]) -> Outcome:
        # Location tokens are special tokens: decode with them kept, the family parser reads them.
        raw = self.tokenizer.decode(row, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return self.family_impl.interpret(request, raw)

    def _generate(self, requests: Sequence[Request], prompts: list[str]) -> list[list[int] | Cancelled]:
        images = [r.image if r.image.mode == "RGB" else r.image.convert("RGB") for r in requests]
        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding="longest")
        inputs.pop("labels", None)  # a training target built from token_type_ids; generate must not see it
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return generation.generate_rows(
            self.model, inputs, requests, eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id
        )

    def _neutralise(self, prompt: str) -> str:
        """Break up text that spells a reserved token (``<image>``, ``<eos>``, ``<loc0001>``…) in user input.

        The processor places ``<bos>`` after the last ``<image>`` it finds and the tokenizer turns such spellings
        into control tokens; a question containing one must stay plain text.
        """
        return self._reserved.sub(lambda m: "< " + m.group(0)[1:], prompt)

    # --- memory -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the weights and give cached device memory back."""
        self.model = None
        generation.free_memory()

    def is_oom(self, error: BaseException) -> bool:
        """Out of device memory (the engine then splits the batch)."""
        return generation.is_oom(error)

    def free_memory(self) -> None:
        """Collect garbage and empty the CUDA cache."""
        generation.free_memory()


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids from the generation config (one id or a list), falling back to the tokenizer's."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = tokenizer.eos_token_id
    ids = configured if isinstance(configured, (list, tuple)) else [configured]
    return [int(i) for i in ids if i is not None]


def _reserved_token_pattern(tokenizer: Any) -> re.Pattern[str]:
    """A regex matching every angle-bracketed special or added token the tokenizer would treat as control."""
    tokens = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    bracketed = sorted((t for t in tokens if t.startswith("<") and t.endswith(">")), key=len, reverse=True)
    if not bracketed:
        return re.compile(r"(?!)")
    return re.compile("|".join(re.escape(t) for t in bracketed))
