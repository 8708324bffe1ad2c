"""A scripted fake :class:`~vlm_tools.backends.base.Backend` that records what it ran, for engine and server tests.

It generates no real text: each row "emits" one simulated token per step (sleeping ``token_delay_s`` per step),
stops at its own ``max_new_tokens`` or when its ``cancel`` event is set, and answers with text that is a
deterministic function of the request (:func:`expected_raw`), so a test can check that every caller got its own
answer back. Faults are scripted by request text:

* ``poison``: a batch holding one of these texts raises from ``run_batch`` (a batch-wide crash, as a real model
  fails on one bad input); run alone, that request raises again, every other request succeeds.
* ``fail_rows``: these rows get an exception in their own outcome slot (the rest of the batch is fine).
* ``crash``: raises :class:`FakeWorkerCrash`, a ``BaseException`` that no fault isolation should swallow — it
  stands in for whatever kills a worker thread.
* ``oom_above``: a batch larger than this raises :class:`FakeOutOfMemory` (``is_oom`` says yes).
* :meth:`FakeBackend.hold` / :meth:`FakeBackend.release`: the next batches block (already recorded as started)
  until released.

Shared images are tiny; use :func:`make_request` to build requests.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from PIL import Image

from vlm_tools.backends.base import BatchBackend, Outcome, Output, Request, Task
from vlm_tools.errors import Cancelled
from vlm_tools.families import get_family

ALL_TASKS = frozenset(Task)
IMAGE = Image.new("RGB", (4, 4), (200, 30, 30))


class FakeOutOfMemory(RuntimeError):
    """What the fake raises for a batch over ``oom_above`` (a stand-in for ``torch.cuda.OutOfMemoryError``)."""


class FakeModelFailure(ValueError):
    """What the fake raises for a poisoned request (batch-wide) or puts in a failing row's slot."""


class FakeWorkerCrash(BaseException):
    """Escapes any ``except Exception``: stands in for whatever kills a worker thread."""


@dataclass(frozen=True)
class BatchRecord:
    """One ``run_batch`` call as the fake saw it."""

    task: Task
    size: int
    texts: tuple[str, ...]
    max_new_tokens: tuple[int, ...]
    thread: str


def make_request(text: str, task: Task = Task.CAPTION, max_new_tokens: int = 4, **extra: object) -> Request:
    """A request on a tiny shared image; ``text`` should be unique within a test (the fake keys records by it)."""
    return Request(task=task, image=IMAGE, text=text, max_new_tokens=max_new_tokens, **extra)  # type: ignore[arg-type]


def expected_raw(request: Request) -> str:
    """The fake's answer to a request that ran to its limit: a function of the request alone."""
    return f"{request.task.value}|{request.text}|{request.max_new_tokens}"


