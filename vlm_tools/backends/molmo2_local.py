"""Molmo2 (``allenai/Molmo2-4B`` …) resident in this process, through transformers' native implementation.

A batch runs as ONE ``generate`` call, whatever the sizes and aspect ratios of its images. That works because of
how transformers 5 lays Molmo2 inputs out:

* an image's crops (overlapping 378 px crops plus a low-resolution view on the hub) become one run of image tokens
  (``<low_res_im_start> <im_patch>… <im_end> <im_start> <im_patch>… <im_end>``, from its ``image_grids``); the
  vision encoder's pooled features are added, in order, onto its ``<im_patch>`` tokens, so rows may hold different
  numbers of image tokens;
* the image tokens of a row attend to each other bidirectionally through ``mm_token_type_ids`` (padding is type
  0, so left padding changes nothing), and ``generate`` derives position ids from the attention mask.

The prompt is the checkpoint's own chat template (the image hoisted to the front as ``<|image|>``, no system turn)
after BOS (= ``<|im_end|>``, which the processor puts in front). :meth:`Molmo2Backend.model_inputs` lays it out
around an image's encoding — its token ids and pooled features, reused for an image seen before — and gives
``generate`` the features ready-made (``mm_encoder_outputs``); :meth:`Molmo2Backend.prepare_inputs` is the
processor's own layout, which the tests hold it to, token for token. What runs is
:meth:`Molmo2Backend.generation_inputs`: the language model's keys and values over BOS and the image tokens depend
on the image alone (they attend to nothing after them), so they are read once per image, kept with its encoding,
and every question on that image reads only its own turn (:mod:`~vlm_tools.backends.prefixes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .base import Request
from .generation import left_padded, positions
from .local import LocalBackend
from .prefixes import Prefix, continue_from_prefixes, prefixes_from_cache

if TYPE_CHECKING:
    from PIL import Image

IMAGE_PLACEHOLDER = "<|image|>"


@dataclass(frozen=True)
class Molmo2Image:
    """What Molmo2 makes of one image: the ids of its image tokens, the pooled features added onto them and, once
    a prompt on it has been read, the language model's keys and values over BOS and those tokens."""

    token_ids: list[int]
    features: torch.Tensor
    prefix: Prefix | None = None

    @property
    def nbytes(self) -> int:
        """Device memory it takes."""
        kept = self.prefix.nbytes if self.prefix is not None else 0
        return self.features.numel() * self.features.element_size() + 8 * len(self.token_ids) + kept


