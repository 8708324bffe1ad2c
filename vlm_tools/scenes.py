"""Synthetic UI screenshots with known geometry: the shared vocabulary of the trained fixture models.

Training (``scripts/train_fixtures.py``), the accuracy suite (:mod:`vlm_tools.evaluation`) and the browser test
all draw from here, so the models are asked about exactly the kind of picture they learnt. What a scene holds:
:class:`Scene`; the same seed draws the same pixels on every machine (:func:`scenes`).
"""

from __future__ import annotations

import html
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (22, 163, 74),
    "blue": (37, 99, 235),
    "yellow": (234, 179, 8),
    "purple": (147, 51, 234),
    "orange": (249, 115, 22),
}
"""The colours objects come in, by the name a prompt uses (saturated, far from the neutral backgrounds)."""

SHAPES: tuple[str, ...] = ("button", "circle", "triangle")
"""The shapes objects come in, by the name a prompt uses: three that stay distinct even when a screenshot is
squashed to a small square model input (a button is wide and rounded, a circle round, a triangle pointed)."""

BUTTON_WORDS: tuple[str, ...] = ("OK", "Go", "Save", "Next", "Buy", "Send", "Open", "Play", "Stop", "Menu", "Help")
"""Short words drawn on some buttons (never asked about: descriptions name colour and shape only)."""

_LIGHT_BACKGROUNDS = ((255, 255, 255), (248, 250, 252), (243, 244, 246), (229, 231, 235), (250, 250, 245))
_DARK_BACKGROUNDS = ((17, 24, 39), (30, 41, 59), (38, 38, 38), (55, 65, 81))
_FURNITURE_LIGHT = ((209, 213, 219), (156, 163, 175), (203, 213, 225))
_FURNITURE_DARK = ((75, 85, 99), (100, 116, 139), (64, 64, 64))

TRAINING_SIZES: tuple[tuple[int, int], ...] = (
    (1280, 720), (1366, 768), (1024, 768), (800, 600), (1200, 800), (960, 540), (1440, 900), (1000, 500),
    (720, 1280), (600, 900), (768, 1024), (540, 960), (800, 1100), (480, 800),
    (1000, 1000), (800, 800), (640, 640), (1200, 1200),
)  # fmt: skip
"""Canvas sizes scenes are drawn at when none is given: landscape, portrait and square, 480–1440 px."""

Box = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)`` in pixels, x0 < x1 and y0 < y1."""


@dataclass(frozen=True)
class SceneObject:
    """One coloured object: what it is, where it is (``box`` in pixels of its canvas) and what it says."""

    colour: str
    shape: str
    box: Box
    text: str | None = None
    radius: float = 0.0
    border: int = 0

    @property
    def name(self) -> str:
        """How a prompt names it, e.g. ``"red button"``."""
        return f"{self.colour} {self.shape}"

    @property
    def center(self) -> tuple[float, float]:
        """Centre of its bounding box (inside the shape for every shape drawn here)."""
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2.0, (y0 + y1) / 2.0

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready description."""
        return {"name": self.name, "box": list(self.box), "text": self.text}


@dataclass(frozen=True)
class Background:
    """A plain colour (``end is None``) or a linear gradient from ``start`` to ``end`` along ``angle`` degrees."""

    start: tuple[int, int, int]
    end: tuple[int, int, int] | None = None
    angle: int = 0
    dark: bool = False

    def css(self) -> str:
        """The same background as a CSS value."""
        if self.end is None:
            return _rgb(self.start)
        # CSS gradient angles run clockwise from "to top"; 90deg is left → right, 180deg top → bottom.
        return f"linear-gradient({(self.angle + 90) % 360}deg, {_rgb(self.start)}, {_rgb(self.end)})"


