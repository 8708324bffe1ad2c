"""A model in this process that is there before its weights are: it loads in the background, says how far it got,
frees its weights after a while without calls, and loads them again when the next call comes.

So the server answers the MCP handshake at once; how a call meets the weights: :class:`ResidentModel`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ModelUnavailable, Timeout, VlmToolsError
from .base import BatchBackend, LoadState, Outcome, Request

if TYPE_CHECKING:
    from ..families.base import Family
    from ..settings import Settings

log = logging.getLogger(__name__)

Notify = Callable[[float, str], Awaitable[None]]
"""``notify(fraction, message)``: how far a load got (0..1), for a caller waiting on it."""
Loader = Callable[[], BatchBackend]

HEARTBEAT_S = 1.0
"""How often a waiting caller hears how the load goes (progress notifications keep clients' idle timers quiet)."""


@dataclass
class LoadProgress:
    """How far one load got: a fraction of the whole, the phase in words, and since when."""

    fraction: float = 0.0
    phase: str = "starting"
    started: float = 0.0

    def advance(self, fraction: float, phase: str) -> None:
        """Move forward (never back: a progress report must only ever grow)."""
        self.fraction = max(self.fraction, min(1.0, fraction))
        self.phase = phase


class ResidentModel(BatchBackend):
    """A local model known by name and family at once, its weights loaded by ``loader`` in the background.

    The server answers the MCP handshake at once and routes tools by the model's family (read from its config before
    the transport starts); a call that arrives while the weights load waits for them (:meth:`wait_ready`, with
    progress), and the engine's worker, which runs the batches, finds them loaded.

    Args:
        name: what results report as ``model``.
        family: its family (known from its config before any weight is read).
        loader: loads the weights and returns the loaded backend; runs on a thread of its own, and again after an
            idle unload. It may report progress through :func:`loading_progress`.
        max_batch_size: most requests in one batch.
    """

    def __init__(self, name: str, family: Family, loader: Loader, *, max_batch_size: int = 8) -> None:
        self.name = name
        self.family = family
        self.native = family.native
        self.supported = family.supported
        self.max_batch_size = max_batch_size
        self.parallelism = 1
        self.state: LoadState = "unloaded"
        self.error: str | None = None
        self.progress = LoadProgress()
        self.loads = 0
        self.last_used = time.monotonic()
        self._loader = loader
        self._inner: BatchBackend | None = None
        self._active = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    @classmethod
    def local(cls, model: str, family: Family, settings: Settings, *, local_files_only: bool) -> ResidentModel:
        """A model loaded by its family's in-process backend, as the settings say."""
        from .loading import local_backend_class

        def load() -> BatchBackend:
            backend_class = local_backend_class(family, model)
            return backend_class.load(model, family, settings, local_files_only=local_files_only)  # type: ignore

        return cls(model, family, load, max_batch_size=settings.max_batch_size)

    # --- loading ------------------------------------------------------------------------------------------------

    def start_loading(self) -> None:
        """Load the weights on a thread of their own, unless they are loaded or loading."""
        if self.queue_load("starting"):
            threading.Thread(target=self.load_now, name=f"vlm-load[{self.name}]", daemon=True).start()

    def queue_load(self, phase: str) -> bool:
        """Mark the model as loading (``phase`` says why it has not started yet); ``False`` when it already is
        loading or loaded, so only the caller that got ``True`` runs :meth:`load_now`."""
        with self._lock:
            if self.state in ("loading", "ready"):
                return False
            self.state, self.error = "loading", None
            self.progress = LoadProgress(phase=phase, started=time.monotonic())
            return True

    def load_now(self) -> None:
        """Load the weights on this thread (after :meth:`queue_load`); a failure is kept and said, never raised."""
        self.progress.started = time.monotonic()
        self.progress.phase = "starting"
        log.info("loading %s", self.name)
        try:
            with loading_progress(self.progress):
                inner = self._loader()
        except Exception as error:  # noqa: BLE001 - a model that cannot load fails its calls, the server goes on
            reason = error.message if isinstance(error, VlmToolsError) else f"{type(error).__name__}: {error}"
            if not isinstance(error, VlmToolsError):
                log.error("loading %s failed", self.name, exc_info=error)
            log.error("%s could not be loaded: %s", self.name, reason)
            with self._changed:
                self.state, self.error = "failed", reason
                self._changed.notify_all()
            return
        took = time.monotonic() - self.progress.started
        with self._changed:
            self._inner, self.state, self.loads = inner, "ready", self.loads + 1
            self.progress.advance(1.0, "ready")
            self.last_used = time.monotonic()
            self._changed.notify_all()
        log.info("%s is ready (loaded in %.1f s)", self.name, took)

    async def wait_ready(self, notify: Notify | None, timeout_s: float) -> None:
        """Return once the weights are loaded (starting a load after an idle unload), telling ``notify`` how it
        goes every :data:`HEARTBEAT_S`; :class:`ModelUnavailable` when it cannot load, :class:`Timeout` after
        ``timeout_s``."""
        if self.state == "ready":
            return
        if self.state == "unloaded":
            self.start_loading()
        deadline = time.monotonic() + timeout_s
        told, last = 0.0, -1.0
        while True:
            state, now = self.state, time.monotonic()
            if state == "ready":
                return
            if state == "failed":
                raise ModelUnavailable(f"{self.name} could not be loaded: {self.error}")
            if now >= deadline:
                raise Timeout(f"{self.name} is still loading ({self.describe_progress()}) after {timeout_s:g} s; "
                              "retry in a while (a first start downloads the weights: vlm-tools pull does it ahead)")
            if notify is not None and now - told >= HEARTBEAT_S:
                # A progress value must grow with every notification, even while a phase reports nothing.
                last = min(0.999, max(self.progress.fraction, last + 0.0001))
                await notify(last, f"loading {self.name}: {self.describe_progress()}")
                told = now
            await asyncio.sleep(min(0.1, max(0.01, deadline - now)))

    def describe_progress(self) -> str:
        """``40 % (loading weights)``."""
        return f"{self.progress.fraction * 100:.0f} % ({self.progress.phase})"

    @property
    def loaded(self) -> BatchBackend | None:
        """The loaded backend, or ``None`` while the weights are not in memory."""
        return self._inner

    def _loaded(self) -> BatchBackend:
        """The loaded backend, waiting for a load in progress (on the engine's worker thread)."""
        while True:
            with self._changed:
                if self.state == "ready" and self._inner is not None:
                    return self._inner
                if self.state == "failed":
                    raise ModelUnavailable(f"{self.name} could not be loaded: {self.error}")
                if self.state == "loading":
                    self._changed.wait()
                    continue
            self.start_loading()  # freed while its call waited: load again

    # --- use, and freeing the weights when idle -------------------------------------------------------------------

    @contextmanager
    def in_use(self) -> Iterator[None]:
        """Mark a call on this model as in flight: the weights are not freed under it."""
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                self.last_used = time.monotonic()

    def unload_if_idle(self, idle_s: float) -> bool:
        """Free the weights when no call is in flight and none came for ``idle_s``; whether it did."""
        with self._lock:
            if self.state != "ready" or self._active or time.monotonic() - self.last_used < idle_s:
                return False
            inner, self._inner, self.state = self._inner, None, "unloaded"
        log.info("%s: no call for %g s; freeing its weights (the next call loads them again)", self.name, idle_s)
        if inner is not None:
            inner.close()
        return True

    # --- the backend contract, on the loaded model ----------------------------------------------------------------

    def run_batch(self, requests: Sequence[Request]) -> list[Outcome]:
        """Run the batch on the loaded model (waiting for a load in progress)."""
        return self._loaded().run_batch(requests)

    def prefetch(self, request: Request) -> None:
        inner = self._inner
        if inner is not None:
            inner.prefetch(request)

    def forget_image(self, image_id: str) -> None:
        inner = self._inner
        if inner is not None:
            inner.forget_image(image_id)

    def is_oom(self, error: BaseException) -> bool:
        inner = self._inner
        return inner.is_oom(error) if inner is not None else False

    def free_memory(self) -> None:
        inner = self._inner
        if inner is not None:
            inner.free_memory()

    def status(self) -> dict[str, Any]:
        """``{"state", "progress", "error"}`` for ``/health``."""
        return {"state": self.state, "progress": round(self.progress.fraction, 3), "error": self.error}

    def close(self) -> None:
        """Free the weights for good."""
        with self._lock:
            inner, self._inner, self.state = self._inner, None, "unloaded"
        if inner is not None:
            inner.close()


def load_in_order(models: Sequence[ResidentModel], before: Callable[[], None] | None = None) -> None:
    """Load ``models`` one after another on one background thread (the first configured model is ready first, and
    two loads never compete for memory and disk); ``before`` runs first on that thread."""
    queued = [
        model
        for index, model in enumerate(models)
        if model.queue_load("starting: importing torch and transformers" if index == 0 else "waiting for the models "
                            "before it")  # fmt: skip
    ]

    def run() -> None:
        if before is not None:
            try:
                before()
            except Exception:  # noqa: BLE001 - advice before loading must never stop the loading
                log.exception("preparing to load failed")
        for model in queued:
            model.load_now()

    threading.Thread(target=run, name="vlm-load", daemon=True).start()


# --- progress of the libraries' own loading steps ----------------------------------------------------------------

_current = threading.local()

@contextmanager
def loading_progress(progress: LoadProgress) -> Iterator[None]:
    """Report the loads this thread runs into ``progress``: the hub's download bars and transformers' "Loading
    weights" bar (through transformers' tqdm hook, installed once, which passes other threads' bars through)."""
    _install_tqdm_hook()
    _current.progress = progress
    try:
        yield
    finally:
        _current.progress = None


def report_phase(fraction: float, phase: str) -> None:
    """Say how far the load running on this thread got (nothing when no load is being reported)."""
    progress: LoadProgress | None = getattr(_current, "progress", None)
    if progress is not None:
        progress.advance(fraction, phase)


WEIGHTS_END = 0.95
"""Where reading the weights ends on the whole load's scale; what the backend checks after takes the rest."""

_hook_installed = False
_hook_lock = threading.Lock()


def _install_tqdm_hook() -> None:
    global _hook_installed
    with _hook_lock:
        if _hook_installed:
            return
        from transformers.utils import logging as transformers_logging

        previous = transformers_logging.set_tqdm_hook(_tqdm_hook)
        if previous is not None:  # someone else's hook: keep it, and stay out of the way
            transformers_logging.set_tqdm_hook(previous)
        _hook_installed = True


def _tqdm_hook(factory: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    bar = factory(*args, **kwargs)
    progress: LoadProgress | None = getattr(_current, "progress", None)
    if progress is None:
        return bar
    return _Reported(bar, progress, str(kwargs.get("desc") or "loading weights"))


class _Reported:
    """A tqdm bar whose advance is also reported into a :class:`LoadProgress`, on the rest of its scale."""

    def __init__(self, bar: Any, progress: LoadProgress, desc: str) -> None:
        self._bar, self._progress, self._desc = bar, progress, desc
        self._done = 0.0
        self._low = progress.fraction  # what came before (a download) keeps its share

    def __iter__(self) -> Iterator[Any]:
        for item in self._bar:
            self._note(1)
            yield item

    def update(self, n: float = 1) -> Any:
        self._note(n)
        return self._bar.update(n)

    def _note(self, n: float) -> None:
        self._done += n
        total = getattr(self._bar, "total", None)
        if total:
            self._progress.advance(self._low + (WEIGHTS_END - self._low) * self._done / total, self._desc.lower())

    def __enter__(self) -> _Reported:
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._bar.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)
