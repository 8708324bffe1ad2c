"""A pool of OpenAI-compatible inference servers: pick, send, retry elsewhere, and type every failure.

How a server is picked, which failures are retried elsewhere and how each is typed: :class:`ServerPool`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from ..errors import Busy, InputTooLong, ModelError, Timeout

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 300
"""Most characters of a server's error message quoted in ours."""

VLLM_EXTRAS = {"top_k": 0, "min_p": 0, "repetition_penalty": 1, "min_tokens": 0}
"""vLLM's sampling parameters beyond OpenAI's, at their neutral values: without them vLLM would take the
checkpoint's ``generation_config.json`` values (see :mod:`vlm_tools.backends.remote`). Servers that refuse unknown
fields (``transformers serve`` answers 422) get the request again without them, and from then on never see them;
``transformers serve`` decodes greedily with no penalties anyway."""


def error_message(response: httpx.Response) -> str:
    """The error text of an OpenAI-style error answer (vLLM, transformers serve, TGI shapes), one line, truncated."""
    text = response.text
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict):
            inner = inner.get("message", inner)
        found = inner if inner is not None else data.get("message", data.get("detail", text))
        text = found if isinstance(found, str) else json.dumps(found)
    text = " ".join(text.split()) or "(empty body)"
    return text if len(text) <= MESSAGE_LIMIT else text[: MESSAGE_LIMIT - 1] + "…"


def chat_content(server: str, response: httpx.Response) -> str:
    """``choices[0].message.content`` of a chat completion (a string or a list of text parts), else ModelError."""
    try:
        data = response.json()
    except ValueError:
        raise ModelError(f"the inference server {server} answered with malformed JSON: "
                         f"{' '.join(response.text.split())[:100]!r}") from None
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise ModelError(f"the inference server {server} answered without choices; is it a chat-completions server?")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
        isinstance(part, dict) and isinstance(part.get("text"), str) for part in content
    ):
        return "".join(part["text"] for part in content)
    raise ModelError(f"the inference server {server} answered without text content (got {type(content).__name__})")


@dataclass(eq=False)
class Server:
    """One inference server and what the pool knows about it. Touched only on the pool's event loop."""

    url: str
    concurrency: int
    slots: asyncio.Semaphore | None = None
    outstanding: int = 0
    last_pick: int = 0
    down_until: float = 0.0
    failures: int = 0
    send_extras: bool = True
    completed: int = 0

    def is_up(self, now: float) -> bool:
        return self.down_until <= now


