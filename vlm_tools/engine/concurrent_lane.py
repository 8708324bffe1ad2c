"""One model served elsewhere (an inference server, a Ray Serve deployment): each request answered on its own.

Up to ``backend.concurrency`` requests are in flight at once, in arrival order; at most ``queue_size`` more wait
for a slot, and past that a call is refused at once with ``busy``. Each request returns to its caller as soon as
its own answer arrives (the server batches concurrent requests itself), so a slow request never holds others back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..backends.base import ConcurrentBackend, Request
from ..errors import Busy, ModelError, VlmToolsError
from ..metrics import Metrics
from .jobs import Job, Limits, State, prefetch

logger = logging.getLogger(__name__)


class ConcurrentLane:
    """The in-flight slots of one :class:`ConcurrentBackend`; lives on the event loop (no threads)."""

    def __init__(self, backend: ConcurrentBackend, limits: Limits, metrics: Metrics) -> None:
        self.backend = backend
        self.queue_size = limits.queue_size
        self.metrics = metrics
        self.slots = asyncio.Semaphore(max(1, backend.concurrency))
        self.runners: dict[Job, asyncio.Task[None]] = {}
        self.stopping = False
        self.last_error: str | None = None

    def start(self) -> None:
        """Nothing to start: requests run on the event loop."""

    # --- admission ------------------------------------------------------------------------------------------

    def admit(self, request: Request, tool: str, loop: asyncio.AbstractEventLoop, deadline: float) -> Job:
        """Start a job or refuse it at once (``Busy`` when ``queue_size`` requests already wait for a slot)."""
        if self.queued >= self.queue_size:
            raise Busy(f"{self.queued} requests are already waiting for {self.backend.name}; "
                       "retry in a moment (a few seconds)")  # fmt: skip
        job = Job(request, tool, loop, loop.create_future(), time.monotonic(), deadline)
        prefetch(self.backend, request)
        self.runners[job] = loop.create_task(self._run(job), name=f"vlm-request[{self.backend.name}]")
        self.metrics.set_queue_depth(self.backend.name, self.queued)
        return job

    def withdraw(self, job: Job) -> None:
        """The caller left: abandon its call (the backend closes the connection)."""
        job.request.cancel.set()
        runner = self.runners.get(job)
        if runner is not None:
            runner.cancel()

    async def _run(self, job: Job) -> None:
        try:
            async with self.slots:
                job.state = State.RUNNING
                self.metrics.set_queue_depth(self.backend.name, self.queued)
                started = time.monotonic()
                self.metrics.observe_queue_wait(job.tool, started - job.enqueued_at)
                self.metrics.record_batch(self.backend.name, job.request.task.value, 1)
                value: Any = await self._answer(job.request)
                self.metrics.observe_run(job.tool, time.monotonic() - started)
                job.deliver(value)
        finally:
            job.state = State.WITHDRAWN
            self.runners.pop(job, None)
            self.metrics.set_queue_depth(self.backend.name, self.queued)

    async def _answer(self, request: Request) -> Any:
        try:
            return await self.backend.answer(request)
        except VlmToolsError as error:
            return error
        except Exception as error:  # noqa: BLE001 - one request's failure is its caller's answer, nothing more
            logger.error("model %s failed on a request", self.backend.name, exc_info=error)
            self.last_error = f"{type(error).__name__}: {error}"[:300]
            return ModelError(f"model {self.backend.name} failed on this request ({type(error).__name__}); "
                              "details are in the server log")  # fmt: skip

    # --- shutdown ---------------------------------------------------------------------------------------------

    def stop(self) -> list[Job]:
        """Withdraw and return the jobs still waiting for a slot (the caller answers them)."""
        self.stopping = True
        waiting = [job for job in self.runners if job.state is State.QUEUED]
        for job in waiting:
            self.runners.pop(job).cancel()
            job.state = State.WITHDRAWN
        self.metrics.set_queue_depth(self.backend.name, 0)
        return waiting

    def cut(self, job: Job) -> None:
        """Abandon a call that did not finish within the drain."""
        self.withdraw(job)

    async def join(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the abandoned calls to unwind."""
        runners = list(self.runners.values())
        if runners:
            await asyncio.wait(runners, timeout=max(0.0, timeout_s))

    # --- inspection -------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``{"alive", "serving", "queued", "running", "last_error"}``."""
        running = sum(1 for job in self.runners if job.state is State.RUNNING)
        return {"alive": not self.stopping, "serving": True, "queued": self.queued, "running": running,
                "last_error": self.last_error}  # fmt: skip

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return sum(1 for job in self.runners if job.state is State.QUEUED)

    def capacity(self) -> int:
        """As many as may be in flight."""
        return max(1, self.backend.concurrency)

    def describe(self) -> str:
        return f"{self.backend.name} ({self.backend.concurrency} in flight)"

