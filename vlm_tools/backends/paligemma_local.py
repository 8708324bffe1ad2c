"""PaliGemma 2 resident in this process: one processor call and one greedy ``generate`` per batch.

How transformers 5's ``PaliGemmaProcessor`` lays a prompt out (read from its source): for each text that contains
``<image>`` it puts ``<bos>`` right after the *last* ``<image>`` and appends ``"\\n"``, then expands each
``<image>`` to ``image_seq_length`` image tokens. Prompts without ``<image>`` also work but log a warning on every
call, so this backend writes the ``<image>`` itself. The processor always returns ``token_type_ids`` (all 0 for a
prompt: the whole prompt is the bidirectional prefix; ``generate`` marks new tokens 1) and, for training, a
``labels`` tensor that must not reach ``generate``. ``generate`` derives position ids from the attention mask, so
a left-padded row sees the same positions as it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from .base import Request
from .local import LocalBackend

IMAGE_TOKEN = "<image>"


class PaliGemmaBackend(LocalBackend):
    """A PaliGemma (2) checkpoint kept resident; runs a batch of one task in one ``generate`` call."""

    family = "paligemma"
    # Gemma 2 soft-caps its attention scores, which SDPA cannot do: transformers refuses it for the text model, so
    # the text model runs eager attention (exact); the SigLIP vision tower has no soft-capping and runs SDPA.
    attention: ClassVar[str | dict[str, str]] = {"text_config": "eager", "vision_config": "sdpa"}

    def prepare_inputs(self, requests: Sequence[Request], prompts: Sequence[str]) -> Any:
        """The left-padded batch: ``<image>`` + prompt per row, squashed square images, no training labels."""
        inputs = self.processor(
            text=[IMAGE_TOKEN + prompt for prompt in prompts], images=[r.image for r in requests],
            return_tensors="pt", padding="longest",
        )  # fmt: skip
        inputs.pop("labels", None)  # a training target built from token_type_ids; generate must not see it
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs
