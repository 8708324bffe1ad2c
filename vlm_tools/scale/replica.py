"""A model replica: one model in process with its own engine (batching, kept encodings, cancellation), as a Ray
Serve deployment; Ray Serve starts as many as the load needs."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..backends.base import Output, Request, Task

if TYPE_CHECKING:
    from PIL import Image

    from ..settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ask:
    """What the ingress sends a replica for one request: the request's fields that cross a process (its image, its
    task and texts), without what stays behind (its cancel event: a cancelled call cancels the replica's call)."""

    tool: str
    task: str
    image: Image.Image
    text: str
    labels: tuple[str, ...]
    detail: str
    language: str
    max_points: int
    max_new_tokens: int
    image_id: str | None

    @classmethod
    def of(cls, request: Request, tool: str) -> Ask:
        """The ask for ``request``."""
        return cls(tool, request.task.value, request.image, request.text, tuple(request.labels), request.detail,
                   request.language, request.max_points, request.max_new_tokens, request.image_id)  # fmt: skip

    def request(self) -> Request:
        """The request again, on the replica."""
        fields = asdict(self)
        fields.pop("tool")
        fields["task"] = Task(fields["task"])
        return Request(**fields)


@dataclass(frozen=True)
class Where:
    """Which replica answered, and whether it already held what it had made of the image (an affinity hit)."""

    replica: str
    held: bool


class ModelReplica:
    """One Ray Serve replica of a model: the model loaded in its constructor (Serve routes to a replica only once
    it has started), an engine that batches what reaches this replica."""

    def __init__(self, model: str, settings: Settings) -> None:
        from ray import serve

        from ..backends.hub import local_files_only
        from ..backends.loading import load_backend
        from ..engine import Engine
        from ..logs import configure

        configure(settings.log_level)
        self.backend = load_backend(model, settings, local_files_only=local_files_only(model))
        self.engine = Engine.from_settings([self.backend], settings)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._started: asyncio.Task[None] | None = None
        log.info("replica %s of %s is ready", self.replica, model)

    async def answer(self, ask: Ask, image_id: str | None = None) -> tuple[Output, Where]:
        """Run one request through this replica's engine (``image_id`` is what the request router reads)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self.engine.start())
        await self._started
        held = image_id is not None and image_id in getattr(self.backend, "encodings", ())
        output = await self.engine.submit(self.backend, ask.request(), tool=ask.tool)
        return output, Where(self.replica, held)

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine stopped working is replaced."""
        if self._started is not None and self._started.done():
            state = self.engine.health()
            if not all(model["alive"] for model in state["models"].values()):
                raise RuntimeError(f"the engine of replica {self.replica} stopped working")

    async def __del__(self) -> None:
        """Drain like the one-process server: queued requests answered, running ones finished or cut."""
        try:
            if self._started is not None:
                await self.engine.shutdown()
        finally:
            self.backend.close()


