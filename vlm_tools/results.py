"""Typed results of the five tools (pydantic; they become each tool's ``outputSchema``).

Coordinates follow the contract of :func:`vlm_tools.geometry.point_result`: pixels of the image as the server saw
it (after EXIF orientation), the same normalised to [0, 1], and — when the caller gave a ``frame`` — in that frame.
Build points and boxes with it and :func:`~vlm_tools.geometry.box_result`; nothing here computes coordinates.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ImageSize(_Model):
    """Size in pixels of the image as the server saw it (after EXIF orientation)."""

    width: int = Field(gt=0)
    height: int = Field(gt=0)


class Frame(_Model):
    """The caller's coordinate frame, e.g. a browser viewport in CSS pixels."""

    width: float = Field(gt=0, le=1_000_000, description="Width of the caller's coordinate frame (e.g. viewport CSS px).")
    height: float = Field(gt=0, le=1_000_000, description="Height of the caller's coordinate frame.")


class Point(_Model):
    """A point in image pixels, normalised, and (when a frame was given) frame coordinates."""

    x: float = Field(description="Pixels from the left edge of the image.")
    y: float = Field(description="Pixels from the top edge of the image.")
    x_norm: float = Field(ge=0, le=1, description="x / image width.")
    y_norm: float = Field(ge=0, le=1, description="y / image height.")
    frame_x: float | None = Field(default=None, description="x in the caller's frame; null when no frame was given.")
    frame_y: float | None = Field(default=None, description="y in the caller's frame; null when no frame was given.")
    label: str | None = Field(default=None, description="What the model said this point is, when it said.")
    source: Literal["native", "box_center"] = Field(
        default="native",
        description="'native': the model pointed here. 'box_center': the centre of a detected box, used because "
        "the model that answered cannot point.",
    )


class Box(_Model):
    """An axis-aligned box (x0, y0 top-left; x1, y1 bottom-right) in pixels, normalised and frame units."""

    x0: float
    y0: float
    x1: float
    y1: float
    x0_norm: float = Field(ge=0, le=1)
    y0_norm: float = Field(ge=0, le=1)
    x1_norm: float = Field(ge=0, le=1)
    y1_norm: float = Field(ge=0, le=1)
    frame_x0: float | None = None
    frame_y0: float | None = None
    frame_x1: float | None = None
    frame_y1: float | None = None
    center: Point = Field(description="The box centre: a good place to click.")


class Detection(_Model):
    """One detected object."""

    label: str
    box: Box


_WARNINGS = (
    "What to know before trusting the result, e.g. that the model's answer holds geometry in a form this server "
    "could not read (then an empty result does not mean that nothing is there; see raw)."
)


class _ImageResult(_Model):
    image_id: str = Field(description="Handle for this image: pass it as `image` in later calls instead of the bytes.")
    image_size: ImageSize
    model: str = Field(description="The model that answered.")
    raw: str = Field(description="The model's raw text output, unparsed.")


class DescribeResult(_ImageResult):
    """Result of ``describe_image``."""

    text: str


class AnswerResult(_ImageResult):
    """Result of ``answer_about_image``."""

    answer: str


class PointResult(_ImageResult):
    """Result of ``point_to_object``."""

    points: list[Point]
    count: int = Field(description="Number of points returned.")
    found: bool = Field(description="False when the model found nothing matching the description.")
    frame: Frame | None = Field(default=None, description="The frame the frame_x/frame_y values refer to.")
    warnings: list[str] = Field(default_factory=list, description=_WARNINGS)


class DetectResult(_ImageResult):
    """Result of ``detect``."""

    detections: list[Detection]
    count: int
    found: bool
    frame: Frame | None = None
    warnings: list[str] = Field(default_factory=list, description=_WARNINGS)


class PageSizePoints(_Model):
    """A PDF page's size in points (1/72 inch)."""

    width: float
    height: float


class DocumentPage(_Model):
    """One page of ``read_document``."""

    page: int = Field(ge=1, description="1-based page number in the document.")
    image_id: str = Field(description="Handle of the rendered page: ask answer_about_image / point_to_object about it.")
    image_size: ImageSize
    page_size_pt: PageSizePoints | None = Field(
        default=None, description="The PDF page size in points; null for a single image."
    )
    text: str
    raw: str


class DocumentResult(_Model):
    """Result of ``read_document``."""

    pages: list[DocumentPage]
    page_count: int = Field(description="Pages in the whole document.")
    model: str
