"""The safe inputs layer: every image source an agent may send, turned into a checked RGB image.

* :mod:`.decode` — bytes → upright 8-bit RGB (format allowlist, pixel cap before decoding);
* :mod:`.paths` — local files confined to the allowed directories;
* :mod:`.fetch` — SSRF-safe http(s) fetching;
* :mod:`.store` — what an image store does: decoded images kept for reuse by ``image_id``;
* :mod:`.memory_store`, :mod:`.redis_store` — the stores: this process's memory, or Redis shared by many
  (:mod:`.stores` opens the one the settings name; :mod:`.lru` is the in-process LRU both keep);
* :mod:`.encode` — an image as a PNG ``data:`` URI (what inference servers are sent);
* :mod:`.sources` — the one entry point: any accepted source form → a stored image.
"""

from .decode import ACCEPTED_FORMATS, decode_image
from .fetch import UrlFetcher, check_address
from .memory_store import MemoryImageStore
from .paths import read_file_capped, resolve_allowed_path
from .sources import ACCEPTED_FORMS, ImageSources, StoredImage
from .store import ImageStore, is_image_id
from .stores import open_image_store

__all__ = [
    "ACCEPTED_FORMATS",
    "ACCEPTED_FORMS",
    "ImageSources",
    "ImageStore",
    "MemoryImageStore",
    "StoredImage",
    "UrlFetcher",
    "check_address",
    "decode_image",
    "is_image_id",
    "open_image_store",
    "read_file_capped",
    "resolve_allowed_path",
]
