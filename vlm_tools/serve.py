"""Run the server on the configured transport until the client goes away or a signal stops it."""

from __future__ import annotations

import logging

import anyio

from .settings import Settings

logger = logging.getLogger(__name__)


def serve(settings: Settings) -> int:
    """Serve over stdio (until stdin closes) or streamable HTTP (until SIGINT/SIGTERM). Returns an exit code."""
    from .server import build_server

    server = build_server(settings)
    if settings.transport == "stdio":
        anyio.run(server.run_stdio_async)
    else:
        from .http_app import serve_http

        anyio.run(serve_http, server, settings)
    return 0
