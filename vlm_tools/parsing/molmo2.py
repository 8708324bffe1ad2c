"""Molmo2 output: ``<points coords=…>`` on a 0–1000 scale, and the prose around them.

The format and what is dropped are in :func:`parse_points`.
"""

from __future__ import annotations

import re

from ..geometry import NormPoint, from_scale
from .text import Element, find_elements, replace_elements, require_str, strip_chat_specials

COORD_SCALE = 1000
"""Molmo2 writes coordinates on 0..1000 of the image's width and height."""

POINT_TAGS = ("points", "point")
"""Tag names that carry Molmo2 points (``tracks`` is video-only and not read)."""

_GROUP_SEPARATOR = re.compile(r"[\t:,;]")
_INDEX = re.compile(r"\d{1,6}")  # an image index; a video frame's timestamp ("1.5", "0.0") is not one
_ID = re.compile(r"\d{1,6}")
_COORD = re.compile(r"\d{3,4}")


def parse_points(raw: str, image_index: int | None = 1) -> list[NormPoint]:
    """Points in Molmo2 output, normalised, in output order; ``[]`` when there are none or for garbage.

    The format (REFERENCE.md and the parsing code on the Molmo2 model card; transformers 5.23 ships no parser)::

        <points coords="1 1 073 160 2 173 600" alt="boats">the boats</points>

    ``coords`` holds one group per image: the image index (1-based), then triplets ``point-id x y`` with x and
    y on 0–1000 of the image's width and height, written zero-padded to three digits (``073``; ``1000`` has
    four). The card's reference parser separates groups by a tab, ``:``, ``,`` or ``;`` and accepts only 3–4
    digit coordinates; this parser does the same. Counting answers read
    ``"Counting the <points …>the boats</points> shows a total of 3."``, ``There are 3 <points …>…</points>.``,
    or ``There are none.``. ``tests/golden/real_outputs.json`` holds outputs real models printed.

    Decisions:

    * Only the points of one image are returned — image 1 by default, since the server sends one image per
      request; ``image_index=None`` returns the points of every image, in output order.
    * A group of ``3k`` numbers has no image index: it is one image's triplets (AI2's own UI reads
      ``coords="1 193 076 2 226 144"`` so). A group of ``3k + 1`` numbers starts with its image index. A complete
      group of any other length is malformed — which number is which cannot be told — and gives no points.
    * Video output is not read: a group led by a timestamp (``1.5``) rather than an integer image index, and
      ``<tracks>`` elements. The server sends images only.
    * The singular ``<point coords=…>`` is read like ``<points>`` (not seen in the card, harmless to accept).
    * A coordinate over 1000, or a triplet that is not ``digits ddd[d] ddd[d]``, drops that point only.
    * Output cut off inside ``coords``: every triplet that is complete is kept; the last number is trusted only
      if whitespace or a separator came after it (``"… 2 173 6"`` may be ``600`` cut short, so that point goes).
    * The label is the ``alt`` attribute, else the element's text, else ``None``.

    Never raises on a ``str``.

    Args:
        raw: the model's decoded text.
        image_index: which image's points to return (1-based, as Molmo2 numbers them); ``None`` for all.
    """
    return [point for el in find_elements(require_str(raw), POINT_TAGS) for point in _element_points(el, image_index)]


def unread_markup(raw: str) -> int:
    """How many point elements of ``raw`` gave no point at all: markup in a syntax this parser does not read
    (percent ``x=``/``y=`` attributes, video ``<tracks>``, coordinates out of range), so that "found nothing" and
    "could not read it" differ."""
    elements = find_elements(require_str(raw), (*POINT_TAGS, "tracks"))
    return sum(1 for el in elements if el.name == "tracks" or not _element_points(el, None))


def _element_points(el: Element, image_index: int | None) -> list[NormPoint]:
    if "coords" in el.attrs:
        coords, complete = el.attrs["coords"], True
    elif "coords" in el.cut:
        coords, complete = _complete_prefix(el.cut["coords"]), False
    else:
        return []
    return [NormPoint(x, y, el.label) for x, y in _coords_points(coords, image_index, complete)]


def clean_text(raw: str) -> str:
    """The answer as prose: point markup replaced by its label text, chat special tokens removed."""
    return replace_elements(strip_chat_specials(require_str(raw)), POINT_TAGS)


def _complete_prefix(partial: str) -> str:
    """Drop the last number of a cut-off ``coords`` value unless something came after it."""
    if partial and not (partial[-1].isspace() or _GROUP_SEPARATOR.match(partial[-1])):
        tokens = re.split(r"(\s+|[\t:,;])", partial)
        return "".join(tokens[:-1])
    return partial


def _coords_points(coords: str, image_index: int | None, complete: bool) -> list[tuple[float, float]]:
    """The points of ``coords``; ``complete`` is false when the output ended inside it (its last group may be cut
    anywhere after its image index)."""
    found: list[tuple[float, float]] = []
    for group in _GROUP_SEPARATOR.split(coords):
        tokens = group.split()
        if not tokens:
            continue
        if complete and len(tokens) % 3 == 0:
            index, rest = "1", tokens  # no image index: one image's triplets
        elif not complete or len(tokens) % 3 == 1:
            index, rest = tokens[0], tokens[1:]
        else:
            continue  # malformed: neither triplets nor an index and triplets
        if not _INDEX.fullmatch(index) or (image_index is not None and int(index) != image_index):
            continue
        for i in range(0, len(rest) - 2, 3):
            point_id, xs, ys = rest[i : i + 3]
            if not (_ID.fullmatch(point_id) and _COORD.fullmatch(xs) and _COORD.fullmatch(ys)):
                continue
            x, y = from_scale(float(xs), COORD_SCALE), from_scale(float(ys), COORD_SCALE)
            if x is not None and y is not None:
                found.append((x, y))
    return found
