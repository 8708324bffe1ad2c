"""A request on its way through the engine, and how its answer reaches the coroutine awaiting it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from enum import Enum

from ..backends.base import Backend, Output, Request

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What bounds a lane: the most requests in a batch, how long a batch may gather, how many requests may wait,
    how long one may take."""

    batch_size: int
    batch_wait_s: float
    queue_size: int
    request_timeout_s: float


class State(Enum):
    """Where a job is: waiting in its lane's queue, running, or gone (answered, or its caller left)."""

    QUEUED = "queued"
    RUNNING = "running"
    WITHDRAWN = "withdrawn"


@dataclass(eq=False)
class Job:
    """What was asked, by which tool, and the future its caller awaits on its event loop."""

    request: Request
    tool: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Output]
    enqueued_at: float  # time.monotonic() at admission
    deadline: float
    state: State = State.QUEUED

    def deliver(self, value: Output | BaseException) -> None:
        """Hand ``value`` to the awaiting coroutine on its own loop; safe from any thread, at most once."""
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, value)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle(future: asyncio.Future[Output], value: Output | BaseException) -> None:
    """Answer ``future`` unless its caller already left (cancelled, timed out): runs on the loop's thread."""
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


def prefetch(backend: Backend, request: Request) -> None:
    """Let the backend start on the request's image while it waits (a failure here only loses the head start)."""
    try:
        backend.prefetch(request)
    except Exception:
        logger.exception("prefetch of model %s failed", backend.name)
