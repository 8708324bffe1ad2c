"""The image store the settings name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .memory_store import MemoryImageStore
from .store import ImageStore

if TYPE_CHECKING:
    from ..settings import Settings


async def open_image_store(settings: Settings) -> ImageStore:
    """Make the store the settings name: this process's memory, bounded by count, bytes and age."""
    return MemoryImageStore(settings.image_store_count, settings.image_store_bytes, settings.image_store_ttl_s)
