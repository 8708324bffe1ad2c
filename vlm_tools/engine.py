"""The inference engine: one owner per model, micro-batching, bounded admission, time-outs and cancellation.

The tool layer awaits :meth:`Engine.submit` on the event loop; the model never runs there. Each backend gets a
*lane*: its own FIFO queue and ``backend.parallelism`` worker threads, which are the only code that ever calls
``backend.run_batch``. A worker takes the oldest waiting request, gathers more waiting requests of the same task
(other tasks keep their place, so nothing starves), runs them as one batch and hands each outcome back to its own
awaiting coroutine through ``loop.call_soon_threadsafe``.

Admission is **per model**: each lane holds at most ``queue_size`` waiting requests (running ones do not count).
A backlog on one model then never refuses work for another, idle one, and the memory held by waiting images is
bounded by ``queue_size`` per loaded model. Past the bound, :meth:`Engine.submit` raises
:class:`~vlm_tools.errors.Busy` at once, before any await: refusing fast beats queueing forever.

Works on an asyncio event loop (which is what anyio runs the MCP server on); the deadline is enforced with
``asyncio.timeout`` and cancellation arrives as :class:`asyncio.CancelledError`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from .backends.base import Backend, Output, Request
from .errors import Busy, Cancelled, ModelError, ShuttingDown, Timeout, VlmToolsError
from .metrics import Metrics

if TYPE_CHECKING:
    from .settings import Settings

logger = logging.getLogger(__name__)


class _State(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    WITHDRAWN = "withdrawn"  # the caller left (cancelled, timed out) or shutdown answered it while queued


@dataclass(eq=False)
class _Job:
    """A request on its way through the engine: what was asked, by whom, and where the answer goes."""

    request: Request
    tool: str
    lane: _Lane
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Output]
    enqueued_at: float  # time.monotonic() at admission
    deadline: float
    state: _State = _State.QUEUED


@dataclass(eq=False)
class _Lane:
    """One backend's queue and workers. ``cond`` guards every field below it and wakes the workers."""

    backend: Backend
    batch_limit: int
    cond: threading.Condition = field(default_factory=threading.Condition)
    queue: deque[_Job] = field(default_factory=deque)
    running: int = 0
    threads: list[threading.Thread] = field(default_factory=list)
    stopping: bool = False
    dead: bool = False
    last_error: str | None = None
    freed_at: float = 0.0  # time.monotonic() when a worker last finished a batch (the model became free)


def _settle(future: asyncio.Future[Output], value: Output | BaseException) -> None:
    """Answer ``future`` unless its caller already left (cancelled, timed out): runs on the loop's thread."""
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


