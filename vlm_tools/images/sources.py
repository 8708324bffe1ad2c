"""Every form an agent may send an image in, turned into a checked RGB image held under an ``image_id``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from dataclasses import dataclass
from functools import partial

import anyio.to_thread
from PIL import Image

from ..errors import ImageTooLarge, InvalidArgument, InvalidImage, PathNotAllowed, UnknownImageId, UrlBlocked
from ..results import ImageSize
from ..settings import Settings
from .decode import decode_image
from .fetch import UrlFetcher
from .paths import MAX_PATH_CHARS, path_from_file_url, read_file_capped, resolve_allowed_path
from .store import IMAGE_ID_PREFIX, ImageStore, is_image_id

logger = logging.getLogger(__name__)

ACCEPTED_FORMS = (
    "a file path inside the allowed directories (or a file:// URL), an http(s) URL, a data:image/...;base64,... "
    "URI, bare base64 of the image bytes, or an image_id (img_...) from an earlier result"
)
"""What the image argument may be, for error messages and tool descriptions."""

IMAGE_MEDIA_TYPES = frozenset(
    {
        "image/png", "image/jpeg", "image/jpg", "image/pjpeg", "image/webp", "image/gif",
        "image/bmp", "image/x-bmp", "image/x-ms-bmp", "image/tiff", "image/tif",
    }
)  # fmt: skip
DOCUMENT_MEDIA_TYPES = IMAGE_MEDIA_TYPES | {"application/pdf"}

# Schemes that name no local file; anything with "://" other than http(s)/file is refused too.
_URL_ONLY_SCHEMES = frozenset({"javascript", "vbscript", "about", "blob", "mailto", "tel", "urn", "view-source"})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_WHITESPACE = re.compile(r"[ \t\r\n]+")
_PATHLIKE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,5}$")


@dataclass(frozen=True)
class StoredImage:
    """A decoded image held in the store: its id, the RGB image (read-only: shared) and its size."""

    image_id: str
    image: Image.Image
    size: ImageSize


class ImageSources:
    """Loads images (and documents' bytes) from every accepted source form.

    Forms, detected explicitly and in this order (the tool descriptions promise exactly these):

    1. an ``image_id`` returned earlier (``img_`` + 32 hex digits) — looked up in the store, same id back;
    2. a ``data:`` URI — ``data:image/<png|jpeg|webp|gif|bmp|tiff>;base64,…`` only;
    3. an ``http(s)://`` URL — fetched under the SSRF rules of :mod:`.fetch`, unless URL fetching is off;
    4. a file path (absolute, relative to the working directory, ``~``, or a ``file://`` URL) inside the allowed roots;
    5. bare base64 of the image bytes (strict alphabet and padding; MIME line breaks tolerated).

    JPEG base64 starts with ``/9j/`` and other base64 may contain ``/``, so a string that does not name an allowed
    file but is valid base64 is taken as base64; the path error is reported only when it is not. All blocking work
    (file reads, decoding) runs in worker threads so the event loop keeps serving other calls.
    """

    def __init__(self, settings: Settings, store: ImageStore, *, fetcher: UrlFetcher | None = None) -> None:
        self._settings = settings
        self._store = store
        self._owns_fetcher = fetcher is None
        self._fetcher = fetcher or UrlFetcher(
            allow_private=settings.allow_private_urls,
            max_bytes=settings.max_fetch_bytes,
            timeout_s=settings.fetch_timeout_s,
        )

    async def load_image(self, source: str, scope: str) -> StoredImage:
        """Load ``source`` as an image, keep it in the store under ``scope`` and return it with its id.

        An ``image_id`` source returns the held image under the same id. Raises the typed errors of
        :mod:`vlm_tools.errors`: ``invalid_argument``, ``invalid_image``, ``image_too_large``,
        ``path_not_allowed``, ``url_blocked``, ``fetch_failed``, ``unknown_image_id``, ``image_store_unavailable``.
        """
        source = _check_text(source)
        if is_image_id(source):
            return await self._lookup(source, scope)
        data = await self._read(source, IMAGE_MEDIA_TYPES)
        image = await anyio.to_thread.run_sync(partial(decode_image, data, max_pixels=self._settings.max_image_pixels))
        image_id = await self._store.put(image, scope)
        return StoredImage(image_id, image, ImageSize(width=image.width, height=image.height))

    async def load_bytes(self, source: str, scope: str) -> bytes | StoredImage:
        """The raw bytes of ``source`` (for documents: a PDF or an image), or the held image for an image_id.

        Accepts the same forms as :meth:`load_image`, and ``data:application/pdf;base64,…`` as well.
        """
        source = _check_text(source)
        if is_image_id(source):
            return await self._lookup(source, scope)
        return await self._read(source, DOCUMENT_MEDIA_TYPES)

    async def aclose(self) -> None:
        """Release the URL fetcher (when this object created it)."""
        if self._owns_fetcher:
            await self._fetcher.aclose()

    async def _lookup(self, image_id: str, scope: str) -> StoredImage:
        image = await self._store.get(image_id, scope)
        return StoredImage(image_id, image, ImageSize(width=image.width, height=image.height))

    async def _read(self, source: str, media_types: frozenset[str]) -> bytes:
        head = source[:16].lower()
        if head.startswith("data:"):
            logger.debug("image source: data URI (%d chars)", len(source))
            return decode_data_uri(source, media_types=media_types, max_bytes=self._settings.max_inline_bytes)
        if head.startswith(("http://", "https://")):
            if not self._settings.allow_urls:
                raise UrlBlocked("URL fetching is off (--no-urls); send the image as a file path, data URI or base64")
            logger.debug("image source: URL")
            return await self._fetcher.fetch(source)
        if head.startswith("file:"):
            return await self._read_path(path_from_file_url(source))
        scheme = _SCHEME.match(source)
        if scheme and (source[scheme.end() : scheme.end() + 2] == "//" or scheme.group(1).lower() in _URL_ONLY_SCHEMES):
            raise UrlBlocked(f"the URL scheme {scheme.group(1)!r} is not supported; send {ACCEPTED_FORMS}")
        return await self._read_path_or_base64(source)

    async def _read_path_or_base64(self, source: str) -> bytes:
        path_error: PathNotAllowed | None = None
        if len(source) <= MAX_PATH_CHARS and "\n" not in source:
            try:
                return await self._read_path(source)
            except PathNotAllowed as exc:
                path_error = exc
        data = decode_base64(source, max_bytes=self._settings.max_inline_bytes)
        if data is not None:
            logger.debug("image source: base64 (%d bytes)", len(data))
            return data
        if path_error is not None and _looks_like_path(source):
            raise path_error
        if source.startswith(IMAGE_ID_PREFIX) and re.fullmatch(r"\w+", source):
            raise UnknownImageId(f"{source[:40]} is not an image id this server issues (img_ + 32 hex digits)")
        raise InvalidArgument(f"the image argument is none of the accepted forms; send {ACCEPTED_FORMS}")

    async def _read_path(self, raw: str) -> bytes:
        roots = self._settings.allowed_roots
        path = await anyio.to_thread.run_sync(resolve_allowed_path, raw, roots)
        logger.debug("image source: file %s", path)
        return await anyio.to_thread.run_sync(read_file_capped, path, self._settings.max_file_bytes)


def decode_data_uri(uri: str, *, media_types: frozenset[str], max_bytes: int) -> bytes:
    """The bytes of a ``data:<type>;base64,<payload>`` URI whose type is in ``media_types``.

    Only base64 data URIs are accepted (an image is binary; percent-encoded or charset-tagged text forms are
    refused), the decoded size is checked from the payload length before decoding, and the base64 is strict.
    """
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        raise InvalidImage("the data: URI has no ',' before its data; send data:image/png;base64,<base64 bytes>")
    params = [p.strip().lower() for p in header.split(";")]
    media_type = params[0] or "text/plain"
    if media_type not in media_types:
        hint = "; PDFs go to read_document" if media_type == "application/pdf" else ""
        accepted = "image/png, image/jpeg, image/webp, image/gif, image/bmp or image/tiff"
        if "application/pdf" in media_types:
            accepted = accepted.replace(" or ", ", ") + " or application/pdf"
        raise InvalidImage(
            f"the data: URI has type {media_type!r}; send data:<type>;base64,<base64 bytes> with type {accepted}{hint}"
        )
    if "base64" not in params[1:] or any(p.startswith("charset=") for p in params[1:]):
        raise InvalidImage("only base64 data: URIs are accepted (data:image/png;base64,...), not text or charset forms")
    if "%" in payload:
        raise InvalidImage("the data: URI payload is percent-encoded; send plain base64")
    _check_inline_size(payload, max_bytes, "the data: URI")
    data = _b64decode(_WHITESPACE.sub("", payload))
    if data is None:
        raise InvalidImage("the data: URI payload is not valid base64")
    if not data:
        raise InvalidImage("the data: URI carries no data")
    return data


def decode_base64(text: str, *, max_bytes: int) -> bytes | None:
    """Strictly decode bare base64 (standard or URL-safe alphabet, padded); ``None`` when it is not base64.

    Raises :class:`~vlm_tools.errors.ImageTooLarge` when the length alone says the data is over ``max_bytes``.
    """
    compact = _WHITESPACE.sub("", text)
    _check_inline_size(compact, max_bytes, "the base64 data")
    data = _b64decode(compact)
    return data or None


def _b64decode(compact: str) -> bytes | None:
    urlsafe = ("-" in compact or "_" in compact) and not ("+" in compact or "/" in compact)
    try:
        return base64.b64decode(compact, altchars=b"-_" if urlsafe else None, validate=True)
    except (binascii.Error, ValueError):
        return None


def _check_inline_size(payload: str, max_bytes: int, what: str) -> None:
    decoded = len(payload) // 4 * 3  # upper bound of the decoded size, known before decoding anything
    if decoded > max_bytes:
        raise ImageTooLarge(
            f"{what} is about {decoded:,} bytes, over the limit of {max_bytes:,} (--max-inline-bytes); send a "
            "smaller image or a file path"
        )


def _check_text(source: object) -> str:
    if not isinstance(source, str):
        raise InvalidArgument(f"the image argument must be a string: {ACCEPTED_FORMS}")
    stripped = source.strip()
    if not stripped:
        raise InvalidArgument(f"the image argument is empty; send {ACCEPTED_FORMS}")
    return stripped


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "~", ".")) or "/" in text or "\\" in text or bool(_PATHLIKE_SUFFIX.search(text))
