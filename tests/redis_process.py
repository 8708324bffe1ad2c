"""A real ``redis-server`` for the tests: on a free loopback port, nothing written to disk, stopped and started
again on the same port to play an outage."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis
from server_process import free_port


class RedisProcess:
    """``redis-server`` at ``127.0.0.1:<port>`` with persistence off; its output goes to ``log``."""

    def __init__(self, binary: str, log: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0, password: str | None = None) -> str:
        """``redis://`` URL of database ``db`` (with a password in it, when given: the server needs none)."""
        auth = f":{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 15.0) -> None:
        """Start the server (again, on the same port) and wait until it answers PING."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        client = redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        self.stop()
                        raise AssertionError(f"redis-server did not start:\n{self.log.read_text()[-2000:]}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s); nothing it held survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def client(self) -> redis.Redis:
        """A plain client of database 0, to look at what the server holds."""
        return redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=1)

    def __enter__(self) -> RedisProcess:  # noqa: PYI034 - final class
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
