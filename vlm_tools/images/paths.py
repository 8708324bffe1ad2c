"""Local file access confined to the allowed directories.

Confinement by string prefix is broken (``/allowed_x`` passes a check for ``/allowed``) and so is one that does
not resolve symlinks; how it is done here: :func:`resolve_allowed_path`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import ImageTooLarge, PathNotAllowed

MAX_PATH_CHARS = 4096
"""Longest path string considered at all (Linux ``PATH_MAX``)."""


def resolve_allowed_path(raw: str, roots: Sequence[Path]) -> Path:
    """Resolve ``raw`` (absolute, relative to the working directory, or ``~``) to a regular file inside ``roots``.

    The path is made absolute, symlinks are resolved, and the *components* of the result are compared with the
    resolved roots. Only regular files are read: directories, FIFOs (which would block a reader forever), devices
    (``/dev/zero`` never ends) and sockets are refused from ``stat`` before anything is opened, and the read itself
    re-checks the opened descriptor (:func:`read_file_capped`).

    Raises :class:`~vlm_tools.errors.PathNotAllowed` for a path outside the roots (after symlinks), a path that
    does not exist (only said for paths inside the roots, so nothing is learnt about other directories), and
    anything that is not a regular file.
    """
    if not raw or not raw.strip():
        raise PathNotAllowed("the path is empty")
    if "\x00" in raw:
        raise PathNotAllowed("the path contains a NUL byte")
    if len(raw) > MAX_PATH_CHARS:
        raise PathNotAllowed(f"the path is longer than {MAX_PATH_CHARS} characters")
    resolved_roots = [Path(r).expanduser().resolve() for r in roots]
    try:
        candidate = Path(raw).expanduser()
        if not candidate.is_absolute():
            candidate = Path.cwd() / candidate
        # Non-strict first: symlinks that exist are followed, so the containment check sees the real target,
        # and a missing file outside the roots is reported as outside (no existence oracle for other dirs).
        resolved = candidate.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # symlink loops, unknown ~user, name too long
        raise PathNotAllowed(f"{raw} cannot be resolved ({exc})") from None
    if not any(resolved.is_relative_to(root) for root in resolved_roots):
        raise PathNotAllowed(_outside_message(raw, resolved_roots))
    try:
        info = os.stat(resolved)  # follows links; never opens the file
    except FileNotFoundError:
        raise PathNotAllowed(f"{raw} was not found") from None
    except OSError as exc:
        raise PathNotAllowed(f"{raw} cannot be accessed ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise PathNotAllowed(f"{raw} is not a regular file ({_kind(info.st_mode)}); give the path of an image file")
    return resolved


def read_file_capped(path: Path, max_bytes: int) -> bytes:
    """Read a regular file of at most ``max_bytes`` bytes.

    The file is opened without following a final symlink and without blocking (so a FIFO swapped in after the
    check cannot hang the reader), and the open descriptor is checked to be a regular file again. The cap is
    enforced while reading, not only from the size ``stat`` reported.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PathNotAllowed(f"{path} changed into a symlink while being opened") from None
        raise PathNotAllowed(f"{path} cannot be read ({exc.strerror or exc})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise PathNotAllowed(f"{path} is not a regular file ({_kind(info.st_mode)})")
        if info.st_size > max_bytes:
            raise ImageTooLarge(_too_big(path, info.st_size, max_bytes))
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:  # the file grew after fstat
        raise ImageTooLarge(_too_big(path, len(data), max_bytes))
    return data


def path_from_file_url(url: str) -> str:
    """The local path named by a ``file://`` URL (host empty or ``localhost``; percent-escapes decoded)."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "file":
        raise PathNotAllowed(f"{url} is not a file:// URL")
    if parts.netloc not in ("", "localhost"):
        raise PathNotAllowed(f"{url} names another host ({parts.netloc}); file:// URLs may only name local files")
    if parts.query or parts.fragment:
        raise PathNotAllowed(f"{url} has a query or fragment; a file:// URL must name a file only")
    try:
        path = unquote(parts.path, errors="strict")
    except UnicodeDecodeError:
        raise PathNotAllowed(f"{url} has percent-escapes that are not UTF-8") from None
    if not path.startswith("/"):
        raise PathNotAllowed(f"{url} does not name an absolute path")
    return path


def _outside_message(raw: str, roots: Sequence[Path]) -> str:
    listed = ", ".join(str(r) for r in roots) or "none configured"
    return f"{raw} is outside the allowed directories ({listed}); add --allow-path DIR to allow another directory"


def _too_big(path: Path, size: int, max_bytes: int) -> str:
    return f"{path} is over {max_bytes:,} bytes ({size:,} or more; --max-file-bytes); send a smaller file"


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symlink"),
    ):
        if test(mode):
            return name
    return "not a regular file"
