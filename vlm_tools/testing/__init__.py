"""Helpers for tests and benchmarks: tiny random models built offline that load like real checkpoints."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

_build_lock = threading.Lock()


def tiny_model_dir(name: str, builder: Callable[[Path], Path], root: Path) -> Path:
    """``root/name`` holding a model made by ``builder(path)``; built once, then reused while it exists.

    A ``.complete`` marker is written after a successful build, so a build interrupted halfway is redone rather
    than loaded half-written.
    """
    path = Path(root) / name
    marker = path / ".complete"
    with _build_lock:
        if not marker.is_file():
            path.mkdir(parents=True, exist_ok=True)
            builder(path)
            marker.write_text("built\n")
    return path
