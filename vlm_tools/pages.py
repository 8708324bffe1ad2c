"""The pages of whatever ``read_document`` was given: a PDF's selected pages, or a single image.

Pages are rendered one at a time, when asked for, so a 50-page PDF never sits in memory as 50 bitmaps and a
cancelled call renders nothing more. Each rendered page is stored and gets its own ``image_id``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from .documents import PdfDocument, is_pdf, select_pages
from .images.decode import decode_image
from .images.sources import StoredImage
from .images.store import ImageStore
from .results import ImageSize, PageSizePoints
from .settings import Settings


@dataclass(frozen=True)
class RenderedPage:
    """One page as an image the server holds, with its PDF size when it came from a PDF."""

    number: int
    stored: StoredImage
    page_size: PageSizePoints | None


class Pages:
    """The selected pages of one document, rendered on demand."""

    def __init__(
        self,
        *,
        page_count: int,
        selected: list[int],
        pdf: PdfDocument | None,
        image: StoredImage | None,
        settings: Settings,
        store: ImageStore,
        scope: str,
    ) -> None:
        self.page_count = page_count
        self.selected = selected
        self._pdf = pdf
        self._image = image
        self._settings = settings
        self._store = store
        self._scope = scope

    async def render(self, number: int) -> RenderedPage:
        """Render page ``number`` (1-based) in a worker thread and store it."""
        if self._pdf is None:
            assert self._image is not None
            return RenderedPage(number, self._image, None)
        image, size_pt = await anyio.to_thread.run_sync(
            lambda: self._pdf.render_page(number, long_side=self._settings.page_long_side)  # type: ignore[union-attr]
        )
        image_id = await self._store.put(image, self._scope)
        stored = StoredImage(image_id, image, ImageSize(width=image.width, height=image.height))
        return RenderedPage(number, stored, size_pt)

    def close(self) -> None:
        """Release the PDF."""
        if self._pdf is not None:
            self._pdf.close()
            self._pdf = None


@asynccontextmanager
async def open_pages(
    source: bytes | StoredImage, pages: str | None, settings: Settings, store: ImageStore, scope: str
) -> AsyncIterator[Pages]:
    """Open ``source`` (raw bytes or an already stored image) and select ``pages`` (e.g. ``"1-3,5"``)."""
    pdf: PdfDocument | None = None
    image: StoredImage | None = None
    if isinstance(source, StoredImage):
        image, page_count = source, 1
    elif is_pdf(source):
        pdf = await anyio.to_thread.run_sync(PdfDocument.open, source)
        page_count = pdf.page_count
    else:
        decoded = await anyio.to_thread.run_sync(
            lambda: decode_image(source, max_pixels=settings.max_image_pixels)  # type: ignore[arg-type]
        )
        image_id = await store.put(decoded, scope)
        image = StoredImage(image_id, decoded, ImageSize(width=decoded.width, height=decoded.height))
        page_count = 1
    doc = Pages(
        page_count=page_count, selected=[], pdf=pdf, image=image, settings=settings, store=store, scope=scope
    )
    try:
        doc.selected = select_pages(pages, page_count, settings.max_pages)
        yield doc
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(doc.close)
