"""What a model family is: its prompts, how its answers are read, and what the rest of the server needs to know
about its checkpoints. Pure Python (no torch): every backend of a family — in process, behind vLLM, on a Ray
replica — receives the same :class:`Family` object, so prompts and parsers are the same however it is served.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Any
from dataclasses import dataclass

from ..backends.base import Output, Request, Task
from ..errors import InvalidArgument, UnsupportedByModel

DEFAULT_KEEP_UNQUANTISED = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
"""Module names transformers' native vision-language classes give the vision tower, the projector and the output
head: kept in the compute dtype under 4/8-bit (a small share of the weights, and quantising them costs pointing
accuracy for little memory). Full names from the top: transformers matches a skipped module from the start of its
name (or as a suffix), so a bare ``vision_tower`` would not match ``model.vision_tower.…``."""


@dataclass(frozen=True)
class Checkpoint:
    """A published checkpoint of a family: its hub id, its parameter count and how many of those bitsandbytes
    quantises under the family's ``keep_unquantised`` (both counted on the meta device from its published config,
    so memory can be told before its config is downloaded)."""

    model_id: str
    parameters: int
    quantisable: int | None = None


class Family(ABC):
    """One model family. Subclasses fill in the class attributes and the two methods.

    Attributes:
        name: the registry key (``--remote-family``, ``--route TOOL=family``).
        title: the family as users know it, for messages (``"PaliGemma 2"``).
        model_types, name_markers: ``config.json`` ``model_type`` values of its checkpoints, and lower-case
            substrings that identify it in a model's name (the longest match over all families wins); its name
            unless it says otherwise.
        native: tasks it does natively; supported: tasks it can serve at all (a superset).
        control_tokens: spellings of its tokenizer's control tokens, broken up in caller text.
        local_backend: ``"module:Class"`` of its in-process backend, or ``None`` when it cannot run in process.
        not_local: why it cannot run in process, and what to do instead (when ``local_backend`` is ``None``).
        attention: the attention kernel to load it with (a dict per sub-config where they differ).
        keep_unquantised: module names kept in the compute dtype under 4/8-bit quantisation.
        unstable_dtypes: dtypes its weights must never run in (they overflow); float32 is used instead.
        checkpoints: its published checkpoints this server knows (first: the default).
        serve_by_default: whether its first checkpoint is one of the server's default models.
        gated: whether its hub checkpoints need a licence accepted and a token.
        without_it: what the server cannot do when no model of this family loads.
        offline_fixture: the repository's small trained model of the family, to try the tools without a download.
    """

    name: str
    title: str
    native: frozenset[Task]
    supported: frozenset[Task]
    control_tokens: re.Pattern[str]
    local_backend: str | None = None
    not_local: str = ""
    attention: str | dict[str, str] = "sdpa"
    keep_unquantised: tuple[str, ...] = DEFAULT_KEEP_UNQUANTISED
    unstable_dtypes: frozenset[str] = frozenset()
    checkpoints: tuple[Checkpoint, ...] = ()
    serve_by_default: bool = False
    gated: bool = False
    without_it: str = ""
    offline_fixture: str | None = None

    @abstractmethod
    def prompt(self, request: Request) -> str:
        """The text of the user turn for ``request`` (the image goes beside it); caller text is neutralised.
        Raises :class:`InvalidArgument` / :class:`UnsupportedByModel` for a request it cannot phrase."""

    @abstractmethod
    def interpret(self, request: Request, raw: str) -> Output:
        """Turn the model's raw text into an :class:`Output`; never raises on odd model output."""

    probed_at_load: bool = False
    """Whether the in-process backend probes each checkpoint to choose how it lays prompts out (see
    :meth:`serving_path`)."""

    def serving_path(self, processor: Any) -> str:
        """How the in-process backend lays prompts out for the checkpoint whose processor this is, in words."""
        return "the family's one layout"

    def caller_text(self, text: str) -> str:
        """Caller text as it may enter a prompt: control-token spellings broken up (see :func:`neutralise`)."""
        return neutralise(text, self.control_tokens)

    @property
    def model_types(self) -> tuple[str, ...]:
        """``config.json`` ``model_type`` values of its checkpoints: by default, its name."""
        return (self.name,)

    @property
    def name_markers(self) -> tuple[str, ...]:
        """Lower-case substrings that identify it in a model's name: by default, its name."""
        return (self.name,)

    @property
    def example(self) -> str:
        """How to load it, for advice: ``"PaliGemma 2 (e.g. --model google/paligemma2-3b-mix-448)"``."""
        if not self.checkpoints:
            return self.title
        return f"{self.title} (e.g. --model {self.checkpoints[0].model_id})"

    def licence_url(self, model: str) -> str:
        """Where a gated checkpoint's licence is accepted: its hub page (the default's for a local name)."""
        if "/" in model and not model.startswith(("/", ".", "~")):
            return f"https://huggingface.co/{model}"
        return f"https://huggingface.co/{self.checkpoints[0].model_id}" if self.checkpoints else "https://huggingface.co"

    def known_checkpoint(self, model: str) -> Checkpoint | None:
        """The published checkpoint ``model`` (a hub id) if this family knows it, else ``None``."""
        return next((c for c in self.checkpoints if c.model_id == model), None)

    def known_parameters(self, model: str) -> int | None:
        """The parameter count of a published checkpoint this family knows, else ``None``."""
        checkpoint = self.known_checkpoint(model)
        return checkpoint.parameters if checkpoint else None


# --- helpers the families share ---------------------------------------------------------------------------------


def neutralise(text: str, control: re.Pattern[str]) -> str:
    """``text`` with every spelling that ``control`` matches broken up by a space after its first character.

    A caller's question, description or label is text; if it spelt a control token (``<image>``, ``<|im_end|>``…)
    the tokenizer would turn it into the token itself — ending the turn early, forging an image, or (PaliGemma)
    planting location tokens that read as geometry. ``<|im_end|>`` becomes ``< |im_end|>``; ``<b>`` or ``1 < 2``
    pass unchanged, as the real tokenizers leave them.
    """
    return control.sub(lambda m: m.group(0)[0] + " " + m.group(0)[1:], text)


def one_line(text: str) -> str:
    """``text`` on one line: every line break and run of whitespace becomes one space; ends stripped."""
    return " ".join(text.split())


def require_text(value: str, what: str) -> str:
    """``value`` on one line; :class:`InvalidArgument` naming ``what`` when it is blank."""
    text = one_line(value)
    if not text:
        raise InvalidArgument(f"{what} is empty; give a non-empty {what}")
    return text


def check_task(family: Family, task: Task) -> None:
    """:class:`UnsupportedByModel` unless ``family`` can serve ``task``."""
    if task not in family.supported:
        can = ", ".join(sorted(t.value for t in family.supported))
        raise UnsupportedByModel(f"{family.name} models cannot do '{task.value}'; they can do: {can}")


def language_code(family: Family, request: Request) -> str:
    """The request's language code as it may enter a prompt (``en`` when blank)."""
    return family.caller_text(one_line(request.language)) or "en"
