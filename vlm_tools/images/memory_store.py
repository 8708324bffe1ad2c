"""The default image store: decoded images in this process's memory, for one server process."""

from __future__ import annotations

from PIL import Image

from .lru import ImageLru
from .store import EvictionListener, ImageStore, check_fits, new_image_id, unknown_image_id


class MemoryImageStore(ImageStore):
    """Images in an LRU of this process: ``max_count`` images, ``max_bytes`` bytes, each for ``ttl_s`` seconds.

    Nothing here waits on I/O; the methods are async to share the interface of the stores that do.
    """

    def __init__(self, max_count: int, max_bytes: int, ttl_s: float = 3600.0) -> None:
        self._max_bytes = max_bytes
        self._images = ImageLru(max_count, max_bytes, ttl_s)

    def on_evict(self, listener: EvictionListener) -> None:
        self._images.on_evict(listener)

    async def put(self, image: Image.Image, scope: str) -> str:
        check_fits(image, self._max_bytes)
        image_id = new_image_id()
        self._images.add(image_id, image, scope)
        return image_id

    async def get(self, image_id: str, scope: str) -> Image.Image:
        image = self._images.find(image_id, scope)
        if image is None:
            raise unknown_image_id(image_id)
        return image

    def __len__(self) -> int:
        return len(self._images)

    @property
    def nbytes(self) -> int:
        """Bytes currently charged for held images."""
        return self._images.nbytes
