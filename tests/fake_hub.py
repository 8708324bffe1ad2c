"""A Hugging Face hub in a thread: the endpoints huggingface_hub calls to plan and download a model, over model
directories on disk, so a pull runs for real — HTTP, headers, cache layout — with no network.

* ``GET /api/models/{repo}[/revision/{revision}]`` — the model's info with each file's size (``?blobs=True``);
* ``HEAD`` / ``GET /{repo}/resolve/{revision}/{filename}`` — a file with ``X-Repo-Commit``, ``ETag`` and
  ``Content-Length`` (``Range`` honoured), as huggingface_hub's ``file_download`` expects them.

Unknown repositories, revisions and files answer 404 with the hub's ``X-Error-Code``; a gated repository answers
403 ``GatedRepo`` to file requests without a token. Every request is recorded; a file can be held half-sent until
an event is set, to interrupt a download mid-file.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


@dataclass
class FakeRepo:
    """One model repository: its files (path in the repository → bytes) at one commit."""

    files: dict[str, bytes]
    gated: bool = False

    @property
    def commit(self) -> str:
        digest = hashlib.sha1()
        for name in sorted(self.files):
            digest.update(name.encode() + hashlib.sha256(self.files[name]).digest())
        return digest.hexdigest()

    @classmethod
    def from_directory(cls, directory: Path, extra: dict[str, bytes] | None = None, gated: bool = False) -> FakeRepo:
        """The files of ``directory`` (recursively), plus ``extra``."""
        files = {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
        return cls({**files, **(extra or {})}, gated)


@dataclass
class FakeHub:
    """The hub's state: repositories by id, the requests seen, files held half-sent."""

    repos: dict[str, FakeRepo]
    requests: list[tuple[str, str]] = field(default_factory=list)
    hold: dict[str, threading.Event] = field(default_factory=dict)
    """filename → event: a GET of that file sends half its bytes, sets ``held``, then waits for the event."""
    held: threading.Event = field(default_factory=threading.Event)

    def file_requests(self, method: str = "GET") -> list[str]:
        """Filenames requested with ``method`` from ``/resolve/``, in order."""
        return [path.rsplit("/resolve/", 1)[1].split("/", 1)[1] for m, path in self.requests
                if m == method and "/resolve/" in path]  # fmt: skip


_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def _answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path))
            if match := _INFO.match(path):
                self._info(match["repo"], match["rev"] or "main")
            elif match := _RESOLVE.match(path):
                self._file(match["repo"], match["rev"], match["file"], body)
            else:
                self._error(404, "RepoNotFound")

        def _repo(self, repo_id: str, revision: str) -> FakeRepo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound")
            elif revision not in ("main", repo.commit):
                self._error(404, "RevisionNotFound", repo.commit)
            else:
                return repo
            return None

        def _info(self, repo_id: str, revision: str) -> None:
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            siblings = [{"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
                        for name, data in sorted(repo.files.items())]  # fmt: skip
            info = {"id": repo_id, "sha": repo.commit, "gated": "manual" if repo.gated else False,
                    "siblings": siblings}  # fmt: skip
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, True)

        def _file(self, repo_id: str, revision: str, name: str, body: bool) -> None:
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            if repo.gated and "authorization" not in {k.lower() for k in self.headers}:
                self._error(403, "GatedRepo", repo.commit)
                return
            if name not in repo.files:
                self._error(404, "EntryNotFound", repo.commit)
                return
            data = repo.files[name]
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}  # fmt: skip
            start = _range_start(self.headers.get("Range"))
            if start and body:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                self._send(206, data[start:], headers, body)
            elif body and name in hub.hold:
                self._send_held(data, headers, hub.hold[name])
            else:
                self._send(200, data, headers, body)

        def _send_held(self, data: bytes, headers: dict[str, str], release: threading.Event) -> None:
            self.send_response(200)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            hub.held.set()
            release.wait(60)
            self.close_connection = True

        def _error(self, status: int, code: str, commit: str | None = None) -> None:
            headers = {"X-Error-Code": code, "Content-Type": "application/json"}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, json.dumps({"error": code}).encode(), headers, self.command != "HEAD")

        def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(key, value)
            self.end_headers()
            if body:
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client went away mid-file
                    self.close_connection = True

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

    return Handler


def _range_start(header: str | None) -> int:
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(match[1]) if match else 0


@contextmanager
def serve_hub(hub: FakeHub) -> Iterator[str]:
    """Serve ``hub`` on 127.0.0.1 at a free port from a thread; yields its URL (for ``HF_ENDPOINT``)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        for event in hub.hold.values():
            event.set()
        httpd.shutdown()
        httpd.server_close()
