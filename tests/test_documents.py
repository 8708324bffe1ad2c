"""PDF documents: page selection, rendering sizes and page geometry, and PDFium serialisation."""

from __future__ import annotations

import io
import threading

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
import pytest
from PIL import Image

from conftest_inputs import blank_pdf
from vlm_tools import documents
from vlm_tools.documents import PdfDocument, is_pdf, select_pages
from vlm_tools.errors import InvalidArgument, InvalidDocument

pytestmark = pytest.mark.timeout(60)

SELECT_OK = [
    # (id, spec, page_count, max_pages, expected)
    ("all-none", None, 3, 10, [1, 2, 3]),
    ("all-at-cap", None, 5, 5, [1, 2, 3, 4, 5]),
    ("single", "2", 3, 10, [2]),
    ("range", "1-3", 5, 10, [1, 2, 3]),
    ("list-and-range", "1-3,5", 6, 10, [1, 2, 3, 5]),
    ("open-end", "4-", 6, 10, [4, 5, 6]),
    ("open-start", "-3", 6, 10, [1, 2, 3]),
    ("whitespace", " 1 - 2 , 4 ", 6, 10, [1, 2, 4]),
    ("duplicates-removed", "2,2,1-3,3", 6, 10, [1, 2, 3]),
    ("unordered-sorted", "5,1,3", 6, 10, [1, 3, 5]),
    ("single-page-range", "3-3", 6, 10, [3]),
    ("last-page", "6", 6, 10, [6]),
    ("exactly-max", "1-4", 10, 4, [1, 2, 3, 4]),
    ("over-cap-document-with-choice", "7-9", 100, 3, [7, 8, 9]),
    ("leading-zeros", "02", 3, 10, [2]),
]


@pytest.mark.parametrize(
    ("spec", "count", "cap", "expected"), [r[1:] for r in SELECT_OK], ids=[r[0] for r in SELECT_OK]
)
def test_select_pages_valid(spec: str | None, count: int, cap: int, expected: list[int]) -> None:
    assert select_pages(spec, count, cap) == expected


SELECT_BAD = [
    # (id, spec, page_count, max_pages, message fragment)
    ("none-over-cap", None, 11, 10, "choose pages with `pages`"),
    ("zero", "0", 5, 10, "1-5"),
    ("range-from-zero", "0-2", 5, 10, "1-5"),
    ("past-end", "6", 5, 10, "out of range: pages are 1-5"),
    ("range-past-end", "4-9", 5, 10, "1-5"),
    ("huge-number", "99999999999999999999", 5, 10, "1-5"),
    ("reversed", "3-1", 5, 10, "reversed"),
    ("garbage", "abc", 5, 10, "not a page list"),
    ("float", "1.5", 5, 10, "not a page list"),
    ("plus-sign", "+1", 5, 10, "not a page list"),
    ("negative-looking-double", "--2", 5, 10, "not a page list"),
    ("three-part-range", "1-2-3", 5, 10, "not a page list"),
    ("lone-dash", "-", 5, 10, "not a page list"),
    ("empty-item", "1,,2", 5, 10, "not a page list"),
    ("trailing-comma", "1,", 5, 10, "not a page list"),
    ("empty-string", "", 5, 10, "empty"),
    ("blank-string", "   ", 5, 10, "empty"),
    ("unicode-digits", "\u0663", 5, 10, "not a page list"),
    ("too-many-in-range", "1-20", 30, 10, "more than the 10"),
    ("too-many-in-list", "1,2,3,4", 30, 3, "more than the 3"),
    ("open-end-too-many", "2-", 30, 5, "more than the 5"),
    ("single-page-doc-message", "2", 1, 10, "the document has 1 page"),
]


@pytest.mark.parametrize(
    ("spec", "count", "cap", "fragment"), [r[1:] for r in SELECT_BAD], ids=[r[0] for r in SELECT_BAD]
)
def test_select_pages_invalid(spec: str | None, count: int, cap: int, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        select_pages(spec, count, cap)
    assert fragment in str(caught.value)
    assert str(caught.value).startswith("invalid_argument: ")


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"%PDF-1.7\n", True), (b"\xef\xbb\xbf  %PDF-1.4", True), (b"x" * 1000 + b"%PDF-", True),
     (b"x" * 1100 + b"%PDF-", False), (b"", False), (b"\x89PNG", False)],
    ids=["plain", "after-bom", "within-1024", "after-1024", "empty", "png"],
)  # fmt: skip
def test_is_pdf(data: bytes, expected: bool) -> None:
    assert is_pdf(data) is expected


def pdf_with_marked_page() -> bytes:
    """Pages: portrait Letter, landscape A4, a 200x100 page with /Rotate 90 and a black square in the top-left
    quadrant (as drawn, before rotation), and a 100x100 page with a CropBox smaller than its MediaBox."""
    pdf = pdfium.PdfDocument.new()
    for width, height in ((612, 792), (842, 595)):
        pdf.new_page(width, height).close()
    page = pdf.new_page(200, 100)
    rect = pdfium_c.FPDFPageObj_CreateNewRect(0, 50, 100, 50)  # PDF origin is bottom-left: this is the top-left
    pdfium_c.FPDFPageObj_SetFillColor(rect, 0, 0, 0, 255)
    pdfium_c.FPDFPath_SetDrawMode(rect, pdfium_c.FPDF_FILLMODE_ALTERNATE, False)
    pdfium_c.FPDFPage_InsertObject(page, rect)
    pdfium_c.FPDFPage_GenerateContent(page)
    page.set_rotation(90)
    page.close()
    cropped = pdf.new_page(100, 100)
    cropped.set_cropbox(0, 0, 60, 40)
    cropped.close()
    buf = io.BytesIO()
    pdf.save(buf)
    pdf.close()
    return buf.getvalue()


