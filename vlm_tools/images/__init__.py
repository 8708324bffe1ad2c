"""The safe inputs layer: every image source an agent may send, turned into a checked RGB image.

:mod:`.sources` is the one entry point (any accepted source form → a stored image); behind it :mod:`.decode`
(bytes → upright 8-bit RGB), :mod:`.paths` (local files confined to the allowed directories), :mod:`.fetch`
(SSRF-safe http(s)), :mod:`.stores` (the image store the settings name: :mod:`.memory_store` or :mod:`.redis_store`,
behind :mod:`.store`'s interface) and :mod:`.encode` (an image as a PNG ``data:`` URI).
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
