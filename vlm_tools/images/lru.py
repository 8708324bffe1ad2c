"""A thread-safe LRU of decoded images by id: the in-memory store, and a Redis store's copies on this process.

Bounded by count and by bytes (least recently used evicted first) and by age (an image expires ``ttl_s`` after it
was added, however often it is used since, like its copy in Redis). Listeners hear of every image that leaves,
evicted or expired, so what a model made of it can go too.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from PIL import Image

from .store import EvictionListener, image_nbytes


@dataclass(frozen=True)
class _Entry:
    scope: str
    image: Image.Image
    nbytes: int
    expires: float  # time.monotonic() deadline


class ImageLru:
    """Images by id, at most ``max_count`` of them, ``max_bytes`` bytes in all, each for ``ttl_s`` seconds."""

    def __init__(self, max_count: int, max_bytes: int, ttl_s: float) -> None:
        if max_count < 1 or max_bytes < 1 or ttl_s <= 0:
            raise ValueError("max_count and max_bytes must be at least 1, and ttl_s above 0")
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._ttl_s = ttl_s
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self._listeners: list[EvictionListener] = []

    def on_evict(self, listener: EvictionListener) -> None:
        """Call ``listener(image_id)`` whenever an image leaves (evicted or expired)."""
        self._listeners.append(listener)

    def add(self, image_id: str, image: Image.Image, scope: str, ttl_s: float | None = None) -> None:
        """Hold ``image`` under ``image_id`` for ``scope`` for ``ttl_s`` seconds (default: the LRU's TTL).

        Expired images go first, then the least recently used while over a cap; an image over the byte cap by
        itself is held alone.
        """
        nbytes = image_nbytes(image)
        now = time.monotonic()
        with self._lock:
            gone = [key for key, entry in self._entries.items() if entry.expires <= now]
            for key in gone:
                self._drop(key)
            if image_id in self._entries:  # held already (two lookups fetched it at once): replaced, not charged twice
                self._drop(image_id)
            self._entries[image_id] = _Entry(scope, image, nbytes, now + (ttl_s or self._ttl_s))
            self._nbytes += nbytes
            while len(self._entries) > 1 and (len(self._entries) > self._max_count or self._nbytes > self._max_bytes):
                gone.append(next(iter(self._entries)))
                self._drop(gone[-1])
        self._tell(gone)

    def find(self, image_id: str, scope: str) -> Image.Image | None:
        """The image held under ``image_id`` for ``scope`` (marked recently used), or ``None``."""
        with self._lock:
            entry = self._entries.get(image_id)
            if entry is None or entry.scope != scope:
                return None
            expired = entry.expires <= time.monotonic()
            if expired:
                self._drop(image_id)
            else:
                self._entries.move_to_end(image_id)
        if expired:
            self._tell([image_id])
            return None
        return entry.image

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes currently charged for held images."""
        with self._lock:
            return self._nbytes

    def _drop(self, image_id: str) -> None:
        self._nbytes -= self._entries.pop(image_id).nbytes

    def _tell(self, gone: list[str]) -> None:
        # Outside the lock: a listener may take locks of its own (a model's encoding cache).
        for image_id in gone:
            for listener in self._listeners:
                listener(image_id)
