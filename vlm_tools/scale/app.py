"""The Ray Serve application, and ``vlm-tools serve --scale ray``, which runs it.

:func:`build_app` is importable for Ray's own tooling (``serve run vlm_tools.scale.app:build_app model=…`` or a
config file's ``import_path``; see docs/scale-out.md); :func:`run_on_ray` joins or starts a cluster, deploys the
application and serves until SIGINT/SIGTERM, then drains.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Mapping
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from ..backends.hub import local_files_only
from ..backends.loading import read_family
from ..errors import ConfigurationError
from ..settings import Settings
from .ingress import MCPIngress
from .replica import ModelReplica

log = logging.getLogger(__name__)

APP_NAME = "vlm-tools"
ROUTER = "vlm_tools.scale.affinity.ImageAffinityRouter"


def build_app(settings: Settings | Mapping[str, Any]) -> Any:
    """The application for ``settings`` (or for ``serve run`` arguments: setting names to values, lists as comma-
    separated text or JSON): one autoscaled deployment per model, and the MCP ingress in front of them.

    An MCP ingress deployment (stateless streamable HTTP, the one-process server's gate, limits, errors and progress)
    sends each request to the deployment of the model that serves its tool; each model replica owns one in-process
    engine and model, and Ray Serve adds and removes replicas with the load.
    """
    if not isinstance(settings, Settings):
        settings = settings_from_args(settings)
    if settings.ingress_replicas > 1 and settings.image_store_url is None:
        raise ConfigurationError("--ingress-replicas above 1 needs --image-store redis://…: an image_id issued by one "
                                 "ingress replica must be found by the others")  # fmt: skip
    families: dict[str, str] = {}
    deployments: dict[str, str] = {}
    models: dict[str, Any] = {}
    for model in settings.model:
        family = read_family(model, local_files_only=local_files_only(model))  # fails fast, before any replica
        if family.local_backend is None:
            raise ConfigurationError(f"{model} {family.not_local}")
        name = _deployment_name(family.name, deployments.values())
        families[model], deployments[model] = family.name, name
        models[model] = model_deployment(settings, name).bind(model, settings)
    ingress = serve.deployment(MCPIngress).options(
        name="mcp-ingress", num_replicas=settings.ingress_replicas,
        max_ongoing_requests=max(100, settings.queue_size * 4), graceful_shutdown_timeout_s=_grace(settings),
        ray_actor_options={"num_cpus": 0.5},
    )  # fmt: skip
    return ingress.bind(models, families, deployments, settings)


def model_deployment(settings: Settings, name: str) -> Any:
    """The deployment of one model's replicas: autoscaled on requests in flight, routed by image affinity,
    refusing fast (``busy``) past ``queue_size`` waiting requests per ingress replica."""
    return serve.deployment(ModelReplica).options(
        name=name,
        autoscaling_config={
            "min_replicas": settings.min_replicas, "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
            "upscale_delay_s": settings.upscale_delay_s, "downscale_delay_s": settings.downscale_delay_s,
            "look_back_period_s": 11.0,  # above Ray Serve's 10 s metrics interval, as it requires
        },
        # Room for a batch running and the next gathering, so a replica's engine batches what reaches it.
        max_ongoing_requests=2 * settings.max_batch_size,
        max_queued_requests=settings.queue_size,
        ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus},
        request_router_config=RequestRouterConfig(request_router_class=ROUTER),
        graceful_shutdown_timeout_s=_grace(settings),
        health_check_period_s=2.0,
    )  # fmt: skip


def _grace(settings: Settings) -> float:
    return settings.drain_timeout_s + 5.0


def _deployment_name(family: str, taken: Any) -> str:
    name, index = family, 1
    while name in set(taken):
        index += 1
        name = f"{family}-{index}"
    return name


def settings_from_args(args: Mapping[str, Any]) -> Settings:
    """Settings from ``serve run`` arguments (``key=value`` text) or a config file's ``args`` (YAML values)."""
    values: dict[str, Any] = {}
    for key, value in args.items():
        field = Settings.model_fields.get(key)
        if field is None:
            raise ConfigurationError(f"unknown setting {key!r} in the application's arguments")
        if isinstance(value, str) and str(field.annotation).startswith("tuple"):
            value = json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v]
        values[key] = value
    values.setdefault("transport", "http")
    values.setdefault("scale", "ray")
    return Settings(**values)


def run_on_ray(settings: Settings) -> int:
    """Join (``--ray-address``) or start a Ray cluster, deploy the application, serve until SIGINT/SIGTERM, then
    drain (Ray Serve lets running requests finish, within the drain time) and stop what was started here."""
    import ray

    started_here = settings.ray_address is None
    ray.init(address=settings.ray_address, include_dashboard=False, log_to_driver=True)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
        log.info("serving MCP at http://%s:%d/mcp on Ray Serve: %s, %d to %d replicas each", settings.host,
                 settings.port, ", ".join(settings.model), settings.min_replicas, settings.max_replicas)  # fmt: skip
        _wait_for_a_signal()
        log.info("stopping: draining requests (up to %g s)", settings.drain_timeout_s)
        serve.delete(APP_NAME)
        if started_here:
            serve.shutdown()
    finally:
        ray.shutdown()
    return 0


def _wait_for_a_signal() -> None:
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
