"""PaliGemma 2 output: location-token boxes and clean text.

Lenient with output, never inventing geometry: the format and what is dropped are in :func:`parse_detections`.
"""

from __future__ import annotations

import re

from ..geometry import NormBox, from_scale
from .text import collapse_ws, require_str

LOC_SCALE = 1024
"""Bins per side: ``<loc0000>`` .. ``<loc1023>``, coordinate = bin / 1024."""

_LOC = r"<loc(\d{1,6})>"
_BOX = re.compile(r"\s*".join([_LOC] * 4))
_LOC_TOKEN = re.compile(_LOC)
_SEG = re.compile(r"<seg\d{1,6}>")
_LOC_OR_SEG = re.compile(r"<(?:loc|seg)\d{1,6}>")
# Gemma / PaliGemma specials that are never part of what the model said.
_SPECIAL = re.compile(r"<(?:bos|eos|pad|unk|mask|image|start_of_turn|end_of_turn|start_of_image|end_of_image)>")
_SEPARATOR_TAIL = re.compile(r"\s*;\s*\Z")


def _generated_part(raw: str) -> str:
    """The part of a decoded sequence the model generated: after any echoed prompt, before ``<eos>``."""
    # PaliGemmaProcessor lays the prompt out as <image>*N <bos> prompt "\n": an echoed prompt ends at the first
    # newline after the last <bos>.
    bos = raw.rfind("<bos>")
    if bos != -1:
        newline = raw.find("\n", bos)
        raw = raw[newline + 1 :] if newline != -1 else ""
    else:
        image = raw.rfind("<image>")
        if image != -1:
            raw = raw[image + len("<image>") :]
    eos = raw.find("<eos>")
    if eos != -1:
        raw = raw[:eos]
    return raw


def _clean_label(text: str) -> str | None:
    text = _SEPARATOR_TAIL.sub("", _SPECIAL.sub("", _SEG.sub("", text)))
    text = collapse_ws(text)
    return text or None


def parse_detections(raw: str) -> list[NormBox]:
    """Boxes in PaliGemma detect / segment output, normalised, in output order; ``[]`` for anything else.

    Detection output reads ``<locY0><locX0><locY1><locX1> label ; <loc…>… label2``: four location tokens in the
    order **y_min, x_min, y_max, x_max**, each a bin 0..1023 over the square model input, so a coordinate is
    ``bin / 1024`` of the image (the square is the whole image stretched, so the same fraction holds for the
    original). Segmentation output puts 16 ``<segNNN>`` codes between the location tokens and the label.

    Decisions (lenient with output, never inventing geometry):

    * A box whose y_min > y_max or x_min > x_max is dropped, not swapped: the model emitted an invalid box, and
      swapping would report a position it never gave. A zero-width or zero-height box is kept (its centre is
      still where the model pointed).
    * A bin over 1024 (impossible for a real ``<locNNNN>`` token, possible in text from a remote server) drops
      its box. Fewer than four location tokens in a row (output cut off, or stray tokens) make no box.
    * Segments are separated by ``;``. Only a ``;`` followed by the next box's location tokens (or the end of
      the output) separates segments, so a label that itself contains ``;`` keeps it.
    * ``<seg…>`` codes are skipped (the box is kept; the mask codes need Google's decoder weights).
    * Anything after ``<eos>`` is ignored (padding in a batch); an echoed prompt (``…<bos>detect cat\\n``) is
      ignored because the prompt always ends at its ``"\\n"``.

    Never raises on a ``str``.
    """
    text = _generated_part(require_str(raw))
    matches = list(_BOX.finditer(text))
    boxes: list[NormBox] = []
    for i, m in enumerate(matches):
        # The label runs to the next box; the " ; " that separates it from that box is not part of it.
        label_end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        label_text = text[m.end() : label_end]
        # Stray location tokens of a cut-off box after the label are not label text either.
        stray = _LOC_TOKEN.search(label_text)
        if stray is not None:
            label_text = label_text[: stray.start()]
        coords = _box_coords(m.groups())
        if coords is not None:
            y0, x0, y1, x1 = coords
            boxes.append(NormBox(x0, y0, x1, y1, _clean_label(label_text)))
    return boxes


def unread_boxes(raw: str, boxes: list[NormBox]) -> int:
    """How many boxes' worth of location tokens in ``raw`` gave no box (inverted, out of range, or cut short): what
    the model marked but this parser could not read, so that "found nothing" and "could not read it" differ."""
    tokens = len(_LOC_TOKEN.findall(_generated_part(require_str(raw))))
    return max(0, -(-(tokens - 4 * len(boxes)) // 4))


def _box_coords(bins: tuple[str, ...]) -> tuple[float, float, float, float] | None:
    """Normalised (y0, x0, y1, x1) from four bins in PaliGemma's order, or ``None`` for an invalid box."""
    values = [from_scale(float(b), LOC_SCALE) for b in bins]
    if values[0] is None or values[1] is None or values[2] is None or values[3] is None:
        return None
    y0, x0, y1, x1 = values[0], values[1], values[2], values[3]
    if y0 > y1 or x0 > x1:
        return None  # inverted: invalid output, not something to repair by guessing
    return y0, x0, y1, x1


def strip_special(raw: str, prompt: str | None = None) -> str:
    """Clean text from caption / answer / OCR output.

    Removes special tokens (``<bos>``, ``<eos>``, ``<pad>``, …), location and segmentation tokens, an echoed
    prompt (the processor's ``<bos>prompt\\n`` layout, or ``prompt`` itself followed by a newline when given),
    anything after ``<eos>``, and surrounding whitespace. Line breaks inside the text are kept (OCR layout).
    """
    text = _generated_part(require_str(raw))
    while True:  # removing one token can join the pieces of another ("<lo<loc0001>c0002>")
        cleaned = _SPECIAL.sub("", _LOC_OR_SEG.sub("", text))
        if cleaned == text:
            break
        text = cleaned
    if prompt:
        stripped = text.lstrip()
        if stripped.startswith(prompt + "\n"):
            text = stripped[len(prompt) + 1 :]
    return text.strip()
