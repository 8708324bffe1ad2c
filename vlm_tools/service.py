"""The vision service under the MCP tools: every tool's work, with no MCP types in it.

The MCP layer (:mod:`vlm_tools.tools`) turns arguments into calls here and results into tool results; every tool
follows one spine, written once (:class:`VisionService`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .pages import Pages, RenderedPage

Progress = Callable[[float, float | None, str], Awaitable[None]]
"""``progress(done, total, message)``: how a call goes (its model loading, a document's pages)."""


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

    def health(self) -> dict[str, Any]:
        """The engine's health with each model's load state: ``ok`` while every model that loaded serves and none
        is still loading (a model that failed to load is reported, and the others go on serving)."""
        state = self.engine.health()
        loading = False
        for backend in self.backends:
            model = state["models"].setdefault(backend.name, {})
            model.update(backend.status())
            loading = loading or model["state"] == "loading"
            if model["state"] == "failed":  # not serving, by no fault of its lane: it is reported, not counted
                model["serving"] = False
        usable = [m for m in state["models"].values() if m["state"] != "failed"]
        state["ok"] = bool(usable) and state["accepting"] and not loading and all(
            m.get("alive", True) and m.get("serving", True) for m in usable
        )
        return state

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
    """The five tools over a :class:`Runtime`; ``scope`` is the caller's image-handle scope (its MCP session).

    Each tool follows one spine — load the image (any accepted source form, or an ``image_id``), build the request
    with its token limit, send it to the model that serves the tool (the engine batches it with other callers), build
    the typed result, and, when asked, draw it — written once in :meth:`_ask`.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def describe(
        self, image: str, scope: str, *, detail: str, language: str, progress: Progress | None = None
    ) -> DescribeResult:
        """A caption, brief or detailed, in ``language``."""
        got = await self._ask("describe_image", image, scope, progress, detail=detail, language=language)
        return DescribeResult(**_common(got), text=got.output.text)

    async def answer(
        self, image: str, scope: str, *, question: str, language: str, progress: Progress | None = None
    ) -> AnswerResult:
        """The answer to ``question`` about the image."""
        got = await self._ask("answer_about_image", image, scope, progress, text=question, language=language)
        return AnswerResult(**_common(got), answer=got.output.text)

    async def point(
        self, image: str, scope: str, *, description: str, max_points: int, frame: Frame | None, annotate: bool,
        progress: Progress | None = None,
    ) -> tuple[PointResult, bytes | None]:  # fmt: skip
        """Points at what ``description`` names, in pixels, normalised and (with ``frame``) frame coordinates."""
        got = await self._ask("point_to_object", image, scope, progress, text=description, max_points=max_points)
        size = got.stored.size
        points = [point_result(p, size, frame, source=got.output.point_source) for p in got.output.points]
        result = PointResult(**_common(got), points=points, count=len(points), found=bool(points), frame=frame,
                             warnings=self._unread("point_to_object", got, "point"))  # fmt: skip
        return result, await _drawn(annotate, draw_points, got.stored, points)

    async def detect(
        self, image: str, scope: str, *, labels: list[str], frame: Frame | None, annotate: bool,
        progress: Progress | None = None,
    ) -> tuple[DetectResult, bytes | None]:  # fmt: skip
        """Boxes around each kind of thing in ``labels`` (blank and repeated labels dropped)."""
        clean = tuple(dict.fromkeys(label.strip() for label in labels if label.strip()))
        if not clean:
            raise InvalidArgument("labels must contain at least one non-blank label")
        got = await self._ask("detect", image, scope, progress, labels=clean)
        size = got.stored.size
        detections = [Detection(label=b.label or "", box=box_result(b, size, frame)) for b in got.output.boxes]
        result = DetectResult(
            **_common(got), detections=detections, count=len(detections), found=bool(detections), frame=frame,
            warnings=self._unread("detect", got, "box"),
        )  # fmt: skip
        return result, await _drawn(annotate, draw_detections, got.stored, detections)

    async def read_document(
        self, document: str, scope: str, *, pages: str | None, progress: Progress
    ) -> DocumentResult:
        """The text of each selected page of a PDF (or of one image); each page gets its own ``image_id``."""
        from .pages import open_pages

        runtime = self.runtime
        backend = runtime.router.backend_for("read_document")
        source = await runtime.sources.load_bytes(document, scope)
        async with open_pages(source, pages, runtime.settings, runtime.store, scope) as doc:
            with backend.in_use():
                # Loading is reported below one page (progress < 1), so the page count that follows still grows.
                await self._ready(backend, progress, None)
                results = await self._read_pages(doc, backend, progress)
            page_count = doc.page_count
        return DocumentResult(pages=results, page_count=page_count, model=backend.name)

    async def _read_pages(self, doc: Pages, backend: Backend, progress: Progress) -> list[DocumentPage]:
        """Read the selected pages together, so they batch with each other and with other callers.

        Up to the engine's capacity for the model is in flight at once; the next page renders while earlier
        ones are read. Progress reports pages in order, however they finish. The first failure stops the
        rest and is raised; cancelling the call cancels every page still rendering or waiting.
        """
        runtime = self.runtime
        selected, total = doc.selected, len(doc.selected)
        read: dict[int, DocumentPage] = {}
        failures: list[Exception] = []
        in_flight = anyio.Semaphore(runtime.engine.capacity(backend))
        reporting = anyio.Lock()
        reported = 0

        async def read_page(index: int, page: RenderedPage) -> None:
            nonlocal reported
            request = Request(Task.OCR, page.stored.image, max_new_tokens=runtime.max_new_tokens(Task.OCR),
                              image_id=page.stored.image_id)  # fmt: skip
            try:
                try:
                    output = await runtime.engine.submit(backend, request, tool="read_document")
                finally:
                    in_flight.release()
                read[index] = DocumentPage(
                    page=page.number, image_id=page.stored.image_id, image_size=page.stored.size,
                    page_size_pt=page.page_size, text=output.text, raw=output.raw,
                )  # fmt: skip
                async with reporting:
                    while reported < total and reported in read:
                        reported += 1
                        await progress(reported, total, f"read page {selected[reported - 1]} of {doc.page_count}")
            except Exception as error:  # noqa: BLE001 — raised after the group, as the call's error
                failures.append(error)
                group.cancel_scope.cancel()

        async with anyio.create_task_group() as group:
            for index, number in enumerate(selected):
                await in_flight.acquire()
                try:
                    page = await doc.render(number)
                except Exception as error:  # noqa: BLE001 — a page that cannot render fails the call
                    in_flight.release()
                    failures.append(error)
                    group.cancel_scope.cancel()
                    break
                group.start_soon(read_page, index, page)
        if failures:
            raise failures[0]
        return [read[index] for index in range(total)]

    def _unread(self, tool: str, got: Answer, what: str) -> list[str]:
        """A warning (and a count in the metrics) when the model's answer holds geometry its parser could not read,
        so that "found nothing" and "could not read it" differ."""
        if not got.output.unreadable:
            return []
        self.runtime.metrics.record_unreadable(got.model, tool)
        count = got.output.unreadable
        return [
            f"the model's answer holds {count} piece{'s' if count > 1 else ''} of {what} markup this server could not "
            "read (another syntax, or values out of range; see raw): an empty or short result does not mean that "
            "nothing more is there"
        ]

    # --- the spine ----------------------------------------------------------------------------------------

    async def _ask(self, tool: str, image: str, scope: str, progress: Progress | None, **fields: Any) -> Answer:
        """Load the image, build the request, send it to the model that serves ``tool`` (once its weights are in),
        wait for the answer."""
        runtime = self.runtime
        backend = runtime.router.backend_for(tool)
        stored = await runtime.sources.load_image(image, scope)
        task = TOOL_TASKS[tool]
        limit = runtime.max_new_tokens(task, fields.get("detail", "brief"))
        request = Request(task, stored.image, max_new_tokens=limit, image_id=stored.image_id, **fields)
        with backend.in_use():
            left = await self._ready(backend, progress, 1.0)
            output = await runtime.engine.submit(backend, request, tool=tool, timeout_s=left)
        return Answer(stored, output, backend.name)

    async def _ready(self, backend: Backend, progress: Progress | None, total: float | None) -> float:
        """Wait until ``backend``'s weights are loaded, telling the caller how the load goes; the seconds left of
        the request's time limit."""
        limit = self.runtime.settings.request_timeout_s
        if backend.state == "ready":
            return limit
        started = time.monotonic()

        async def notify(fraction: float, message: str) -> None:
            if progress is not None:
                await progress(fraction, total, message)

        await backend.wait_ready(notify, limit)
        return max(0.0, limit - (time.monotonic() - started))


async def _drawn(annotate: bool, draw: Callable[[Any, Any], bytes], stored: StoredImage, items: Any) -> bytes | None:
    """The image with ``items`` drawn on it, as PNG, when ``annotate`` asks for it (in a worker thread)."""
    return await anyio.to_thread.run_sync(draw, stored.image, items) if annotate else None


def _common(got: Answer) -> dict[str, Any]:
    """The fields every image result carries: ``image_id``, ``image_size``, ``model``, ``raw``."""
    return {"image_id": got.stored.image_id, "image_size": got.stored.size, "model": got.model, "raw": got.output.raw}
