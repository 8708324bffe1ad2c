"""Where a model comes from: a local directory or the Hugging Face hub (at a pinned revision when one is named),
and what to say when it cannot be had. Importing this module does not import torch, transformers or
huggingface_hub; they load inside the functions.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigurationError, ModelUnavailable



def looks_local(model: str) -> bool:
    """Whether ``model`` names a filesystem path rather than a hub id (``org/name``)."""
    return (
        os.path.isabs(model)
        or model.startswith(("./", "../", "~", ".\\", "..\\"))
        or model in (".", "..")
        or Path(model).expanduser().exists()
    )


@dataclass(frozen=True)
class ModelRef:
    """A ``--model`` value: a local directory, or a hub id with an optional revision (``org/name@<commit>``)."""

    model_id: str
    revision: str | None = None
    is_local: bool = False

    @classmethod
    def parse(cls, model: str) -> ModelRef:
        """Split ``org/name@revision``; a local directory is taken as it is (its name may hold an ``@``)."""
        if looks_local(model):
            return cls(model, None, True)
        model_id, at, revision = model.partition("@")
        if at and (not model_id or not revision):
            raise ConfigurationError(f"--model {model!r}: write a revision as org/name@<commit, branch or tag>")
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(model_id)
        except HFValidationError as error:
            raise ConfigurationError(f"--model {model!r} is neither a local directory nor a hub id (org/name): "
                                     f"{error}") from None  # fmt: skip
        return cls(model_id, revision or None, False)

    def __str__(self) -> str:
        return f"{self.model_id}@{self.revision}" if self.revision else self.model_id

    @property
    def pretrained_kwargs(self) -> dict[str, str]:
        """``from_pretrained`` keyword arguments that pin the revision (none for a local directory)."""
        return {"revision": self.revision} if self.revision else {}


def model_unavailable(model: str, error: BaseException) -> ModelUnavailable:
    """Turn a hub/filesystem failure into a message that says how to make the model available."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    from ..families import family_from_name

    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    text = " ".join(str(e) for e in chain).lower()
    ref = ModelRef.parse(model)
    not_found = any(isinstance(e, RepositoryNotFoundError) and not isinstance(e, GatedRepoError) for e in chain)
    # The hub's not-found message speaks of "a private or gated repo" too: only a gated error, or transformers'
    # wording of one, is one.
    if any(isinstance(e, GatedRepoError) for e in chain) or (
        not not_found and ("access a gated repo" in text or "is a gated repository" in text)
    ):
        family = family_from_name(ref.model_id)
        url = family.licence_url(ref.model_id) if family else f"https://huggingface.co/{ref.model_id}"
        return ModelUnavailable(
            f"{model} is a gated model and this machine has no access: accept the licence at {url} and set "
            "HF_TOKEN to a token of that account, or pass --model with a local directory holding the model"
        )
    if any(isinstance(e, RevisionNotFoundError) for e in chain):
        return ModelUnavailable(f"{model}: the hub has no revision {ref.revision!r} of {ref.model_id}: check the "
                                "commit, branch or tag after the @")  # fmt: skip
    if not_found or "not a valid model identifier" in text:
        return ModelUnavailable(
            f"{model} was not found on the Hugging Face hub (or it is private): check the id, set HF_TOKEN for a "
            "private model, or pass --model with a local directory holding the model"
        )
    from huggingface_hub import constants

    where = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else (
        f"the hub ({constants.ENDPOINT}) cannot be reached from here")  # fmt: skip
    return ModelUnavailable(
        f"{model} is not in the local cache and {where}. Download it once where the hub can be reached "
        f"(vlm-tools pull {model}), or pass --model with a local directory holding the model; set HF_HUB_OFFLINE=1 "
        f"to never ask the hub. {offline_trial()}"
    )


def offline_trial() -> str:
    """How to try the tools without a download: the repository's small trained models, one per family."""
    from ..families import FAMILIES

    flags = " ".join(f"--model {f.offline_fixture}" for f in FAMILIES if f.offline_fixture)
    return f"To try the tools without a download, in a clone of the vlm-tools repository: {flags}"


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
    """Whether the hub model ``model`` (at its revision) has its ``config.json`` in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    ref = ModelRef.parse(model)
    return isinstance(try_to_load_from_cache(ref.model_id, "config.json", revision=ref.revision), str)


def local_files_only(model: str) -> bool:
    """Whether ``model`` must load without asking the hub: a local directory, offline mode, or no hub in reach."""
    return ModelRef.parse(model).is_local or not hub_reachable()
