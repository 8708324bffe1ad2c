"""Helpers shared by the tests: images made on the fly, test settings, ready-made backend loaders."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from vlm_tools.backends.base import Backend, BatchBackend, ConcurrentBackend, Outcome, Request
from vlm_tools.settings import Settings


def cuda_available() -> bool:
    """Whether torch sees a CUDA GPU (``False`` without torch)."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def require_for_gpu_test(ready: bool, message: str) -> None:
    """A prerequisite of a ``gpu`` test: without CUDA the test skips; on a CUDA machine a missing prerequisite
    (bitsandbytes, the real weights) fails it, so a GPU run cannot pass by skipping what it exists to run."""
    if not cuda_available():
        pytest.skip(f"needs a CUDA GPU ({message})")
    if not ready:
        pytest.fail(f"on this CUDA machine the gpu test cannot run: {message}")


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic RGB image of random pixels (flat colours would make every image look alike to a model)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy())


def png_bytes(width: int = 200, height: int = 100, color: tuple[int, int, int] = (30, 60, 200)) -> bytes:
    """A solid PNG of the given size."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def png_of(image: Image.Image) -> bytes:
    """``image`` as PNG bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pdf_of(images: Sequence[Image.Image]) -> bytes:
    """A PDF with one page per image (Pillow writes it)."""
    buffer = io.BytesIO()
    images[0].save(buffer, format="PDF", save_all=True, append_images=list(images[1:]), resolution=72)
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """``data:`` URI of ``data``."""
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    """Test settings: paths confined to ``tmp_path``, loopback URLs allowed, a fast engine."""
    values: dict[str, object] = {
        "model": ("scripted",),
        "allow_path": (tmp_path,),
        "allow_private_urls": True,
        "batch_wait_ms": 2.0,
        "log_level": "warning",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


class Borrowed(BatchBackend):
    """A backend lent to one server: a server's lifespan closes its backends on the way out, this one stays open
    for the next test."""

    def __init__(self, inner: BatchBackend) -> None:
        self.inner = inner
        self.name, self.family, self.native, self.supported = inner.name, inner.family, inner.native, inner.supported
        self.max_batch_size, self.parallelism = inner.max_batch_size, inner.parallelism

    def run_batch(self, requests: Sequence[Request]) -> list[Outcome]:
        return self.inner.run_batch(requests)


class BorrowedConcurrent(ConcurrentBackend):
    """:class:`Borrowed` for a backend that answers each request on its own (a remote server)."""

    def __init__(self, inner: ConcurrentBackend) -> None:
        self.inner = inner
        self.name, self.family, self.native, self.supported = inner.name, inner.family, inner.native, inner.supported
        self.concurrency = inner.concurrency

    def prefetch(self, request: Request) -> None:
        self.inner.prefetch(request)

    async def answer(self, request: Request) -> Any:
        return await self.inner.answer(request)


def borrowed(inner: Backend) -> Backend:
    """``inner`` lent to one server (see :class:`Borrowed`)."""
    return BorrowedConcurrent(inner) if isinstance(inner, ConcurrentBackend) else Borrowed(inner)  # type: ignore


def loader(*backends: Backend) -> Callable[[Settings], Sequence[Backend]]:
    """A ``load_backends`` function that hands the server ready-made backends."""
    return lambda _settings: list(backends)


@contextmanager
def static_site(routes: Mapping[str, tuple[str, bytes]]) -> Iterator[str]:
    """Serve ``routes`` (path → (content type, body); 404 elsewhere) on 127.0.0.1 at a free port from a thread;
    yields the base URL (no trailing slash). Routes are looked up per request, so a dict filled later is served."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            route = routes.get(self.path)
            if route is None:
                self.send_error(404)
                return
            content_type, body = route
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def answer_all(backend: Any, requests: Sequence[Request]) -> list[Any]:
    """Ask a :class:`~vlm_tools.backends.base.ConcurrentBackend` every request at once, outside any event loop: one
    output, or the error it raised, per request, in order."""
    import asyncio

    async def one(request: Request) -> Any:
        try:
            return await backend.answer(request)
        except Exception as error:  # noqa: BLE001 - the error is the outcome the test checks
            return error

    async def every() -> list[Any]:
        return list(await asyncio.gather(*(one(request) for request in requests)))

    return asyncio.run(every())


def run_requests(backend: Any, requests: Sequence[Request]) -> list[Any]:
    """One outcome per request from any backend: a batch backend's ``run_batch``, a concurrent one's answers."""
    from vlm_tools.backends.base import ConcurrentBackend

    if isinstance(backend, ConcurrentBackend):
        return answer_all(backend, requests)
    return backend.run_batch(requests)