@dataclass(frozen=True)
class Scene:
    """A rendered screenshot, the objects on it and which one is asked about.

    A scene is a canvas (plain or gradient background, optional neutral "page furniture": a header bar and grey
    text lines) holding 2–5 coloured objects — rounded-rectangle buttons (optionally with a short word on them in a
    contrasting colour), circles and triangles — at varied sizes, positions and aspect ratios. Every object has its
    own colour in its scene (shapes repeat), so "the red button" names exactly one thing, and its bounding box is
    known to the pixel.
    """

    image: Image.Image
    objects: tuple[SceneObject, ...]
    target_index: int
    background: Background = field(default_factory=lambda: Background((255, 255, 255)))

    @property
    def target(self) -> SceneObject:
        """The object the scene asks about."""
        return self.objects[self.target_index]

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels."""
        return self.image.size


# --- layout ---------------------------------------------------------------------------------------------------


def _object_size(rng: random.Random, shape: str, width: int, height: int) -> tuple[float, float]:
    """Width and height in pixels of a new object; sizes scale with the canvas's short side."""
    short = min(width, height)
    if shape == "button":
        h = rng.uniform(0.13, 0.21) * short
        w = min(h * rng.uniform(1.6, 3.0), 0.45 * width)
        return w, h
    if shape == "circle":
        d = rng.uniform(0.16, 0.30) * short
        return d, d
    if shape == "square":
        s = rng.uniform(0.15, 0.28) * short
        return s, s
    w = rng.uniform(0.17, 0.30) * short  # triangle: isosceles, apex up
    return w, w * rng.uniform(0.8, 1.0)


def _overlaps(box: Box, others: Sequence[Box], gap: float) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + gap and b[0] < x1 + gap and y0 < b[3] + gap and b[1] < y1 + gap for b in others)


