"""A bad-image (and bad-document) corpus: every case gives its typed error or a correct image — never a crash
or a hang. Image cases go through ImageSources.load_image, the way the tools receive them."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from conftest_inputs import blank_pdf, encrypted_pdf, image_bytes, noisy_image, zero_page_pdf
from vlm_tools.documents import PdfDocument, select_pages
from vlm_tools.errors import ImageTooLarge, InvalidArgument, InvalidDocument, InvalidImage, VlmToolsError
from vlm_tools.images import ImageSources, MemoryImageStore
from vlm_tools.settings import Settings

pytestmark = pytest.mark.timeout(30)

WHITE = (255, 255, 255)


# --- byte builders -------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR (with a correct CRC) announces ``width x height`` RGB pixels, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def gif_claiming(width: int, height: int) -> bytes:
    """A GIF whose logical screen and only frame announce ``width x height``."""
    header = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x00"
    return header + frame + b";"


def png_with_bad_crc() -> bytes:
    data = bytearray(image_bytes(Image.new("RGB", (4, 4), (1, 2, 3)), "PNG"))
    data[29] ^= 0xFF  # inside the IHDR CRC (8 signature + 4 length + 4 type + 13 data = 29)
    return bytes(data)


def psd_bytes(width: int = 4, height: int = 3) -> bytes:
    """A minimal valid Photoshop file (raw RGB), which Pillow opens when PSD is not excluded."""
    header = b"8BPS" + struct.pack(">H", 1) + b"\0" * 6 + struct.pack(">HIIHH", 3, height, width, 8, 3)
    sections = struct.pack(">I", 0) * 3 + struct.pack(">H", 0)
    planes = bytes([200] * width * height) + bytes([10] * width * height) * 2
    return header + sections + planes


EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
    b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
)
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
HTML = b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return image_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def multipage_tiff() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 255, 0), (255, 0, 0))]
    return image_bytes(frames[0], "TIFF", save_all=True, append_images=frames[1:])


def palette_with_transparency() -> bytes:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    img.putpixel((1, 1), 1)
    return image_bytes(img, "PNG", transparency=0)


def rgb_with_colour_key() -> bytes:
    img = Image.new("RGB", (4, 4), (0, 0, 0))
    img.putpixel((1, 1), (0, 255, 0))
    return image_bytes(img, "PNG", transparency=(0, 0, 0))


def la_image() -> bytes:
    img = Image.new("LA", (4, 4), (0, 0))
    img.putpixel((1, 1), (0, 255))
    return image_bytes(img, "PNG")


def one_bit() -> bytes:
    img = Image.new("1", (8, 8), 0)
    img.putpixel((2, 2), 1)
    return image_bytes(img, "PNG")


def sixteen_bit() -> bytes:
    img = Image.new("I;16", (4, 1))
    for x, value in enumerate((0, 32896, 65535, 1000)):
        img.putpixel((x, 0), value)
    return image_bytes(img, "PNG")


# --- the corpus ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One corpus entry: the bytes, how they are sent, and what must come out."""

    name: str
    make: Callable[[], bytes]
    expect: type[VlmToolsError] | Callable[[Image.Image], None]
    send: str = "base64"  # base64 | data:<mime> | file:<name> | text (the bytes decoded as the argument itself)
    max_pixels: int = 40_000_000
    max_inline: int = 20_000_000


def near(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 3) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def colour_at(x: int, y: int, expected: tuple[int, int, int], size: tuple[int, int] | None = None, tol: int = 3):
    def check(img: Image.Image) -> None:
        assert img.mode == "RGB"
        if size is not None:
            assert img.size == size
        assert near(img.getpixel((x, y)), expected, tol), img.getpixel((x, y))

    return check


def same_pixels(expected: Image.Image) -> Callable[[Image.Image], None]:
    def check(img: Image.Image) -> None:
        assert img.size == expected.size and img.tobytes() == expected.tobytes()

    return check


def all_of(*checks: Callable[[Image.Image], None]) -> Callable[[Image.Image], None]:
    def check(img: Image.Image) -> None:
        for c in checks:
            c(img)

    return check


def solid(color: tuple[int, int, int], fmt: str, mode: str = "RGB", size: tuple[int, int] = (8, 8), **kw: object):
    return lambda: image_bytes(Image.new(mode, size, color if mode == "RGB" else color[: len(mode)]), fmt, **kw)


