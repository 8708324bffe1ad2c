"""A model family: how to phrase each task for it and how to read its answer.

Local and remote backends of the same family share one :class:`Family`, so prompts, parsers and therefore
results are the same whichever way the model is served. Families are pure Python (no torch).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from .base import Output, Request, Task


class Family(ABC):
    """Prompts and output interpretation of one model family."""

    name: str
    native: frozenset[Task]
    supported: frozenset[Task]

    @abstractmethod
    def prompt(self, request: Request) -> str:
        """The text of the user turn for ``request`` (the image goes beside it)."""

    @abstractmethod
    def interpret(self, request: Request, raw: str) -> Output:
        """Turn the model's raw text into an :class:`Output`; never raises on odd model output."""


def get_family(name: str) -> Family:
    """The family object for a ``model_type`` / family name; raises ``KeyError`` for an unknown one."""
    from . import families

    return families.FAMILIES[name]