class Molmo2Backend(LocalBackend):
    """A resident Molmo2 model: chat-template prompts, batched greedy generation, family parsing."""

    family = "molmo2"
    attention = "sdpa"  # exact; flash attention would drop the bidirectional mask over image tokens

    def prepare_inputs(self, requests: Sequence[Request], prompts: Sequence[str]) -> Any:
        """The processor's layout of a batch: chat template, image crops and token bookkeeping, left-padded."""
        inputs = self.processor.apply_chat_template(
            [self._conversation(request.image, prompt) for request, prompt in zip(requests, prompts, strict=True)],
            tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True,
            processor_kwargs={"padding": True, "padding_side": "left"},
        )  # fmt: skip
        return inputs.to(self.device)

    def model_inputs(self, requests: Sequence[Request], prompts: Sequence[str]) -> Any:
        """BOS, each image's tokens and the templated turn per row, left-padded; the features ready-made."""
        images: list[Molmo2Image] = self.image_encodings(requests)
        rows = [
            [*self._prefix_ids(image), *self._turn_ids(prompt)] for image, prompt in zip(images, prompts, strict=True)
        ]
        return self._read_inputs(rows, images)

    def generation_inputs(self, requests: Sequence[Request], prompts: Sequence[str]) -> Any:
        """Each row read on from its image's kept prefix (:mod:`~vlm_tools.backends.prefixes`): only the user's
        turn is read now; the prefixes not kept yet are read first, once per image, in one pass."""
        images = self.image_prefixes(requests, self.image_encodings(requests))
        return continue_from_prefixes(
            [image.prefix for image in images], [self._turn_ids(prompt) for prompt in prompts],
            pad_token_id=self.pad_token_id, config=self.model.config, device=self.device,
        )  # fmt: skip

    def image_prefixes(self, requests: Sequence[Request], images: Sequence[Molmo2Image]) -> list[Molmo2Image]:
        """``images`` with their prefix read: kept from before, or read now (each distinct image once, all in one
        pass) and kept with the image's encoding."""
        keys = [request.image_id or id(image) for request, image in zip(requests, images, strict=True)]
        kept = {key: image for key, image in zip(keys, images, strict=True) if image.prefix is not None}
        pending = {key: image for key, image in zip(keys, images, strict=True) if key not in kept}
        if not pending:
            return list(images)
        rows = [self._prefix_ids(image) for image in pending.values()]
        inputs = self._read_inputs(rows, list(pending.values()))
        inputs["position_ids"] = positions(inputs["attention_mask"])  # generate derives them so; a bare pass does not
        with torch.inference_mode():
            read = self.model.model(**inputs, use_cache=True)
        for (key, image), prefix in zip(pending.items(), prefixes_from_cache(read.cache, rows), strict=True):
            pending[key] = replace(image, prefix=prefix)
            if isinstance(key, str):
                self.encodings.put(key, pending[key], pending[key].nbytes)
        return [kept[key] if key in kept else pending[key] for key in keys]

    def _read_inputs(self, rows: list[list[int]], images: Sequence[Molmo2Image]) -> dict[str, Any]:
        """Model inputs for token rows holding ``images``' tokens in order: left-padded, the features ready-made."""
        input_ids, attention_mask = left_padded(rows, self.pad_token_id)
        types = torch.tensor(self.processor.create_mm_token_type_ids(input_ids.tolist()), dtype=torch.long)
        features = BaseModelOutputWithPooling(pooler_output=tuple(image.features for image in images))
        return {
            "input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device),
            "mm_token_type_ids": types.to(self.device), "mm_encoder_outputs": {"image": features},
        }  # fmt: skip

    def _prefix_ids(self, image: Molmo2Image) -> list[int]:
        """BOS (the processor puts it in front) and the image's tokens: the part of a prompt the image alone fixes."""
        bos = self.tokenizer.convert_tokens_to_ids(self.tokenizer.bos_token or self.tokenizer.eos_token)
        return [bos, *image.token_ids]

    def encode_images(self, images: Sequence[Image.Image]) -> list[Molmo2Image]:
        """One image-processor call and one vision-encoder pass for all ``images``."""
        processed = self.processor.image_processor(images=list(images), return_tensors="pt")
        grids = processed["image_grids"]
        with torch.inference_mode():
            encoded = self.model.get_image_features(
                processed["pixel_values"].to(self.device), processed["image_token_pooling"].to(self.device),
                grids.to(self.device),
            )  # fmt: skip
        return [
            Molmo2Image(self._image_token_ids(grid), features)
            for grid, features in zip(grids.tolist(), encoded.pooler_output, strict=True)
        ]

    def _image_token_ids(self, grid: list[int]) -> list[int]:
        """The token ids the processor writes for an image with this grid (low-resolution view, then crops)."""
        text = self.processor.replace_image_token({"image_grids": [grid]}, image_idx=0)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _turn_ids(self, prompt: str) -> list[int]:
        """The chat template's user turn and generation prompt, after the image placeholder it puts first."""
        text = self.processor.apply_chat_template(
            [self._conversation(None, prompt)], tokenize=False, add_generation_prompt=True
        )[0]
        if not text.startswith(IMAGE_PLACEHOLDER):
            raise RuntimeError(f"the chat template does not put the image first: {text[:80]!r}")
        return self.tokenizer(text[len(IMAGE_PLACEHOLDER) :], add_special_tokens=False)["input_ids"]

    @staticmethod
    def _conversation(image: Any, prompt: str) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
