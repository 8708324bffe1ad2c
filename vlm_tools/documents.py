"""PDF documents: page selection and page rendering with PDFium (pypdfium2).

PDFium is not thread-safe — not even across documents — and has had memory-safety bugs, so every PDFium call
in the process goes through :data:`PDFIUM_LOCK`, pages are capped (``max_pages``) and renders are bounded
(``long_side``).
"""

from __future__ import annotations

import logging
import math
import re
import threading

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image

from .errors import InvalidArgument, InvalidDocument
from .results import PageSizePoints

logger = logging.getLogger(__name__)

PDFIUM_LOCK = threading.Lock()
"""Held around every PDFium call in the process (PDFium has global state and no locking of its own)."""

_PDF_MAGIC = b"%PDF-"
_PAGE_ITEM = re.compile(r"^(?:(\d+)|(\d+)?\s*-\s*(\d+)?)$")


def is_pdf(data: bytes) -> bool:
    """Whether ``data`` carries the PDF header (``%PDF-``) within its first 1024 bytes, as readers allow."""
    return _PDF_MAGIC in data[:1024]


def select_pages(spec: str | None, page_count: int, max_pages: int) -> list[int]:
    """The 1-based pages a ``pages`` argument selects, ascending and without duplicates.

    ``spec`` is a comma-separated list of pages and ranges: ``"2"``, ``"1-3,5"``, ``"4-"`` (4 to the end),
    ``"-3"`` (1 to 3); spaces are ignored. ``None`` selects every page, allowed only when the document has at
    most ``max_pages`` pages. Anything else — empty, zero, out of range, reversed, not numbers, or more than
    ``max_pages`` pages — is :class:`~vlm_tools.errors.InvalidArgument` naming the valid range.
    """
    valid = f"pages are 1-{page_count}" if page_count > 1 else "the document has 1 page"
    if spec is None:
        if page_count > max_pages:
            raise InvalidArgument(
                f"the document has {page_count} pages, more than the {max_pages} read per call (--max-pages); "
                f"choose pages with `pages`, e.g. pages=\"1-{max_pages}\""
            )
        return list(range(1, page_count + 1))
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidArgument(f"`pages` is empty; leave it out for all pages or give pages like \"1-3,5\" ({valid})")
    selected: set[int] = set()
    for item in spec.split(","):
        first, last = _parse_item(item.strip(), spec, page_count, valid)
        if first < 1 or last > page_count:
            raise InvalidArgument(f"`pages` {spec!r} is out of range: {valid}")
        if first > last:
            raise InvalidArgument(f"`pages` {spec!r} has a reversed range {first}-{last}; write it low-high ({valid})")
        if last - first + 1 > max_pages:  # refuse before expanding a huge range
            raise InvalidArgument(_too_many(spec, last - first + 1, max_pages))
        selected.update(range(first, last + 1))
        if len(selected) > max_pages:
            raise InvalidArgument(_too_many(spec, len(selected), max_pages))
    return sorted(selected)


def _parse_item(item: str, spec: str, page_count: int, valid: str) -> tuple[int, int]:
    match = _PAGE_ITEM.match(item) if item.isascii() else None  # ASCII digits only (no "٣")
    if match is None or item == "-" or item == "":
        raise InvalidArgument(
            f"`pages` {spec!r} is not a page list; write pages like \"1-3,5\", \"4-\" or \"-2\" ({valid})"
        )
    single, low, high = match.groups()
    if single is not None:
        return int(single), int(single)
    return (int(low) if low else 1), (int(high) if high else page_count)


def _too_many(spec: str, count: int, max_pages: int) -> str:
    return f"`pages` {spec!r} selects {count} pages, more than the {max_pages} read per call (--max-pages)"


