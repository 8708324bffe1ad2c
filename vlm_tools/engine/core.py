"""The :class:`Engine`: submits requests to the lane of their model and answers every caller exactly once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..backends.base import Backend, BatchBackend, ConcurrentBackend, Output, Request
from ..errors import Cancelled, ShuttingDown, Timeout, VlmToolsError
from ..metrics import Metrics
from .batch_lane import BatchLane
from .concurrent_lane import ConcurrentLane
from .jobs import Job, Limits

if TYPE_CHECKING:
    from ..settings import Settings

logger = logging.getLogger(__name__)

Lane = BatchLane | ConcurrentLane


class Engine:
    """Runs requests on resident backends.

    The tool layer awaits :meth:`submit` on the event loop; a model never runs there. A model in this process
    gets a :class:`~vlm_tools.engine.batch_lane.BatchLane` (a queue and worker threads that micro-batch), a model
    served elsewhere a :class:`~vlm_tools.engine.concurrent_lane.ConcurrentLane` (each request on its own). Admission is
    per model: at most ``queue_size`` requests wait for each, so a backlog on one model never refuses work for another,
    and past the bound :meth:`submit` raises :class:`~vlm_tools.errors.Busy` at once.

    Args:
        backends: the models (distinct names); each gets its own lane.
        max_batch_size: most requests in one batch (a backend's own ``max_batch_size`` may lower it).
        batch_wait_ms: how long the oldest waiting request may be held back for others to join its batch.
        queue_size: most requests waiting per model; past it :meth:`submit` raises ``Busy``.
        request_timeout_s: time limit of one request from submission, queue wait included.
        metrics: where to record; a private :class:`Metrics` when left out.
        drain_timeout_s: default for :meth:`shutdown`.
    """

    def __init__(
        self, backends: Sequence[Backend], *, max_batch_size: int, batch_wait_ms: float, queue_size: int,
        request_timeout_s: float, metrics: Metrics | None = None, drain_timeout_s: float = 30.0,
    ) -> None:  # fmt: skip
        if max_batch_size < 1 or queue_size < 1 or batch_wait_ms < 0 or request_timeout_s <= 0:
            raise ValueError("need max_batch_size >= 1, queue_size >= 1, batch_wait_ms >= 0, request_timeout_s > 0")
        names = [backend.name for backend in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be distinct: {names}")
        if queue_size < max_batch_size:
            # A batch is gathered from waiting requests, so it can never hold more than queue_size of them.
            logger.warning("queue_size %d < max_batch_size %d: batches stay smaller", queue_size, max_batch_size)
        self.max_batch_size = max_batch_size
        self.queue_size = queue_size
        self.request_timeout_s = request_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.metrics = metrics if metrics is not None else Metrics()
        self.batch_wait_s = batch_wait_ms / 1000.0
        self._lanes: dict[str, Lane] = {backend.name: self._lane_for(backend) for backend in backends}
        self._jobs: dict[Job, Lane] = {}  # every accepted, unanswered job; touched only on the event loop
        self._started = False
        self._accepting = False
        self._shutdown_task: asyncio.Task[None] | None = None
        for name in self._lanes:
            self.metrics.set_queue_depth(name, 0)

    @classmethod
    def from_settings(cls, backends: Sequence[Backend], settings: Settings, metrics: Metrics | None = None) -> Engine:
        """An engine configured by the engine section of ``settings``."""
        return cls(
            backends, max_batch_size=settings.max_batch_size, batch_wait_ms=settings.batch_wait_ms,
            queue_size=settings.queue_size, request_timeout_s=settings.request_timeout_s, metrics=metrics,
            drain_timeout_s=settings.drain_timeout_s,
        )  # fmt: skip

    def _lane_for(self, backend: Backend) -> Lane:
        limits = Limits(self.max_batch_size, self.batch_wait_s, self.queue_size, self.request_timeout_s)
        if isinstance(backend, ConcurrentBackend):
            return ConcurrentLane(backend, limits, self.metrics)
        if isinstance(backend, BatchBackend):
            return BatchLane(backend, limits, self.metrics)
        raise TypeError(f"{type(backend).__name__} is neither a BatchBackend nor a ConcurrentBackend")

    # --- life cycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every lane. Calling it again does nothing."""
        if self._started:
            return
        if self._shutdown_task is not None:
            raise RuntimeError("a shut-down engine cannot be restarted; build a new one")
        self._started = True
        self._accepting = True
        for lane in self._lanes.values():
            lane.start()
        logger.info("engine started: %s", ", ".join(lane.describe() for lane in self._lanes.values()))

    async def shutdown(self, drain_timeout_s: float | None = None) -> None:
        """Stop accepting work and answer everything that was accepted; calling it again waits for the first call.

        New submits get ``ShuttingDown`` at once; queued requests get ``ShuttingDown`` without running; running
        ones may finish within ``drain_timeout_s`` (default: the configured one), after which their callers get
        ``ShuttingDown`` and they are stopped. The backends are not closed: their owner closes them.
        """
        if self._shutdown_task is None:
            drain = self.drain_timeout_s if drain_timeout_s is None else drain_timeout_s
            self._shutdown_task = asyncio.ensure_future(self._shutdown(max(0.0, drain)))
        # shield: a caller cancelled while waiting must not abandon the shutdown half-way for everyone else.
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self, drain_s: float) -> None:
        deadline = time.monotonic() + drain_s
        self._accepting = False
        refused = 0
        for lane in self._lanes.values():
            for job in lane.stop():
                job.deliver(ShuttingDown("the server is shutting down; this request was not started"))
                refused += 1
        pending = [job.future for job in self._jobs if not job.future.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        cut = 0
        for job, lane in list(self._jobs.items()):
            if not job.future.done():
                lane.cut(job)
                job.deliver(ShuttingDown("the server is shutting down; this request did not finish in time"))
                cut += 1
        # Let the lanes leave their last batch inside the drain time, so the owner can close the backends after.
        for lane in self._lanes.values():
            await lane.join(max(0.0, deadline - time.monotonic()))
        logger.info("engine stopped: %d queued and %d running requests answered shutting_down", refused, cut)

    # --- submitting ---------------------------------------------------------------------------------------

    async def submit(self, backend: Backend, request: Request, *, tool: str, timeout_s: float | None = None) -> Output:
        """Run ``request`` on ``backend`` and return its output; ``tool`` labels metrics.

        ``timeout_s`` (default ``request_timeout_s``) bounds the whole call, queue wait included.

        Raises:
            Busy: the model's queue is full (raised before any await, so at once).
            ShuttingDown: the engine is stopping.
            Timeout: no answer in time; the request is withdrawn/cancelled.
            ModelError: the model failed on this request, or it is unavailable.
            Cancelled: the backend stopped the row because its cancel event was set.
            asyncio.CancelledError: the awaiting task was cancelled; the request is withdrawn and re-raised.
        """
        limit = self.request_timeout_s if timeout_s is None else max(0.0, timeout_s)
        try:
            lane, job = self._admit(backend, request, tool, limit)
        except VlmToolsError as error:
            self.metrics.record_error(tool, error)
            raise
        self._jobs[job] = lane
        try:
            async with asyncio.timeout(job.deadline - time.monotonic()):
                output = await job.future
        except TimeoutError:
            lane.withdraw(job)
            timeout = Timeout(f"no answer from {backend.name} within {limit:g} s (queue wait included); the server "
                              "is overloaded or the task is long: retry later or raise request_timeout_s")  # fmt: skip
            self.metrics.record_error(tool, timeout)
            raise timeout from None
        except asyncio.CancelledError:
            lane.withdraw(job)
            self.metrics.record_request(tool, "error", Cancelled.code)
            raise
        except Exception as error:
            self.metrics.record_error(tool, error)
            raise
        finally:
            self._jobs.pop(job, None)
        self.metrics.record_request(tool, "ok")
        return output

    def _admit(self, backend: Backend, request: Request, tool: str, limit: float) -> tuple[Lane, Job]:
        lane = self._lanes.get(backend.name)
        if lane is None or lane.backend is not backend:
            raise ValueError(f"backend {backend.name!r} is not served by this engine")
        if self._shutdown_task is not None:
            raise ShuttingDown("the server is shutting down and accepts no new requests")
        if not self._started:
            raise RuntimeError("Engine.start() must be awaited before submit()")
        loop = asyncio.get_running_loop()
        return lane, lane.admit(request, tool, loop, time.monotonic() + limit)

    # --- inspection ---------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``{"ok", "accepting", "models": {name: {"alive", "serving", "queued", "running", "last_error"}}}``.

        ``ok`` means the engine accepts requests and every model's lane is alive and serving.
        """
        models = {name: lane.health() for name, lane in self._lanes.items()}
        ok = self._accepting and all(model["alive"] and model["serving"] for model in models.values())
        return {"ok": ok, "accepting": self._accepting, "models": models}

    def capacity(self, backend: Backend) -> int:
        """How many of one caller's requests to keep in flight on ``backend`` (a document's pages): what the lane
        can use, at most half the queue, so one caller's pages never crowd others into ``busy``."""
        return max(1, min(self._lanes[backend.name].capacity(), self.queue_size // 2))

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not yet running), over all models."""
        return sum(lane.queued for lane in self._lanes.values())
