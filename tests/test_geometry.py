"""Coordinate conversions (vlm_tools.geometry): pixels ↔ normalised ↔ caller frame, result building, model
scales, and EXIF orientation checked against real decoded images."""

from __future__ import annotations

import math

import pytest
import exif_maps
from conftest_inputs import image_bytes
from PIL import Image

from vlm_tools import geometry as g
from vlm_tools.images import decode_image
from vlm_tools.results import Frame, ImageSize

SIZES = [
    ("square-1x1", (1, 1)),
    ("square-512", (512, 512)),
    ("landscape-1920x1080", (1920, 1080)),
    ("portrait-1080x1920", (1080, 1920)),
    ("landscape-1280x720", (1280, 720)),
    ("portrait-600x900", (600, 900)),
    ("extreme-20000x1", (20000, 1)),
    ("extreme-1x20000", (1, 20000)),
    ("screenshot-dpr2-2560x1440", (2560, 1440)),
]

# Caller frames as a fraction of the image: devicePixelRatio 2 and 1.5 (frame smaller), 1 (same), 0.5 (larger).
DPRS = [("dpr-2", 2.0), ("dpr-1.5", 1.5), ("dpr-1", 1.0), ("frame-larger-dpr-0.5", 0.5)]

NORM_POINTS = [(0.0, 0.0), (1.0, 1.0), (0.5, 0.5), (0.123456789, 0.987654321), (1 / 3, 2 / 3), (0.999, 0.001)]


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.parametrize("size", [s for _, s in SIZES], ids=[n for n, _ in SIZES])
@pytest.mark.parametrize("dpr", [d for _, d in DPRS], ids=[n for n, _ in DPRS])
def test_round_trips(size: tuple[int, int], dpr: float) -> None:
    w, h = size
    frame = (w / dpr, h / dpr)
    for nx, ny in NORM_POINTS:
        px, py = g.to_pixels(nx, ny, w, h)
        back = g.to_norm(px, py, w, h)
        assert close(back[0], nx) and close(back[1], ny)
        fx, fy = g.to_pixels(nx, ny, *frame)
        assert close(fx, px / dpr) and close(fy, py / dpr)  # frame = pixels / devicePixelRatio
        to_frame = g.scale_xy(px, py, (w, h), frame)
        assert close(to_frame[0], fx) and close(to_frame[1], fy)
        to_pixels = g.scale_xy(fx, fy, frame, (w, h))
        assert close(to_pixels[0], px) and close(to_pixels[1], py)
        frame_model = Frame(width=frame[0], height=frame[1])
        result = g.point_result(g.NormPoint(nx, ny), ImageSize(width=w, height=h), frame_model)
        assert close(result.x, px) and close(result.y, py)
        assert close(result.frame_x, fx) and close(result.frame_y, fy)  # type: ignore[arg-type]
        assert (result.x_norm, result.y_norm) == (nx, ny)


POINT_ROWS = [
    # (id, norm point, image size, frame, expected (x, y), expected frame (x, y) or None)
    ("centre-1920x1080", (0.5, 0.5), (1920, 1080), None, (960.0, 540.0), None),
    ("quarter-1920x1080-frame-1280x720", (0.25, 0.75), (1920, 1080), (1280, 720), (480.0, 810.0), (320.0, 540.0)),
    ("screenshot-dpr2", (0.5, 0.25), (2560, 1440), (1280, 720), (1280.0, 360.0), (640.0, 180.0)),
    ("screenshot-dpr1.5", (0.1, 0.9), (1920, 1080), (1280, 720), (192.0, 972.0), (128.0, 648.0)),
    ("frame-larger", (0.5, 0.5), (640, 360), (1280, 720), (320.0, 180.0), (640.0, 360.0)),
    ("origin", (0.0, 0.0), (600, 900), (300, 450), (0.0, 0.0), (0.0, 0.0)),
    ("far-corner", (1.0, 1.0), (600, 900), (300, 450), (600.0, 900.0), (300.0, 450.0)),
    ("extreme-wide", (0.5, 0.5), (20000, 1), None, (10000.0, 0.5), None),
    ("extreme-tall", (0.5, 0.5), (1, 20000), None, (0.5, 10000.0), None),
    ("one-pixel", (0.5, 0.5), (1, 1), (2, 2), (0.5, 0.5), (1.0, 1.0)),
]