class _Retry(Exception):
    """This server could not take the request; try another. ``busy`` when it was saturation."""

    def __init__(self, reason: str, *, busy: bool = False, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.busy = busy
        self.unreachable = unreachable


class ServerPool:
    """Inference servers behind one interface.

    All servers in a pool serve the same model. Each request goes to the server with the fewest outstanding
    requests (waiting for a slot or in flight; ties go to the one picked least recently), through a per-server
    semaphore of ``concurrency`` slots. Failures are sorted into three kinds:

    * **server trouble** — refused or dropped connection, HTTP 5xx other than 503: the server is marked down for a
      back-off (doubling from ``backoff_s[0]`` up to ``backoff_s[1]``, reset by a success) and the request is retried
      on another server. Tool calls are idempotent, so a retry is safe; each server is tried at most once per request.
    * **saturation** — HTTP 429 or 503: the request is retried on another server; when none can take it, it fails
      with :class:`~vlm_tools.errors.Busy`. A 503 also marks the server down briefly (a dead worker answers 503 too,
      and answers it fast, which would otherwise make it everybody's first pick).
    * **request trouble** — any other 4xx, an answer that is not a chat completion, a time-out: no retry, a typed
      error naming the server (:class:`~vlm_tools.errors.ModelError` / :class:`~vlm_tools.errors.Timeout`).

    A down server is still tried when no server that is up is left to try, so a pool of one keeps probing its server
    instead of refusing for the whole back-off. The pool runs on a private asyncio event loop in a daemon thread; the
    engine's worker threads hand it requests through :meth:`ServerPool.submit` and may cancel them, which closes the
    HTTP connection (vLLM then aborts the generation).

    Args:
        urls: base URLs ending where ``/chat/completions`` and ``/models`` hang, e.g. ``http://gpu1:8000/v1``.
        api_key: sent as ``Authorization: Bearer`` when given.
        concurrency: requests in flight per server.
        timeout_s: time limit of one HTTP request (connecting is capped at 10 s).
        backoff_s: (first, longest) seconds a failing server is left alone.
        transport: an httpx transport, for tests.
        clock: the time back-offs are counted in (``time.monotonic``; tests pass one they can move).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        api_key: str | None = None,
        concurrency: int = 16,
        timeout_s: float = 120.0,
        backoff_s: tuple[float, float] = (5.0, 30.0),
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError("a server pool needs at least one base URL")
        self.servers = [Server(url.rstrip("/"), concurrency) for url in urls]
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self._clock = clock
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._picks = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vlm-remote-pool", daemon=True)
        self._thread.start()
        self._client: httpx.AsyncClient = self._call(self._make_client(len(urls) * concurrency, transport))

    async def _make_client(self, connections: int, transport: httpx.AsyncBaseTransport | None) -> httpx.AsyncClient:
        for server in self.servers:
            server.slots = asyncio.Semaphore(server.concurrency)
        return httpx.AsyncClient(
            timeout=httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s)),
            limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
            headers=self._headers,
            transport=transport,
        )

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    # --- public, from any thread ----------------------------------------------------------------------------

    def submit(self, body: dict[str, Any]) -> concurrent.futures.Future[str]:
        """Send a chat-completion body; the future gives the message text or raises a typed error.

        Cancelling the future abandons the request (not sent yet, or its connection closed).
        """
        return asyncio.run_coroutine_threadsafe(self._complete(body), self._loop)

    def close(self) -> None:
        """Close the connections and stop the pool's thread. Calling it again does nothing."""
        if self._loop.is_closed() or not self._loop.is_running():
            return
        try:
            self._call(self._client.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()

    def snapshot(self) -> list[dict[str, Any]]:
        """Per-server state (for logs, metrics and tests): url, up, outstanding, completed."""

        async def read() -> list[dict[str, Any]]:
            now = self._clock()
            return [
                {"url": s.url, "up": s.is_up(now), "outstanding": s.outstanding, "completed": s.completed}
                for s in self.servers
            ]

        return self._call(read())

    # --- on the pool's loop ---------------------------------------------------------------------------------

    def _pick(self, tried: set[Server]) -> Server | None:
        """The untried server that is up with the fewest outstanding requests; else the untried down server
        whose back-off ends first; else ``None``."""
        now = self._clock()
        untried = [s for s in self.servers if s not in tried]
        up = [s for s in untried if s.is_up(now)]
        if up:
            choice = min(up, key=lambda s: (s.outstanding, s.last_pick))
        elif untried:
            choice = min(untried, key=lambda s: s.down_until)
        else:
            return None
        self._picks += 1
        choice.last_pick = self._picks
        return choice

    def _mark_down(self, server: Server, reason: str, *, brief: bool = False) -> None:
        """Leave ``server`` alone for a back-off that doubles with each outage (not with each failed request:
        the requests in flight when a server dies all fail at once, and count as one outage)."""
        now = self._clock()
        if not server.is_up(now):
            return
        server.failures = 1 if brief else server.failures + 1
        first, longest = self.backoff_s
        pause = min(longest, first * 2 ** (server.failures - 1))
        server.down_until = now + pause
        log.warning("inference server %s marked down for %.0f s: %s", server.url, pause, reason)

    async def _complete(self, body: dict[str, Any]) -> str:
        tried: set[Server] = set()
        reasons: list[str] = []
        busy = unreachable = 0
        while (server := self._pick(tried)) is not None:
            tried.add(server)
            server.outstanding += 1
            try:
                assert server.slots is not None
                async with server.slots:
                    content = await self._attempt(server, body)
            except _Retry as retry:
                reasons.append(f"{server.url}: {retry.reason}")
                busy += retry.busy
                unreachable += retry.unreachable
                continue
            finally:
                server.outstanding -= 1
            server.failures = 0
            server.down_until = 0.0
            server.completed += 1
            return content
        detail = "; ".join(reasons)
        if busy:
            raise Busy(f"the inference server is saturated ({detail}); retry shortly")
        if unreachable == len(reasons):
            raise ModelError(f"no inference server reachable: {detail}; check that it runs and --base-url")
        raise ModelError(f"the inference server failed: {detail}")

    async def _attempt(self, server: Server, body: dict[str, Any]) -> str:
        """One request to one server: the content, a typed error, or :class:`_Retry` to go elsewhere."""
        url = server.url + "/chat/completions"
        for _ in range(2):  # the second round only after the server refused the extra parameters
            with_extras = server.send_extras  # read once: a concurrent request may clear it meanwhile
            payload = {**body, **VLLM_EXTRAS} if with_extras else body
            try:
                response = await self._client.post(url, json=payload)
            except httpx.TimeoutException as error:
                if isinstance(error, (httpx.ConnectTimeout, httpx.PoolTimeout)):
                    self._mark_down(server, "connection timed out")
                    raise _Retry("connection timed out", unreachable=True) from None
                raise Timeout(f"the inference server {server.url} did not answer within {self.timeout_s:g} s; "
                              "it may be overloaded, or raise --request-timeout-s") from None
            except httpx.TransportError as error:  # refused, reset, dropped mid-answer: the server is in trouble
                reason = f"{type(error).__name__}: {error or 'connection failed'}"
                self._mark_down(server, reason)
                raise _Retry(reason, unreachable=isinstance(error, httpx.ConnectError)) from None
            status = response.status_code
            if status == 200:
                return chat_content(server.url, response)
            message = error_message(response)
            if status in (400, 422) and with_extras and any(k in message for k in VLLM_EXTRAS):
                if server.send_extras:
                    log.info("inference server %s refuses %s; sending requests without it", server.url,
                             ", ".join(VLLM_EXTRAS))
                server.send_extras = False
                continue
            break
        if status in (429, 503):
            if status == 503:
                self._mark_down(server, f"HTTP 503: {message}", brief=True)
            raise _Retry(f"HTTP {status}: {message}", busy=True)
        if status >= 500:
            self._mark_down(server, f"HTTP {status}: {message}")
            raise _Retry(f"HTTP {status}: {message}")
        if status in (401, 403):
            raise ModelError(f"the inference server {server.url} refused the API key (HTTP {status}: {message}); "
                             "set the key in the variable named by --api-key-env (default VLM_TOOLS_API_KEY)")
        if status == 400 and "maximum context length" in message:  # vLLM's words for a prompt that cannot fit
            raise InputTooLong(f"the image and prompt do not fit the inference server's context ({message}); "
                               "shorten the text or send a smaller image, or serve the model with a larger "
                               "--max-model-len")
        raise ModelError(f"the inference server {server.url} rejected the request (HTTP {status}): {message}")

