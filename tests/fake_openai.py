"""A scripted fake OpenAI-compatible inference server: a real HTTP server on 127.0.0.1 that records every request.

Each server answers ``GET /v1/models`` with its ``models`` and ``POST /v1/chat/completions`` with whatever its
script says for that body: a :class:`Reply` (status, message content or a raw body, a delay, or a dropped
connection). ``script`` may be one reply for every request, a list used in order (the last one repeating), or a
function of the request body. Every request is recorded (path, headers, parsed body) in :attr:`FakeOpenAI.requests`,
and the most requests in flight at once in :attr:`FakeOpenAI.max_in_flight`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_MODEL = "google/paligemma2-3b-mix-448"


@dataclass
class Reply:
    """One scripted answer to a chat completion.

    ``content`` goes into ``choices[0].message.content`` of a well-formed completion; ``body`` (bytes, str or a
    JSON-able object) replaces the whole answer; ``drop`` closes the connection without answering.
    """

    status: int = 200
    content: Any = "a cat"
    body: Any = None
    delay_s: float = 0.0
    drop: bool = False


@dataclass
class Recorded:
    """A request the fake received."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None


Script = Reply | list[Reply] | Callable[[dict[str, Any]], Reply]


@dataclass
class FakeOpenAI:
    """The fake server; use as a context manager (``with FakeOpenAI() as fake: fake.url``)."""

    script: Script = field(default_factory=Reply)
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    models_status: int = 200
    reject_fields: frozenset[str] = frozenset()  # answer 422 naming them, as ``transformers serve`` does
    requests: list[Recorded] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    completed: int = 0  # chat completions answered (whatever the status)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._served = 0
        self._httpd: ThreadingHTTPServer | None = None

    # --- life cycle ---------------------------------------------------------------------------------------

    def __enter__(self) -> FakeOpenAI:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start the fake first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    # --- what it saw --------------------------------------------------------------------------------------

    @property
    def chat_bodies(self) -> list[dict[str, Any]]:
        """Bodies of the chat-completion requests, in arrival order."""
        with self._lock:
            return [r.body for r in self.requests if r.path.endswith("/chat/completions") and r.body is not None]

    def _next_reply(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            index = self._served
            self._served += 1
        script = self.script
        if isinstance(script, Reply):
            return script
        if isinstance(script, list):
            return script[min(index, len(script) - 1)]
        return script(body)

    # --- HTTP ---------------------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _record(self, body: dict[str, Any] | None) -> None:
                with fake._lock:
                    fake.requests.append(Recorded(self.command, self.path, dict(self.headers.items()), body))

            def _send(self, status: int, payload: Any) -> None:
                data = payload if isinstance(payload, bytes) else (
                    payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                self._record(None)
                if not self.path.endswith("/models"):
                    self._send(404, {"detail": "Not Found"})
                elif fake.models_status != 200:
                    self._send(fake.models_status, {"error": {"message": "models listing failed"}})
                else:
                    data = [{"id": m, "object": "model", "owned_by": "fake", "root": m} for m in fake.models]
                    self._send(200, {"object": "list", "data": data})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"unparsed": raw.decode(errors="replace")}
                self._record(body)
                with fake._lock:
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    self._answer(body)
                finally:
                    with fake._lock:
                        fake.in_flight -= 1
                        fake.completed += 1

            def _answer(self, body: dict[str, Any]) -> None:
                unexpected = sorted(fake.reject_fields & set(body))
                if unexpected:
                    self._send(422, {"detail": f"Unexpected fields in the request: {set(unexpected)}"})
                    return
                reply = fake._next_reply(body)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if reply.body is not None:
                    self._send(reply.status, reply.body)
                    return
                self._send(reply.status, completion(body.get("model", ""), reply.content))

        return Handler


def completion(model: str, content: Any) -> dict[str, Any]:
    """A well-formed chat completion answering ``content``."""
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
