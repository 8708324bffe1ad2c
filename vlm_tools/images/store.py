"""Decoded images kept for reuse by ``image_id`` (send a screenshot once, ask several questions about it).

Bounded by count and by bytes (``width * height * 3`` for RGB), least recently used evicted first. Ids are
random (``secrets``), so they cannot be guessed, and each is bound to the scope (session) that created it: an id
that is unknown, evicted or another scope's gives the same :class:`~vlm_tools.errors.UnknownImageId`, so a caller
learns nothing about images that are not its own.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from ..errors import ImageTooLarge, UnknownImageId

IMAGE_ID_PREFIX = "img_"
IMAGE_ID_PATTERN = re.compile(r"img_[0-9a-f]{32}")
"""The exact form of an id this store issues (``img_`` and 32 hex digits: 128 random bits)."""


def is_image_id(text: str) -> bool:
    """Whether ``text`` has the exact form of an image id (says nothing about whether it is held)."""
    return IMAGE_ID_PATTERN.fullmatch(text) is not None


def image_nbytes(image: Image.Image) -> int:
    """Bytes an image is charged in the store: its pixel count times 3 (8-bit RGB)."""
    return image.width * image.height * 3


@dataclass(frozen=True)
class _Entry:
    scope: str
    image: Image.Image
    nbytes: int


class ImageStore:
    """A thread-safe LRU of decoded images, bounded by ``max_count`` images and ``max_bytes`` bytes."""

    def __init__(self, max_count: int, max_bytes: int) -> None:
        if max_count < 1 or max_bytes < 1:
            raise ValueError("max_count and max_bytes must be at least 1")
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []

    def on_evict(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(image_id)`` whenever an image leaves the store (what was made of it goes too)."""
        self._listeners.append(listener)

    def put(self, image: Image.Image, scope: str) -> str:
        """Keep ``image`` for ``scope`` and return its new id; evicts the least recently used as needed."""
        nbytes = image_nbytes(image)
        if nbytes > self._max_bytes:
            raise ImageTooLarge(
                f"the image ({image.width}x{image.height}) needs {nbytes:,} bytes, more than the whole image store "
                f"holds ({self._max_bytes:,}; --image-store-bytes); send a smaller image"
            )
        image_id = IMAGE_ID_PREFIX + secrets.token_hex(16)
        gone = []
        with self._lock:
            self._entries[image_id] = _Entry(scope, image, nbytes)
            self._nbytes += nbytes
            while len(self._entries) > self._max_count or self._nbytes > self._max_bytes:
                evicted_id, evicted = self._entries.popitem(last=False)
                self._nbytes -= evicted.nbytes
                gone.append(evicted_id)
        for evicted_id in gone:
            for listener in self._listeners:
                listener(evicted_id)
        return image_id

    def get(self, image_id: str, scope: str) -> Image.Image:
        """The image held under ``image_id`` for ``scope``; marks it recently used.

        The image is shared with every later caller of the same id: treat it as read-only (copy to draw on it).
        """
        with self._lock:
            entry = self._entries.get(image_id)
            if entry is None or entry.scope != scope:
                raise UnknownImageId(
                    f"{image_id[:40]} is not an image this session holds (never issued, expired from the store, "
                    "or another session's); send the image itself again"
                )
            self._entries.move_to_end(image_id)
            return entry.image

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes currently charged for held images."""
        with self._lock:
            return self._nbytes
