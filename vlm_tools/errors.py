"""The error hierarchy every layer raises and the tool boundary translates once.

Each error carries a stable ``code`` (part of the public contract: agents and scripts match on it) and a
message that says what went wrong and what to do. ``str(error)`` is ``"<code>: <message>"`` so the code is
the first thing a client sees, whatever prefix the MCP SDK puts in front.
"""

from __future__ import annotations


class VlmToolsError(Exception):
    """Base class: an expected failure with a stable code and an actionable message."""

    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidImage(VlmToolsError):
    """The bytes are not an image in an accepted format, or are broken."""

    code = "invalid_image"


class ImageTooLarge(VlmToolsError):
    """The image (pixels or bytes) is over a configured cap."""

    code = "image_too_large"


class PathNotAllowed(VlmToolsError):
    """A file path outside the allowed roots, or not a regular file."""

    code = "path_not_allowed"


class UrlBlocked(VlmToolsError):
    """A URL that must not be fetched (private address, bad scheme, fetching off)."""

    code = "url_blocked"


class FetchFailed(VlmToolsError):
    """A permitted URL could not be fetched (network error, HTTP error, too big, too slow)."""

    code = "fetch_failed"


class UnknownImageId(VlmToolsError):
    """An ``image_id`` the server does not hold (never issued, evicted, or another session's)."""

    code = "unknown_image_id"


class ImageStoreUnavailable(VlmToolsError):
    """The shared image store (Redis) cannot be reached, so an ``image_id`` this process does not hold cannot be
    looked up; sending the image itself still works."""

    code = "image_store_unavailable"


class InvalidArgument(VlmToolsError):
    """A caller argument out of its allowed range or form."""

    code = "invalid_argument"


class InvalidDocument(VlmToolsError):
    """A document that cannot be read: broken, encrypted, empty, or over the page cap."""

    code = "invalid_document"


class InputTooLong(VlmToolsError):
    """The image and prompt take more tokens than the model's context holds."""

    code = "input_too_long"


class UnsupportedByModel(VlmToolsError):
    """No loaded model can do this task."""

    code = "unsupported_by_model"


class Busy(VlmToolsError):
    """The request queue is full; retry shortly."""

    code = "busy"


class Timeout(VlmToolsError):
    """The request did not finish within its time limit."""

    code = "timeout"


class Cancelled(VlmToolsError):
    """The caller cancelled the request."""

    code = "cancelled"


class ModelError(VlmToolsError):
    """The model failed on this request."""

    code = "model_error"


class ModelBroken(ModelError):
    """The model fails every request the same way (a broken checkpoint or configuration): not worth a retry."""


class ShuttingDown(VlmToolsError):
    """The server is stopping and accepts no new work."""

    code = "shutting_down"


class ConfigurationError(VlmToolsError):
    """Settings that cannot work together; raised at start-up."""

    code = "configuration_error"


class ModelUnavailable(ConfigurationError):
    """A model that cannot be fetched or found: gated without access, missing, or no network and not cached."""

    code = "model_unavailable"


ERROR_CODES: tuple[str, ...] = tuple(
    cls.code
    for cls in (
        InvalidImage,
        ImageTooLarge,
        PathNotAllowed,
        UrlBlocked,
        FetchFailed,
        UnknownImageId,
        ImageStoreUnavailable,
        InvalidArgument,
        InvalidDocument,
        InputTooLong,
        UnsupportedByModel,
        Busy,
        Timeout,
        Cancelled,
        ModelError,
        ShuttingDown,
        ConfigurationError,
        ModelUnavailable,
    )
)
"""Every stable error code, in one place for documentation and metrics."""
