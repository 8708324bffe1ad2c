"""Which loaded model answers which tool.

A tool goes to the first model that does its task natively (in the order the models were given), else to the
first that can serve it at all (PaliGemma points by box centres), unless a route names a model for it. A model
whose weights could not be loaded is passed over; when only such models could serve a tool, the call says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .backends.base import Backend, Task
from .errors import ConfigurationError, ModelUnavailable, UnsupportedByModel
from .families import suggest_for_task

TOOL_TASKS: dict[str, Task] = {
    "describe_image": Task.CAPTION,
    "answer_about_image": Task.ANSWER,
    "point_to_object": Task.POINT,
    "detect": Task.DETECT,
    "read_document": Task.OCR,
}


class Router:
    """Maps each tool to one resident backend: decided at start-up, passing over models that failed to load."""

    def __init__(self, backends: Sequence[Backend], overrides: Mapping[str, str] | None = None) -> None:
        if not backends:
            raise ConfigurationError("no model is loaded; pass --model with a hub id or a local directory")
        self.backends = list(backends)
        self._routes: dict[str, Backend | None] = {}
        self._named_routes = set(overrides or {})
        overrides = dict(overrides or {})
        for tool, task in TOOL_TASKS.items():
            if tool in overrides:
                self._routes[tool] = self._named(tool, task, overrides[tool])
            else:
                self._routes[tool] = self._choose(task)

    def _named(self, tool: str, task: Task, wanted: str) -> Backend:
        for backend in self.backends:
            if wanted in (backend.name, backend.family.name):
                if task not in backend.supported:
                    raise ConfigurationError(f"route {tool}={wanted}: a {backend.family.name} model cannot do "
                                             f"{task.value}; use {suggest_for_task(task)}")  # fmt: skip
                return backend
        names = ", ".join(b.name for b in self.backends)
        raise ConfigurationError(f"route {tool}={wanted}: no loaded model is called that (loaded: {names})")

    def _choose(self, task: Task, passed_over: Sequence[Backend] = ()) -> Backend | None:
        candidates = [backend for backend in self.backends if backend not in passed_over]
        for backend in candidates:
            if task in backend.native:
                return backend
        for backend in candidates:
            if task in backend.supported:
                return backend
        return None

    def backend_for(self, tool: str) -> Backend:
        """The backend that serves ``tool``: :class:`UnsupportedByModel` when no model can, :class:`ModelUnavailable`
        (with the reason) when the only ones that can failed to load."""
        task = TOOL_TASKS[tool]
        backend = self._routes.get(tool)
        if backend is not None and backend.state == "failed":
            failed = [b for b in self.backends if b.state == "failed"]
            other = None if tool in self._named_routes else self._choose(task, passed_over=failed)
            if other is None:
                raise ModelUnavailable(f"{tool} is served by {backend.name}, which could not be loaded: "
                                       f"{backend.error or 'unknown reason'}")  # fmt: skip
            backend = other
        if backend is None:
            loaded = ", ".join(f"{b.name} ({b.family.name})" for b in self.backends)
            raise UnsupportedByModel(f"{tool} needs a model that can do {task.value}; the loaded models ({loaded}) "
                                     f"cannot. Start the server with {suggest_for_task(task)}.")  # fmt: skip
        return backend

    def table(self) -> dict[str, str | None]:
        """tool → model name (None when unsupported), for logs and the health endpoint."""
        return {tool: (b.name if b else None) for tool, b in self._routes.items()}

