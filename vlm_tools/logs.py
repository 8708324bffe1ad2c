"""Logging: one handler, on stderr, for this package and every library it uses.

stdout carries the MCP protocol on stdio, so nothing logs there. transformers and huggingface_hub install handlers
of their own when they are imported and also pass their records up: every message of theirs would appear twice.
:func:`route_library_logs` takes their handlers away so their records reach the one handler once.
"""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET = ("httpx", "httpx2", "httpcore")
"""Loggers that say one line per HTTP request (URL fetches, remote inference calls): kept at warning."""
ONCE = ("bitsandbytes",)
"""Loggers that repeat one warning on every matrix product (8-bit on the CPU: "inputs will be cast to float16"):
each distinct message is said once."""


class OnceFilter(logging.Filter):
    """Lets each distinct message of the :data:`ONCE` loggers (and their children) through once."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(ONCE):
            return True
        key = (record.name, record.getMessage())
        if key in self._seen:
            return False
        self._seen.add(key)
        return True


def configure(level: str) -> None:
    """Send every log record at ``level`` and above to one stderr handler (replacing any handler already there)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(OnceFilter())  # a handler's filter sees the records of child loggers too
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))


def route_library_logs() -> None:
    """Make transformers and huggingface_hub log through the root handler only (call once they can be imported:
    when models load)."""
    import huggingface_hub.utils.logging as hub_logging
    import transformers.utils.logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    hub_logging.enable_propagation()
    hub_root = logging.getLogger("huggingface_hub")
    for handler in list(hub_root.handlers):
        hub_root.removeHandler(handler)
