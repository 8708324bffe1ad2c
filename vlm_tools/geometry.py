"""The one place that does arithmetic on coordinates.

Three coordinate systems meet here: normalised, pixels and the caller's frame (see :func:`point_result`). Model
conventions (PaliGemma's bins, Molmo's percent, Molmo2's 0–1000) are turned into normalised values by their
parsers through :func:`from_scale`; everything after that goes through the functions below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .results import Box, Frame, ImageSize, Point

PointSource = Literal["native", "box_center"]
"""Where a point came from: the model pointed (``native``) or it is the centre of a box (``box_center``)."""


@dataclass(frozen=True)
class NormPoint:
    """A point in normalised image coordinates, as a parser emits it."""

    x: float
    y: float
    label: str | None = None


@dataclass(frozen=True)
class NormBox:
    """A box in normalised image coordinates (``x0 <= x1``, ``y0 <= y1``), as a parser emits it."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str | None = None

    def center(self) -> NormPoint:
        """The box centre, labelled like the box."""
        return NormPoint((self.x0 + self.x1) / 2.0, (self.y0 + self.y1) / 2.0, self.label)


def from_scale(value: float, scale: float) -> float | None:
    """Turn a model's coordinate on ``[0, scale]`` into a normalised one, or ``None`` when out of range.

    Parsers call this for every coordinate: PaliGemma bins use ``scale=1024``, Molmo percent ``100`` and
    Molmo2 ``1000``. Values outside the range (or not finite) are invalid output, never clamped into a
    plausible-looking but invented position.
    """
    if not (0.0 <= value <= scale):  # also rejects NaN
        return None
    return value / scale


def to_pixels(x_norm: float, y_norm: float, width: float, height: float) -> tuple[float, float]:
    """Normalised → pixels (or any frame) of the given size."""
    return x_norm * width, y_norm * height


def to_norm(x: float, y: float, width: float, height: float) -> tuple[float, float]:
    """Pixels (or any frame) of the given size → normalised."""
    if width <= 0 or height <= 0:
        raise ValueError("width and height must be positive")
    return x / width, y / height


def point_result(
    p: NormPoint,
    size: ImageSize,
    frame: Frame | None = None,
    source: PointSource = "native",
) -> Point:
    """Build the public :class:`~vlm_tools.results.Point` for a normalised point, in the three coordinate systems:

    * **normalised** — ``x_norm, y_norm`` in [0, 1] over the image as the server saw it (after EXIF orientation),
      origin top-left, x to the right, y down. Parsers emit only this.
    * **pixels** — the same point in pixels of that image: ``x = x_norm * width``. Coordinates are continuous:
      pixel column ``i`` covers ``[i, i + 1)``, so the centre of the top-left pixel is ``(0.5, 0.5)``.
    * **frame** — the caller's own coordinate system (``frame = {width, height}``), e.g. a browser viewport in CSS
      pixels while the screenshot is in device pixels: ``frame_x = x_norm * frame.width``.
    """
    from .results import Point

    x, y = to_pixels(p.x, p.y, size.width, size.height)
    fx = fy = None
    if frame is not None:
        fx, fy = to_pixels(p.x, p.y, frame.width, frame.height)
    return Point(x=x, y=y, x_norm=p.x, y_norm=p.y, frame_x=fx, frame_y=fy, label=p.label, source=source)


def box_result(b: NormBox, size: ImageSize, frame: Frame | None = None) -> Box:
    """Build the public :class:`~vlm_tools.results.Box` for a normalised box (with its centre)."""
    from .results import Box

    x0, y0 = to_pixels(b.x0, b.y0, size.width, size.height)
    x1, y1 = to_pixels(b.x1, b.y1, size.width, size.height)
    center = point_result(b.center(), size, frame, source="box_center")
    fx0 = fy0 = fx1 = fy1 = None
    if frame is not None:
        fx0, fy0 = to_pixels(b.x0, b.y0, frame.width, frame.height)
        fx1, fy1 = to_pixels(b.x1, b.y1, frame.width, frame.height)
    return Box(
        x0=x0, y0=y0, x1=x1, y1=y1,
        x0_norm=b.x0, y0_norm=b.y0, x1_norm=b.x1, y1_norm=b.y1,
        frame_x0=fx0, frame_y0=fy0, frame_x1=fx1, frame_y1=fy1,
        center=center,
    )  # fmt: skip


def scale_xy(x: float, y: float, src: tuple[float, float], dst: tuple[float, float]) -> tuple[float, float]:
    """Map a point between two sizes of the same picture (used to draw on a resized copy)."""
    nx, ny = to_norm(x, y, *src)
    return to_pixels(nx, ny, *dst)
