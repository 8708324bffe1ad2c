"""A real ``transformers serve`` process (transformers' own OpenAI-compatible server) for tests and benchmarks.

It runs offline on 127.0.0.1 with one model directory preloaded (``transformers serve <dir>`` pins every request
to it). Two things a bare tiny PaliGemma directory lacks, learnt from transformers 5.23's serving code:

* a chat template: chat completions go through ``processor.apply_chat_template``; PaliGemma checkpoints have
  none. :data:`PALIGEMMA_CHAT_TEMPLATE` turns the image part into ``<image>`` and passes the text through, so the
  processor lays out ``<image>×N <bos> prompt "\\n"`` exactly as a local backend does.
* an existing hub cache directory: ``GET /v1/models`` scans it and fails when it does not exist.

``transformers serve`` answers unknown request fields with 422 and decodes with ``skip_special_tokens=True``
(PaliGemma's ``<loc####>`` / ``<seg###>`` are added, non-special tokens, so they come back). Its continuous
batching (``--continuous-batching``) applies to text-only models; for vision models it logs a warning and
falls back to sequential generation.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

PALIGEMMA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
)
"""Image part → ``<image>``, text parts as they are, nothing else (PaliGemma has no turns)."""


def with_chat_template(model_dir: Path, target: Path, template: str = PALIGEMMA_CHAT_TEMPLATE) -> Path:
    """A copy of ``model_dir`` at ``target`` carrying ``chat_template.jinja``; returns ``target``."""
    shutil.copytree(model_dir, target, dirs_exist_ok=True)
    (Path(target) / "chat_template.jinja").write_text(template)
    return Path(target)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """``transformers serve MODEL_DIR`` as a child process; stop it with :meth:`stop` (or :meth:`kill`).

    Args:
        model_dir: the model to preload (requests must name it exactly, or name no model).
        work_dir: where the hub cache directory and the log file go.
        continuous_batching: pass ``--continuous-batching``.
        device: ``--device`` (``cpu`` in tests).
        threads: torch's intra-op threads in the server (``OMP_NUM_THREADS``); ``None`` keeps the default (one per
            core), which on a small machine shared with other processes oversubscribes the cores badly.
    """

    def __init__(self, model_dir: Path, work_dir: Path, *, continuous_batching: bool = False,
                 device: str = "cpu", threads: int | None = None) -> None:
        self.model = str(model_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        work_dir = Path(work_dir)
        cache = work_dir / "hub-cache"
        cache.mkdir(parents=True, exist_ok=True)
        self.log_path = work_dir / f"serve-{self.port}.log"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "HF_HUB_CACHE": str(cache),
            "HF_HUB_DISABLE_UPDATE_CHECK": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        command = [
            sys.executable, "-m", "transformers.cli.transformers", "serve", self.model,
            "--host", "127.0.0.1", "--port", str(self.port), "--device", device, "--log-level", "warning",
        ]  # fmt: skip
        if continuous_batching:
            command.append("--continuous-batching")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout_s: float = 180.0) -> ServeProcess:
        """Block until ``GET /health`` answers 200; raise ``RuntimeError`` (with the log's tail) otherwise."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"transformers serve was not ready within {timeout_s:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """Kill the server at once (SIGKILL): in-flight requests see their connection drop."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and close its log."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()
