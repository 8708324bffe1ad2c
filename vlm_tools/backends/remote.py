"""The remote backend: the same tools served by an OpenAI-compatible inference server (vLLM, ``transformers serve``).

Prompts and parsers are the family's, as for a local model. What this module adds is the request shape, set out
in :class:`RemoteBackend`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from ..errors import Cancelled, ConfigurationError
from ..families import FAMILIES, family_from_name, get_family
from ..images.encode import png_data_uri
from .base import ConcurrentBackend, Output, Request
from .encodings import EncodingCache
from .remote_client import ServerPool, error_message

if TYPE_CHECKING:
    from ..families.base import Family
    from ..settings import Settings

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 10.0


def chat_body(model: str, prompt: str, image_url: str, max_new_tokens: int) -> dict[str, Any]:
    """A greedy chat-completion body: one user message holding the image (a ``data:`` URI), then the prompt."""
    return {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url}},
                    {"type": "text", "text": prompt},
                ],
            }
        ],
        "temperature": 0,
        "top_p": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "seed": 0,
        "n": 1,
        "max_tokens": max(1, int(max_new_tokens)),
        "stream": False,
    }


class RemoteBackend(ConcurrentBackend):
    """A model of one family served by one or more OpenAI-compatible servers (all serving the same model).

    The request shape:

    * one ``user`` message whose content is ``[image_url, text]``: the image as a ``data:image/png;base64,…`` URI
      encoded ahead, on a thread of its own, from the image the server already fetched, decoded and checked (a user's
      URL never reaches the inference server, whose own fetching has had SSRF holes), kept by image id so a follow-up
      sends the same bytes without encoding them again;
    * greedy decoding that inherits nothing: vLLM takes its default sampling parameters from the checkpoint's
      ``generation_config.json``, so the neutral values are sent explicitly (and vLLM's own, see
      :data:`~vlm_tools.backends.remote_client.VLLM_EXTRAS`).

    Each request is sent on its own and answers its caller as soon as its own answer arrives (the server batches
    concurrent requests itself); cancelling a call closes its connection.

    Args:
        base_urls: e.g. ``("http://gpu1:8000/v1", "http://gpu2:8000/v1")``.
        model: the model name the servers serve (sent as ``model``; what results report).
        family: the model's family.
        api_key: sent as ``Authorization: Bearer``.
        concurrency: requests in flight per server.
        timeout_s: time limit of one HTTP request.
        backoff_s: (first, longest) seconds a failing server is left alone.
        max_model_len: the servers' context length when they report it (vLLM's ``GET /models``): no request asks
            for more new tokens than that (vLLM refuses such a request outright; it fits the rest itself).
        image_cache_bytes: most bytes of PNG ``data:`` URIs kept by image id, so a follow-up on an image sends
            the same bytes without encoding them again (vLLM's prefix cache then matches them too).
        transport: an httpx transport, for tests.
        clock: what back-offs are counted in (tests pass one they can move).
    """

    def __init__(
        self, base_urls: Sequence[str], model: str, family: Family, *, api_key: str | None = None,
        concurrency: int = 16, timeout_s: float = 120.0, backoff_s: tuple[float, float] = (5.0, 30.0),
        max_model_len: int | None = None, image_cache_bytes: int = 256_000_000,
        transport: httpx.AsyncBaseTransport | None = None, clock: Callable[[], float] = time.monotonic,
    ) -> None:  # fmt: skip
        self.name = model
        self.family = family
        self.native = family.native
        self.supported = family.supported
        self.concurrency = max(1, len(base_urls) * concurrency)
        self.max_model_len = max_model_len
        self.image_urls = EncodingCache(image_cache_bytes)
        self._encoder = concurrent.futures.ThreadPoolExecutor(_encoding_workers(), thread_name_prefix="vlm-png")
        self.pool = ServerPool(
            base_urls, api_key=api_key, concurrency=concurrency, timeout_s=timeout_s, backoff_s=backoff_s,
            transport=transport, clock=clock,
        )  # fmt: skip

    @classmethod
    def from_settings(
        cls, settings: Settings, model: str, family: Family, max_model_len: int | None = None
    ) -> RemoteBackend:
        """A backend over every ``settings.base_url``, configured by the settings."""
        return cls(
            settings.base_url, model, family, api_key=settings.resolved_api_key(),
            concurrency=settings.remote_concurrency, timeout_s=settings.request_timeout_s,
            max_model_len=max_model_len, image_cache_bytes=settings.encoding_cache_bytes,
        )  # fmt: skip

    def prompt(self, request: Request) -> str:
        """The text sent beside the image: the family's prompt (caller text already neutralised)."""
        return self.family.prompt(request)

    def prefetch(self, request: Request) -> None:
        """Start encoding the request's image as a PNG ``data:`` URI on a thread of its own (unless it is kept)."""
        if request.image_id not in self.image_urls:
            request.ahead = self._encoder.submit(self.image_url, request)

    def image_url(self, request: Request) -> str:
        """The request's image as a PNG ``data:`` URI, kept by image id for the next call on it."""
        url = self.image_urls.get(request.image_id)
        if url is None:
            url = png_data_uri(request.image)
            self.image_urls.put(request.image_id, url, len(url))
        return url

    def forget_image(self, image_id: str) -> None:
        """Drop the kept ``data:`` URI of an image that left the image store."""
        self.image_urls.forget(image_id)

    async def answer(self, request: Request) -> Output:
        """Send one request and read its answer; cancelling the awaiting task closes its connection."""
        if request.cancel.is_set():
            raise Cancelled("the request was cancelled before it was sent to the inference server")
        prompt = self.prompt(request)  # a bad request fails here, before anything is encoded or sent
        ahead, request.ahead = request.ahead, None
        if ahead is None:
            ahead = self._encoder.submit(self.image_url, request)
        url = await asyncio.wrap_future(ahead)
        limit = min(request.max_new_tokens, self.max_model_len) if self.max_model_len else request.max_new_tokens
        raw = await asyncio.wrap_future(self.pool.submit(chat_body(self.name, prompt, url, limit)))
        return self.family.interpret(request, raw)

    def close(self) -> None:
        """Close the connections to the inference servers."""
        self._encoder.shutdown(wait=False, cancel_futures=True)
        self.image_urls.clear()
        self.pool.close()


def _encoding_workers() -> int:
    """Threads that encode PNG data URIs: one per core, at most 4 (zlib releases the GIL)."""
    import os

    return max(1, min(4, os.cpu_count() or 1))


# --- start-up ---------------------------------------------------------------------------------------------


def probe(url: str, api_key: str | None, timeout_s: float = PROBE_TIMEOUT_S) -> list[dict[str, Any]]:
    """``GET {url}/models``: the model entries the server lists (may be empty).

    Raises :class:`ConfigurationError` when the server refuses the API key, :class:`ConnectionError` when it
    cannot be reached. A server that answers but cannot list its models (``transformers serve`` answers 500 while
    its hub cache directory does not exist) counts as reachable with an empty list.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url.rstrip("/") + "/models", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as error:
        raise ConnectionError(f"{type(error).__name__}: {error or 'connection failed'}") from None
    if response.status_code in (401, 403):
        raise ConfigurationError(
            f"the inference server {url} refused the API key (HTTP {response.status_code}): set it in the variable "
            "named by --api-key-env (default VLM_TOOLS_API_KEY) or pass --api-key"
        )
    if response.status_code != 200:
        log.warning("inference server %s is up but GET /models answered HTTP %s: %s", url, response.status_code,
                    error_message(response))
        return []
    try:
        data = response.json().get("data", [])
    except (ValueError, AttributeError):
        data = []
    return [entry for entry in data if isinstance(entry, dict) and isinstance(entry.get("id"), str)]


def _choose_model(settings: Settings, listed: list[dict[str, Any]]) -> tuple[str, str | None]:
    """The model name to send and the path it was loaded from (vLLM's ``root``), as far as the servers tell."""
    ids = list(dict.fromkeys(entry["id"] for entry in listed))
    if settings.remote_model:
        entry = next((e for e in listed if e["id"] == settings.remote_model), None)
        if ids and entry is None:
            log.warning("the inference servers list %s but not --remote-model %s; requests will name it anyway",
                        ", ".join(ids), settings.remote_model)
        return settings.remote_model, (entry or {}).get("root")
    if len(ids) == 1:
        return ids[0], listed[0].get("root")
    if not ids:
        raise ConfigurationError("the inference servers list no model: pass --remote-model with the name they serve")
    raise ConfigurationError(f"the inference servers serve several models ({', '.join(ids)}): "
                             "pick one with --remote-model")


def load_remote_backends(settings: Settings) -> list[RemoteBackend]:
    """One :class:`RemoteBackend` over every ``--base-url`` (all serving the same model).

    Checks each server at start-up (``GET /models``) and logs what it found; raises
    :class:`ConfigurationError` when none answers, when the model cannot be told, or when the family cannot.
    """
    api_key = settings.resolved_api_key()
    listed: list[dict[str, Any]] = []
    failures: list[str] = []
    for url in settings.base_url:
        try:
            models = probe(url, api_key, min(PROBE_TIMEOUT_S, settings.request_timeout_s))
        except ConnectionError as error:
            failures.append(f"{url}: {error}")
            log.warning("inference server %s is not reachable (%s); it will be tried again while serving", url, error)
            continue
        log.info("inference server %s reachable; it lists: %s", url, ", ".join(m["id"] for m in models) or "nothing")
        listed.extend(models)
    if len(failures) == len(settings.base_url):
        raise ConfigurationError("no inference server reachable: " + "; ".join(failures)
                                 + ". Start it (e.g. vllm serve …) or fix --base-url")
    model, root = _choose_model(settings, listed)
    if settings.remote_family == "auto":
        family = family_from_name(model, root)
        if family is None:
            raise ConfigurationError(f"cannot tell the family of the remote model {model!r} from its name: pass "
                                     f"--remote-family {', '.join(f.name for f in FAMILIES)}")  # fmt: skip
    else:
        family = get_family(settings.remote_family)
    # vLLM reports its context length; with several servers the smallest one bounds every request.
    lengths = [e["max_model_len"] for e in listed if e["id"] == model and isinstance(e.get("max_model_len"), int)]
    backend = RemoteBackend.from_settings(settings, model, family, min(lengths) if lengths else None)
    log.info("remote model %s (family %s) on %d server(s), %d requests in flight per server%s",
             model, family.name, len(settings.base_url), settings.remote_concurrency,
             f", context {backend.max_model_len} tokens" if backend.max_model_len else "")
    return [backend]

