"""A scripted backend for server tests: a real family's prompts and parsers over canned raw model text.

It stands in for the model only, so everything around the model — sources, routing, engine, parsers, coordinate
conversion, result schemas, errors — runs for real, and a test can state the exact pixels a known raw output
must produce.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from vlm_tools.backends.base import BatchBackend, Outcome, Request, Task
from vlm_tools.errors import Cancelled
from vlm_tools.families import get_family


class ScriptedBackend(BatchBackend):
    """Answers each request with ``script(request)`` and interprets it with the named family's parser."""

    def __init__(
        self,
        family: str,
        script: Callable[[Request], str],
        *,
        name: str | None = None,
        delay_s: float = 0.0,
        max_batch_size: int = 8,
        gate: threading.Event | None = None,
    ) -> None:
        self.family = get_family(family)
        self.name = name or f"scripted-{family}"
        self.native = self.family.native
        self.supported = self.family.supported
        self.max_batch_size = max_batch_size
        self.script = script
        self.delay_s = delay_s
        self.gate = gate  # when given, every batch waits for it to open: the test says when the model answers
        self.batches: list[tuple[Task, int]] = []
        self.requests: list[Request] = []
        self._lock = threading.Lock()

    def run_batch(self, requests: Sequence[Request]) -> list[Outcome]:
        with self._lock:
            self.batches.append((requests[0].task, len(requests)))
            self.requests.extend(requests)
        if self.gate is not None:
            self.gate.wait(timeout=60)
        if self.delay_s:
            time.sleep(self.delay_s)
        outcomes: list[Outcome] = []
        for request in requests:
            if request.cancel.is_set():
                outcomes.append(Cancelled("cancelled"))
                continue
            self.family.prompt(request)  # the prompt must build for every request the server sends
            outcomes.append(self.family.interpret(request, self.script(request)))
        return outcomes


def paligemma_script(request: Request) -> str:
    """Canned PaliGemma outputs: one box per label, at fixed places, for every detect/point request."""
    if request.task in (Task.DETECT, Task.POINT):
        labels = request.labels or (request.text,)
        # y0=256 x0=128 y1=768 x1=512  →  x 0.125..0.5, y 0.25..0.75 of the image
        return " ; ".join(f"<loc0256><loc0128><loc0768><loc0512> {label}" for label in labels) + "<eos>"
    if request.task is Task.OCR:
        return "Hello page<eos>"
    if request.task is Task.ANSWER:
        return "blue<eos>"
    return "a test image<eos>"


def molmo2_script(request: Request) -> str:
    """Canned Molmo2 outputs: two points for 'everything', none for 'nothing', one otherwise."""
    if request.task is Task.POINT:
        if "nothing" in request.text:
            return "There are none."
        if "everything" in request.text:
            return f'<points coords="1 1 250 500 2 750 500" alt="{request.text}">{request.text}</points>'
        return f'<points coords="1 1 500 250" alt="{request.text}">{request.text}</points>'
    if request.task is Task.OCR:
        return "Page text"
    if request.task is Task.ANSWER:
        return "It is blue."
    return "A plain test image."