RENDER_ROWS = [
    # (id, page, long_side, expected image size, expected page size in points)
    ("portrait-letter", 1, 1024, (792, 1024), (612.0, 792.0)),
    ("landscape-a4", 2, 1024, (1024, 724), (842.0, 595.0)),
    ("rotated-90", 3, 400, (200, 400), (100.0, 200.0)),
    ("cropbox", 4, 300, (300, 200), (60.0, 40.0)),
    ("small-long-side", 1, 64, (50, 64), (612.0, 792.0)),
    ("odd-long-side", 2, 777, (777, 550), (842.0, 595.0)),
]


@pytest.mark.parametrize(("page", "long_side", "image_size", "points"), [r[1:] for r in RENDER_ROWS],
                         ids=[r[0] for r in RENDER_ROWS])  # fmt: skip
def test_render_sizes(page: int, long_side: int, image_size: tuple[int, int], points: tuple[float, float]) -> None:
    with PdfDocument.open(pdf_with_marked_page()) as doc:
        assert doc.page_count == 4
        image, size = doc.render_page(page, long_side=long_side)
    assert image.mode == "RGB"
    assert max(image.size) == long_side
    assert image.size == image_size
    assert (size.width, size.height) == points
    # The image keeps the page's aspect ratio to within one pixel of rounding.
    assert abs(image.width / image.height - points[0] / points[1]) < 2 / min(image.size)


def test_rotated_page_renders_as_displayed() -> None:
    with PdfDocument.open(pdf_with_marked_page()) as doc:
        image, _ = doc.render_page(3, long_side=400)
    # Drawn in the top-left quadrant, turned 90 degrees clockwise by /Rotate: now in the top-right quadrant.
    assert image.getpixel((150, 50)) == (0, 0, 0)
    for corner in ((50, 50), (50, 350), (150, 350)):
        assert image.getpixel(corner) == (255, 255, 255)


@pytest.mark.parametrize(
    ("width", "height", "long_side"),
    [(612, 792, 2048), (1, 14400, 2048), (14400, 1, 1000), (333.3, 777.7, 1000), (595.28, 841.89, 2048),
     (100, 100, 64)],
    ids=["letter", "needle-tall", "needle-wide", "fractional", "a4-fractional", "square"],
)  # fmt: skip
def test_long_side_is_exact_never_over(width: float, height: float, long_side: int) -> None:
    with PdfDocument.open(blank_pdf([(width, height)])) as doc:
        image, size = doc.render_page(1, long_side=long_side)
    assert max(image.size) == long_side
    assert min(image.size) >= 1
    assert (size.width, size.height) == pytest.approx((width, height), rel=1e-6)


@pytest.mark.parametrize("page", [0, 5, -1], ids=["zero", "past-end", "negative"])
def test_render_page_out_of_range(page: int) -> None:
    with PdfDocument.open(pdf_with_marked_page()) as doc:
        with pytest.raises(InvalidArgument, match="1-4"):
            doc.render_page(page, long_side=100)


def test_closed_document_refuses_and_close_is_idempotent() -> None:
    doc = PdfDocument.open(blank_pdf([(50, 50)]))
    doc.close()
    doc.close()
    with pytest.raises(InvalidDocument, match="closed"):
        doc.render_page(1, long_side=100)


def test_every_render_holds_the_pdfium_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    real_render = pdfium.PdfPage.render
    held: list[bool] = []

    def render(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        held.append(documents.PDFIUM_LOCK.locked())
        return real_render(self, *args, **kwargs)

    monkeypatch.setattr(pdfium.PdfPage, "render", render)
    with PdfDocument.open(blank_pdf([(50, 50), (60, 40)])) as doc:
        doc.render_page(1, long_side=64)
        doc.render_page(2, long_side=64)
    assert held == [True, True]


def test_concurrent_renders_from_many_threads() -> None:
    data = pdf_with_marked_page()
    shared = PdfDocument.open(data)
    errors: list[BaseException] = []
    results: list[tuple[int, tuple[int, int]]] = []
    start = threading.Barrier(6)

    def worker(index: int) -> None:
        try:
            start.wait()
            own = PdfDocument.open(data)  # opening and closing while others render
            try:
                for round_ in range(3):
                    doc = shared if (index + round_) % 2 else own
                    page = 1 + (index + round_) % 4
                    image, _ = doc.render_page(page, long_side=256)
                    results.append((page, image.size))
            finally:
                own.close()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    shared.close()
    assert errors == []
    assert len(results) == 18
    expected = {1: (198, 256), 2: (256, 181), 3: (128, 256), 4: (256, 171)}
    for page, size in results:
        assert size == expected[page], (page, size)


def test_rendered_page_is_independent_of_the_closed_document() -> None:
    """The image must own its pixels: PDFium's bitmap memory is freed when the render finishes."""
    with PdfDocument.open(pdf_with_marked_page()) as doc:
        image, _ = doc.render_page(3, long_side=400)
    copy = Image.new("RGB", image.size)
    copy.paste(image)
    assert copy.getpixel((150, 50)) == (0, 0, 0)