class PdfDocument:
    """An open PDF; every method takes :data:`PDFIUM_LOCK`. Use as a context manager or call :meth:`close`."""

    def __init__(self, pdf: pdfium.PdfDocument, page_count: int) -> None:
        self._pdf: pdfium.PdfDocument | None = pdf
        self.page_count = page_count

    @classmethod
    def open(cls, data: bytes) -> PdfDocument:
        """Open a PDF from its bytes; encrypted, broken or empty documents are :class:`InvalidDocument`."""
        if not is_pdf(data):
            raise InvalidDocument("the data is not a PDF (no %PDF- header); send a PDF or an image")
        with PDFIUM_LOCK:
            try:
                pdf = pdfium.PdfDocument(data)
            except pdfium.PdfiumError as exc:
                # PDFium's last-error value is global and not reset by every failure path (a PDF with no pages
                # fails with a stale code), so "wrong password" counts only when the file has an /Encrypt entry.
                if getattr(exc, "err_code", None) == pdfium_c.FPDF_ERR_PASSWORD and b"/Encrypt" in data:
                    raise InvalidDocument(
                        "encrypted PDFs are not supported; send an unencrypted copy (or images of its pages)"
                    ) from None
                raise InvalidDocument(
                    "the PDF cannot be read: it is broken, truncated or has no pages; send a valid PDF"
                ) from None
            try:
                page_count = len(pdf)
            except Exception:  # noqa: BLE001 - a broken page tree is a bad document, not a crash
                page_count = 0
            if page_count < 1:
                pdf.close()
                raise InvalidDocument("the PDF has no pages")
        return cls(pdf, page_count)

    def render_page(self, page: int, *, long_side: int) -> tuple[Image.Image, PageSizePoints]:
        """Render 1-based ``page`` as RGB with its long side ``long_side`` px (never more) and its size in points.

        The size is the page as displayed (its crop box, after ``/Rotate``), in points (1/72 inch), so coordinates on
        the page image can be mapped back to the page (``x / image width × page width in points``).
        """
        if not 1 <= page <= self.page_count:
            raise InvalidArgument(f"page {page} is out of range: pages are 1-{self.page_count}")
        if long_side < 1:
            raise InvalidArgument("long_side must be at least 1 pixel")
        with PDFIUM_LOCK:
            pdf = self._require_open()
            try:
                pdf_page = pdf[page - 1]
            except Exception as exc:  # noqa: BLE001
                raise InvalidDocument(f"page {page} of the PDF cannot be read ({exc})") from None
            try:
                width, height = pdf_page.get_size()
                if not (math.isfinite(width) and math.isfinite(height) and width > 0 and height > 0):
                    raise InvalidDocument(f"page {page} has no usable size ({width} x {height} points)")
                bitmap = pdf_page.render(scale=_fit_scale(width, height, long_side))
                try:
                    # to_pil() shares the bitmap's memory: convert (a copy) before the bitmap is freed.
                    image = bitmap.to_pil().convert("RGB")
                finally:
                    bitmap.close()
            except InvalidDocument:
                raise
            except Exception as exc:  # noqa: BLE001 - PDFium failures on hostile pages are bad input
                raise InvalidDocument(f"page {page} of the PDF cannot be rendered ({exc})") from None
            finally:
                pdf_page.close()
        return image, PageSizePoints(width=width, height=height)

    def close(self) -> None:
        """Release the document (idempotent)."""
        with PDFIUM_LOCK:
            if self._pdf is not None:
                self._pdf.close()
                self._pdf = None

    def __enter__(self) -> PdfDocument:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _require_open(self) -> pdfium.PdfDocument:
        if self._pdf is None:
            raise InvalidDocument("the document is closed")
        return self._pdf


def _fit_scale(width: float, height: float, long_side: int) -> float:
    """The render scale that makes the page's long side exactly ``long_side`` px once PDFium rounds up.

    pypdfium2 sizes the bitmap as ``ceil(points * scale)``; floating-point error can push that one pixel over,
    so the scale steps down (by ulps) until it does not.
    """
    long_pt = max(width, height)
    scale = long_side / long_pt
    while math.ceil(long_pt * scale) > long_side:
        scale = math.nextafter(scale, 0.0)
    return scale
