"""Prometheus metrics of one server: queue depth, batch sizes, waiting and running times, request outcomes.

Each server's metrics live in a registry of their own, so that several servers can share a process, and their
label values are bounded by construction (:class:`Metrics`).
"""

from __future__ import annotations

import threading
import weakref
from typing import Literal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

Outcome = Literal["ok", "error"]

# Batch sizes are small integers capped by max_batch_size (<= 256): powers of two resolve them well.
_BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Waiting ranges from microseconds (idle server) to the request time limit (minutes).
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# A request runs from tens of milliseconds (a short answer on a GPU) to minutes (OCR of a dense page on a CPU).
_RUN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    """The metrics of one server, in a registry of their own.

    It holds its own :class:`~prometheus_client.CollectorRegistry` instead of the process-wide default one, so that
    several servers (tests build many) can live in one process without their series clashing or adding up. The
    engine records batches, times and the outcome of every request it accepts or refuses; the tool layer records
    outcomes of requests that failed before they reached the engine (a bad image, a blocked URL) through the same
    :meth:`record_request`. :meth:`record_error` counts an error object once even when both the engine and the tool
    boundary report it, so the boundary may report every error it sees.

    Label values are bounded by construction: ``model`` is a loaded model's name, ``tool`` one of the tool names,
    ``task`` a :class:`~vlm_tools.backends.base.Task` value and ``code`` one of the stable error codes (or ``none``).

    Attributes:
        registry: the registry every metric below is registered in (what :meth:`render` exposes).
        queue_depth: gauge ``vlm_tools_queue_depth{model}``: requests waiting for a model.
        batch_size: histogram ``vlm_tools_batch_size{model,task}``: requests per ``run_batch`` call.
        queue_wait_seconds: histogram ``vlm_tools_queue_wait_seconds{tool}``: submit to start of its batch.
        run_seconds: histogram ``vlm_tools_run_seconds{tool}``: start of its batch to its answer.
        requests: counter ``vlm_tools_requests_total{tool,outcome,code}``: finished tool calls.
        unreadable: counter ``vlm_tools_unreadable_outputs_total{model,tool}``: answers with markup not read.
        affinity: counter ``vlm_tools_image_affinity_total{model,held}``: requests on an image id by whether the
            replica that ran them already held the image (``--scale ray``).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queue_depth = Gauge(
            "vlm_tools_queue_depth", "Requests waiting for a model.", ["model"], registry=self.registry
        )
        self.batch_size = Histogram(
            "vlm_tools_batch_size",
            "Requests run together in one batch.",
            ["model", "task"],
            buckets=_BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "vlm_tools_queue_wait_seconds",
            "Seconds a request waited before its batch started.",
            ["tool"],
            buckets=_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.run_seconds = Histogram(
            "vlm_tools_run_seconds",
            "Seconds from the start of a request's batch to its answer.",
            ["tool"],
            buckets=_RUN_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "vlm_tools_requests",
            "Finished tool calls by outcome and error code.",
            ["tool", "outcome", "code"],
            registry=self.registry,
        )
        self.unreadable = Counter(
            "vlm_tools_unreadable_outputs",
            "Answers holding geometry markup the family's parser could not read.",
            ["model", "tool"],
            registry=self.registry,
        )
        self.affinity = Counter(
            "vlm_tools_image_affinity",
            "Requests on an image_id by whether the model replica that ran them already held the image's encoding.",
            ["model", "held"],
            registry=self.registry,
        )
        self._counted_errors: weakref.WeakSet[BaseException] = weakref.WeakSet()
        self._lock = threading.Lock()

    def record_request(self, tool: str, outcome: Outcome, code: str = "none") -> None:
        """Count one finished tool call: ``outcome`` is ``"ok"`` (``code`` then ``"none"``) or ``"error"``.

        Raises:
            ValueError: for an outcome other than ok/error, or a code that contradicts the outcome — a bug
                in the caller that would otherwise create series no dashboard expects.
        """
        if outcome == "ok":
            if code != "none":
                raise ValueError(f"an ok request has code 'none', not {code!r}")
        elif outcome == "error":
            if not code or code == "none":
                raise ValueError("an error needs its error code")
        else:
            raise ValueError(f"outcome must be 'ok' or 'error', not {outcome!r}")
        self.requests.labels(tool=tool, outcome=outcome, code=code).inc()

    def record_error(self, tool: str, error: BaseException) -> None:
        """Count ``error`` as the outcome of one ``tool`` call, once per error object.

        The code is the error's ``code`` (``internal_error`` for an exception without one). An error the engine
        already counted and that then reaches the tool boundary is the same object, so it is not counted twice.
        """
        with self._lock:
            try:
                if error in self._counted_errors:
                    return
                self._counted_errors.add(error)
            except TypeError:  # built-in exceptions take no weak references; only ours can be reported twice
                pass
        self.record_request(tool, "error", str(getattr(error, "code", "") or "internal_error"))

    def record_unreadable(self, model: str, tool: str) -> None:
        """Count one answer of ``model`` whose geometry markup could not be read."""
        self.unreadable.labels(model=model, tool=tool).inc()

    def record_affinity(self, model: str, *, held: bool) -> None:
        """Count one request on an image id by whether its replica already held the image (``--scale ray``)."""
        self.affinity.labels(model=model, held="yes" if held else "no").inc()

    def record_batch(self, model: str, task: str, size: int) -> None:
        """Record one ``run_batch`` call of ``size`` requests."""
        self.batch_size.labels(model=model, task=task).observe(size)

    def observe_queue_wait(self, tool: str, seconds: float) -> None:
        """Record how long a request waited before its batch started."""
        self.queue_wait_seconds.labels(tool=tool).observe(max(0.0, seconds))

    def observe_run(self, tool: str, seconds: float) -> None:
        """Record how long a request ran (from the start of its batch to its answer)."""
        self.run_seconds.labels(tool=tool).observe(max(0.0, seconds))

    def set_queue_depth(self, model: str, depth: int) -> None:
        """Set the number of requests waiting for ``model``."""
        self.queue_depth.labels(model=model).set(depth)

    def render(self) -> tuple[bytes, str]:
        """The exposition text of every metric and its content type, ready for an HTTP ``/metrics`` answer."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
