"""Where a model comes from: a local directory or the Hugging Face hub, and what to say when it cannot be had.

Importing this module does not import torch, transformers or huggingface_hub; they load inside the functions.
"""

from __future__ import annotations

import functools
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

    if constants.is_offline_mode():
        where = "HF_HUB_OFFLINE is set"
    else:
        where = f"the hub ({constants.ENDPOINT}) cannot be reached from here"
    return ModelUnavailable(
        f"{model} is not in the local cache and {where}. Download it once where the hub can be reached "
        f"(hf download {model}), or pass --model with a local directory holding the model; set HF_HUB_OFFLINE=1 to "
        "never ask the hub. To try the tools without a download, in a clone of the vlm-tools repository: "
        "--model tests/fixtures/models/molmo2-ui --model tests/fixtures/models/paligemma-ui"
    )


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all, asked once per process with a short time limit.

    ``False`` without asking when ``HF_HUB_OFFLINE`` is set. A machine without network then fails in seconds,
    where the hub client would retry each file of each model with back-off (about 50 s for the default models).
    """
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    import httpx

    try:
        httpx.head(constants.ENDPOINT, timeout=timeout_s)
    except httpx.HTTPError:
        return False
    return True


def is_cached(model: str) -> bool:
    """Whether the hub model ``model`` has its ``config.json`` in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "config.json"), str)


def local_files_only(model: str) -> bool:
    """Whether ``model`` must load without asking the hub: a local directory, offline mode, or no hub in reach."""
    return looks_local(model) or not hub_reachable()