CASES = [
    # broken, empty, not an image
    Case("empty-file", lambda: b"", InvalidImage, send="file:empty.png"),
    Case("empty-data-uri", lambda: b"", InvalidImage, send="data:image/png"),
    Case("truncated-png", lambda: image_bytes(noisy_image(), "PNG")[:2000], InvalidImage),
    Case("truncated-jpeg", lambda: image_bytes(noisy_image(), "JPEG", quality=90)[:1500], InvalidImage),
    Case("png-signature-only", lambda: b"\x89PNG\r\n\x1a\n", InvalidImage),
    Case("png-header-no-data", lambda: image_bytes(Image.new("RGB", (4, 4)), "PNG")[:33], InvalidImage),
    Case("png-bad-crc", png_with_bad_crc, InvalidImage),
    Case("png-zero-width", lambda: png_claiming(0, 10), InvalidImage),
    Case("plain-text", lambda: b"this is not an image, just some text\n", InvalidImage),
    Case("svg", lambda: SVG, InvalidImage, send="file:drawing.svg"),
    Case("html", lambda: HTML, InvalidImage, send="data:image/png"),
    Case("random-bytes", lambda: bytes(range(256)) * 4, InvalidImage),
    # formats Pillow knows but the server refuses (exotic decoders are where the CVEs live)
    Case("psd-named-png", psd_bytes, InvalidImage, send="file:photo.png"),
    Case("eps", lambda: EPS, InvalidImage, send="file:figure.eps"),
    Case("jpeg2000", solid((255, 0, 0), "JPEG2000"), InvalidImage),
    Case("ico", solid((255, 0, 0), "ICO"), InvalidImage),
    Case("ppm", solid((255, 0, 0), "PPM"), InvalidImage),
    Case("tga", solid((255, 0, 0), "TGA"), InvalidImage),
    # too many pixels: refused from the header, before decoding
    Case("png-claims-100000x100000", lambda: png_claiming(100_000, 100_000), ImageTooLarge),
    Case("png-claims-over-cap", lambda: png_claiming(7_000, 7_000), ImageTooLarge),
    Case("gif-claims-65535-square", lambda: gif_claiming(65535, 65535), ImageTooLarge),
    Case("real-image-over-cap", solid((0, 0, 0), "PNG", size=(100, 100)), ImageTooLarge, max_pixels=5_000),
    Case("base64-over-inline-cap", solid((0, 0, 0), "BMP", size=(64, 64)), ImageTooLarge, max_inline=1_000),
    # argument forms that are not images
    Case("bad-base64", lambda: b"iVBORw0KGgo!!!!", InvalidArgument, send="text"),
    Case("base64-bad-padding", lambda: b"iVBORw0KGgoAAAANSUhEUg", InvalidArgument, send="text"),
    Case("base64-of-text", lambda: base64.b64encode(b"hello there, not an image"), InvalidImage, send="text"),
    Case("data-uri-wrong-type", lambda: b"data:text/html;base64," + base64.b64encode(HTML), InvalidImage, send="text"),
    Case("data-uri-pdf-as-image", lambda: b"data:application/pdf;base64," + base64.b64encode(blank_pdf([(10, 10)])),
         InvalidImage, send="text"),
    Case("data-uri-not-base64", lambda: b"data:image/png,%89PNG%0D%0A%1A%0A", InvalidImage, send="text"),
    Case("data-uri-charset", lambda: b"data:image/png;charset=utf-8;base64,iVBORw0KGgo=", InvalidImage, send="text"),
    Case("data-uri-percent-in-base64", lambda: b"data:image/png;base64,iVBORw0KGgo%3D", InvalidImage, send="text"),
    Case("data-uri-bad-base64", lambda: b"data:image/png;base64,iVBORw0KGgo!!", InvalidImage, send="text"),
    Case("data-uri-no-comma", lambda: b"data:image/png;base64", InvalidImage, send="text"),
    # awkward but valid: converted correctly
    Case("animated-gif-first-frame", animated_gif, colour_at(4, 4, (255, 0, 0), (8, 8))),
    Case("multipage-tiff-first-page", multipage_tiff, colour_at(4, 4, (0, 255, 0), (8, 8))),
    Case("cmyk-jpeg", solid((0, 255, 255, 0), "JPEG", mode="CMYK", quality=95), colour_at(4, 4, (255, 0, 0), tol=20)),
    Case("16-bit-png", sixteen_bit, all_of(colour_at(0, 0, (0, 0, 0)), colour_at(1, 0, (128, 128, 128), tol=1),
                                           colour_at(2, 0, WHITE), colour_at(3, 0, (4, 4, 4), tol=1))),
    Case("float-tiff", solid((0.5,), "TIFF", mode="F"), colour_at(0, 0, (127, 127, 127), tol=1)),
    Case("palette-transparency", palette_with_transparency,
         all_of(colour_at(0, 0, WHITE), colour_at(1, 1, (255, 0, 0)))),
    Case("rgb-colour-key", rgb_with_colour_key, all_of(colour_at(0, 0, WHITE), colour_at(1, 1, (0, 255, 0)))),
    Case("rgba-half-transparent", solid((255, 0, 0, 128), "PNG", mode="RGBA"), colour_at(0, 0, (255, 127, 127), tol=2)),
    Case("rgba-fully-transparent", solid((0, 0, 0, 0), "PNG", mode="RGBA"), colour_at(0, 0, WHITE)),
    Case("la", la_image, all_of(colour_at(0, 0, WHITE), colour_at(1, 1, (0, 0, 0)))),
    Case("one-bit", one_bit, all_of(colour_at(0, 0, (0, 0, 0)), colour_at(2, 2, WHITE))),
    Case("grey-l", solid((90,), "PNG", mode="L"), colour_at(0, 0, (90, 90, 90))),
    Case("1x1", solid((1, 2, 3), "PNG", size=(1, 1)), colour_at(0, 0, (1, 2, 3), (1, 1))),
    Case("20000x1", solid((9, 9, 9), "PNG", size=(20_000, 1)), colour_at(19_999, 0, (9, 9, 9), (20_000, 1))),
    Case("1x20000", solid((9, 9, 9), "PNG", size=(1, 20_000)), colour_at(0, 19_999, (9, 9, 9), (1, 20_000))),
    # every accepted format, through every sending form
    Case("png", solid((10, 200, 30), "PNG"), colour_at(4, 4, (10, 200, 30), (8, 8))),
    Case("jpeg", solid((10, 200, 30), "JPEG", quality=95), colour_at(4, 4, (10, 200, 30), (8, 8), tol=6)),
    Case("webp-lossless", solid((10, 200, 30), "WEBP", lossless=True), colour_at(4, 4, (10, 200, 30), (8, 8))),
    Case("webp-rgba", solid((10, 200, 30, 0), "WEBP", mode="RGBA", lossless=True), colour_at(4, 4, WHITE)),
    Case("bmp", solid((10, 200, 30), "BMP"), colour_at(4, 4, (10, 200, 30), (8, 8))),
    Case("tiff", solid((10, 200, 30), "TIFF"), colour_at(4, 4, (10, 200, 30), (8, 8))),
    Case("gif", solid((10, 200, 30), "GIF"), colour_at(4, 4, (10, 200, 30), (8, 8), tol=8)),
    Case("png-as-data-uri", solid((10, 200, 30), "PNG"), colour_at(4, 4, (10, 200, 30)), send="data:image/png"),
    Case("jpeg-data-uri-jpg-alias", solid((10, 200, 30), "JPEG"), colour_at(4, 4, (10, 200, 30), tol=6),
         send="data:image/jpg"),
    Case("png-as-file", solid((10, 200, 30), "PNG"), colour_at(4, 4, (10, 200, 30)), send="file:ok.png"),
    Case("png-misnamed-jpg", solid((10, 200, 30), "PNG"), colour_at(4, 4, (10, 200, 30)), send="file:ok.jpg"),
    Case("base64-with-line-breaks", solid((10, 200, 30), "PNG"), colour_at(4, 4, (10, 200, 30)), send="base64-mime"),
    Case("base64-urlsafe-garbage", lambda: bytes(range(256)), InvalidImage, send="base64-urlsafe"),
    Case("base64-urlsafe-png", lambda: image_bytes(noisy_image((8, 8)), "PNG"), same_pixels(noisy_image((8, 8))),
         send="base64-urlsafe"),
]


