"""A model resident in this process: loading, and the batched greedy path every local family shares.

A family's backend file holds only what differs (the hooks of :class:`LocalBackend`); the shared path reads
top-down in :meth:`LocalBackend.run_batch`. Imported only when a local model loads.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from abc import abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import Cancelled, ModelError, VlmToolsError
from . import generation, placement
from .base import BatchBackend, Outcome, Request
from .encodings import EncodingCache
from .hub import ModelRef, model_unavailable
from .resident import WEIGHTS_END, report_phase

if TYPE_CHECKING:
    from PIL import Image

    from ..families.base import Family
    from ..settings import Settings

log = logging.getLogger(__name__)

DEFAULT_ENCODING_CACHE_BYTES = 2_000_000_000


def prefetch_workers() -> int:
    """Threads that encode images ahead of their batch: one per CPU core, at most 4.

    The processor's work is CPU-bound torch code that releases the GIL (resizing a 2048 px page takes ~0.1 s on
    one core), so a document's pages encode in parallel while a batch generates; past 4 they only contend.
    """
    return max(1, min(4, os.cpu_count() or 1))


class LocalBackend(BatchBackend):
    """A resident model of one family; subclasses fill in the hooks.

    A family's backend file holds only what differs: its processor call (:meth:`reference_inputs`), how it encodes
    images and lays a prompt out around an encoding. Images are encoded ahead of their batch on a few threads of
    their own (:meth:`prefetch`).

    Args:
        name: what results report as ``model`` (the hub id or directory it was loaded from).
        family: the model's family (prompts, parser).
        model: the transformers model, in eval mode, on ``device``.
        processor: its processor; the tokenizer pads on the left, where generation continues every row.
        device: where the model runs.
        max_batch_size: most requests in one ``generate``.
        encoding_cache_bytes: most bytes of image encodings kept for reuse (device memory).
    """

    def __init__(
        self, name: str, family: Family, model: Any, processor: Any, *, device: str, max_batch_size: int = 8,
        encoding_cache_bytes: int = DEFAULT_ENCODING_CACHE_BYTES,
    ) -> None:  # fmt: skip
        self.name = name
        self.family = family
        self.native = family.native
        self.supported = family.supported
        self.max_batch_size = max_batch_size
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.device = device
        self.eos_token_ids = generation.stop_token_ids(model, self.tokenizer)
        self.pad_token_id = generation.pad_token_id(model, self.tokenizer, self.eos_token_ids)
        model.generation_config = generation.neutral_generation_config(model, self.eos_token_ids, self.pad_token_id)
        self.encodings = EncodingCache(encoding_cache_bytes)
        self._prefetcher = concurrent.futures.ThreadPoolExecutor(prefetch_workers(), thread_name_prefix="vlm-prefetch")

    @classmethod
    def load(cls, model: str, family: Family, settings: Settings, *, local_files_only: bool = False) -> LocalBackend:
        """Load processor and weights from a hub id or a ``save_pretrained`` directory, straight onto the device
        (from the local cache only with ``local_files_only``).

        The checkpoints' own repository code (``auto_map``) never runs: the families are native in transformers.
        """
        from transformers import AutoModelForImageTextToText, AutoProcessor

        place = placement.Placement.for_family(family, settings)
        ref = ModelRef.parse(model)
        try:
            local = {"trust_remote_code": False, "local_files_only": local_files_only, **ref.pretrained_kwargs}
            report_phase(0.02, "reading the processor")
            processor = AutoProcessor.from_pretrained(ref.model_id, **local)
            report_phase(0.05, "reading the weights")
            network = AutoModelForImageTextToText.from_pretrained(ref.model_id, **local, **place.kwargs)
        except OSError as error:  # missing files, no network, gated: say how to make the model available
            raise model_unavailable(model, error) from error
        network.eval()
        report_phase(WEIGHTS_END, "checking the model")
        log.info("loaded %s (%s) on %s: %s", model, family.name, place.describe(),
                 placement.memory_taken(network, place.device))  # fmt: skip
        return cls(
            model, family, network, processor, device=place.device, max_batch_size=settings.max_batch_size,
            encoding_cache_bytes=settings.encoding_cache_bytes,
        )  # fmt: skip

    # --- running ------------------------------------------------------------------------------------------

    def run_batch(self, requests: Sequence[Request]) -> list[Outcome]:
        """Run the requests in one ``generate`` call; per-request failures and cancellations stay in their slot.

        It reads top-down: each request's prompt from its family, :meth:`serving_inputs` (the left-padded batch,
        each image's encoding reused or made), one greedy ``generate``
        (:func:`~vlm_tools.backends.generation.generate_rows`), and each row decoded and read by the family's parser.
        """
        outcomes: list[Outcome | None] = [None] * len(requests)
        live: list[int] = []
        prompts: list[str] = []
        for index, request in enumerate(requests):
            if request.cancel.is_set():
                outcomes[index] = Cancelled("the request was cancelled before the model started on it")
                continue
            try:
                prompts.append(self.family.prompt(request))
            except VlmToolsError as error:  # a bad request fails alone, the rest of the batch runs
                outcomes[index] = error
                continue
            live.append(index)
        if live:
            batch = [requests[i] for i in live]
            inputs = self.serving_inputs(batch, prompts)
            rows = generation.generate_rows(
                self.model, inputs, batch, eos_token_ids=self.eos_token_ids, pad_token_id=self.pad_token_id
            )
            for index, row in zip(live, rows, strict=True):
                outcomes[index] = row if isinstance(row, Cancelled) else self._interpret(requests[index], row)
        return [outcome for outcome in outcomes if outcome is not None]

    @abstractmethod
    def reference_inputs(self, requests: Sequence[Request], prompts: Sequence[str]) -> Any:
        """The left-padded model inputs of a batch from the family's processor alone (pixels included, nothing
        reused): what every faster layout must equal, and what training feeds the model."""

    @abstractmethod
    def serving_inputs(self, requests: Sequence[Request], prompts: Sequence[str]) -> Any:
        """What ``generate`` is given when serving a batch, on the device: each image's encoding reused or made
        (:meth:`image_encodings`), so that every row gets what :meth:`reference_inputs` would give it."""

    @abstractmethod
    def encode_images(self, images: Sequence[Image.Image]) -> list[Any]:
        """What the model makes of each image (one processor call and one vision-encoder pass for them all); each
        encoding has ``nbytes``."""

    def decode(self, tokens: Sequence[int]) -> str:
        """One row's new tokens as text. Special tokens are dropped: the families' geometry is in ordinary tokens
        (Molmo2's points are text; PaliGemma's ``<locNNNN>`` tokens are not special)."""
        return self.tokenizer.decode(tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _interpret(self, request: Request, tokens: Sequence[int]) -> Outcome:
        raw = self.decode(tokens)
        try:
            return self.family.interpret(request, raw)
        except VlmToolsError as error:
            return error
        except Exception as error:  # the contract says interpret never raises; if it does, only this row fails
            log.exception("interpreting the output of %s failed", self.name)
            return ModelError(f"could not read the model's answer ({type(error).__name__}); raw output: {raw[:200]!r}")

    # --- image encodings: reused, or made ahead of the batch ----------------------------------------------

    def prefetch(self, request: Request) -> None:
        """Start encoding ``request``'s image on a prefetch thread, unless it is known already."""
        if request.image_id in self.encodings:
            return
        request.ahead = self._prefetcher.submit(self._encode_one, request)

    def image_encodings(self, requests: Sequence[Request]) -> list[Any]:
        """Each request's image encoding: kept from before, made ahead of the batch, or made now (the rest
        together, in one pass)."""
        found: list[Any] = [self.encodings.get(r.image_id) for r in requests]
        for index, request in enumerate(requests):
            ahead, request.ahead = request.ahead, None
            if found[index] is None and ahead is not None and not ahead.cancel():
                found[index] = ahead.result()  # started (or done) already: wait for it rather than redo it
        missing = [i for i, encoding in enumerate(found) if encoding is None]
        if missing:
            for index, encoding in zip(missing, self.encode_images([requests[i].image for i in missing]), strict=True):
                found[index] = encoding
                self.encodings.put(requests[index].image_id, encoding, encoding.nbytes, replace=False)
        return found

    def _encode_one(self, request: Request) -> Any:
        (encoding,) = self.encode_images([request.image])
        # replace=False: a batch may have kept a fuller encoding of this image meanwhile (Molmo2: with its prefix)
        self.encodings.put(request.image_id, encoding, encoding.nbytes, replace=False)
        return encoding

    # --- resources ----------------------------------------------------------------------------------------

    def forget_image(self, image_id: str) -> None:
        """Drop the encoding of an image that left the image store."""
        self.encodings.forget(image_id)

    def is_oom(self, error: BaseException) -> bool:
        """Whether ``error`` is a device out-of-memory error (the engine then splits the batch)."""
        return placement.is_oom(error)

    def free_memory(self) -> None:
        """Give cached device memory back (kept encodings first)."""
        self.encodings.clear()
        placement.free_memory()

    def close(self) -> None:
        """Drop the model and free its memory."""
        self._prefetcher.shutdown(wait=True, cancel_futures=True)
        self.model = None
        self.encodings.clear()
        placement.free_memory()
