"""Where decoded images wait under their ``image_id`` (send a screenshot once, ask several questions about it).

:class:`ImageStore` is what every store does; :class:`~.memory_store.MemoryImageStore` (one process, the default)
and :class:`~.redis_store.RedisImageStore` (every process sharing one Redis) do it. Ids are issued by the store,
random (``secrets``) so they cannot be guessed, and each is bound to the scope (session) that created it: an id
that is unknown, expired, evicted or another scope's gives the same :class:`~vlm_tools.errors.UnknownImageId`, so
a caller learns nothing about images that are not its own.
"""

from __future__ import annotations

import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable

from PIL import Image

from ..errors import ImageTooLarge, UnknownImageId

IMAGE_ID_PREFIX = "img_"
IMAGE_ID_PATTERN = re.compile(r"img_[0-9a-f]{32}")
"""The exact form of an id a store issues (``img_`` and 32 hex digits: 128 random bits)."""

EvictionListener = Callable[[str], None]
"""``listener(image_id)``: called when an image leaves a process's memory."""


def is_image_id(text: str) -> bool:
    """Whether ``text`` has the exact form of an image id (says nothing about whether it is held)."""
    return IMAGE_ID_PATTERN.fullmatch(text) is not None


def new_image_id() -> str:
    """A fresh, unguessable image id."""
    return IMAGE_ID_PREFIX + secrets.token_hex(16)


def image_nbytes(image: Image.Image) -> int:
    """Bytes an image is charged in a store: its pixel count times 3 (8-bit RGB)."""
    return image.width * image.height * 3


def check_fits(image: Image.Image, max_bytes: int) -> int:
    """The bytes ``image`` is charged; raises :class:`ImageTooLarge` when it alone is over the store's byte cap."""
    nbytes = image_nbytes(image)
    if nbytes > max_bytes:
        raise ImageTooLarge(
            f"the image ({image.width}x{image.height}) needs {nbytes:,} bytes, more than the whole image store "
            f"holds ({max_bytes:,}; --image-store-bytes); send a smaller image"
        )
    return nbytes


def unknown_image_id(image_id: str) -> UnknownImageId:
    """The one error for an id that is not the caller's to use, whatever the reason (the same words for all)."""
    return UnknownImageId(
        f"{image_id[:40]} is not an image this session holds (never issued, expired from the store, or another "
        "session's); send the image itself again"
    )


class ImageStore(ABC):
    """Decoded RGB images kept under ids bound to a scope, bounded by count, bytes and age.

    The images handed out are shared with every later caller of the same id: treat them as read-only (copy one to
    draw on it).
    """

    @abstractmethod
    async def put(self, image: Image.Image, scope: str) -> str:
        """Keep ``image`` for ``scope`` and return its new id (oldest images go as the caps require).

        Raises :class:`~vlm_tools.errors.ImageTooLarge` when the image alone is over the byte cap.
        """

    @abstractmethod
    async def get(self, image_id: str, scope: str) -> Image.Image:
        """The image held under ``image_id`` for ``scope``.

        Raises :class:`~vlm_tools.errors.UnknownImageId` for an id never issued, expired, evicted or another
        scope's, and :class:`~vlm_tools.errors.ImageStoreUnavailable` when a shared store cannot be asked.
        """

    @abstractmethod
    def on_evict(self, listener: EvictionListener) -> None:
        """Call ``listener(image_id)`` whenever an image leaves this process's memory (what was made of it can go
        too)."""

    async def aclose(self) -> None:  # a store with nothing to release keeps this default
        """Release connections (the in-memory store has none)."""