class Engine:
    """Runs requests on resident backends in micro-batches; see the module docstring for the rules.

    Args:
        backends: the loaded models (distinct names); each gets its own queue and worker thread(s).
        max_batch_size: most requests in one batch (a backend's own ``max_batch_size`` may lower it).
        batch_wait_ms: how long the oldest waiting request may be held back for others to join its batch.
        queue_size: most requests waiting per model; past it :meth:`submit` raises ``Busy``.
        request_timeout_s: time limit of one request from submission, queue wait included.
        metrics: where to record; a private :class:`Metrics` when left out.
        drain_timeout_s: default for :meth:`shutdown`.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        max_batch_size: int,
        batch_wait_ms: float,
        queue_size: int,
        request_timeout_s: float,
        metrics: Metrics | None = None,
        drain_timeout_s: float = 30.0,
    ) -> None:
        if max_batch_size < 1 or queue_size < 1 or batch_wait_ms < 0 or request_timeout_s <= 0:
            raise ValueError("need max_batch_size >= 1, queue_size >= 1, batch_wait_ms >= 0, request_timeout_s > 0")
        names = [backend.name for backend in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be distinct: {names}")
        if queue_size < max_batch_size:
            # A batch is gathered from waiting requests, so it can never hold more than queue_size of them.
            logger.warning("queue_size %d < max_batch_size %d: batches stay smaller", queue_size, max_batch_size)
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.queue_size = queue_size
        self.request_timeout_s = request_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self.metrics = metrics if metrics is not None else Metrics()
        self._lanes: dict[int, _Lane] = {
            id(backend): _Lane(backend, batch_limit=max(1, min(max_batch_size, backend.max_batch_size)))
            for backend in backends
        }
        self._jobs: set[_Job] = set()  # every accepted, unanswered job; touched only on the event loop
        self._started = False
        self._accepting = False
        self._shutdown_task: asyncio.Task[None] | None = None
        for lane in self._lanes.values():
            self.metrics.set_queue_depth(lane.backend.name, 0)

    @classmethod
    def from_settings(cls, backends: Sequence[Backend], settings: Settings, metrics: Metrics | None = None) -> Engine:
        """An engine configured by the engine section of ``settings``."""
        return cls(
            backends,
            max_batch_size=settings.max_batch_size,
            batch_wait_ms=settings.batch_wait_ms,
            queue_size=settings.queue_size,
            request_timeout_s=settings.request_timeout_s,
            metrics=metrics,
            drain_timeout_s=settings.drain_timeout_s,
        )

    # --- life cycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start ``backend.parallelism`` worker threads per backend. Calling it again does nothing."""
        if self._started:
            return
        if self._shutdown_task is not None:
            raise RuntimeError("a shut-down engine cannot be restarted; build a new one")
        self._started = True
        self._accepting = True
        for lane in self._lanes.values():
            for index in range(max(1, lane.backend.parallelism)):
                thread = threading.Thread(
                    target=self._worker,
                    args=(lane,),
                    name=f"vlm-engine[{lane.backend.name}]#{index}",
                    # A hung model must not keep the process alive after shutdown gave up on it.
                    daemon=True,
                )
                lane.threads.append(thread)
                thread.start()
        logger.info("engine started: %s", ", ".join(self._describe(lane) for lane in self._lanes.values()))

    async def shutdown(self, drain_timeout_s: float | None = None) -> None:
        """Stop accepting work and answer everything that was accepted; calling it again waits for the first call.

        New submits get ``ShuttingDown`` at once; queued requests get ``ShuttingDown`` without running; running
        batches may finish within ``drain_timeout_s`` (default: the configured one), after which their callers
        get ``ShuttingDown`` and their rows are cancelled. The backends are not closed: their owner closes them.
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
            with lane.cond:
                lane.stopping = True
                waiting = list(lane.queue)
                lane.queue.clear()
                for job in waiting:
                    job.state = _State.WITHDRAWN
                self.metrics.set_queue_depth(lane.backend.name, 0)
                lane.cond.notify_all()
            for job in waiting:
                self._deliver(job, ShuttingDown("the server is shutting down; this request was not started"))
            refused += len(waiting)
        pending = [job.future for job in self._jobs if not job.future.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        cut = 0
        for job in list(self._jobs):
            if not job.future.done():
                job.request.cancel.set()  # the row stops at its next token
                self._deliver(job, ShuttingDown("the server is shutting down; this request did not finish in time"))
                cut += 1
        # Let workers leave their last batch inside the drain time, so the owner can close the backends after.
        threads = [thread for lane in self._lanes.values() for thread in lane.threads]
        while any(thread.is_alive() for thread in threads) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        logger.info("engine stopped: %d queued and %d running requests answered shutting_down", refused, cut)

    # --- submitting ---------------------------------------------------------------------------------------

    async def submit(self, backend: Backend, request: Request, *, tool: str) -> Output:
        """Run ``request`` on ``backend`` and return its output; ``tool`` labels metrics.

        Raises:
            Busy: the model's queue is full (raised before any await, so at once).
            ShuttingDown: the engine is stopping.
            Timeout: no answer within ``request_timeout_s`` of submission; the request is withdrawn/cancelled.
            ModelError: the model failed on this request, or its worker died.
            Cancelled: the backend stopped the row because its cancel event was set.
            asyncio.CancelledError: the awaiting task was cancelled; the request is withdrawn and re-raised.
        """
        try:
            job = self._admit(backend, request, tool)
        except VlmToolsError as error:
            self.metrics.record_error(tool, error)
            raise
        self._jobs.add(job)
        try:
            async with asyncio.timeout(job.deadline - time.monotonic()):
                output = await job.future
        except TimeoutError:
            self._withdraw(job)
            timeout = Timeout(
                f"no answer from {backend.name} within {self.request_timeout_s:g} s (queue wait included); "
                "the server is overloaded or the task is long: retry later or raise request_timeout_s"
            )
            self.metrics.record_error(tool, timeout)
            raise timeout from None
        except asyncio.CancelledError:
            self._withdraw(job)
            self.metrics.record_request(tool, "error", Cancelled.code)
            raise
        except Exception as error:
            self.metrics.record_error(tool, error)
            raise
        finally:
            self._jobs.discard(job)
        self.metrics.record_request(tool, "ok")
        return output

    def _admit(self, backend: Backend, request: Request, tool: str) -> _Job:
        """Queue a job or refuse it; synchronous, so a refusal costs no wait."""
        lane = self._lanes.get(id(backend))
        if lane is None:
            raise ValueError(f"backend {backend.name!r} is not served by this engine")
        if self._shutdown_task is not None:
            raise ShuttingDown("the server is shutting down and accepts no new requests")
        if not self._started:
            raise RuntimeError("Engine.start() must be awaited before submit()")
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        with lane.cond:
            if lane.dead:
                raise ModelError(
                    f"model {backend.name} is unavailable: its worker stopped ({lane.last_error}); "
                    "restart the server or use another model"
                )
            if len(lane.queue) >= self.queue_size:
                raise Busy(
                    f"{len(lane.queue)} requests are already waiting for {backend.name}; "
                    "retry in a moment (a few seconds)"
                )
            job = _Job(request, tool, lane, loop, loop.create_future(), now, now + self.request_timeout_s)
            lane.queue.append(job)
            self._prefetch(backend, request)
            self.metrics.set_queue_depth(backend.name, len(lane.queue))
            # Every worker: one gathering a batch that this request fills must stop waiting now, whichever wakes.
            lane.cond.notify_all()
        return job

    @staticmethod
    def _prefetch(backend: Backend, request: Request) -> None:
        """Let the backend start on the request's image while it waits (a failure here only loses the head start:
        the batch does the work itself)."""
        try:
            backend.prefetch(request)
        except Exception:
            logger.exception("prefetch of model %s failed", backend.name)

    def _withdraw(self, job: _Job) -> None:
        """The caller left: stop the row if it runs, and take the request out of the queue if it waits."""
        job.request.cancel.set()
        lane = job.lane
        with lane.cond:
            if job.state is _State.QUEUED:
                lane.queue.remove(job)
                job.state = _State.WITHDRAWN
                self.metrics.set_queue_depth(lane.backend.name, len(lane.queue))
                lane.cond.notify_all()  # a worker gathering a batch around this job must look again

    # --- workers (each in its own thread) ------------------------------------------------------------------

    def _worker(self, lane: _Lane) -> None:
        """Take batches and run them until shutdown; never die silently."""
        batch: list[_Job] = []
        try:
            while True:
                batch = self._next_batch(lane)
                if not batch:
                    return
                self._run(lane, batch)
                with lane.cond:
                    lane.running -= len(batch)
                    lane.freed_at = time.monotonic()
                batch = []
        except BaseException as error:  # noqa: BLE001 - the point is to catch everything and say so
            logger.critical("worker of model %s died", lane.backend.name, exc_info=error)
            self._fail_lane(lane, batch, error)

    def _next_batch(self, lane: _Lane) -> list[_Job]:
        """Block until a batch is ready: the oldest request plus waiting ones of its task. Empty at shutdown."""
        with lane.cond:
            while True:
                if lane.stopping or lane.dead:
                    return []
                if not lane.queue:
                    lane.cond.wait()
                    continue
                head = lane.queue[0]
                # The wait is counted from when the head could first have run: its arrival, or the end of the
                # batch it waited behind. Batching thus holds a request at most batch_wait_s beyond that. Counting
                # from arrival alone starts a backlog at once, before the callers that batch just answered can
                # come back, and concurrent callers then split for good into smaller batches that take turns.
                gather_until = max(head.enqueued_at, lane.freed_at) + self.batch_wait_s
                while (
                    not lane.stopping
                    and lane.queue
                    and lane.queue[0] is head
                    and self._count_task(lane, head) < lane.batch_limit
                    and (remaining := gather_until - time.monotonic()) > 0
                ):
                    lane.cond.wait(remaining)
                if lane.stopping or not lane.queue or lane.queue[0] is not head:
                    continue  # stopping, or the head left while we waited: start over with the new head
                batch = self._take_batch(lane, head)
                if batch:
                    lane.running += len(batch)
                    self.metrics.set_queue_depth(lane.backend.name, len(lane.queue))
                    return batch

    @staticmethod
    def _count_task(lane: _Lane, head: _Job) -> int:
        return sum(1 for job in lane.queue if job.request.task is head.request.task)

    def _take_batch(self, lane: _Lane, head: _Job) -> list[_Job]:
        """Remove up to ``batch_limit`` live jobs of the head's task; others keep their order. Holds ``cond``."""
        now = time.monotonic()
        batch: list[_Job] = []
        kept: deque[_Job] = deque()
        for job in lane.queue:
            if len(batch) >= lane.batch_limit or job.request.task is not head.request.task:
                kept.append(job)
                continue
            job.state = _State.WITHDRAWN
            if job.deadline <= now:  # its caller is timing out right now: never spend compute on it
                self._deliver(job, Timeout(f"the request waited longer than {self.request_timeout_s:g} s"))
            elif job.request.cancel.is_set():
                self._deliver(job, Cancelled("the request was cancelled before it ran"))
            else:
                job.state = _State.RUNNING
                batch.append(job)
        lane.queue = kept
        return batch

    def _run(self, lane: _Lane, batch: list[_Job]) -> None:
        started = time.monotonic()
        for job in batch:
            self.metrics.observe_queue_wait(job.tool, started - job.enqueued_at)
        self._execute(lane, batch, started)

    def _execute(self, lane: _Lane, jobs: list[_Job], started: float) -> None:
        """Run ``jobs`` as one batch and answer each; on failure split them so that a fault stays with its request.

        A batch that raises is retried one request at a time, so only the request that caused it fails; an
        out-of-memory error instead frees memory and retries in halves, down to single requests.
        """
        backend = lane.backend
        live = []
        for job in jobs:
            if job.request.cancel.is_set():  # its caller left while an earlier part of a split batch ran
                self._deliver(job, Cancelled("the request was cancelled before it ran"))
            else:
                live.append(job)
        if not live:
            return
        self.metrics.record_batch(backend.name, live[0].request.task.value, len(live))
        try:
            outcomes = backend.run_batch([job.request for job in live])
            if not isinstance(outcomes, (list, tuple)) or len(outcomes) != len(live):
                raise RuntimeError(f"run_batch returned {_count(outcomes)} outcomes for {len(live)} requests")
        except Exception as error:
            if self._is_oom(backend, error):
                self._free_memory(backend)
                if len(live) == 1:
                    logger.error("model %s ran out of memory on a single request", backend.name)
                    self._finish(live[0], ModelError(
                        f"model {backend.name} ran out of memory on this request; try a smaller image or a "
                        "shorter task, or retry when the server is less busy"
                    ), started)
                    return
                middle = len(live) // 2
                logger.warning("model %s ran out of memory on a batch of %d; splitting it", backend.name, len(live))
                self._execute(lane, live[:middle], started)
                self._execute(lane, live[middle:], started)
                return
            if len(live) == 1:
                logger.error("model %s failed on a request", backend.name, exc_info=error)
                self._finish(live[0], self._model_error(backend, error), started)
                return
            logger.warning(
                "a batch of %d on model %s failed (%s); retrying its requests one by one",
                len(live), backend.name, type(error).__name__,
            )
            for job in live:
                self._execute(lane, [job], started)
            return
        for job, outcome in zip(live, outcomes, strict=True):
            self._finish(job, self._result(backend, outcome), started)

    def _result(self, backend: Backend, outcome: Any) -> Output | BaseException:
        """Turn one per-request outcome into what its caller gets."""
        if isinstance(outcome, (Output, VlmToolsError)):  # Cancelled stays Cancelled; typed errors pass through
            return outcome
        if isinstance(outcome, BaseException):
            logger.error("model %s failed on a request", backend.name, exc_info=outcome)
            return self._model_error(backend, outcome)
        logger.error("model %s returned %r instead of an Output", backend.name, type(outcome).__name__)
        return ModelError(f"model {backend.name} returned no usable output for this request; retry or report it")

    @staticmethod
    def _model_error(backend: Backend, error: BaseException) -> ModelError:
        return ModelError(
            f"model {backend.name} failed on this request ({type(error).__name__}); other requests were not "
            "affected; retry, or try another image or model (details are in the server log)"
        )

    def _finish(self, job: _Job, value: Output | BaseException, started: float) -> None:
        self.metrics.observe_run(job.tool, time.monotonic() - started)
        self._deliver(job, value)

    @staticmethod
    def _deliver(job: _Job, value: Output | BaseException) -> None:
        """Hand ``value`` to the job's awaiting coroutine on its own loop; safe from any thread."""
        try:
            job.loop.call_soon_threadsafe(_settle, job.future, value)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    @staticmethod
    def _is_oom(backend: Backend, error: BaseException) -> bool:
        try:
            return bool(backend.is_oom(error))
        except Exception:  # a broken check must not turn one failure into a dead worker
            logger.exception("is_oom of model %s failed", backend.name)
            return False

    @staticmethod
    def _free_memory(backend: Backend) -> None:
        try:
            backend.free_memory()
        except Exception:
            logger.exception("free_memory of model %s failed", backend.name)

    def _fail_lane(self, lane: _Lane, batch: list[_Job], error: BaseException) -> None:
        """A worker died: mark the model unavailable and answer its running and queued requests."""
        with lane.cond:
            lane.dead = True
            lane.last_error = f"{type(error).__name__}: {error}"[:300]
            waiting = list(lane.queue)
            lane.queue.clear()
            for job in waiting:
                job.state = _State.WITHDRAWN
            lane.running -= len(batch)
            self.metrics.set_queue_depth(lane.backend.name, 0)
            lane.cond.notify_all()  # sibling workers leave after their current batch
        failure = ModelError(
            f"model {lane.backend.name} stopped working ({type(error).__name__}); restart the server or use "
            "another model"
        )
        for job in [*batch, *waiting]:
            job.request.cancel.set()
            self._deliver(job, failure)

    # --- inspection ---------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``{"ok", "accepting", "models": {name: {"alive", "queued", "running", "last_error"}}}``.

        ``ok`` means the engine accepts requests and every model's workers are alive.
        """
        models: dict[str, dict[str, Any]] = {}
        for lane in self._lanes.values():
            with lane.cond:
                alive = bool(lane.threads) and not lane.dead and all(t.is_alive() for t in lane.threads)
                models[lane.backend.name] = {
                    "alive": alive,
                    "queued": len(lane.queue),
                    "running": lane.running,
                    "last_error": lane.last_error,
                }
        ok = self._accepting and all(model["alive"] for model in models.values())
        return {"ok": ok, "accepting": self._accepting, "models": models}

    def capacity(self, backend: Backend) -> int:
        """How many of one caller's requests to keep in flight on ``backend`` (a document's pages).

        Two full batches per worker: one generating while the next waits with its images already encoded
        (:meth:`Backend.prefetch`). At most half the queue, so one caller's pages never crowd others into
        ``busy``.
        """
        lane = self._lanes[id(backend)]
        return max(1, min(2 * lane.batch_limit * max(1, backend.parallelism), self.queue_size // 2))

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not yet running), over all models."""
        return sum(len(lane.queue) for lane in self._lanes.values())

    def _describe(self, lane: _Lane) -> str:
        return f"{lane.backend.name} (batch {lane.batch_limit}, {len(lane.threads)} worker(s))"


def _count(outcomes: object) -> str:
    try:
        return str(len(outcomes))  # type: ignore[arg-type]
    except TypeError:
        return "no list of"
