"""The backend contract: what the engine hands a model and what it gets back.

A backend is kept resident and serves one model of one family: a :class:`BatchBackend` (a model in this process)
runs batches on a worker thread, a :class:`ConcurrentBackend` (an inference server, a Ray Serve deployment) answers
each request on its own, many at once, on the event loop. This module must stay importable without torch.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

from ..geometry import NormBox, NormPoint, PointSource

if TYPE_CHECKING:
    from PIL import Image

    from ..families.base import Family


class Task(str, Enum):
    """What a request asks of a model. One batch holds one task."""

    CAPTION = "caption"
    ANSWER = "answer"
    POINT = "point"
    DETECT = "detect"
    OCR = "ocr"


Detail = Literal["brief", "detailed"]
LoadState = Literal["loading", "ready", "failed", "unloaded"]
"""Whether a model's weights are in memory (see :attr:`Backend.state`)."""


@dataclass(frozen=True)
class GenerationLimits:
    """Greedy decoding; at most this many new tokens per task (documented in the README)."""

    caption_brief: int = 64
    caption_detailed: int = 320
    answer: int = 128
    point: int = 384
    detect: int = 256
    ocr: int = 1536

    def for_request(self, task: Task, detail: Detail = "brief") -> int:
        """The token limit for a task (captions by detail)."""
        if task is Task.CAPTION:
            return self.caption_detailed if detail == "detailed" else self.caption_brief
        return int(getattr(self, task.value))


@dataclass
class Request:
    """One task on one image.

    ``cancel`` is set by whoever owns the request (the engine) when the caller goes away; a backend checks it
    between tokens so that a cancelled row stops generating while the rest of its batch goes on.
    """

    task: Task
    image: Image.Image
    """RGB, as the images layer decodes every image."""
    text: str = ""
    labels: tuple[str, ...] = ()
    detail: Detail = "brief"
    language: str = "en"
    max_points: int = 10
    max_new_tokens: int = 128
    cancel: threading.Event = field(default_factory=threading.Event)
    image_id: str | None = None
    """The image's handle in the image store, when it has one: a model may reuse what it made of that image."""
    ahead: Any = None
    """What the backend started on this request ahead of its batch (its image being encoded), if anything."""


@dataclass
class Output:
    """What a model answered to one request: its raw text and what the family parser made of it."""

    raw: str
    text: str = ""
    points: list[NormPoint] = field(default_factory=list)
    boxes: list[NormBox] = field(default_factory=list)
    point_source: PointSource = "native"
    unreadable: int = 0
    """Pieces of geometry markup in ``raw`` the family's parser could not read (another syntax, out of range)."""


Outcome = Output | BaseException
"""Per-request result of a batch: an output, or the exception only that request caused."""


class Backend(ABC):
    """A resident model of one family.

    Attributes:
        name: the model id or directory it was loaded from (what results report as ``model``).
        family: its :class:`~vlm_tools.families.base.Family`: prompts, parser, what its checkpoints need.
        native: tasks the model does natively.
        supported: tasks it can serve at all (a superset of ``native``: PaliGemma points by box centres).
    """

    name: str
    family: Family
    native: frozenset[Task]
    supported: frozenset[Task]
    state: LoadState = "ready"
    """Whether its weights are in memory: a model in process may still be loading them, have failed to, or have
    freed them when idle (:class:`~vlm_tools.backends.resident.ResidentModel`); any other backend is ready."""
    error: str | None = None
    """Why it could not load (``state == "failed"``)."""

    async def wait_ready(self, notify: Callable[[float, str], Awaitable[None]] | None, timeout_s: float) -> None:
        """Return once the model can answer, telling ``notify(fraction, message)`` how its load goes (at once here)."""

    def in_use(self) -> AbstractContextManager[None]:
        """Mark a call on the model as in flight, for as long as the context lasts (nothing to mark here)."""
        return nullcontext()

    def status(self) -> dict[str, Any]:
        """Its load state for ``/health``."""
        return {"state": self.state}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the backend holds (GPU memory, connections)."""

    def forget_image(self, image_id: str) -> None:  # noqa: B027 - optional hook
        """Drop whatever the backend keeps of an image that left the image store."""

    def prefetch(self, request: Request) -> None:  # noqa: B027 - optional hook
        """Start work on ``request`` that can run before it does (the engine calls it on admission, on the event
        loop: it must hand heavy work to a thread and return at once)."""


class BatchBackend(Backend):
    """A model that runs requests in batches, one batch at a time, on the engine's worker thread(s).

    Attributes:
        max_batch_size: most requests it takes in one :meth:`run_batch`.
        parallelism: how many batches may run at once (1 for a model in this process).
    """

    max_batch_size: int = 8
    parallelism: int = 1

    @abstractmethod
    def run_batch(self, requests: Sequence[Request]) -> list[Outcome]:
        """Run requests of one task together; return one outcome per request, in order.

        Raising means the batch as a whole failed: the engine then isolates the request that caused it, unless
        the error is a :class:`~vlm_tools.errors.ModelBroken` (every request would fail the same way).
        """

    def is_oom(self, error: BaseException) -> bool:
        """Whether ``error`` means the device ran out of memory (the engine then splits the batch)."""
        return False

    def free_memory(self) -> None:  # noqa: B027 - optional hook
        """Give cached device memory back after an out-of-memory error."""


class ConcurrentBackend(Backend):
    """A model served elsewhere that answers each request on its own (the server batches them itself).

    Attributes:
        concurrency: how many requests may be in flight at once.
    """

    concurrency: int = 16

    @abstractmethod
    async def answer(self, request: Request) -> Output:
        """The output for ``request``; raises its typed error. Cancelling the awaiting task abandons the call."""