@pytest.mark.parametrize(
    ("norm", "size", "frame", "xy", "fxy"), [r[1:] for r in POINT_ROWS], ids=[r[0] for r in POINT_ROWS]
)
def test_point_result(norm, size, frame, xy, fxy) -> None:  # type: ignore[no-untyped-def]
    frame_model = Frame(width=frame[0], height=frame[1]) if frame else None
    p = g.point_result(g.NormPoint(*norm, label="cup"), ImageSize(width=size[0], height=size[1]), frame_model)
    assert (p.x, p.y) == pytest.approx(xy, rel=1e-12)
    assert (p.x_norm, p.y_norm) == norm
    assert p.label == "cup" and p.source == "native"
    if fxy is None:
        assert p.frame_x is None and p.frame_y is None
    else:
        assert (p.frame_x, p.frame_y) == pytest.approx(fxy, rel=1e-12)


BOX_ROWS = [
    ("landscape-with-frame", (0.1, 0.2, 0.3, 0.4), (1000, 500), (500, 250),
     (100.0, 100.0, 300.0, 200.0), (50.0, 50.0, 150.0, 100.0), (200.0, 150.0)),
    ("whole-image", (0.0, 0.0, 1.0, 1.0), (1280, 720), None, (0.0, 0.0, 1280.0, 720.0), None, (640.0, 360.0)),
    ("portrait-dpr2", (0.25, 0.5, 0.75, 1.0), (1080, 1920), (540, 960),
     (270.0, 960.0, 810.0, 1920.0), (135.0, 480.0, 405.0, 960.0), (540.0, 1440.0)),
    ("degenerate-point-box", (0.5, 0.5, 0.5, 0.5), (600, 900), None,
     (300.0, 450.0, 300.0, 450.0), None, (300.0, 450.0)),
]  # fmt: skip


@pytest.mark.parametrize(("box", "size", "frame", "pixels", "frame_px", "centre"), [r[1:] for r in BOX_ROWS],
                         ids=[r[0] for r in BOX_ROWS])  # fmt: skip
def test_box_result(box, size, frame, pixels, frame_px, centre) -> None:  # type: ignore[no-untyped-def]
    frame_model = Frame(width=frame[0], height=frame[1]) if frame else None
    b = g.box_result(g.NormBox(*box, label="dog"), ImageSize(width=size[0], height=size[1]), frame_model)
    assert (b.x0, b.y0, b.x1, b.y1) == pytest.approx(pixels, rel=1e-12)
    assert (b.x0_norm, b.y0_norm, b.x1_norm, b.y1_norm) == box
    assert (b.center.x, b.center.y) == pytest.approx(centre, rel=1e-12)
    assert b.center.source == "box_center" and b.center.label == "dog"
    if frame_px is None:
        assert b.frame_x0 is None and b.center.frame_x is None
    else:
        assert (b.frame_x0, b.frame_y0, b.frame_x1, b.frame_y1) == pytest.approx(frame_px, rel=1e-12)
        assert b.center.frame_x == pytest.approx((frame_px[0] + frame_px[2]) / 2, rel=1e-12)


SCALE_ROWS = [
    ("paligemma-bin-512", 512, 1024, 0.5),
    ("paligemma-bin-0", 0, 1024, 0.0),
    ("paligemma-bin-1024", 1024, 1024, 1.0),
    ("molmo-percent", 63.3, 100, 0.633),
    ("molmo2-permille", 73, 1000, 0.073),
    ("negative", -0.001, 100, None),
    ("over-scale", 100.5, 100, None),
    ("molmo2-over", 1001, 1000, None),
    ("nan", float("nan"), 100, None),
    ("inf", float("inf"), 100, None),
    ("minus-inf", float("-inf"), 100, None),
]


