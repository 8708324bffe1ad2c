"""Run the server on the configured transport until the client goes away or a signal stops it."""

from __future__ import annotations

import logging

import anyio

from .settings import Settings

logger = logging.getLogger(__name__)


def serve(settings: Settings) -> int:
    """Serve over stdio (until stdin closes) or streamable HTTP (until SIGINT/SIGTERM); returns an exit code.

    What can fail fast is checked before any transport starts — each model's config and family, whether the hub or
    the cache can give it — so a model that cannot be had stops the command at once with its message (a
    :class:`~vlm_tools.errors.VlmToolsError` the command line prints). The weights load once the transport is up,
    so clients get the handshake and the tool list at once, whatever the load takes.
    """
    from .images.stores import check_image_store
    from .server import build_server, load_configured_backends

    if settings.transport == "http":
        from .http_app import check_bind

        check_bind(settings)  # a refused bind is a settings mistake: say so before anything else
    check_image_store(settings)
    if settings.scale == "ray":
        from .scale.app import run_on_ray

        return run_on_ray(settings)
    backends = load_configured_backends(settings)
    server = build_server(settings, load_backends=lambda _settings: backends)
    if settings.transport == "stdio":
        anyio.run(server.run_stdio_async)
    else:
        from .http_app import serve_http

        anyio.run(serve_http, server, settings)
    return 0
