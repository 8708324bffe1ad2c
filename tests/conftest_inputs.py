"""Helpers for the inputs-layer tests: a local HTTP server that counts what reaches it, a stub resolver, a
recording transport, and small image builders. (Not a conftest: test modules import what they use.)"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

# --- images ------------------------------------------------------------------------------------------------


def image_bytes(img: Image.Image, fmt: str = "PNG", **save_args: object) -> bytes:
    """Encode ``img`` with Pillow."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_args)
    return buf.getvalue()


def png_bytes(size: tuple[int, int] = (8, 6), color: tuple[int, ...] = (255, 0, 0), mode: str = "RGB") -> bytes:
    """A solid-colour PNG."""
    return image_bytes(Image.new(mode, size, color), "PNG")


def noisy_image(size: tuple[int, int] = (64, 64), seed: int = 1) -> Image.Image:
    """A deterministic RGB image with high-entropy pixels (compresses poorly, so truncation bites)."""
    import random

    rng = random.Random(seed)
    return Image.frombytes("RGB", size, bytes(rng.randrange(256) for _ in range(size[0] * size[1] * 3)))


# --- a local HTTP server that counts ------------------------------------------------------------------------

PNG_BODY = png_bytes((8, 6), (0, 128, 255))
STREAM_LIMIT = 8_000_000  # most bytes an endless route sends before giving up on its own


@dataclass
class ServerLog:
    """What reached the server: TCP connections accepted, request lines, Host headers, bytes of streamed bodies."""

    connections: int = 0
    requests: list[str] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)
    streamed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.log = ServerLog()
        self.stopping = threading.Event()

    def handle_error(self, request, client_address) -> None:  # type: ignore[no-untyped-def]
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up early is the point
            super().handle_error(request, client_address)

    def verify_request(self, request, client_address) -> bool:  # type: ignore[no-untyped-def]
        with self.log.lock:
            self.log.connections += 1
        return True


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        log = self.server.log
        with log.lock:
            log.requests.append(self.path)
            log.hosts.append(self.headers.get("Host", ""))
        path = self.path
        if path == "/img.png":
            self._send(200, PNG_BODY, "image/png")
        elif path.startswith("/redirect/"):
            left = int(path.rsplit("/", 1)[1])
            self._redirect("/img.png" if left <= 0 else f"/redirect/{left - 1}")
        elif path == "/redirect-no-location":
            self._send(302, b"", "text/plain")
        elif path == "/missing":
            self._send(404, b"not here", "text/plain")
        elif path == "/error":
            self._send(500, b"boom", "text/plain")
        elif path == "/big-declared":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(50_000_000))
            self.end_headers()
            self._stream(chunked=False)
        elif path == "/lying-small-length":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "10")
            self.end_headers()
            self._stream(chunked=False)
        elif path == "/big-chunked":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._stream(chunked=True)
        elif path == "/big-no-length":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self._stream(chunked=False)
        elif path == "/slow-body":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(100):  # a byte every 0.1 s: per-read timeouts never fire, the deadline must
                if self.server.stopping.wait(0.1) or not self._write(b"x"):
                    return
        elif path == "/slow-headers":
            self.server.stopping.wait(10)
            self._send(200, PNG_BODY, "image/png")
        else:
            self._send(404, b"unknown route", "text/plain")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._write(body)

    def _redirect(self, location: str, status: int = 302) -> None:
        self.send_response(status)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream(self, *, chunked: bool) -> None:
        chunk = b"\0" * 65536
        while self.server.log.streamed < STREAM_LIMIT and not self.server.stopping.is_set():
            piece = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
            if not self._write(piece):
                return
            with self.server.log.lock:
                self.server.log.streamed += len(chunk)
            time.sleep(0.001)

    def _write(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError, OSError):
            return False


@dataclass
class LocalServer:
    """A running local server: its port, base URL and log."""

    port: int
    log: ServerLog

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def local_server() -> Iterator[LocalServer]:
    """A real HTTP server on 127.0.0.1 (free port) in a thread, counting connections and requests."""
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield LocalServer(server.server_address[1], server.log)
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def closed_port() -> int:
    """A localhost port with nothing listening (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- name resolution and transports that never leave the machine ---------------------------------------------


class StubResolver:
    """A resolver from a fixed table; counts lookups; unknown names fail like DNS would."""

    def __init__(self, table: dict[str, list[str] | Callable[[int], list[str]]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        answer = self.table.get(host)
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, f"stub resolver: unknown name {host}")
        return answer(self.calls.count(host)) if callable(answer) else list(answer)


Script = Callable[[httpx.Request], httpx.Response]


class RecordingTransport(httpx.AsyncBaseTransport):
    """Records every request; sends those to 127.0.0.0/8 to the real local server and answers all others from
    ``script`` without connecting anywhere."""

    def __init__(self, script: Script | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.forwarded: list[httpx.Request] = []
        self._script = script or (lambda request: httpx.Response(404))
        self._real: httpx.AsyncHTTPTransport | None = None  # made on first use (building it loads CA certificates)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host.startswith("127."):
            self.forwarded.append(request)
            if self._real is None:
                self._real = httpx.AsyncHTTPTransport()
            return await self._real.handle_async_request(request)
        return self._script(request)

    async def aclose(self) -> None:
        if self._real is not None:
            await self._real.aclose()


# --- PDFs built byte by byte (for the shapes pypdfium2 cannot write) -------------------------------------------


def build_pdf(objects: list[bytes], trailer_extra: bytes = b"") -> bytes:
    """A PDF whose object ``i`` (1-based) is ``objects[i-1]``, object 1 being the catalog, with a correct xref."""
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R %s>>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, trailer_extra, xref)
    return bytes(out)


def zero_page_pdf() -> bytes:
    """A well-formed PDF whose page tree is empty."""
    return build_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"])


_PDF_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _rc4(key: bytes, data: bytes) -> bytes:
    s = list(range(256))
    j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    i = j = 0
    out = bytearray()
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def encrypted_pdf(user_password: bytes = b"secret", owner_password: bytes = b"owner") -> bytes:
    """A one-page PDF encrypted with the standard security handler (revision 2, 40-bit RC4), as in PDF 1.7
    §7.6.3 algorithms 2, 3 and 4. The page has no content stream, so no string or stream needs encrypting."""
    import hashlib
    import struct

    def pad(password: bytes) -> bytes:
        return (password + _PDF_PAD)[:32]

    permissions = -4
    doc_id = bytes(range(16))
    owner_value = _rc4(hashlib.md5(pad(owner_password)).digest()[:5], pad(user_password))
    key = hashlib.md5(pad(user_password) + owner_value + struct.pack("<i", permissions) + doc_id).digest()[:5]
    user_value = _rc4(key, _PDF_PAD)
    encrypt = b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P %d >>" % (
        owner_value.hex().encode(), user_value.hex().encode(), permissions)  # fmt: skip
    return build_pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] >>",
            encrypt,
        ],
        trailer_extra=b"/Encrypt 4 0 R /ID [<%s> <%s>] " % (doc_id.hex().encode(), doc_id.hex().encode()),
    )


def blank_pdf(sizes: list[tuple[float, float]], rotations: dict[int, int] | None = None) -> bytes:
    """A PDF of blank pages of the given sizes in points, made with pypdfium2; ``rotations`` maps a 0-based page
    index to its /Rotate."""
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument.new()
    for index, (width, height) in enumerate(sizes):
        page = pdf.new_page(width, height)
        if rotations and index in rotations:
            page.set_rotation(rotations[index])
        page.close()
    buf = io.BytesIO()
    pdf.save(buf)
    pdf.close()
    return buf.getvalue()
