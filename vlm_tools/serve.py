"""Run the server on the configured transport until the client goes away or a signal stops it."""

from __future__ import annotations

import logging

import anyio

from .settings import Settings

logger = logging.getLogger(__name__)


def serve(settings: Settings) -> int:
    """Load the models, then serve over stdio (until stdin closes) or streamable HTTP (until SIGINT/SIGTERM).

    The models load before any transport starts, so a model that cannot be had stops the command at once with its
    message (a :class:`~vlm_tools.errors.VlmToolsError` the command line prints), not inside a running server.
    Returns an exit code.
    """
    from .images.stores import check_image_store
    from .server import build_server, load_configured_backends

    if settings.transport == "http":
        from .http_app import check_bind

        check_bind(settings)  # a refused bind is a settings mistake: say so before loading any model
    check_image_store(settings)
    backends = load_configured_backends(settings)
    server = build_server(settings, load_backends=lambda _settings: backends)
    if settings.transport == "stdio":
        anyio.run(server.run_stdio_async)
    else:
        from .http_app import serve_http

        anyio.run(serve_http, server, settings)
    return 0
