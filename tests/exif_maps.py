"""EXIF orientation as arithmetic: the oracle the decoding tests hold decoded pixels against.

An EXIF Orientation tag (1..8) says how the stored pixel grid must be transformed for display. The server applies
it when decoding (Pillow's ``ImageOps.exif_transpose``), so every coordinate it reports is in the displayed ("as
seen") image. These functions map a continuous point between the stored grid and the displayed image; they are
exact inverses.
"""

from __future__ import annotations


def oriented_size(stored_w: float, stored_h: float, orientation: int) -> tuple[float, float]:
    """Displayed size of a stored image of ``stored_w × stored_h`` under an EXIF orientation."""
    _check_orientation(orientation)
    return (stored_h, stored_w) if orientation >= 5 else (stored_w, stored_h)


def stored_to_displayed(x: float, y: float, stored_w: float, stored_h: float, orientation: int) -> tuple[float, float]:
    """A point of the stored pixel grid → the same scene point in the displayed image."""
    _check_orientation(orientation)
    w, h = stored_w, stored_h
    return {
        1: (x, y),
        2: (w - x, y),  # mirror horizontal
        3: (w - x, h - y),  # rotate 180
        4: (x, h - y),  # mirror vertical
        5: (y, x),  # transpose
        6: (h - y, x),  # rotate 90 CW for display
        7: (h - y, w - x),  # transverse
        8: (y, w - x),  # rotate 90 CCW for display
    }[orientation]


def displayed_to_stored(x: float, y: float, stored_w: float, stored_h: float, orientation: int) -> tuple[float, float]:
    """Inverse of :func:`stored_to_displayed`."""
    _check_orientation(orientation)
    w, h = stored_w, stored_h
    return {
        1: (x, y),
        2: (w - x, y),
        3: (w - x, h - y),
        4: (x, h - y),
        5: (y, x),
        6: (y, h - x),
        7: (w - y, h - x),
        8: (w - y, x),
    }[orientation]


def _check_orientation(orientation: int) -> None:
    if orientation not in range(1, 9):
        raise ValueError(f"EXIF orientation must be 1..8, got {orientation}")
