"""One model in this process: its FIFO queue and the worker thread(s) that run its batches.

How a worker gathers a batch, so that nothing starves, and keeps a fault with the request that caused it:
:class:`BatchLane`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

from ..backends.base import BatchBackend, Output, Request
from ..errors import Busy, Cancelled, ModelBroken, ModelError, Timeout, VlmToolsError
from ..metrics import Metrics
from .jobs import Job, Limits, State, prefetch

logger = logging.getLogger(__name__)


class BatchLane:
    """The queue and workers of one :class:`BatchBackend`. ``cond`` guards the mutable state and wakes workers.

    A worker takes the oldest waiting request, gathers waiting requests of the same task (other tasks keep their place,
    so nothing starves), runs them as one ``run_batch`` and hands each outcome to its caller. A batch that raises is
    split so that a fault stays with the request that caused it; out-of-memory halves it; a
    :class:`~vlm_tools.errors.ModelBroken` error, or every request failing alone the same way, marks the model as not
    serving (no request is then run twice for nothing) until a batch succeeds again.
    """

    def __init__(self, backend: BatchBackend, limits: Limits, metrics: Metrics) -> None:
        self.backend = backend
        self.limits = limits
        self.batch_limit = max(1, min(limits.batch_size, backend.max_batch_size))
        self.metrics = metrics
        self.cond = threading.Condition()
        self.queue: deque[Job] = deque()
        self.running = 0
        self.threads: list[threading.Thread] = []
        self.stopping = False
        self.dead = False
        self.serving = True  # False while every request fails the same way; True again after a batch succeeds
        self.last_error: str | None = None
        self.freed_at = 0.0  # time.monotonic() when a worker last finished a batch (the model became free)

    # --- life cycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start ``backend.parallelism`` worker threads."""
        for index in range(max(1, self.backend.parallelism)):
            # daemon: a hung model must not keep the process alive after shutdown gave up on it.
            thread = threading.Thread(target=self._worker, name=f"vlm-engine[{self.backend.name}]#{index}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def stop(self) -> list[Job]:
        """Stop taking batches; withdraw and return the queued jobs (the caller answers them)."""
        with self.cond:
            self.stopping = True
            waiting = list(self.queue)
            self.queue.clear()
            for job in waiting:
                job.state = State.WITHDRAWN
            self.metrics.set_queue_depth(self.backend.name, 0)
            self.cond.notify_all()
        return waiting

    def cut(self, job: Job) -> None:
        """Stop a job that did not finish within the drain: its row stops at its next token."""
        job.request.cancel.set()

    async def join(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the workers to leave their last batch."""
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            await asyncio.to_thread(thread.join, max(0.0, deadline - time.monotonic()))

    # --- admission ------------------------------------------------------------------------------------------

    def admit(self, request: Request, tool: str, loop: asyncio.AbstractEventLoop, deadline: float) -> Job:
        """Queue a job or refuse it at once (``Busy``, a dead model); synchronous, so a refusal costs no wait."""
        now = time.monotonic()
        with self.cond:
            if self.dead:
                raise ModelError(f"model {self.backend.name} is unavailable: its worker stopped ({self.last_error}); "
                                 "restart the server or use another model")  # fmt: skip
            if len(self.queue) >= self.limits.queue_size:
                raise Busy(f"{len(self.queue)} requests are already waiting for {self.backend.name}; "
                           "retry in a moment (a few seconds)")  # fmt: skip
            job = Job(request, tool, loop, loop.create_future(), now, deadline)
            self.queue.append(job)
            prefetch(self.backend, request)
            self.metrics.set_queue_depth(self.backend.name, len(self.queue))
            # Every worker: one gathering a batch that this request fills must stop waiting now, whichever wakes.
            self.cond.notify_all()
        return job

    def withdraw(self, job: Job) -> None:
        """The caller left: stop the row if it runs, and take the request out of the queue if it waits."""
        job.request.cancel.set()
        with self.cond:
            if job.state is State.QUEUED:
                self.queue.remove(job)
                job.state = State.WITHDRAWN
                self.metrics.set_queue_depth(self.backend.name, len(self.queue))
                self.cond.notify_all()  # a worker gathering a batch around this job must look again

    # --- workers (each in its own thread) -----------------------------------------------------------------------

    def _worker(self) -> None:
        """Take batches and run them until shutdown; never die silently."""
        batch: list[Job] = []
        try:
            while batch := self._next_batch():
                self._run(batch)
                with self.cond:
                    self.running -= len(batch)
                    self.freed_at = time.monotonic()
        except BaseException as error:  # noqa: BLE001 - the point is to catch everything and say so
            logger.critical("worker of model %s died", self.backend.name, exc_info=error)
            self._fail_lane(batch, error)

    def _next_batch(self) -> list[Job]:
        """Block until a batch is ready: the oldest request plus waiting ones of its task. Empty at shutdown."""
        with self.cond:
            while True:
                if self.stopping or self.dead:
                    return []
                if not self.queue:
                    self.cond.wait()
                    continue
                head = self.queue[0]
                self._gather(head)
                if self.stopping or not self.queue or self.queue[0] is not head:
                    continue  # stopping, or the head left while we waited: start over with the new head
                batch = self._take_batch(head)
                if batch:
                    self.running += len(batch)
                    self.metrics.set_queue_depth(self.backend.name, len(self.queue))
                    return batch

    def _gather(self, head: Job) -> None:
        """Wait (holding ``cond``) while more requests of the head's task may join its batch.

        The wait is counted from when the head could first have run: its arrival, or the end of the batch it waited
        behind. Counting from arrival alone starts a backlog at once, before the callers that batch just answered
        can come back, and concurrent callers then split for good into smaller batches that take turns.
        """
        gather_until = max(head.enqueued_at, self.freed_at) + self.limits.batch_wait_s
        while (
            not self.stopping
            and self.queue
            and self.queue[0] is head
            and sum(1 for job in self.queue if job.request.task is head.request.task) < self.batch_limit
            and (remaining := gather_until - time.monotonic()) > 0
        ):
            self.cond.wait(remaining)

    def _take_batch(self, head: Job) -> list[Job]:
        """Remove up to ``batch_limit`` live jobs of the head's task; others keep their order. Holds ``cond``."""
        now = time.monotonic()
        batch: list[Job] = []
        kept: deque[Job] = deque()
        for job in self.queue:
            if len(batch) >= self.batch_limit or job.request.task is not head.request.task:
                kept.append(job)
                continue
            job.state = State.WITHDRAWN
            if job.deadline <= now:  # its caller is timing out right now: never spend compute on it
                job.deliver(Timeout(f"the request waited longer than {self.limits.request_timeout_s:g} s"))
            elif job.request.cancel.is_set():
                job.deliver(Cancelled("the request was cancelled before it ran"))
            else:
                job.state = State.RUNNING
                batch.append(job)
        self.queue = kept
        return batch

    def _run(self, batch: list[Job]) -> None:
        started = time.monotonic()
        for job in batch:
            self.metrics.observe_queue_wait(job.tool, started - job.enqueued_at)
        self._execute(batch, started)

    def _execute(self, jobs: list[Job], started: float) -> None:
        """Run ``jobs`` as one batch and answer each; on failure split them so that a fault stays with its request."""
        live = [job for job in jobs if not self._cancelled_before_run(job)]
        if not live:
            return
        error = self._attempt(live, started)
        if error is None:
            return
        if _is_oom(self.backend, error):
            self._split_after_oom(live, started)
        elif isinstance(error, ModelBroken) or (not self.serving and _signature(error) == self.last_error):
            # Every request fails the same way: answer them all now rather than run each alone for nothing.
            self._mark_broken(error)
            failure = error if isinstance(error, ModelBroken) else self._broken_error(error)
            for job in live:
                self._finish(job, failure, started)
        elif len(live) == 1:
            logger.error("model %s failed on a request", self.backend.name, exc_info=error)
            self._finish(live[0], self._request_error(error), started)
        else:
            self._isolate(live, error, started)

    def _attempt(self, jobs: list[Job], started: float) -> Exception | None:
        """Run ``jobs`` as one batch and answer each; the exception when the batch as a whole raised."""
        self.metrics.record_batch(self.backend.name, jobs[0].request.task.value, len(jobs))
        try:
            outcomes = self.backend.run_batch([job.request for job in jobs])
            if not isinstance(outcomes, (list, tuple)) or len(outcomes) != len(jobs):
                raise RuntimeError(f"run_batch returned {_count(outcomes)} outcomes for {len(jobs)} requests")
        except Exception as error:
            return error
        if not self.serving:
            logger.info("model %s serves again", self.backend.name)
        self.serving = True
        for job, outcome in zip(jobs, outcomes, strict=True):
            self._finish(job, self._result(outcome), started)
        return None

    def _isolate(self, live: list[Job], error: Exception, started: float) -> None:
        """Run each request of a failed batch alone, so that only the one that caused the failure fails."""
        logger.warning("a batch of %d on model %s failed (%s); running its requests one by one",
                       len(live), self.backend.name, _signature(error))  # fmt: skip
        seen: dict[str, int] = {}  # each distinct failure is logged with its traceback once
        failed: list[tuple[Job, Exception]] = []
        for job in live:
            if self._cancelled_before_run(job):
                continue
            single = self._attempt([job], started)
            if single is None:
                continue
            signature = _signature(single)
            seen[signature] = seen.get(signature, 0) + 1
            if seen[signature] == 1:
                logger.error("model %s failed on a request alone too", self.backend.name, exc_info=single)
            else:
                logger.error("model %s failed on another request the same way: %s", self.backend.name, signature)
            failed.append((job, single))
        if seen.get(_signature(error)) == len(live):
            self._mark_broken(error)  # before the answers go out: a caller who then asks /health sees it
        for job, single in failed:
            self._finish(job, self._request_error(single), started)

    def _split_after_oom(self, live: list[Job], started: float) -> None:
        _free_memory(self.backend)
        if len(live) == 1:
            logger.error("model %s ran out of memory on a single request", self.backend.name)
            self._finish(live[0], ModelError(
                f"model {self.backend.name} ran out of memory on this request; try a smaller image or a shorter task, "
                "or retry when the server is less busy"
            ), started)  # fmt: skip
            return
        middle = len(live) // 2
        logger.warning("model %s ran out of memory on a batch of %d; splitting it", self.backend.name, len(live))
        self._execute(live[:middle], started)
        self._execute(live[middle:], started)

    def _cancelled_before_run(self, job: Job) -> bool:
        if job.request.cancel.is_set():  # its caller left while an earlier part of a split batch ran
            job.deliver(Cancelled("the request was cancelled before it ran"))
            return True
        return False

    def _mark_broken(self, error: BaseException) -> None:
        if self.serving:
            logger.error("model %s fails every request the same way (%s): marked as not serving until a batch "
                         "succeeds", self.backend.name, _signature(error))  # fmt: skip
        self.serving = False
        self.last_error = _signature(error)

    def _result(self, outcome: Any) -> Output | BaseException:
        """Turn one per-request outcome into what its caller gets."""
        if isinstance(outcome, (Output, VlmToolsError)):  # Cancelled stays Cancelled; typed errors pass through
            return outcome
        if isinstance(outcome, BaseException):
            logger.error("model %s failed on a request", self.backend.name, exc_info=outcome)
            return self._request_error(outcome)
        logger.error("model %s returned %r instead of an Output", self.backend.name, type(outcome).__name__)
        return ModelError(f"model {self.backend.name} returned no usable output for this request; report it")

    def _request_error(self, error: BaseException) -> ModelError:
        if isinstance(error, VlmToolsError):
            return error if isinstance(error, ModelError) else ModelError(error.message)
        return ModelError(
            f"model {self.backend.name} failed on this request ({type(error).__name__}), and fails on it alone too; "
            "other requests were not affected: try another image or model (details are in the server log)"
        )

    def _broken_error(self, error: BaseException) -> ModelBroken:
        return ModelBroken(
            f"model {self.backend.name} fails every request the same way ({_signature(error)}); this is not about "
            "your request: use another model, or ask the server's operator (details are in the server log)"
        )

    def _finish(self, job: Job, value: Output | BaseException, started: float) -> None:
        self.metrics.observe_run(job.tool, time.monotonic() - started)
        job.deliver(value)

    def _fail_lane(self, batch: list[Job], error: BaseException) -> None:
        """A worker died: mark the model unavailable and answer its running and queued requests."""
        with self.cond:
            self.dead = True
            self.last_error = f"{type(error).__name__}: {error}"[:300]
            waiting = list(self.queue)
            self.queue.clear()
            for job in waiting:
                job.state = State.WITHDRAWN
            self.running -= len(batch)
            self.metrics.set_queue_depth(self.backend.name, 0)
            self.cond.notify_all()  # sibling workers leave after their current batch
        failure = ModelError(f"model {self.backend.name} stopped working ({type(error).__name__}); restart the "
                             "server or use another model")  # fmt: skip
        for job in [*batch, *waiting]:
            job.request.cancel.set()
            job.deliver(failure)

    # --- inspection -------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``{"alive", "serving", "queued", "running", "last_error"}``."""
        with self.cond:
            alive = bool(self.threads) and not self.dead and all(t.is_alive() for t in self.threads)
            return {"alive": alive, "serving": self.serving, "queued": len(self.queue), "running": self.running,
                    "last_error": self.last_error}  # fmt: skip

    @property
    def queued(self) -> int:
        """Requests waiting (not yet running)."""
        return len(self.queue)

    def capacity(self) -> int:
        """Two full batches per worker: one generating while the next waits with its images already encoded."""
        return 2 * self.batch_limit * max(1, self.backend.parallelism)

    def describe(self) -> str:
        return f"{self.backend.name} (batch {self.batch_limit}, {len(self.threads)} worker(s))"


def _is_oom(backend: BatchBackend, error: BaseException) -> bool:
    try:
        return bool(backend.is_oom(error))
    except Exception:  # a broken check must not turn one failure into a dead worker
        logger.exception("is_oom of model %s failed", backend.name)
        return False


def _free_memory(backend: BatchBackend) -> None:
    try:
        backend.free_memory()
    except Exception:
        logger.exception("free_memory of model %s failed", backend.name)


def _signature(error: BaseException) -> str:
    """An error's type and message: two failures with the same signature are the same failure."""
    return f"{type(error).__name__}: {error}"[:300]


def _count(outcomes: object) -> str:
    try:
        return str(len(outcomes))  # type: ignore[arg-type]
    except TypeError:
        return "no list of"