def _argument(case: Case, data: bytes, tmp_path: Path) -> str:
    if case.send == "base64":
        return base64.b64encode(data).decode()
    if case.send == "base64-mime":
        return base64.encodebytes(data).decode()
    if case.send == "base64-urlsafe":
        encoded = base64.urlsafe_b64encode(data).decode()
        assert "-" in encoded or "_" in encoded  # otherwise the case tests nothing
        return encoded
    if case.send == "text":
        return data.decode()
    if case.send.startswith("data:"):
        return f"{case.send};base64,{base64.b64encode(data).decode()}"
    name = case.send.removeprefix("file:")
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_bad_image_corpus(case: Case, tmp_path: Path) -> None:
    settings = Settings(allow_path=(tmp_path,), allow_urls=False, max_image_pixels=case.max_pixels,
                        max_inline_bytes=case.max_inline)  # fmt: skip
    sources = ImageSources(settings, MemoryImageStore(16, 10**9))
    argument = _argument(case, case.make(), tmp_path)
    try:
        if isinstance(case.expect, type):
            with pytest.raises(case.expect) as caught:
                await sources.load_image(argument, "scope")
            assert str(caught.value).startswith(case.expect.code + ": ")
        else:
            stored = await sources.load_image(argument, "scope")
            case.expect(stored.image)
            assert (stored.size.width, stored.size.height) == stored.image.size
    finally:
        await sources.aclose()


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 25


