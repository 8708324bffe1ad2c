"""Draw points and boxes on a copy of the image, so an agent (or a person) can look before acting."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from .geometry import scale_xy
from .results import Detection, Point

MAX_SIDE = 1024
_COLORS = ("#ff2d55", "#00c853", "#2979ff", "#ffab00", "#d500f9", "#00b8d4", "#ff6d00", "#aeea00")


def _canvas(image: Image.Image) -> tuple[Image.Image, tuple[float, float], tuple[float, float]]:
    src = (float(image.width), float(image.height))
    scale = min(1.0, MAX_SIDE / max(image.width, image.height))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    canvas = image.convert("RGB").resize(size, Image.Resampling.LANCZOS) if scale < 1 else image.convert("RGB")
    return canvas, src, (float(size[0]), float(size[1]))


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, color: str) -> None:
    font = ImageFont.load_default(size=14)
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=color)
    draw.text(xy, text, fill="white", font=font)


def draw_points(image: Image.Image, points: Sequence[Point]) -> bytes:
    """PNG (long side at most 1024 px) with each point drawn as a numbered target."""
    canvas, src, dst = _canvas(image)
    draw = ImageDraw.Draw(canvas)
    radius = max(4.0, max(dst) / 120)
    for i, point in enumerate(points):
        color = _COLORS[i % len(_COLORS)]
        x, y = scale_xy(point.x, point.y, src, dst)
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=color, width=3)
        draw.line((x - 2 * radius, y, x + 2 * radius, y), fill=color, width=1)
        draw.line((x, y - 2 * radius, x, y + 2 * radius), fill=color, width=1)
        _label(draw, (x + radius + 2, y - radius - 2), f"{i + 1} {point.label or ''}".strip(), color)
    return _png(canvas)


def draw_detections(image: Image.Image, detections: Sequence[Detection]) -> bytes:
    """PNG (long side at most 1024 px) with each box and its label."""
    canvas, src, dst = _canvas(image)
    draw = ImageDraw.Draw(canvas)
    colors: dict[str, str] = {}
    for det in detections:
        color = colors.setdefault(det.label, _COLORS[len(colors) % len(_COLORS)])
        x0, y0 = scale_xy(det.box.x0, det.box.y0, src, dst)
        x1, y1 = scale_xy(det.box.x1, det.box.y1, src, dst)
        draw.rectangle((x0, y0, x1, y1), outline=color, width=3)
        _label(draw, (x0 + 2, max(0.0, y0 - 18)), det.label, color)
    return _png(canvas)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
