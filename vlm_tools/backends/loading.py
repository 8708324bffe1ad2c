"""Loading local models: read each model's family from its config, load the matching backend, skip the unavailable.

The family is read from the model's ``config.json`` (``model_type``), never guessed from its name, so a local
directory, a fine-tune under any name and a hub id all take the same path. Importing this module does not import
torch or transformers; they load inside the functions that need them.

Hub downloads report progress through huggingface_hub's tqdm bars, which write to stderr (tqdm's default;
neither huggingface_hub nor transformers points them at stdout), so the stdio MCP transport stays clean.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from ..settings import Settings
    from .base import Backend

log = logging.getLogger(__name__)

MODEL_TYPES: dict[str, str] = {"paligemma": "paligemma", "molmo2": "molmo2", "molmo": "molmo"}
"""``config.model_type`` → family. Molmo 0924 remote-code checkpoints declare ``molmo``."""

PALIGEMMA_LICENCE_URL = "https://huggingface.co/google/paligemma2-3b-mix-448"


class ModelUnavailable(ConfigurationError):
    """The model cannot be fetched or found: gated without access, missing, or no network and not cached."""


def _looks_local(model: str) -> bool:
    """Whether ``model`` names a filesystem path rather than a hub id (``org/name``)."""
    return (
        os.path.isabs(model)
        or model.startswith(("./", "../", "~", ".\\", "..\\"))
        or model in (".", "..")
        or Path(model).expanduser().exists()
    )


def model_unavailable(model: str, error: BaseException) -> ModelUnavailable:
    """Turn a hub/filesystem failure into a message that says how to make the model available."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    text = " ".join(str(e) for e in chain).lower()
    gated = any(isinstance(e, GatedRepoError) for e in chain) or "gated repo" in text
    if gated:
        url = PALIGEMMA_LICENCE_URL if "paligemma" in model.lower() else f"https://huggingface.co/{model}"
        return ModelUnavailable(
            f"{model} is a gated model and this machine has no access: accept the licence at {url} and set "
            "HF_TOKEN to a token of that account, or pass --model with a local directory holding the model"
        )
    if any(isinstance(e, RepositoryNotFoundError) for e in chain) or "not a valid model identifier" in text:
        return ModelUnavailable(
            f"{model} was not found on the Hugging Face hub (or it is private): check the id, set HF_TOKEN for a "
            "private model, or pass --model with a local directory holding the model"
        )
    from huggingface_hub import constants

    offline = constants.is_offline_mode()
    where = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
    return ModelUnavailable(
        f"{model} is not in the local cache and {where}: download it once with network access "
        f"(huggingface-cli download {model}), or pass --model with a local directory holding the model "
        f"(detail: {str(error).splitlines()[0] if str(error) else type(error).__name__})"
    )


def read_family(model: str, *, trust_remote_code: bool = False) -> str:
    """The family of ``model`` (hub id or local directory), read from its ``config.json`` ``model_type``.

    The config is read as data (``PretrainedConfig.get_config_dict``), so no repository code runs whatever
    ``trust_remote_code`` says; the flag only shapes the message for a model_type that exists only as remote
    code. Raises :class:`ModelUnavailable` when the config cannot be fetched or found, and
    :class:`ConfigurationError` for a family this server does not support.
    """
    if _looks_local(model):
        directory = Path(model).expanduser()
        if not directory.is_dir():
            raise ModelUnavailable(
                f"{model} is not a directory: pass --model with a directory made by save_pretrained, or a hub id "
                "such as google/paligemma2-3b-mix-448"
            )
        if not (directory / "config.json").is_file():
            raise ModelUnavailable(
                f"{model} holds no config.json: pass a directory made by save_pretrained (model and processor)"
            )
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(model)
    except (OSError, ValueError) as error:  # hub errors arrive wrapped in OSError by transformers
        raise model_unavailable(model, error) from error
    model_type = str(config.get("model_type", ""))
    family = MODEL_TYPES.get(model_type)
    if family is None:
        supported = ", ".join(sorted(MODEL_TYPES))
        hint = ""
        if config.get("auto_map") and not trust_remote_code:
            hint = " (its code lives in its repository; even with --trust-remote-code only these families are served)"
        raise ConfigurationError(
            f"{model} has model_type {model_type or '(none)'!r}, which this server does not serve{hint}: "
            f"supported model types are {supported}"
        )
    return family


def load_backend(model: str, settings: Settings) -> Backend:
    """Load ``model`` as a resident backend of its family (read from its config)."""
    family = read_family(model, trust_remote_code=settings.trust_remote_code)
    log.info(
        "loading %s (family %s) on device=%s dtype=%s quantize=%s",
        model,
        family,
        settings.device,
        settings.dtype,
        settings.quantize,
    )
    if family == "paligemma":
        from .paligemma_local import PaliGemmaBackend

        return PaliGemmaBackend.load(model, settings)
    if family == "molmo2":
        from .molmo2_local import Molmo2Backend

        return Molmo2Backend.load(model, settings)
    if not settings.trust_remote_code:
        raise ConfigurationError(
            f"{model} is a Molmo 0924 model, whose code lives in its repository: it needs --trust-remote-code "
            "and, even then, transformers < 5 or a vLLM server (--backend openai; see README)"
        )
    try:
        from .molmo_local import MolmoBackend
    except ImportError as error:
        raise ConfigurationError(
            f"{model} is a Molmo 0924 model and this installation has no local Molmo backend ({error}): "
            "serve it with vLLM and use --backend openai (see README)"
        ) from error
    return MolmoBackend.load(model, settings)


def load_backends(settings: Settings) -> list[Backend]:
    """Load every ``settings.model``; skip the unavailable ones with a log line saying how to enable them.

    Start-up goes on as long as one model loads. Errors that are not about availability (an unsupported family,
    quantisation without CUDA) are configuration mistakes and stop start-up at once.
    """
    backends: list[Backend] = []
    failures: list[str] = []
    for model in settings.model:
        try:
            backends.append(load_backend(model, settings))
        except ModelUnavailable as error:
            failures.append(f"{model}: {error.message}")
            log.warning("skipping %s: %s. %s", model, error.message, _what_is_lost(model))
    if not backends:
        raise ConfigurationError("no model could be loaded:\n  " + "\n  ".join(failures))
    return backends


def _what_is_lost(model: str) -> str:
    """A hint of which tools go without the skipped model (by its usual name; a hint only, never dispatch)."""
    name = model.lower()
    if "paligemma" in name:
        return "Without it, detect (boxes) is unavailable; enable it as the message says"
    if "molmo" in name:
        return "Without it, native pointing is unavailable; enable it as the message says"
    return "Tools only it serves are unavailable until it loads"
