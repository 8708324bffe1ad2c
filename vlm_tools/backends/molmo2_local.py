"""Molmo2 (``allenai/Molmo2-4B`` …) resident in this process, through transformers' native implementation.

A batch runs as ONE ``generate`` call, whatever the sizes and aspect ratios of its images. That works because of
how transformers 5 lays Molmo2 inputs out:

* ``pixel_values`` are the crops of all images concatenated (``[total_crops, patches, pixels]``), with
  ``image_token_pooling`` indices already offset per image and ``image_grids`` / ``image_num_crops`` one row per
  image — there is no per-row image tensor that would need equal shapes;
* the model splits the pooled features per image and scatters them, in order, onto the ``<im_patch>`` tokens of
  ``input_ids``, so rows may hold different numbers of image tokens;
* the image tokens of a row attend to each other bidirectionally through ``mm_token_type_ids`` (padding is type
  0, so left padding changes nothing), and ``generate`` derives position ids from the attention mask.

So the prompts are rendered with the checkpoint's own chat template (the image hoisted to the front as
``<|image|>``, no system turn; the processor puts BOS in front) for the whole batch and left-padded; greedy
decoding then gives every row the tokens it would get alone (the tests check exactly that).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Request
from .local import LocalBackend


class Molmo2Backend(LocalBackend):
    """A resident Molmo2 model: chat-template prompts, batched greedy generation, family parsing."""

    family = "molmo2"
    attention = "sdpa"  # exact; flash attention would drop the bidirectional mask over image tokens

    def prepare_inputs(self, requests: Sequence[Request], prompts: Sequence[str]) -> Any:
        """The left-padded model inputs for a batch: chat template, image crops and token bookkeeping."""
        conversations = [
            [{"role": "user", "content": [{"type": "image", "image": request.image}, {"type": "text", "text": prompt}]}]
            for request, prompt in zip(requests, prompts, strict=True)
        ]
        inputs = self.processor.apply_chat_template(
            conversations,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            add_generation_prompt=True,
            processor_kwargs={"padding": True, "padding_side": "left"},
        )
        return inputs.to(self.device)
