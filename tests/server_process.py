"""The server as a separate process for load and shutdown tests: start, wait until healthy, talk MCP, stop.

Each server runs ``vlm-tools serve`` with the tiny models on one torch thread (steady on a small machine) and
writes its log to a file, shown when a test fails.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from vlm_tools.errors import ERROR_CODES

VLM_TOOLS = str(Path(sys.executable).with_name("vlm-tools"))
TOKEN = "load-test-token"

# The SDK may put "Error executing tool NAME: " in front of a tool error; the code comes right after.
_TYPED = re.compile(r"^(?:Error executing tool \S+: )?(" + "|".join(map(re.escape, ERROR_CODES)) + r"): \S")


def server_env(**settings: object) -> dict[str, str]:
    """Environment of a server process: offline, one torch thread, ``VLM_TOOLS_<NAME>`` for each setting."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "VLM_TOOLS_LOG_LEVEL": "info"})
    env.update({f"VLM_TOOLS_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServerProcess:
    """``vlm-tools serve --transport http`` on a free loopback port, with a bearer token.

    Args:
        args: ``serve`` flags after the transport, port and token (models, paths, engine settings).
        env: the process environment (see :func:`server_env`).
        cwd: working directory; ``log`` receives stdout and stderr.
    """

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log_file = log.open("wb")
        self.proc = subprocess.Popen(
            [VLM_TOOLS, "serve", "--transport", "http", "--port", str(self.port), "--auth-token", TOKEN, *args],
            stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=str(cwd),
        )  # fmt: skip

    @property
    def pid(self) -> int:
        """The server's process id (the Python process itself: ``vlm-tools`` is a console script)."""
        return self.proc.pid

    def wait_healthy(self, timeout: float = 120.0) -> None:
        """Block until ``/health`` answers 200; fail with the server log if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise AssertionError(f"server not healthy within {timeout:g} s:\n{self.log_tail()}")

    def health(self) -> tuple[int, dict[str, Any]]:
        """Status and body of ``/health``."""
        response = httpx.get(f"{self.base}/health", timeout=5)
        return response.status_code, response.json()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the exit status (kill after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return int(self.proc.returncode)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log."""
        self._log_file.flush()
        return self.log.read_text(errors="replace")[-chars:]

    def __enter__(self) -> ServerProcess:  # noqa: PYI034 - final class
        try:
            self.wait_healthy()
        except BaseException:
            self.stop(signal.SIGKILL)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def http_client(base: str, *, timeout: float = 120.0, mode: str = "auto") -> Any:
    """An MCP client over streamable HTTP carrying the bearer token."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=timeout)
    return Client(streamable_http_client(f"{base}/mcp", http_client=http), mode=mode)


def error_text(result: Any) -> str:
    """The text of a tool result's content blocks."""
    return " ".join(getattr(block, "text", "") for block in result.content)


def typed_code(message: str) -> str | None:
    """The stable error code a tool error message starts with (after the SDK's prefix), or None."""
    match = _TYPED.match(message)
    return match.group(1) if match else None


def outcome(result: Any) -> str:
    """``ok`` for a result, the error code for a typed tool error, ``untyped`` for any other tool error."""
    if not result.is_error:
        return "ok"
    return typed_code(error_text(result)) or "untyped"


def pdf_bytes(pages: int, size: tuple[float, float] = (200, 150)) -> bytes:
    """A PDF of ``pages`` blank pages."""
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument.new()
    for _ in range(pages):
        doc.new_page(*size)
    buffer = io.BytesIO()
    doc.save(buffer)
    doc.close()
    return buffer.getvalue()


# --- calls as a client sees them ----------------------------------------------------------------------------


@dataclass
class Call:
    """One tool call as its client saw it: when it was sent, when it ended, and how."""

    tool: str
    sent: float
    ended: float = 0.0
    result: str = "pending"  # ok, an error code, untyped, hang, transport:<error>, or client_failed:<error>
    structured: dict[str, Any] | None = None  # the structured result of an ok call

    @property
    def seconds(self) -> float:
        """From sending to the answer."""
        return self.ended - self.sent


async def record_call(
    client: Any, tool: str, arguments: dict[str, Any], *logs: list[Call], timeout: float = 60.0
) -> Call:
    """Make one call, append it to every list in ``logs`` at once, record its outcome; never raises.

    A call without an answer after ``timeout`` seconds is recorded as ``hang``.
    """
    call = Call(tool, sent=time.monotonic())
    for log in logs:
        log.append(call)
    try:
        with anyio.fail_after(timeout):
            result = await client.call_tool(tool, arguments)
        call.result = outcome(result)
        if call.result == "ok":
            call.structured = result.structured_content
    except TimeoutError:
        call.result = "hang"
    except Exception as error:  # noqa: BLE001 - a refused or dropped connection surfaces as any exception
        call.result = f"transport:{type(error).__name__}"
    call.ended = time.monotonic()
    return call


async def with_http_client(
    base: str, body: Callable[[Any, list[Call]], Awaitable[None]], *, timeout: float = 120.0
) -> list[Call]:
    """Run ``body(client, mine)`` with an HTTP MCP client and return the calls it recorded in ``mine``.

    The MCP client fails as a whole (its task group raises) when it can no longer reach the server, cutting
    short the call in progress: such calls are recorded as ``client_failed`` instead of raising. A failure to
    connect at all raises.
    """
    mine: list[Call] = []
    try:
        async with http_client(base, timeout=timeout) as client:
            # The client checks a result against the tool's outputSchema, fetching tools/list when it has none:
            # fetch it now, or a call answered during a shutdown could fail on that second request.
            await client.list_tools()
            await body(client, mine)
    except Exception as error:  # noqa: BLE001 - any transport failure; the calls say what it cut
        for call in mine:
            if call.result == "pending":
                call.result, call.ended = f"client_failed:{error!r}"[:300], time.monotonic()
    return mine