class FakeBackend(BatchBackend):
    """A backend whose behaviour is scripted; every batch it ran and every token it "generated" is recorded.

    Args:
        name: reported model name.
        supported: tasks it serves (all by default); ``native`` is the same set.
        max_batch_size / parallelism: as on :class:`Backend`.
        token_delay_s: seconds per simulated generation step (one token for every live row).
        batch_delay_s: fixed seconds per ``run_batch`` call (prefill, say), before the first token.
        poison, fail_rows, crash: request texts that fail as described in the module docstring.
        oom_above: batches larger than this raise an out-of-memory error.
    """

    family = get_family("molmo2")  # only its name is read: routing by family, messages

    def __init__(
        self,
        name: str = "fake/model",
        *,
        supported: Iterable[Task] = ALL_TASKS,
        max_batch_size: int = 8,
        parallelism: int = 1,
        token_delay_s: float = 0.0,
        batch_delay_s: float = 0.0,
        poison: Iterable[str] = (),
        fail_rows: Iterable[str] = (),
        crash: Iterable[str] = (),
        oom_above: int | None = None,
    ) -> None:
        self.name = name
        self.supported = frozenset(supported)
        self.native = self.supported
        self.max_batch_size = max_batch_size
        self.parallelism = parallelism
        self.token_delay_s = token_delay_s
        self.batch_delay_s = batch_delay_s
        self.poison = frozenset(poison)
        self.fail_rows = frozenset(fail_rows)
        self.crash = frozenset(crash)
        self.oom_above = oom_above
        self.broken: BaseException | None = None  # when set, every batch raises it (a model broken for everyone)
        self.batches: list[BatchRecord] = []
        self.tokens: dict[str, int] = {}  # simulated tokens generated per request text
        self.free_memory_calls = 0
        self.closed = False
        self._lock = threading.Lock()
        self._gate = threading.Event()
        self._gate.set()
        self._in_flight = 0
        self._max_in_flight = 0

    # --- scripting ----------------------------------------------------------------------------------------

    def hold(self) -> None:
        """Make batches that start from now on block (after being recorded) until :meth:`release`."""
        self._gate.clear()

    def release(self) -> None:
        """Let held batches go on."""
        self._gate.set()

    # --- inspection ---------------------------------------------------------------------------------------

    @property
    def batch_sizes(self) -> list[int]:
        """Sizes of the batches run so far, in order."""
        with self._lock:
            return [batch.size for batch in self.batches]

    @property
    def texts_run(self) -> list[str]:
        """Every request text that reached ``run_batch`` (a text run twice appears twice)."""
        with self._lock:
            return [text for batch in self.batches for text in batch.texts]

    @property
    def max_in_flight(self) -> int:
        """Most ``run_batch`` calls that ran at the same time."""
        return self._max_in_flight

    def tokens_of(self, text: str) -> int:
        """Simulated tokens generated so far for the request with ``text``."""
        with self._lock:
            return self.tokens.get(text, 0)

    # --- the Backend contract -----------------------------------------------------------------------------

    def run_batch(self, requests: Sequence[Request]) -> list[Outcome]:
        with self._lock:
            self.batches.append(
                BatchRecord(
                    task=requests[0].task,
                    size=len(requests),
                    texts=tuple(r.text for r in requests),
                    max_new_tokens=tuple(r.max_new_tokens for r in requests),
                    thread=threading.current_thread().name,
                )
            )
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            return self._generate(requests)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _generate(self, requests: Sequence[Request]) -> list[Outcome]:
        if len({r.task for r in requests}) != 1:
            raise AssertionError("a batch mixed tasks")  # the engine must never do this
        self._gate.wait()
        if self.broken is not None:
            raise self.broken
        if self.oom_above is not None and len(requests) > self.oom_above:
            raise FakeOutOfMemory(f"out of memory (simulated) for a batch of {len(requests)}")
        if any(r.text in self.crash for r in requests):
            raise FakeWorkerCrash("simulated worker crash")
        if any(r.text in self.poison for r in requests):
            raise FakeModelFailure("simulated model failure on a poisoned request")
        if self.batch_delay_s:
            time.sleep(self.batch_delay_s)
        outcomes: list[Outcome | None] = [None] * len(requests)
        generated = [0] * len(requests)
        for step in range(max(r.max_new_tokens for r in requests)):
            live = False
            for row, request in enumerate(requests):
                if outcomes[row] is not None or generated[row] >= request.max_new_tokens:
                    continue
                if request.cancel.is_set():  # the row stops here; the others go on
                    outcomes[row] = Cancelled("the request was cancelled while the model was generating")
                    continue
                generated[row] += 1
                live = True
                with self._lock:
                    self.tokens[request.text] = self.tokens.get(request.text, 0) + 1
            if not live:
                break
            if self.token_delay_s:
                time.sleep(self.token_delay_s)
        for row, request in enumerate(requests):
            if outcomes[row] is not None:
                continue
            if request.text in self.fail_rows:
                outcomes[row] = FakeModelFailure("simulated failure of one row")
            else:
                raw = expected_raw(request)
                outcomes[row] = Output(raw=raw, text=raw)
        return [outcome for outcome in outcomes if outcome is not None]

    def is_oom(self, error: BaseException) -> bool:
        return isinstance(error, FakeOutOfMemory)

    def free_memory(self) -> None:
        with self._lock:
            self.free_memory_calls += 1

    def close(self) -> None:
        self.closed = True


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0, what: str = "condition") -> None:
    """Poll ``predicate`` on the event loop until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
