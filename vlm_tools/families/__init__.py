"""The model families this server serves, and the one registry every other module asks about them.

Adding a family is one module (a :class:`~vlm_tools.families.base.Family` subclass) plus one line in
:data:`FAMILIES`; see ``families/base.py`` for what a family provides.
"""

from __future__ import annotations

from ..backends.base import Task
from .base import Family
from .molmo import Molmo
from .molmo2 import Molmo2
from .paligemma import PaliGemma

FAMILIES: tuple[Family, ...] = (Molmo2(), PaliGemma(), Molmo())
"""Every family, in the order tools prefer them when several loaded models could serve a tool."""

__all__ = ["FAMILIES", "Family", "Molmo", "Molmo2", "PaliGemma", "default_models", "family_for_model_type",
           "family_from_name", "get_family", "suggest_for_task"]  # fmt: skip


def get_family(name: str) -> Family:
    """The family called ``name``; ``KeyError`` for an unknown one."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(name)


def family_for_model_type(model_type: str) -> Family | None:
    """The family whose checkpoints declare ``model_type`` in their ``config.json``, if any."""
    return next((family for family in FAMILIES if model_type in family.model_types), None)


def family_from_name(*names: str | None) -> Family | None:
    """The family a model name says (a served model's name, or the path it was loaded from): the longest marker
    found in any of ``names`` wins (``molmo2`` over ``molmo``); ``None`` when none tells."""
    found = [
        (len(marker), family)
        for name in names
        for family in FAMILIES
        for marker in family.name_markers
        if marker in (name or "").lower()
    ]
    return max(found, key=lambda item: item[0])[1] if found else None


def suggest_for_task(task: Task) -> str:
    """Which families to load for ``task``, natives first: ``"Molmo2 (e.g. --model …) or PaliGemma 2"``."""
    can = [f for f in FAMILIES if task in f.native and f.local_backend] + [
        f for f in FAMILIES if task in f.supported and task not in f.native and f.local_backend
    ]
    if not can:
        return "a model that can do " + task.value
    return " or ".join([can[0].example, *(f.title for f in can[1:])])


def default_models() -> tuple[str, ...]:
    """The models the server loads when none is named: each default family's first checkpoint."""
    return tuple(f.checkpoints[0].model_id for f in FAMILIES if f.serve_by_default and f.checkpoints)
