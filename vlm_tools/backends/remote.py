"""The remote backend: the same tools served by an OpenAI-compatible inference server (vLLM, ``transformers serve``).

Prompts and parsers are the family's (:mod:`vlm_tools.backends.families`), exactly as for a local model, so the
same tool call gives the same result whichever way the model runs. What this module adds is the request shape:

* one ``user`` message whose content is ``[image_url, text]``: the image as a ``data:image/png;base64,…`` URI
  encoded from the image the server already fetched, decoded and checked (a user's URL never reaches the
  inference server, whose own fetching has had SSRF holes), kept by image id so a follow-up sends the same bytes
  without encoding them again, then the family's prompt text;
* greedy decoding that inherits nothing: vLLM takes its default sampling parameters from the checkpoint's
  ``generation_config.json`` (a repetition penalty there would bend every answer), so the neutral values are
  sent explicitly — ``temperature 0``, ``top_p 1``, no presence or frequency penalty, ``seed 0``, ``n 1``,
  ``max_tokens`` = the request's limit, and vLLM's own ``top_k 0``, ``min_p 0``, ``repetition_penalty 1``,
  ``min_tokens 0`` (see :data:`~vlm_tools.backends.remote_client.VLLM_EXTRAS`);
* special tokens are dropped from the text, as the local backends drop them (PaliGemma's ``<locNNNN>`` tokens
  are not special and come through).

A batch is sent as concurrent requests (the inference server batches them itself: that is where its throughput
comes from); a request whose ``cancel`` event is set is not sent, or its connection is closed.

The family (``--remote-family auto``) is read from the model name: the name (and, for vLLM, the ``root`` it was
loaded from) containing ``paligemma`` → paligemma, ``molmo2`` → molmo2, ``molmo`` → molmo (checked in that order).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from ..errors import Cancelled, ConfigurationError, ModelError, VlmToolsError
from ..images.encode import png_data_uri
from .base import Backend, Outcome, Request
from .encodings import EncodingCache
from .families import get_family
from .family import Family
from .remote_client import ServerPool, error_message

if TYPE_CHECKING:
    from ..settings import Settings

log = logging.getLogger(__name__)

FAMILY_MARKERS = (("paligemma", "paligemma"), ("molmo2", "molmo2"), ("molmo", "molmo"))
"""(substring of the lower-cased model name, family), first match wins."""

PROBE_TIMEOUT_S = 10.0


def family_from_name(*names: str | None) -> str | None:
    """The family a model name (or the path it was loaded from) says, or ``None`` when none of them tells."""
    for name in names:
        lowered = (name or "").lower()
        for marker, family in FAMILY_MARKERS:
            if marker in lowered:
                return family
    return None


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


class RemoteBackend(Backend):
    """A model of one family served by one or more OpenAI-compatible servers (all serving the same model).

    Args:
        base_urls: e.g. ``("http://gpu1:8000/v1", "http://gpu2:8000/v1")``.
        model: the model name the servers serve (sent as ``model``; what results report).
        family: ``"paligemma"``, ``"molmo2"`` or ``"molmo"``.
        api_key: sent as ``Authorization: Bearer``.
        concurrency: requests in flight per server.
        timeout_s: time limit of one HTTP request.
        max_batch_size: most requests the engine hands over at once.
        backoff_s: (first, longest) seconds a failing server is left alone.
        max_model_len: the servers' context length when they report it (vLLM's ``GET /models``): no request asks
            for more new tokens than that (vLLM refuses such a request outright; it fits the rest itself).
        image_cache_bytes: most bytes of PNG ``data:`` URIs kept by image id, so a follow-up on an image sends
            the same bytes without encoding them again (vLLM's prefix cache then matches them too).
        transport: an httpx transport, for tests.
        clock: what back-offs are counted in (tests pass one they can move).
    """

    def __init__(
        self,
        base_urls: Sequence[str],
        model: str,
        family: str,
        *,
        api_key: str | None = None,
        concurrency: int = 16,
        timeout_s: float = 120.0,
        max_batch_size: int = 8,
        backoff_s: tuple[float, float] = (5.0, 30.0),
        max_model_len: int | None = None,
        image_cache_bytes: int = 256_000_000,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.conventions: Family = get_family(family)
        self.image_urls = EncodingCache(image_cache_bytes)
        self.max_model_len = max_model_len
        self.name = model
        self.family = self.conventions.name
        self.native = self.conventions.native
        self.supported = self.conventions.supported
        self.max_batch_size = max_batch_size
        # Enough batches in flight to fill every server's slots; the servers batch across them.
        self.parallelism = max(1, len(base_urls) * max(1, concurrency // max(1, max_batch_size)))
        self.pool = ServerPool(
            base_urls, api_key=api_key, concurrency=concurrency, timeout_s=timeout_s, backoff_s=backoff_s,
            transport=transport, clock=clock,
        )  # fmt: skip

    @classmethod
    def from_settings(
        cls, settings: Settings, model: str, family: str, max_model_len: int | None = None
    ) -> RemoteBackend:
        """A backend over every ``settings.base_url``, configured by the settings."""
        return cls(
            settings.base_url, model, family, api_key=settings.resolved_api_key(),
            concurrency=settings.remote_concurrency, timeout_s=settings.request_timeout_s,
            max_batch_size=settings.max_batch_size, max_model_len=max_model_len,
            image_cache_bytes=settings.encoding_cache_bytes,
        )  # fmt: skip

    def prompt(self, request: Request) -> str:
        """The text sent beside the image: the family's prompt (caller text already neutralised)."""
        return self.conventions.prompt(request)

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

    def run_batch(self, requests: Sequence[Request]) -> list[Outcome]:
        """Send every request at once; wait for all, abandoning those whose ``cancel`` gets set meanwhile."""
        outcomes: list[Outcome | None] = [None] * len(requests)
        pending: dict[concurrent.futures.Future[str], int] = {}
        for index, request in enumerate(requests):
            if request.cancel.is_set():
                outcomes[index] = Cancelled("the request was cancelled before it was sent to the inference server")
                continue
            try:
                limit = request.max_new_tokens
                if self.max_model_len:
                    limit = min(limit, self.max_model_len)
                body = chat_body(self.name, self.prompt(request), self.image_url(request), limit)
            except VlmToolsError as error:
                outcomes[index] = error
                continue
            pending[self.pool.submit(body)] = index
        while pending:
            done, _ = concurrent.futures.wait(pending, timeout=0.05, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                index = pending.pop(future)
                outcomes[index] = self._outcome(requests[index], future)
            for future, index in list(pending.items()):
                if requests[index].cancel.is_set():
                    future.cancel()  # closes its connection, or drops it before it is sent
                    del pending[future]
                    outcomes[index] = Cancelled("the request was cancelled; its inference-server call was abandoned")
        return [outcome for outcome in outcomes if outcome is not None]

    def _outcome(self, request: Request, future: concurrent.futures.Future[str]) -> Outcome:
        if future.cancelled():
            return Cancelled("the request was cancelled; its inference-server call was abandoned")
        error = future.exception()
        if error is not None:
            if isinstance(error, VlmToolsError):
                return error
            log.error("remote request failed unexpectedly", exc_info=error)
            return ModelError(f"the remote request failed unexpectedly ({type(error).__name__}: {error})")
        return self.conventions.interpret(request, future.result())

    def close(self) -> None:
        """Close the connections to the inference servers."""
        self.image_urls.clear()
        self.pool.close()


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


def load_remote_backends(settings: Settings) -> list[Backend]:
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
    family = settings.remote_family
    if family == "auto":
        found = family_from_name(model, root)
        if found is None:
            raise ConfigurationError(
                f"cannot tell the family of the remote model {model!r} from its name: pass --remote-family "
                "paligemma, molmo2 or molmo"
            )
        family = found
    # vLLM reports its context length; with several servers the smallest one bounds every request.
    lengths = [e["max_model_len"] for e in listed if e["id"] == model and isinstance(e.get("max_model_len"), int)]
    backend = RemoteBackend.from_settings(settings, model, family, min(lengths) if lengths else None)
    log.info("remote model %s (family %s) on %d server(s), %d requests in flight per server, parallelism %d%s",
             model, family, len(settings.base_url), settings.remote_concurrency, backend.parallelism,
             f", context {backend.max_model_len} tokens" if backend.max_model_len else "")
    return [backend]
