"""Bytes → a checked 8-bit RGB image, the only place image bytes are parsed.

Every image source (file, URL, data URI, base64) ends here, and hostile input is normal input: the checks are
listed at :func:`decode_image`.
"""

from __future__ import annotations

import io
import logging

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageTooLarge, InvalidImage, VlmToolsError

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
"""Pillow format names decoded; anything else is :class:`~vlm_tools.errors.InvalidImage`."""

_ACCEPTED_TEXT = "PNG, JPEG, WebP, GIF, BMP or TIFF"

# Modes whose alpha channel (or palette/colour-key transparency) must be composited on white.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode ``data`` into an upright 8-bit RGB image of at most ``max_pixels`` pixels.

    Hostile input is normal input, so:

    * only the formats in :data:`ACCEPTED_FORMATS` are even tried (most Pillow CVEs live in exotic plugins: PSD,
      EPS, FITS, McIdas, JPEG 2000), never chosen by file name;
    * the pixel count is read from the header and checked *before* any pixel is decoded (a 100000×100000 PNG is
      a few hundred bytes);
    * the pixels are fully loaded here, so truncated data fails here with a typed error rather than later inside
      a model;
    * the result is always an upright (EXIF orientation applied), single-frame, 8-bit RGB image, transparency
      composited on white — the one form every backend and every coordinate in a result refers to.

    Raises :class:`~vlm_tools.errors.InvalidImage` for empty, unrecognised, broken or truncated data, and
    :class:`~vlm_tools.errors.ImageTooLarge` when the header announces more than ``max_pixels`` pixels (or more
    than Pillow's own decompression-bomb ceiling, ``Image.MAX_IMAGE_PIXELS``). Animated images give their first
    frame.
    """
    if not data:
        raise InvalidImage(f"the image is empty (0 bytes); send a {_ACCEPTED_TEXT} image")
    try:
        return _decode(data, max_pixels)
    except VlmToolsError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own ceiling; our header check normally fires first.
        raise ImageTooLarge(
            f"the image announces too many pixels to decode safely ({exc}); the limit is {max_pixels:,} pixels "
            "(--max-image-pixels); send a smaller image"
        ) from None
    except MemoryError:
        raise ImageTooLarge("the image is too large to decode in the memory available") from None
    except UnidentifiedImageError:
        raise InvalidImage(f"the data is not a {_ACCEPTED_TEXT} image") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure on hostile bytes is bad input, not a crash
        # Plugins raise OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, ... on broken data.
        logger.debug("image decode failed: %s: %s", type(exc).__name__, exc)
        raise InvalidImage(
            f"the image is broken or truncated ({type(exc).__name__}: {exc}); send a complete {_ACCEPTED_TEXT} image"
        ) from None


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    width, height = img.size
    if width <= 0 or height <= 0:
        raise InvalidImage(f"the image has no pixels ({width}x{height}); send a {_ACCEPTED_TEXT} image")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(--max-image-pixels); send a smaller image"
        )
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animations and multi-page TIFFs: the first frame only
    img.load()  # decode every pixel now, so truncation surfaces here
    img = _apply_orientation(img)
    return to_rgb(img)


def _apply_orientation(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag so the result is the image as a viewer displays it."""
    try:
        upright = ImageOps.exif_transpose(img)
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block must not sink an otherwise good image
        logger.debug("ignoring unreadable EXIF orientation: %s: %s", type(exc).__name__, exc)
        return img
    return img if upright is None else upright


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert an image of any Pillow mode to 8-bit RGB, compositing transparency on white."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode == "I":
        return _scale_to_8bit(img.convert("I"), default_max=65535).convert("RGB")
    if mode == "F":
        return _scale_to_8bit(img, default_max=1.0).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV


def _scale_to_8bit(img: Image.Image, *, default_max: float) -> Image.Image:
    """Map a 32-bit integer or float greyscale image onto 0..255.

    16-bit data (0..65535) and float data in 0..1 scale by their nominal range so a dark image stays dark;
    data that already fits 0..255 is kept; anything else (negative or wider values) is stretched min..max.
    """
    low, high = img.getextrema()
    if low >= 0 and high <= 255 and default_max > 1:
        scale, offset = 1.0, 0.0
    elif low >= 0 and high <= default_max:
        scale, offset = 255.0 / default_max, 0.0
    elif high > low:
        scale, offset = 255.0 / (high - low), -low * 255.0 / (high - low)
    else:
        scale, offset = 0.0, 0.0 if low < 0 else 255.0
    grey = img.point(lambda v: v * scale + offset)  # linear maps run in C for I and F images
    return grey.convert("L")
