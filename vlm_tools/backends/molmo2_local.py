"""Molmo2 (``allenai/Molmo2-4B`` …) resident in this process, through transformers' native implementation.

A batch runs as ONE ``generate`` call, whatever the sizes and aspect ratios of its images. That works because of
how transformers 5.23 lays Molmo2 inputs out:

* ``pixel_values`` are the crops of all images concatenated (``[total_crops, patches, pixels]``), with
  ``image_token_pooling`` indices already offset per image and ``image_grids`` / ``image_num_crops`` one row per
  image — there is no per-row image tensor that would need equal shapes;
* the model splits the pooled features per image and scatters them, in order, onto the ``<im_patch>`` tokens of
  ``input_ids``, so rows may hold different numbers of image tokens;
* the image tokens of a row attend to each other bidirectionally through ``mm_token_type_ids`` (padding is type
  0, so left padding changes nothing), and ``generate`` derives position ids from the attention mask.

So the prompts are rendered with the processor's chat template for the whole batch and left-padded; greedy
decoding then gives every row the tokens it would get alone (the tests check exactly that).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import Cancelled, ModelError, VlmToolsError
from .base import Backend, Outcome, Request
from .family import Family, get_family

if TYPE_CHECKING:
    from PIL import Image

    from ..settings import Settings

log = logging.getLogger(__name__)


class Molmo2Backend(Backend):
    """A resident Molmo2 model: chat-template prompts, batched greedy generation, family parsing."""

    family = "molmo2"

    def __init__(
        self, name: str, model: Any, processor: Any, device: str, family: Family, max_batch_size: int = 8
    ) -> None:
        self.name = name
        self.model = model
        self.processor = processor
        self.device = device
        self.prompts = family
        self.native = family.native
        self.supported = family.supported
        self.max_batch_size = max_batch_size
        tokenizer = processor.tokenizer
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        pad = getattr(model.generation_config, "pad_token_id", None)
        if pad is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_token_ids)
        self.pad_token_id = int(pad)

    @classmethod
    def load(cls, model: str, settings: Settings) -> Molmo2Backend:
        """Load processor and model from a hub id or a ``save_pretrained`` directory, onto the configured device."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .generation import placement_kwargs
        from .loading import model_unavailable

        device, model_kwargs = placement_kwargs(settings.device, settings.dtype, settings.quantize)
        # Molmo2 is native in transformers; the hub repositories still carry their original remote code (auto_map).
        # Never run it, whatever --trust-remote-code says (that flag is for Molmo 0924).
        try:
            processor = AutoProcessor.from_pretrained(model, trust_remote_code=False)
            network = AutoModelForImageTextToText.from_pretrained(model, trust_remote_code=False, **model_kwargs)
        except OSError as error:  # missing files, no network, gated: say how to make the model available
            raise model_unavailable(model, error) from error
        if "quantization_config" not in model_kwargs:
            network = network.to(device)
        network.eval()
        processor.tokenizer.padding_side = "left"  # generation continues every row from its last real token
        log.info("loaded Molmo2 %s on %s (%s)", model, device, model_kwargs.get("dtype"))
        return cls(model, network, processor, device, get_family("molmo2"), max_batch_size=settings.max_batch_size)

    # --- running ------------------------------------------------------------------------------------------

    def run_batch(self, requests: Sequence[Request]) -> list[Outcome]:
        """Run the requests in one ``generate`` call; per-request failures and cancellations stay in their slot."""
        from .generation import run_rows

        return run_rows(requests, prompt=self.prompts.prompt, generate=self._generate, finish=self._interpret)

    def _generate(self, requests: Sequence[Request], prompts: Sequence[str]) -> list[str | Cancelled]:
        """Raw text (or ``Cancelled``) per request, from one batched greedy ``generate``."""
        from .generation import generate_rows

        inputs = self.prepare_inputs(requests, prompts)
        rows = generate_rows(
            self.model, inputs, requests, eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id
        )
        tokenizer = self.processor.tokenizer
        # Molmo2 writes points as plain text (<points coords="…">), so dropping special tokens loses nothing.
        return [
            row if isinstance(row, Cancelled) else tokenizer.decode(row, skip_special_tokens=True) for row in rows
        ]

    def prepare_inputs(self, requests: Sequence[Request], prompts: Sequence[str]) -> Any:
        """The left-padded model inputs for a batch: chat template, image crops and token bookkeeping."""
        conversations = [
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": _rgb(request.image)},
                        {"type": "text", "text": prompt},
                    ],
                }
            ]
            for request, prompt in zip(requests, prompts, strict=True)
        ]
        inputs = self.processor.apply_chat_template(
            conversations,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            add_generation_prompt=True,
            # Text a caller wrote that spells a control token ("<|image|>", "<im_patch>", "<|im_end|>") is encoded
            # as plain text: it can neither add an image placeholder nor end the user turn.
            sanitize_control_tokens=True,
            processor_kwargs={"padding": True, "padding_side": "left"},
        )
        return inputs.to(self.device)

    def _interpret(self, request: Request, raw: str) -> Outcome:
        try:
            return self.prompts.interpret(request, raw)
        except VlmToolsError as error:
            return error
        except Exception as error:  # the contract says interpret never raises; if it does, only this row fails
            log.exception("interpreting Molmo2 output failed")
            return ModelError(f"could not read the model's answer ({type(error).__name__}); raw output: {raw[:200]!r}")

    # --- resources ----------------------------------------------------------------------------------------

    def is_oom(self, error: BaseException) -> bool:
        """Whether ``error`` is a device out-of-memory error."""
        from .generation import is_oom

        return is_oom(error)

    def free_memory(self) -> None:
        """Give cached device memory back."""
        from .generation import free_memory

        free_memory()

    def close(self) -> None:
        """Drop the model and free its memory."""
        self.model = None
        self.free_memory()


def _rgb(image: Image.Image) -> Image.Image:
    """The image in RGB (the processor would convert too; doing it here keeps alpha and palettes predictable)."""
    return image if image.mode == "RGB" else image.convert("RGB")


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends an answer: the generation config's EOS ids and the tokenizer's EOS."""
    configured = getattr(model.generation_config, "eos_token_id", None)
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
