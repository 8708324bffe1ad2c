"""The image store the settings name: in this process's memory (the default), or in Redis for many processes."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from ..errors import ConfigurationError
from .memory_store import MemoryImageStore
from .store import ImageStore

if TYPE_CHECKING:
    from ..settings import Settings


def check_image_store(settings: Settings) -> None:
    """Raise :class:`~vlm_tools.errors.ConfigurationError` when the store the settings name cannot be made here
    (a Redis store without the redis client installed): said at start-up, before any model loads."""
    if settings.image_store_url is not None and importlib.util.find_spec("redis") is None:
        raise ConfigurationError(
            "--image-store redis://… needs the redis client: pip install 'vlm-tools[scale]' (or 'redis>=5')"
        )


async def open_image_store(settings: Settings) -> ImageStore:
    """Make the store ``--image-store`` names. A Redis store is asked once whether Redis answers; when it does
    not, a warning is logged and the server starts all the same (calls that carry an image work without it)."""
    url = settings.image_store_url
    if url is None:
        return MemoryImageStore(settings.image_store_count, settings.image_store_bytes, settings.image_store_ttl_s)
    check_image_store(settings)
    from .redis_store import RedisImageStore  # the redis client is an optional dependency: imported when named

    store = RedisImageStore(
        url,
        max_count=settings.image_store_count,
        max_bytes=settings.image_store_bytes,
        ttl_s=settings.image_store_ttl_s,
    )
    await store.check()
    return store
