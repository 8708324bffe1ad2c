"""Molmo (0924) output: percent points in ``<point>`` / ``<points>`` attributes.

The format and what is dropped are in :func:`parse_points`.
"""

from __future__ import annotations

import re

from ..geometry import NormPoint, from_scale
from .text import Element, find_elements, replace_elements, require_str, strip_chat_specials

PERCENT_SCALE = 100
"""Molmo writes coordinates as percent of the image's width and height."""

POINT_TAGS = ("points", "point")

_NUMBER = re.compile(r"\s*(\d{1,6}(?:\.\d{0,6})?|\.\d{1,6})\s*")
_INDEXED_X = re.compile(r"x(\d{1,4})")


def parse_points(raw: str) -> list[NormPoint]:
    """Points in Molmo output, normalised, in output order; ``[]`` when there are none or for garbage.

    The format (REFERENCE.md; the Molmo model card's discussion gives the same reading)::

        <point x="63.3" y="85.8" alt="cup">cup</point>
        <points x1="9.1" y1="11.7" x2="17.2" y2="41.3" alt="cups">cups</points>

    x and y are **percent** (0–100) of the image's width and height.

    Decisions:

    * Attributes in any order, single or double quotes; a bare ``x``/``y`` pair and numbered ``xN``/``yN`` pairs
      are read from either tag, bare pair first, then by number (``x2`` before ``x10``).
    * A value over 100, negative, or not a plain decimal number drops that point only (the card's own parser
      treats over-100 as invalid output).
    * A pair with a missing half, or a value the end of the output cut off, is dropped.
    * The label is the ``alt`` attribute, else the element's text, else ``None``.

    Never raises on a ``str``.
    """
    return [point for el in find_elements(require_str(raw), POINT_TAGS) for point in _element_points(el)]


def unread_markup(raw: str) -> int:
    """How many point elements of ``raw`` gave no point at all (another syntax, or values out of range)."""
    return sum(1 for el in find_elements(require_str(raw), POINT_TAGS) if not _element_points(el))


def _element_points(el: Element) -> list[NormPoint]:
    keys = [("x", "y")] if "x" in el.attrs else []
    numbered = sorted((int(m.group(1)), m.group(1)) for k in el.attrs if (m := _INDEXED_X.fullmatch(k)))
    keys += [(f"x{digits}", f"y{digits}") for _, digits in numbered]
    points = []
    for kx, ky in keys:
        x, y = _percent(el.attrs.get(kx)), _percent(el.attrs.get(ky))
        if x is not None and y is not None:
            points.append(NormPoint(x, y, el.label))
    return points


def clean_text(raw: str) -> str:
    """The answer as prose: point markup replaced by its label text, chat special tokens removed."""
    return replace_elements(strip_chat_specials(require_str(raw)), POINT_TAGS)


def _percent(value: str | None) -> float | None:
    if value is None or not _NUMBER.fullmatch(value):
        return None
    return from_scale(float(value), PERCENT_SCALE)
