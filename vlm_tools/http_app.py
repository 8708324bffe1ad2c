"""Streamable-HTTP serving: the MCP endpoint at ``/mcp``, ``/health`` and ``/metrics``, guarded.

Every request, on every route, passes the same gate (:class:`Gate`): the Host header must name this server (421
otherwise, against DNS rebinding), a browser Origin must be allowed (403), and when a token is set the request
must carry ``Authorization: Bearer <token>`` (401).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

import uvicorn
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ConfigurationError
from .server import VisionServer
from .settings import Settings

logger = logging.getLogger(__name__)

# JSON-RPC envelope and argument names around a base64 image: generous, fixed.
_ENVELOPE_BYTES = 64 * 1024


def request_body_limit(settings: Settings) -> int:
    """The largest request body needed: the largest inline image as base64 (4/3 of its bytes) plus the envelope."""
    return (settings.max_inline_bytes * 4 + 2) // 3 + _ENVELOPE_BYTES


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(settings: Settings) -> None:
    """Refuse to serve beyond this machine without a token unless explicitly forced."""
    if not is_loopback(settings.host) and settings.auth_token is None and not settings.allow_public_bind:
        raise ConfigurationError(
            f"refusing to bind {settings.host} without --auth-token: anyone who can reach it could use the "
            "server. Set --auth-token (or VLM_TOOLS_AUTH_TOKEN), bind 127.0.0.1, or pass --allow-public-bind."
        )


def allowed_hosts(settings: Settings, port: int) -> list[str]:
    """Host header values this server answers to."""
    names = {settings.host}
    if is_loopback(settings.host) or settings.host in ("0.0.0.0", "::"):
        names |= {"127.0.0.1", "localhost", "[::1]"}
    if settings.host in ("0.0.0.0", "::"):
        names.add(socket.gethostname())
    hosts = [f"{_bracket(n)}:{port}" for n in names] + [_bracket(n) for n in names if port in (80, 443)]
    return sorted(set(hosts) | set(settings.allowed_hosts))


def allowed_origins(settings: Settings, port: int) -> list[str]:
    """Browser origins allowed to call the server (requests without an Origin header are not browsers)."""
    origins = {f"http://{h}" for h in allowed_hosts(settings, port)} | {
        f"https://{h}" for h in allowed_hosts(settings, port)
    }
    return sorted(origins | set(settings.allowed_origins))


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class Gate:
    """ASGI middleware: Host (421), Origin (403) and bearer token (401) checks on every HTTP request."""

    def __init__(self, app: ASGIApp, *, hosts: Iterable[str], origins: Iterable[str], token: str | None) -> None:
        self.app = app
        self.hosts = frozenset(h.lower() for h in hosts)
        self.origins = frozenset(o.lower() for o in origins)
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        host = request.headers.get("host", "").lower()
        if host not in self.hosts:
            await _plain(421, "misdirected request: unknown Host header")(scope, receive, send)
            return
        origin = request.headers.get("origin")
        if origin is not None and origin.lower() not in self.origins:
            await _plain(403, "forbidden: Origin not allowed (see --allowed-origins)")(scope, receive, send)
            return
        if self.token is not None and scope.get("path") != "/health" and not self._authorised(request):
            response = _plain(401, "unauthorised: send Authorization: Bearer <token>")
            response.headers["WWW-Authenticate"] = 'Bearer realm="vlm-tools"'
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorised(self, request: Request) -> bool:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token or b"")


def _plain(status: int, text: str) -> Response:
    return Response(text, status_code=status, media_type="text/plain")


def build_http_app(
    server: VisionServer, settings: Settings, port: int, *, stateless: bool = False,
    health_extra: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> ASGIApp:  # fmt: skip
    """The ASGI app serving ``server`` on ``port`` (the port clients reach it on).

    ``stateless`` serves every request on its own (no ``Mcp-Session-Id``), as replicas behind a balancer must;
    ``health_extra`` adds to the ``/health`` answer (a scaled deployment's replica counts). ``/health`` answers
    without a token so a load balancer can probe it, and says no more than whether the server can serve.
    """
    hosts = allowed_hosts(settings, port)
    origins = allowed_origins(settings, port)

    @server.custom_route("/health", methods=["GET"])
    async def health(_: Request) -> Response:
        runtime = server.runtime
        if runtime is None:
            return JSONResponse({"ok": False, "status": "starting or stopping"}, status_code=503)
        state = runtime.health()
        body = {"ok": bool(state.get("ok")), "accepting": state.get("accepting"), "models": state.get("models")}
        if health_extra is not None:
            body |= await health_extra()
        return Response(json.dumps(body), status_code=200 if body["ok"] else 503, media_type="application/json")

    @server.custom_route("/metrics", methods=["GET"])
    async def metrics(_: Request) -> Response:
        body, content_type = server.metrics.render()
        return Response(body, media_type=content_type)

    app = server.streamable_http_app(
        streamable_http_path="/mcp",
        max_request_body_size=request_body_limit(settings),
        transport_security=TransportSecuritySettings(allowed_hosts=hosts, allowed_origins=origins),
        host=settings.host,
        stateless_http=stateless,
    )
    token = settings.auth_token.get_secret_value() if settings.auth_token else None
    return Gate(app, hosts=hosts, origins=origins, token=token)


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket first, so port 0 resolves to a real port before the app is built."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only when sock.proto is IPPROTO_TCP,
    # and without it a JSON response (headers, then body) waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


# Beyond the drain: time to write the last responses and to close streams that stay open (a session's GET event
# stream), which uvicorn then cuts.
_RESPONSE_GRACE_S = 3


class DrainingServer(uvicorn.Server):
    """uvicorn's server, stopped the way this server promises: every call it received is answered, then exit 0.

    On SIGINT/SIGTERM it stops accepting connections, reads what already arrived on open ones, and drains the
    engine while uvicorn waits for the open responses: queued calls are answered ``shutting_down`` at once and
    running ones finish within ``drain_timeout_s`` (or are answered ``shutting_down`` then), so no received call
    loses its connection. Left to itself, uvicorn would close a connection whose request was still unread, keep
    the engine running queued work while it waits, cut what is unfinished at its graceful time-out, and finally
    re-raise the signal, so the process would die by SIGTERM instead of exiting normally.
    """

    def __init__(self, config: uvicorn.Config, vision: VisionServer) -> None:
        super().__init__(config)
        self.vision = vision

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Handle SIGINT/SIGTERM as a request to stop; unlike uvicorn's version, do not re-raise them after."""
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop accepting, read what arrived, start the engine's drain, then uvicorn's own shutdown."""
        for server in self.servers:
            server.close()
        # uvicorn closes at once a connection with no request in progress: let the loop read the requests that
        # are already in the connections' buffers first, so that they are answered instead of dropped.
        await asyncio.sleep(0.05)
        runtime = self.vision.runtime
        drain = None
        if runtime is not None:
            logger.info("stopping: draining requests (up to %g s)", runtime.settings.drain_timeout_s)
            # Runs while uvicorn waits for the open responses; the lifespan's own shutdown call awaits it.
            drain = asyncio.ensure_future(runtime.engine.shutdown())
        await super().shutdown(sockets)
        if drain is not None:
            await drain


async def serve_http(server: VisionServer, settings: Settings) -> None:
    """Serve over streamable HTTP until SIGINT/SIGTERM, then drain (see :class:`DrainingServer`)."""
    check_bind(settings)
    sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    app = build_http_app(server, settings, port)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        lifespan="on",
        timeout_graceful_shutdown=math.ceil(settings.drain_timeout_s) + _RESPONSE_GRACE_S,
    )
    logger.info("serving MCP at http://%s:%d/mcp", _bracket(settings.host), port)
    await DrainingServer(config, server).serve(sockets=[sock])