def test_psd_bytes_really_are_a_psd() -> None:
    """The PSD case is only meaningful if Pillow would have decoded it without the allowlist."""
    assert Image.open(io.BytesIO(psd_bytes())).format == "PSD"
    assert Image.open(io.BytesIO(EPS)).format == "EPS"


def test_invalid_image_message_names_accepted_formats() -> None:
    from vlm_tools.images import decode_image

    with pytest.raises(InvalidImage, match="PNG, JPEG, WebP, GIF, BMP or TIFF"):
        decode_image(SVG, max_pixels=100)


# --- documents ---------------------------------------------------------------------------------------------

DOCUMENT_CASES = [
    ("zero-pages", zero_page_pdf, "broken, truncated or has no pages"),
    ("encrypted", encrypted_pdf, "encrypted PDFs are not supported"),
    ("garbage-after-magic", lambda: b"%PDF-1.7\n" + bytes(range(256)) * 8, "cannot be read"),
    ("truncated", lambda: blank_pdf([(100, 100)] * 3)[:300], "cannot be read"),
    ("magic-only", lambda: b"%PDF-", "cannot be read"),
    ("not-a-pdf", lambda: image_bytes(Image.new("RGB", (4, 4)), "PNG"), "not a PDF"),
    ("empty", lambda: b"", "not a PDF"),
]


@pytest.mark.parametrize(("make", "fragment"), [c[1:] for c in DOCUMENT_CASES], ids=[c[0] for c in DOCUMENT_CASES])
def test_bad_documents(make: Callable[[], bytes], fragment: str) -> None:
    with pytest.raises(InvalidDocument, match=fragment):
        PdfDocument.open(make())


def test_encrypted_pdf_is_real() -> None:
    """The encrypted case is only meaningful if the right password really opens it."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(encrypted_pdf(), password="secret")
    assert len(pdf) == 1
    pdf.close()


def test_encrypted_after_zero_pages_and_back() -> None:
    """PDFium's stale last-error value must not turn a broken PDF into an 'encrypted' one or back."""
    for make, fragment in [(encrypted_pdf, "encrypted"), (zero_page_pdf, "no pages"), (encrypted_pdf, "encrypted")]:
        with pytest.raises(InvalidDocument, match=fragment):
            PdfDocument.open(make())


def test_pdf_over_page_cap_needs_a_page_choice() -> None:
    with PdfDocument.open(blank_pdf([(50, 50)] * 6)) as doc:
        with pytest.raises(InvalidArgument, match="choose pages with `pages`"):
            select_pages(None, doc.page_count, max_pages=5)
        assert select_pages("2-6", doc.page_count, max_pages=5) == [2, 3, 4, 5, 6]


async def test_pdf_data_uri_loads_as_bytes_for_documents(tmp_path: Path) -> None:
    pdf = blank_pdf([(50, 50)])
    sources = ImageSources(Settings(allow_path=(tmp_path,), allow_urls=False), MemoryImageStore(4, 10**8))
    try:
        assert await sources.load_bytes("data:application/pdf;base64," + base64.b64encode(pdf).decode(), "s") == pdf
    finally:
        await sources.aclose()
