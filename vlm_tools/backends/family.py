"""A model family: how to phrase each task for it and how to read its answer.

Local and remote backends of the same family share one :class:`Family`, so prompts, parsers and therefore
results are the same whichever way the model is served. Families are pure Python (no torch); the families
themselves and their registry are in :mod:`vlm_tools.backends.families`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod

from .base import Output, Request, Task
from .control_tokens import neutralise


class Family(ABC):
    """Prompts and output interpretation of one model family.

    Attributes:
        name: the family name (the ``model_type`` of its checkpoints).
        native: tasks its models do natively; supported: tasks they can serve at all.
        control_tokens: spellings of its tokenizer's control tokens, broken up in caller text.
    """

    name: str
    native: frozenset[Task]
    supported: frozenset[Task]
    control_tokens: re.Pattern[str]

    @abstractmethod
    def prompt(self, request: Request) -> str:
        """The text of the user turn for ``request`` (the image goes beside it); caller text is neutralised."""

    @abstractmethod
    def interpret(self, request: Request, raw: str) -> Output:
        """Turn the model's raw text into an :class:`Output`; never raises on odd model output."""

    def caller_text(self, text: str) -> str:
        """Caller text as it may enter a prompt: control-token spellings broken up (see :mod:`.control_tokens`)."""
        return neutralise(text, self.control_tokens)
