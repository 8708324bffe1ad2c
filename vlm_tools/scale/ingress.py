"""The MCP ingress of a Ray Serve deployment: the one-process server's HTTP app (gate, limits, error codes,
progress, ``/health``, ``/metrics``), stateless, its models being the model deployments behind their handles."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from ..backends.base import ConcurrentBackend, Output, Request
from ..errors import Busy, ModelError, VlmToolsError
from ..families import get_family
from ..router import TOOL_TASKS
from .replica import Ask

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from ..families.base import Family
    from ..metrics import Metrics
    from ..settings import Settings

log = logging.getLogger(__name__)

RETRIES = 2
"""Other replicas a request is sent to when the one running it dies (tool calls are idempotent)."""

_TOOL_OF_TASK = {task: tool for tool, task in TOOL_TASKS.items()}


class DeploymentModel(ConcurrentBackend):
    """A model served by a Ray Serve deployment of replicas: each request goes to the replica its image's affinity
    names (:mod:`~vlm_tools.scale.affinity`); a replica that dies under it hands it to another.

    Args:
        name: the model id or directory (what results report as ``model``).
        family: the model's family.
        handle: the model deployment's handle.
        concurrency: requests in flight at once from this ingress replica (Ray Serve queues and routes them).
    """

    def __init__(self, name: str, family: Family, handle: DeploymentHandle, *, concurrency: int) -> None:
        self.name = name
        self.family = family
        self.native = family.native
        self.supported = family.supported
        self.concurrency = concurrency
        self.handle = handle.options(method_name="answer")
        self.metrics: Metrics | None = None

    async def answer(self, request: Request) -> Output:
        """Send the request to a replica and return its answer; cancelling the awaiting task cancels the replica's
        call (its row stops at its next token)."""
        self.family.prompt(request)  # a request the family cannot phrase fails here, not on a replica
        ask = Ask.of(request, _TOOL_OF_TASK[request.task])
        for attempt in range(RETRIES + 1):
            response = self.handle.remote(ask, image_id=request.image_id)
            try:
                output, where = await response
            except asyncio.CancelledError:
                response.cancel()  # awaiting a handle call does not cancel it by itself
                raise
            except BackPressureError:
                raise Busy(f"every replica of {self.name} is busy and its queue is full; retry in a moment") from None
            except RayTaskError as error:
                raise _typed(error, self.name) from None
            except (RayActorError, ActorUnavailableError, DeploymentUnavailableError) as error:
                if attempt == RETRIES:
                    raise ModelError(f"the replicas of {self.name} kept failing ({type(error).__name__}); "
                                     "retry in a moment") from None  # fmt: skip
                log.warning("a replica of %s died under a request (%s); sending it to another", self.name,
                            type(error).__name__)  # fmt: skip
                continue
            if request.image_id is not None and self.metrics is not None:
                self.metrics.record_affinity(self.name, held=where.held)
            return output
        raise AssertionError("unreachable")


def _typed(error: RayTaskError, model: str) -> VlmToolsError:
    """The replica's own typed error (a Ray task error wraps it), or a model error saying what failed."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, VlmToolsError):
        return cause
    log.error("a replica of %s failed", model, exc_info=error)
    return ModelError(f"model {model} failed on this request ({type(cause).__name__}); details are in the logs")


@serve.ingress()
class MCPIngress:
    """The ingress deployment: builds the server's HTTP app over the model deployments' handles.

    Args:
        models: model id → the handle of its deployment (bound deployments arrive as handles).
        families: model id → family name (read from each model's config when the application was built).
        deployments: model id → deployment name, for the replica counts ``/health`` reports.
        settings: the server's settings.
    """

    def __init__(self, models: dict[str, DeploymentHandle], families: dict[str, str], deployments: dict[str, str],
                 settings: Settings) -> None:  # fmt: skip
        from ..logs import configure

        configure(settings.log_level)
        self.settings = settings
        self.deployments = deployments
        per_model = settings.max_replicas * 2 * settings.max_batch_size  # what the replicas can hold in flight
        self.backends = [
            DeploymentModel(model, get_family(families[model]), handle, concurrency=per_model)
            for model, handle in models.items()
        ]
        self.app_name = serve.get_replica_context().app_name

    def __serve_build_asgi_app__(self) -> Any:
        """The one-process server's HTTP app, stateless (each request on its own: any ingress replica may answer)."""
        from ..http_app import build_http_app
        from ..server import build_server

        server = build_server(self.settings, load_backends=lambda _settings: self.backends)
        for backend in self.backends:
            backend.metrics = server.metrics
        return build_http_app(server, self.settings, self.settings.port, stateless=True,
                              health_extra=self.replica_counts)  # fmt: skip

    async def replica_counts(self) -> dict[str, Any]:
        """``{"replicas": {model: running replicas}}`` for ``/health``."""
        status = await asyncio.to_thread(serve.status)
        deployments = status.applications[self.app_name].deployments
        return {
            "replicas": {
                model: deployments[name].replica_states.get("RUNNING", 0) if name in deployments else 0
                for model, name in self.deployments.items()
            }
        }
