"""Where a model comes from: a local directory or the Hugging Face hub, and what to say when it cannot be had.

Importing this module does not import torch, transformers or huggingface_hub; they load inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelUnavailable

PALIGEMMA_LICENCE_URL = "https://huggingface.co/google/paligemma2-3b-mix-448"


def looks_local(model: str) -> bool:
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
