"""The vision service under the MCP tools: every tool's work, with no MCP types in it.

Each tool follows one spine — load the image (any accepted source form, or an ``image_id``), build the request
with its token limit, send it to the model that serves the tool (the engine batches it with other callers), build
the typed result, and, when asked, draw it — written once in :meth:`VisionService._ask`. The MCP layer
(:mod:`vlm_tools.tools`) turns arguments into calls here and results into tool results.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from .annotate import draw_detections, draw_points
from .backends.base import Backend, GenerationLimits, Output, Request, Task
from .engine import Engine
from .errors import InvalidArgument
from .geometry import box_result, point_result
from .images.sources import ImageSources, StoredImage
from .images.store import ImageStore
from .metrics import Metrics
from .results import (
    AnswerResult,
    DescribeResult,
    Detection,
    DetectResult,
    DocumentPage,
    DocumentResult,
    Frame,
    PointResult,
)
from .router import TOOL_TASKS, Router
from .settings import Settings

Progress = Callable[[int, int, str], Awaitable[None]]
"""``progress(done, total, message)``: called after each page of a document."""


@dataclass
class Runtime:
    """What stays resident for the life of the process."""

    settings: Settings
    engine: Engine
    router: Router
    sources: ImageSources
    store: ImageStore
    metrics: Metrics
    limits: GenerationLimits = field(default_factory=GenerationLimits)
    backends: list[Backend] = field(default_factory=list)

    def max_new_tokens(self, task: Task, detail: str = "brief") -> int:
        """The token limit for a task: the per-task default, under the configured cap."""
        limit = self.limits.for_request(task, detail)  # type: ignore[arg-type]
        cap = self.settings.max_new_tokens
        return min(limit, cap) if cap else limit


@dataclass(frozen=True)
class Answer:
    """What one tool call got: the stored image it asked about, the model's output and who answered."""

    stored: StoredImage
    output: Output
    model: str


class VisionService:
    """The five tools over a :class:`Runtime`; ``scope`` is the caller's image-handle scope (its MCP session)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def describe(self, image: str, scope: str, *, detail: str, language: str) -> DescribeResult:
        """A caption, brief or detailed, in ``language``."""
        got = await self._ask("describe_image", image, scope, detail=detail, language=language)
        return DescribeResult(**_common(got), text=got.output.text)

    async def answer(self, image: str, scope: str, *, question: str, language: str) -> AnswerResult:
        """The answer to ``question`` about the image."""
        got = await self._ask("answer_about_image", image, scope, text=question, language=language)
        return AnswerResult(**_common(got), answer=got.output.text)

    async def point(
        self, image: str, scope: str, *, description: str, max_points: int, frame: Frame | None, annotate: bool
    ) -> tuple[PointResult, bytes | None]:
        """Points at what ``description`` names, in pixels, normalised and (with ``frame``) frame coordinates."""
        got = await self._ask("point_to_object", image, scope, text=description, max_points=max_points)
        size = got.stored.size
        points = [point_result(p, size, frame, source=got.output.point_source) for p in got.output.points]
        result = PointResult(**_common(got), points=points, count=len(points), found=bool(points), frame=frame)
        return result, await _drawn(annotate, draw_points, got.stored, points)

    async def detect(
        self, image: str, scope: str, *, labels: list[str], frame: Frame | None, annotate: bool
    ) -> tuple[DetectResult, bytes | None]:
        """Boxes around each kind of thing in ``labels`` (blank and repeated labels dropped)."""
        clean = tuple(dict.fromkeys(label.strip() for label in labels if label.strip()))
        if not clean:
            raise InvalidArgument("labels must contain at least one non-blank label")
        got = await self._ask("detect", image, scope, labels=clean)
        size = got.stored.size
        detections = [Detection(label=b.label or "", box=box_result(b, size, frame)) for b in got.output.boxes]
        result = DetectResult(
            **_common(got), detections=detections, count=len(detections), found=bool(detections), frame=frame
        )
        return result, await _drawn(annotate, draw_detections, got.stored, detections)

    async def read_document(
        self, document: str, scope: str, *, pages: str | None, progress: Progress
    ) -> DocumentResult:
        """The text of each selected page of a PDF (or of one image); each page gets its own ``image_id``."""
        from .pages import open_pages

        runtime = self.runtime
        backend = runtime.router.backend_for("read_document")
        source = await runtime.sources.load_bytes(document, scope)
        results: list[DocumentPage] = []
        async with open_pages(source, pages, runtime.settings, runtime.store, scope) as doc:
            total = len(doc.selected)
            for number in doc.selected:
                # Cancellation lands at these awaits: a cancelled call renders and reads no further page.
                page = await doc.render(number)
                request = Request(Task.OCR, page.stored.image, max_new_tokens=runtime.max_new_tokens(Task.OCR))
                output = await runtime.engine.submit(backend, request, tool="read_document")
                results.append(DocumentPage(
                    page=number, image_id=page.stored.image_id, image_size=page.stored.size,
                    page_size_pt=page.page_size, text=output.text, raw=output.raw,
                ))  # fmt: skip
                await progress(len(results), total, f"read page {number} of {doc.page_count}")
            page_count = doc.page_count
        return DocumentResult(pages=results, page_count=page_count, model=backend.name)

    # --- the spine ----------------------------------------------------------------------------------------

    async def _ask(self, tool: str, image: str, scope: str, **fields: Any) -> Answer:
        """Load the image, build the request, send it to the model that serves ``tool``, wait for the answer."""
        runtime = self.runtime
        backend = runtime.router.backend_for(tool)
        stored = await runtime.sources.load_image(image, scope)
        task = TOOL_TASKS[tool]
        limit = runtime.max_new_tokens(task, fields.get("detail", "brief"))
        request = Request(task, stored.image, max_new_tokens=limit, **fields)
        output = await runtime.engine.submit(backend, request, tool=tool)
        return Answer(stored, output, backend.name)


async def _drawn(annotate: bool, draw: Callable[[Any, Any], bytes], stored: StoredImage, items: Any) -> bytes | None:
    """The image with ``items`` drawn on it, as PNG, when ``annotate`` asks for it (in a worker thread)."""
    return await anyio.to_thread.run_sync(draw, stored.image, items) if annotate else None


def _common(got: Answer) -> dict[str, Any]:
    """The fields every image result carries: ``image_id``, ``image_size``, ``model``, ``raw``."""
    return {"image_id": got.stored.image_id, "image_size": got.stored.size, "model": got.model, "raw": got.output.raw}
