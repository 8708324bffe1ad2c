"""Molmo (0924: ``allenai/Molmo-7B-D-0924``, ``-7B-O-0924``, ``-72B-0924``, ``MolmoE-1B-0924``) in this process.

These checkpoints exist only as remote code in their hub repositories (``trust_remote_code``), and that code is
known to break on transformers 5.x. This backend runs it the way the model card shows
(``processor.process`` + ``model.generate_from_batch``) for environments where it still works; everywhere else
loading fails with a :class:`~vlm_tools.errors.ConfigurationError` that names the way that does work: vLLM with
``--trust-remote-code`` behind ``--backend openai``, or Molmo2.

The remote code has no batched entry point, so a batch holds one request (``max_batch_size = 1``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import Cancelled, ConfigurationError, ModelError, VlmToolsError
from .base import Backend, Outcome, Request
from .family import Family, get_family

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger(__name__)

UNSUPPORTED_MESSAGE = (
    "Molmo (0924) checkpoints run on remote code that does not work with transformers 5.x; serve them with vLLM "
    "(--trust-remote-code) and use --backend openai, or use Molmo2"
)
"""What every failure to load a Molmo 0924 checkpoint says first."""

END_OF_TEXT = "<|endoftext|>"


class MolmoBackend(Backend):
    """A resident Molmo 0924 model on its own remote code; one request per ``generate`` call."""

    family = "molmo"
    max_batch_size = 1

    def __init__(self, name: str, model: Any, processor: Any, device: str, family: Family) -> None:
        self.name = name
        self.model = model
        self.processor = processor
        self.device = device
        self.prompts = family
        self.native = family.native
        self.supported = family.supported

    @classmethod
    def load(cls, model: str, settings: Settings) -> MolmoBackend:
        """Load through the repository's code; any failure becomes a ConfigurationError with the way out."""
        if not settings.trust_remote_code:
            raise ConfigurationError(
                f"{UNSUPPORTED_MESSAGE}. ({model} loads only with --trust-remote-code, which runs code from its "
                "repository.)"
            )
        from transformers import AutoModelForCausalLM, AutoProcessor

        from .generation import placement_kwargs

        device, model_kwargs = placement_kwargs(settings.device, settings.dtype, settings.quantize)
        try:
            processor = AutoProcessor.from_pretrained(model, trust_remote_code=True)
            network = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=True, **model_kwargs)
            if "quantization_config" not in model_kwargs:
                network = network.to(device)
            network.eval()
            if not hasattr(processor, "process") or not hasattr(network, "generate_from_batch"):
                raise TypeError("the loaded classes lack process() / generate_from_batch()")
        except ConfigurationError:
            raise
        except Exception as error:  # remote code fails in many ways (imports, removed APIs, shapes)
            detail = str(error).splitlines()[0] if str(error) else ""
            raise ConfigurationError(
                f"{UNSUPPORTED_MESSAGE}. (Loading {model} failed: {type(error).__name__}: {detail[:300]})"
            ) from error
        log.info("loaded Molmo 0924 %s on %s through its remote code", model, device)
        return cls(model, network, processor, device, get_family("molmo"))

    def run_batch(self, requests: Sequence[Request]) -> list[Outcome]:
        """Run each request on its own (the remote code cannot batch)."""
        return [self._run_one(request) for request in requests]

    def _run_one(self, request: Request) -> Outcome:
        if request.cancel.is_set():
            return Cancelled("the request was cancelled before the model started on it")
        try:
            prompt = self.prompts.prompt(request)
        except VlmToolsError as error:
            return error
        raw = self._generate(request, prompt)
        if isinstance(raw, Cancelled):
            return raw
        try:
            return self.prompts.interpret(request, raw)
        except VlmToolsError as error:
            return error
        except Exception as error:  # interpret never raises by contract; if it does, only this request fails
            log.exception("interpreting Molmo output failed")
            return ModelError(f"could not read the model's answer ({type(error).__name__}); raw output: {raw[:200]!r}")

    def _generate(self, request: Request, prompt: str) -> str | Cancelled:
        import torch
        from transformers import GenerationConfig, StoppingCriteriaList

        from .generation import RowStopping

        image = request.image if request.image.mode == "RGB" else request.image.convert("RGB")
        processed = self.processor.process(images=[image], text=prompt)
        # process() returns one unbatched example; the model takes a batch of one.
        inputs = {key: value.to(self.device).unsqueeze(0) for key, value in processed.items()}
        if "images" in inputs:
            inputs["images"] = inputs["images"].to(self.model.dtype)
        tokenizer = self.processor.tokenizer
        limit = max(1, int(request.max_new_tokens))
        prompt_length = int(inputs["input_ids"].shape[1])
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        stopping = RowStopping(prompt_length, [limit], [request.cancel], eos)
        with torch.inference_mode():
            output = self.model.generate_from_batch(
                inputs,
                GenerationConfig(max_new_tokens=limit, stop_strings=END_OF_TEXT, do_sample=False),
                tokenizer=tokenizer,
                stopping_criteria=StoppingCriteriaList([stopping]),
            )
        if stopping.cancelled[0]:
            return Cancelled("the request was cancelled while the model was generating")
        return tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)

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
