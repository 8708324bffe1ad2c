"""Encoded images kept for reuse: what a model made of an image it has already seen.

An agent sends a screenshot once and asks several things about it by ``image_id``. Each local backend keeps, per
image id, what its family's processor and vision encoder made of that image (for Molmo2 its token ids and pooled
vision features; for PaliGemma its projected SigLIP features), so a follow-up call runs neither again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class EncodingCache:
    """An LRU of ``image_id → encoding``, bounded by ``max_bytes`` (the sizes :meth:`put` is told).

    Least recently used evicted first, and an entry goes when its image leaves the image store (:meth:`forget`);
    image ids are random and bound to one session, so entries are scoped as the images are. Thread-safe: batches
    are prepared on a worker thread while the store evicts on the event loop.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._nbytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, image_id: str | None) -> Any | None:
        """The encoding of ``image_id`` (marked recently used), or ``None``."""
        if image_id is None:
            return None
        with self._lock:
            entry = self._entries.get(image_id)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(image_id)
            self.hits += 1
            return entry[0]

    def put(self, image_id: str | None, encoding: Any, nbytes: int, *, replace: bool = True) -> None:
        """Keep ``encoding`` for ``image_id`` (nothing for an image without an id, or one bigger than the cache);
        with ``replace=False``, an encoding already kept for it stays (it may carry more, e.g. Molmo2's prefix)."""
        if image_id is None or nbytes > self.max_bytes:
            return
        with self._lock:
            if not replace and image_id in self._entries:
                return
            old = self._entries.pop(image_id, None)
            if old is not None:
                self._nbytes -= old[1]
            self._entries[image_id] = (encoding, nbytes)
            self._nbytes += nbytes
            while self._nbytes > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._nbytes -= evicted

    def forget(self, image_id: str) -> None:
        """Drop the encoding of an image that left the image store."""
        with self._lock:
            entry = self._entries.pop(image_id, None)
            if entry is not None:
                self._nbytes -= entry[1]

    def clear(self) -> None:
        """Drop everything (the model is closing)."""
        with self._lock:
            self._entries.clear()
            self._nbytes = 0

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        with self._lock:
            return self._nbytes

    def __contains__(self, image_id: object) -> bool:
        """Whether an encoding is kept for ``image_id`` (counted neither as a hit nor a miss)."""
        with self._lock:
            return image_id in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
