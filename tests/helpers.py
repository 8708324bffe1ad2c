"""Helpers shared by the tests: images made on the fly, test settings, ready-made backend loaders."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from vlm_tools.backends.base import Backend
from vlm_tools.settings import Settings


def png_bytes(width: int = 200, height: int = 100, color: tuple[int, int, int] = (30, 60, 200)) -> bytes:
    """A solid PNG of the given size."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """``data:`` URI of ``data``."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    """Test settings: paths confined to ``tmp_path``, loopback URLs allowed, a fast engine."""
    values: dict[str, object] = {
        "model": ("scripted",),
        "allow_path": (tmp_path,),
        "allow_private_urls": True,
        "batch_wait_ms": 2.0,
        "log_level": "warning",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def loader(*backends: Backend) -> Callable[[Settings], Sequence[Backend]]:
    """A ``load_backends`` function that hands the server ready-made backends."""
    return lambda _settings: list(backends)