@pytest.mark.parametrize(("value", "scale", "expected"), [r[1:] for r in SCALE_ROWS], ids=[r[0] for r in SCALE_ROWS])
def test_from_scale(value: float, scale: float, expected: float | None) -> None:
    result = g.from_scale(value, scale)
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-1, 5)], ids=["zero-width", "zero-height", "negative"])
def test_to_norm_rejects_empty_sizes(size: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        g.to_norm(1, 1, *size)


# --- EXIF orientation --------------------------------------------------------------------------------------

ORIENTATIONS = list(range(1, 9))
STORED_W, STORED_H = 40, 24
MARKER = (5, 3)  # stored pixel column, row: off every axis of symmetry, so each orientation moves it differently


@pytest.mark.parametrize("orientation", ORIENTATIONS, ids=[f"orientation-{o}" for o in ORIENTATIONS])
def test_exif_orientation_lossless_marker_pixel(orientation: int) -> None:
    """A TIFF carrying the orientation tag, one red pixel: it lands where stored_to_displayed says.

    Pillow's TIFF loader applies the tag itself; this also checks that decoding does not apply it a second time.
    """
    stored = Image.new("RGB", (STORED_W, STORED_H), (0, 0, 0))
    stored.putpixel(MARKER, (255, 0, 0))
    shown = decode_image(image_bytes(stored, "TIFF", tiffinfo={274: orientation}), max_pixels=10_000)
    assert shown.size == exif_maps.oriented_size(STORED_W, STORED_H, orientation)
    red = [(x, y) for y in range(shown.height) for x in range(shown.width) if shown.getpixel((x, y))[0] > 128]
    centre = (MARKER[0] + 0.5, MARKER[1] + 0.5)
    dx, dy = exif_maps.stored_to_displayed(*centre, STORED_W, STORED_H, orientation)
    assert red == [(math.floor(dx), math.floor(dy))]
    assert (dx % 1, dy % 1) == (0.5, 0.5)  # the pixel centre maps to a pixel centre
    assert exif_maps.displayed_to_stored(dx, dy, STORED_W, STORED_H, orientation) == centre


@pytest.mark.parametrize("orientation", ORIENTATIONS, ids=[f"orientation-{o}" for o in ORIENTATIONS])
def test_exif_orientation_jpeg_marker_block(orientation: int) -> None:
    """A JPEG with an EXIF Orientation tag (lossy, so a solid 8x8 block and its centroid)."""
    w, h = 64, 48
    block = (8, 16)  # top-left of an 8x8 block aligned with JPEG's 8x8 grid
    stored = Image.new("RGB", (w, h), (0, 0, 0))
    stored.paste((255, 0, 0), (block[0], block[1], block[0] + 8, block[1] + 8))
    exif = Image.Exif()
    exif[274] = orientation
    shown = decode_image(image_bytes(stored, "JPEG", quality=95, exif=exif.tobytes()), max_pixels=10_000)
    assert shown.size == exif_maps.oriented_size(w, h, orientation)
    red = [(x + 0.5, y + 0.5) for y in range(shown.height) for x in range(shown.width)
           if shown.getpixel((x, y))[0] > 128 and shown.getpixel((x, y))[1] < 100]  # fmt: skip
    assert 50 <= len(red) <= 80
    centroid = (sum(p[0] for p in red) / len(red), sum(p[1] for p in red) / len(red))
    expected = exif_maps.stored_to_displayed(block[0] + 4, block[1] + 4, w, h, orientation)
    assert centroid == pytest.approx(expected, abs=0.75)


SIZES_FOR_EXIF = [(40, 24), (24, 40), (1, 1), (20000, 1), (7, 3)]


@pytest.mark.parametrize("orientation", ORIENTATIONS, ids=[f"orientation-{o}" for o in ORIENTATIONS])
@pytest.mark.parametrize("size", SIZES_FOR_EXIF, ids=[f"{w}x{h}" for w, h in SIZES_FOR_EXIF])
def test_orientation_round_trip(orientation: int, size: tuple[int, int]) -> None:
    w, h = size
    dw, dh = exif_maps.oriented_size(w, h, orientation)
    for fx, fy in [(0, 0), (1, 1), (0.25, 0.75), (0.5, 0.5), (1 / 3, 0.9)]:
        x, y = fx * w, fy * h
        d = exif_maps.stored_to_displayed(x, y, w, h, orientation)
        assert 0 <= d[0] <= dw and 0 <= d[1] <= dh
        back = exif_maps.displayed_to_stored(*d, w, h, orientation)
        assert close(back[0], x) and close(back[1], y)


@pytest.mark.parametrize("orientation", [0, 9, -1], ids=["zero", "nine", "negative"])
def test_invalid_orientation(orientation: int) -> None:
    with pytest.raises(ValueError):
        exif_maps.stored_to_displayed(0, 0, 10, 10, orientation)
    with pytest.raises(ValueError):
        exif_maps.oriented_size(10, 10, orientation)
