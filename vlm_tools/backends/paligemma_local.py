"""PaliGemma 2 resident in this process: one greedy ``generate`` per batch.

It writes the processor's prompt layout itself, around each image's reused SigLIP features
(:class:`PaliGemmaBackend`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .base import Request
from .generation import left_padded
from .local import LocalBackend

if TYPE_CHECKING:
    from PIL import Image

IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class PaliGemmaImage:
    """What PaliGemma makes of one image: its projected SigLIP features, one per image token."""

    features: torch.Tensor

    @property
    def nbytes(self) -> int:
        """Device memory it takes."""
        return self.features.numel() * self.features.element_size()


class PaliGemmaBackend(LocalBackend):
    """A PaliGemma (2) checkpoint kept resident; runs a batch of one task in one ``generate`` call.

    How transformers 5's ``PaliGemmaProcessor`` lays a prompt out (read from its source): for each text that contains
    ``<image>`` it puts ``<bos>`` right after the *last* ``<image>`` and appends ``"\\n"``, then expands each
    ``<image>`` to ``image_seq_length`` image tokens. It always returns ``token_type_ids`` (all 0 for a prompt: the
    whole prompt is the bidirectional prefix; ``generate`` marks new tokens 1) and, for training, a ``labels`` tensor
    that must not reach ``generate``. ``generate`` derives position ids from the attention mask, so a left-padded row
    sees the same positions as it would alone.

    :meth:`serving_inputs` writes that layout itself around each image's projected SigLIP features
    (reused for an image seen before) and gives ``generate`` the features ready-made (``mm_encoder_outputs``);
    :meth:`reference_inputs` is the processor's own call, which the tests hold it to.
    """

    bidirectional_prefix: bool = True
    """Whether image and prompt are read as one bidirectional prefix (``token_type_ids`` 0), as Google trained
    PaliGemma and transformers runs it. ``False`` reads them causally (``token_type_ids`` 1), as vLLM's CPU
    attention does, which has no prefix-LM mask: the fixture trainer and the vLLM tests compare against that."""

    def _token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(input_ids) if self.bidirectional_prefix else torch.ones_like(input_ids)

    def reference_inputs(self, requests: Sequence[Request], prompts: Sequence[str]) -> Any:
        """The processor's batch: ``<image>`` + prompt per row, squashed square images, no training labels."""
        inputs = self.processor(
            text=[IMAGE_TOKEN + prompt for prompt in prompts], images=[r.image for r in requests],
            return_tensors="pt", padding="longest",
        )  # fmt: skip
        inputs.pop("labels", None)  # a training target built from token_type_ids; generate must not see it
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        inputs["token_type_ids"] = self._token_types(inputs["token_type_ids"])
        return inputs

    def serving_inputs(self, requests: Sequence[Request], prompts: Sequence[str]) -> Any:
        """``<image>``×N ``<bos>`` prompt ``"\\n"`` per row, left-padded; the image features ready-made."""
        images: list[PaliGemmaImage] = self.image_encodings(requests)
        prefix = IMAGE_TOKEN * self.processor.image_seq_length + self.tokenizer.bos_token
        rows = [self.tokenizer(prefix + prompt + "\n", add_special_tokens=False)["input_ids"] for prompt in prompts]
        input_ids, attention_mask = left_padded(rows, self.pad_token_id)
        features = BaseModelOutputWithPooling(pooler_output=torch.stack([image.features for image in images]))
        return {
            "input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device),
            "token_type_ids": self._token_types(input_ids).to(self.device), "mm_encoder_outputs": {"image": features},
        }  # fmt: skip

    def encode_images(self, images: Sequence[Image.Image]) -> list[PaliGemmaImage]:
        """One image-processor call and one SigLIP + projector pass for all ``images``."""
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            encoded = self.model.get_image_features(pixels.to(self.device, self.model.dtype))
        return [PaliGemmaImage(features) for features in encoded.pooler_output]
