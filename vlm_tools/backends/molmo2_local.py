"""Molmo2 (``allenai/Molmo2-4B`` …) resident in this process, through transformers' native implementation.

A batch runs as ONE ``generate`` call, whatever its images, and a follow-up question on an image reads only its
own turn where the checkpoint's template allows (see :class:`Molmo2Backend`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .base import Request, Task
from .generation import generate_rows, left_padded, positions
from .local import LocalBackend
from .molmo2_layout import Molmo2Layout, conversation, plan_layout, probe_image
from .prefixes import Prefix, continue_from_prefixes, prefixes_from_cache

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Molmo2Image:
    """What Molmo2 makes of one image: the ids of its image tokens, the pooled features added onto them and, once
    a prompt on it has been read, the language model's keys and values over the prompt up to and with the image."""

    token_ids: list[int]
    features: torch.Tensor
    prefix: Prefix | None = None

    @property
    def nbytes(self) -> int:
        """Device memory it takes."""
        kept = self.prefix.nbytes if self.prefix is not None else 0
        return self.features.numel() * self.features.element_size() + 8 * len(self.token_ids) + kept


class Molmo2Backend(LocalBackend):
    """A resident Molmo2 model: its chat template probed at load, batched greedy generation, family parsing.

    A batch runs as ONE ``generate`` call, whatever the sizes and aspect ratios of its images: an image's crops become
    one run of image tokens whose pooled features are added, in order, onto its ``<im_patch>`` tokens (rows may hold
    different numbers of them); the image tokens of a row attend to each other bidirectionally through
    ``mm_token_type_ids`` (padding is type 0, so left padding changes nothing); ``generate`` derives position ids from
    the attention mask.

    How a prompt is laid out around an image is the checkpoint's own chat template, probed at load
    (:mod:`~vlm_tools.backends.molmo2_layout`): where everything up to the image is the same for every prompt, the
    language model's keys and values over it are read once per image and kept with its encoding, and each question
    reads only its own turn (:mod:`~vlm_tools.backends.prefixes`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.layout = plan_layout(self.processor)
        if self.layout.mode == "prefix":
            self.layout = self._check_prefix_path(self.layout)
        log.info("%s reads prompts by %s", self.name, self.layout.describe())

    def reference_inputs(self, requests: Sequence[Request], prompts: Sequence[str]) -> Any:
        """The processor's layout of a batch: chat template, image crops and token bookkeeping, left-padded."""
        inputs = self.processor.apply_chat_template(
            [conversation(request.image, prompt) for request, prompt in zip(requests, prompts, strict=True)],
            tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True,
            processor_kwargs={"padding": True, "padding_side": "left"},
        )  # fmt: skip
        return inputs.to(self.device)

    def serving_inputs(self, requests: Sequence[Request], prompts: Sequence[str]) -> Any:
        """The batch laid out by the probed layout: read on from kept prefixes, around reused encodings, or by the
        processor."""
        if self.layout.mode == "processor":
            return self.reference_inputs(requests, prompts)
        if self.layout.mode == "reuse":
            return self.encoded_inputs(requests, prompts)
        turns = [self.layout.turn_ids(prompt) for prompt in prompts]
        images = self.image_prefixes(requests, self.image_encodings(requests))
        return continue_from_prefixes(
            [image.prefix for image in images], turns, pad_token_id=self.pad_token_id, config=self.model.config,
            device=self.device,
        )  # fmt: skip

    def encoded_inputs(self, requests: Sequence[Request], prompts: Sequence[str]) -> dict[str, Any]:
        """Each row's whole prompt around its image's reused encoding, left-padded; the features ready-made."""
        images: list[Molmo2Image] = self.image_encodings(requests)
        rows = [self.layout.row_ids(prompt, image.token_ids) for image, prompt in zip(images, prompts, strict=True)]
        return self._read_inputs(rows, images)

    def image_prefixes(self, requests: Sequence[Request], images: Sequence[Molmo2Image]) -> list[Molmo2Image]:
        """``images`` with their prefix read: kept from before, or read now (each distinct image once, all in one
        pass) and kept with the image's encoding."""
        keys = [request.image_id or id(image) for request, image in zip(requests, images, strict=True)]
        kept = {key: image for key, image in zip(keys, images, strict=True) if image.prefix is not None}
        pending = {key: image for key, image in zip(keys, images, strict=True) if key not in kept}
        if not pending:
            return list(images)
        head = self.layout.head_ids()
        rows = [[*head, *image.token_ids] for image in pending.values()]
        inputs = self._read_inputs(rows, list(pending.values()))
        inputs["position_ids"] = positions(inputs["attention_mask"])  # generate derives them so; a bare pass does not
        with torch.inference_mode():
            read = self.model.model(**inputs, use_cache=True)
        for (key, image), prefix in zip(pending.items(), prefixes_from_cache(read.cache, rows), strict=True):
            pending[key] = replace(image, prefix=prefix)
            if isinstance(key, str):
                self.encodings.put(key, pending[key], pending[key].nbytes)
        return [kept[key] if key in kept else pending[key] for key in keys]

    def _check_prefix_path(self, layout: Molmo2Layout) -> Molmo2Layout:
        """Read one probe question on from a kept prefix; on any failure (a wrapped model, a language model that
        keeps only a window of keys) serve by encoding reuse instead."""
        probe = Request(Task.ANSWER, probe_image(), text="What is this?", max_new_tokens=1)
        try:
            inputs = self.serving_inputs([probe], [self.family.prompt(probe)])
            generate_rows(self.model, inputs, [probe], eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id)
        except Exception as error:  # noqa: BLE001 - any failure means the prefix path is not for this checkpoint
            log.warning("%s: reading on from a kept image prefix failed on a probe (%s: %s); serving by encoding "
                        "reuse", self.name, type(error).__name__, error)  # fmt: skip
            return replace(layout, mode="reuse", reason=f"a kept prefix failed on a probe: {type(error).__name__}")
        return layout

    def _read_inputs(self, rows: list[list[int]], images: Sequence[Molmo2Image]) -> dict[str, Any]:
        """Model inputs for token rows holding ``images``' tokens in order: left-padded, the features ready-made."""
        input_ids, attention_mask = left_padded(rows, self.pad_token_id)
        types = torch.tensor(self.processor.create_mm_token_type_ids(input_ids.tolist()), dtype=torch.long)
        features = BaseModelOutputWithPooling(pooler_output=tuple(image.features for image in images))
        return {
            "input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device),
            "mm_token_type_ids": types.to(self.device), "mm_encoder_outputs": {"image": features},
        }  # fmt: skip

    def prefetch(self, request: Request) -> None:
        """Encode ahead of the batch, unless the processor lays every prompt out (nothing to reuse then)."""
        if self.layout.mode != "processor":
            super().prefetch(request)

    def encode_images(self, images: Sequence[Image.Image]) -> list[Molmo2Image]:
        """One image-processor call and one vision-encoder pass for all ``images``."""
        processed = self.processor.image_processor(images=list(images), return_tensors="pt")
        grids = processed["image_grids"]
        # transformers 5.25 indexes each image's pooling within that image and wants its crop count to batch them;
        # 5.24's processor gives none and its pooling indexes the whole batch. Pass what the processor gave.
        crops = {key: processed[key].to(self.device) for key in ("image_num_crops",) if key in processed}
        with torch.inference_mode():
            encoded = self.model.get_image_features(
                processed["pixel_values"].to(self.device), processed["image_token_pooling"].to(self.device),
                grids.to(self.device), **crops,
            )  # fmt: skip
        return [
            Molmo2Image(self._image_token_ids(grid), features)
            for grid, features in zip(grids.tolist(), encoded.pooler_output, strict=True)
        ]

    def _image_token_ids(self, grid: list[int]) -> list[int]:
        """The token ids the processor writes for an image with this grid (low-resolution view, then crops)."""
        text = self.processor.replace_image_token({"image_grids": [grid]}, image_idx=0)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