def _pairs(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """``count`` (colour, shape) pairs, the first the target's. Every object has its own colour, so a description
    names exactly one thing; about half the distractors share the target's shape, so the shape alone is often not
    enough and the colour must be read."""
    colours = rng.sample(list(PALETTE), min(count, len(PALETTE)))
    target_shape = rng.choice(SHAPES)
    chosen = [(colours[0], target_shape)]
    for colour in colours[1:]:
        chosen.append((colour, target_shape if rng.random() < 0.5 else rng.choice(SHAPES)))
    return chosen


def random_layout(
    rng: random.Random, size: tuple[int, int], count: int | None = None, *, words: bool = True
) -> tuple[list[SceneObject], int]:
    """Place 2–5 (or ``count``, at least 1) non-overlapping objects on a canvas of ``size``; returns them and the
    target index.

    Objects keep a margin from the edges and a gap between each other, so every box is fully visible and a
    point inside one box is inside no other.
    """
    width, height = size
    count = max(1, count) if count is not None else rng.randint(2, 5)
    short = min(width, height)
    margin, gap = 0.02 * short, 0.03 * short
    objects: list[SceneObject] = []
    boxes: list[Box] = []
    for colour, shape in _pairs(rng, count):
        for _attempt in range(200):
            w, h = _object_size(rng, shape, width, height)
            x0 = rng.uniform(margin, width - margin - w)
            y0 = rng.uniform(margin, height - margin - h)
            box = (round(x0), round(y0), round(x0 + w), round(y0 + h))
            if not _overlaps(box, boxes, gap):
                break
        else:
            continue  # a crowded canvas: fewer objects rather than overlapping ones
        text = None
        radius, border = 0.0, 0
        if shape == "button":
            radius = round(rng.uniform(0.15, 0.5) * (box[3] - box[1]))
            text = rng.choice(BUTTON_WORDS) if words and rng.random() < 0.6 else None
            border = rng.choice((0, 0, 0, 2, 3))
        boxes.append(box)
        objects.append(SceneObject(colour, shape, box, text, radius, border))
    # The target was placed first (it always fits on an empty canvas); shuffle so it is not always first in order.
    order = list(range(len(objects)))
    rng.shuffle(order)
    return [objects[i] for i in order], order.index(0)


def random_background(rng: random.Random) -> Background:
    """A light or dark neutral, plain or as a gentle gradient."""
    dark = rng.random() < 0.25
    pool = _DARK_BACKGROUNDS if dark else _LIGHT_BACKGROUNDS
    start = rng.choice(pool)
    if rng.random() < 0.4:
        end = rng.choice([c for c in pool if c != start])
        return Background(start, end, rng.choice((0, 45, 90, 135)), dark)
    return Background(start, None, 0, dark)


# --- drawing --------------------------------------------------------------------------------------------------


def _rgb(colour: tuple[int, int, int]) -> str:
    return f"rgb({colour[0]}, {colour[1]}, {colour[2]})"


def _text_colour(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light fills (yellow, orange), white on the others."""
    r, g, b = fill
    return (17, 17, 17) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def _darker(colour: tuple[int, int, int], factor: float = 0.7) -> tuple[int, int, int]:
    return (int(colour[0] * factor), int(colour[1] * factor), int(colour[2] * factor))


def paint_background(size: tuple[int, int], background: Background) -> Image.Image:
    """A canvas filled with ``background``."""
    import numpy as np

    width, height = size
    if background.end is None:
        return Image.new("RGB", size, background.start)
    # A linear gradient is drawn small and scaled up: bilinear scaling of a linear ramp is the same ramp, and it
    # is far cheaper than computing every pixel of a large canvas.
    small_w, small_h = max(2, width // 16), max(2, height // 16)
    xs = np.linspace(0.0, 1.0, small_w, dtype=np.float32)[None, :]
    ys = np.linspace(0.0, 1.0, small_h, dtype=np.float32)[:, None]
    angle = background.angle % 180
    if angle == 0:
        t = np.broadcast_to(xs, (small_h, small_w))
    elif angle == 90:
        t = np.broadcast_to(ys, (small_h, small_w))
    elif angle == 45:
        t = (xs + ys) / 2.0
    else:
        t = ((1.0 - xs) + ys) / 2.0
    start = np.array(background.start, dtype=np.float32)
    end = np.array(background.end, dtype=np.float32)
    pixels = start + (end - start) * t[..., None]
    small = Image.fromarray(pixels.round().astype(np.uint8), "RGB")
    return small.resize(size, Image.Resampling.BILINEAR)


def _draw_furniture(draw: ImageDraw.ImageDraw, rng: random.Random, size: tuple[int, int], dark: bool) -> None:
    """Neutral page furniture: a header bar and grey lines standing in for text (never asked about)."""
    width, height = size
    pool = _FURNITURE_DARK if dark else _FURNITURE_LIGHT
    if rng.random() < 0.3:
        draw.rectangle((0, 0, width, round(rng.uniform(0.05, 0.09) * height)), fill=rng.choice(pool))
    if rng.random() < 0.5:
        line_h = max(2, round(0.012 * min(size)))
        for _ in range(rng.randint(2, 6)):
            x0 = rng.uniform(0, 0.7) * width
            y0 = rng.uniform(0.1, 0.95) * height
            draw.rectangle((x0, y0, x0 + rng.uniform(0.1, 0.3) * width, y0 + line_h), fill=rng.choice(pool))


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    """Draw one object onto a canvas."""
    fill = PALETTE[obj.colour]
    x0, y0, x1, y1 = obj.box
    # Pillow boxes include their last pixel; the object's box is continuous [x0, x1), so the last pixel is x1 - 1.
    shape_box = (x0, y0, x1 - 1, y1 - 1)
    if obj.shape == "button":
        outline = _darker(fill) if obj.border else None
        draw.rounded_rectangle(shape_box, radius=obj.radius, fill=fill, outline=outline, width=obj.border or 1)
        if obj.text:
            font = ImageFont.load_default(size=max(8, round(0.42 * (y1 - y0))))
            draw.text(((x0 + x1) / 2, (y0 + y1) / 2), obj.text, fill=_text_colour(fill), font=font, anchor="mm")
    elif obj.shape == "circle":
        draw.ellipse(shape_box, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(shape_box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)


def render(
    size: tuple[int, int],
    objects: Sequence[SceneObject],
    background: Background,
    rng: random.Random | None = None,
) -> Image.Image:
    """Paint ``background``, page furniture (when ``rng`` is given) and ``objects`` on a canvas of ``size``."""
    image = paint_background(size, background)
    draw = ImageDraw.Draw(image)
    if rng is not None:
        _draw_furniture(draw, rng, size, background.dark)
    for obj in objects:
        draw_object(draw, obj)
    return image


def random_scene(rng: random.Random, size: tuple[int, int] | None = None, count: int | None = None) -> Scene:
    """A random scene on a canvas of ``size`` (default: one of :data:`TRAINING_SIZES`) with ``count`` objects
    (default: 2–5)."""
    size = size or rng.choice(TRAINING_SIZES)
    background = random_background(rng)
    objects, target = random_layout(rng, size, count)
    image = render(size, objects, background, rng)
    return Scene(image, tuple(objects), target, background)


def scenes(seed: int, count: int, size: tuple[int, int] | None = None) -> Iterator[Scene]:
    """``count`` scenes from ``seed`` (the same seed gives the same scenes, pixel for pixel).

    Everything is deterministic for a given :class:`random.Random` state and uses only Pillow's bundled font, so
    the same seed draws the same pixels on every machine.
    """
    rng = random.Random(seed)
    for _ in range(count):
        yield random_scene(rng, size)


# --- the same scene in a browser ------------------------------------------------------------------------------

_CLICK_SCRIPT = """
window.clicks = [];
document.addEventListener("click", (event) => {
  const hit = event.target.closest("[data-name]");
  window.clicks.push({name: hit ? hit.dataset.name : null, x: event.clientX, y: event.clientY});
  if (hit) { hit.dataset.clicked = String(Number(hit.dataset.clicked || "0") + 1); }
});
"""


def _object_css(obj: SceneObject) -> str:
    x0, y0, x1, y1 = obj.box
    fill = PALETTE[obj.colour]
    style = [
        "position:absolute", f"left:{x0}px", f"top:{y0}px", f"width:{x1 - x0}px", f"height:{y1 - y0}px",
        f"background:{_rgb(fill)}", "margin:0", "padding:0", "box-sizing:border-box", "cursor:pointer",
    ]  # fmt: skip
    if obj.shape == "button":
        style += [
            f"border-radius:{obj.radius}px",
            f"border:{obj.border}px solid {_rgb(_darker(fill))}" if obj.border else "border:none",
            f"color:{_rgb(_text_colour(fill))}",
            f"font:{max(8, round(0.42 * (y1 - y0)))}px sans-serif",
            "display:flex", "align-items:center", "justify-content:center",
        ]  # fmt: skip
    elif obj.shape == "circle":
        style += ["border-radius:50%", "border:none"]
    elif obj.shape == "triangle":
        # clip-path also clips hit testing: a click outside the triangle does not reach it.
        style += ["border:none", "clip-path:polygon(50% 0, 100% 100%, 0 100%)"]
    else:
        style += ["border:none"]
    return ";".join(style)


def scene_html(objects: Sequence[SceneObject], background: Background, title: str = "vlm-tools demo") -> str:
    """An HTML page showing ``objects`` where a scene would draw them (CSS pixels = scene pixels), each
    element recording its clicks: ``window.clicks`` lists ``{name, x, y}`` per click (``name`` null for a click
    that hit no object) and each element counts its own in ``data-clicked``.

    The same objects as CSS shapes at absolute positions: the bridge from the synthetic pictures to a real browser.
    """
    parts = []
    for obj in objects:
        tag = "button" if obj.shape == "button" else "div"
        label = html.escape(obj.text or "")
        role = "" if tag == "button" else ' role="button"'
        parts.append(
            f'<{tag} data-name="{html.escape(obj.name)}"{role} aria-label="{html.escape(obj.name)}" '
            f'style="{_object_css(obj)}">{label}</{tag}>'
        )
    return (
        '<!doctype html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        "<style>html,body{margin:0;padding:0;width:100%;height:100%;overflow:hidden}"
        f"body{{background:{background.css()};position:relative}}</style></head>\n<body>\n"
        + "\n".join(parts)
        + f"\n<script>{_CLICK_SCRIPT}</script>\n"
        + f'<script type="application/json" id="scene">{json.dumps([o.to_dict() for o in objects])}</script>\n'
        "</body></html>\n"
    )
