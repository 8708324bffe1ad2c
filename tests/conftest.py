"""Shared fixtures: images made on the fly, tiny models built once per session."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

# Tiny models on a small CPU: one thread per process is steadier and faster than oversubscribed cores, for this
# process and for the servers the tests start (they inherit the environment).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from helpers import png_bytes

if TYPE_CHECKING:
    from redis_process import RedisProcess


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    """A 200×100 PNG on disk, inside the allowed roots of :func:`settings_for`."""
    path = tmp_path / "shot.png"
    path.write_bytes(png_bytes())
    return path


@pytest.fixture(scope="session")
def tiny_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_paligemma_dir(tiny_models_root: Path) -> Path:
    """A tiny random PaliGemma saved like a hub checkpoint (built once per test session)."""
    from vlm_tools.testing.tiny_paligemma import build_tiny_paligemma

    return build_tiny_paligemma(tiny_models_root / "paligemma")


@pytest.fixture(scope="session")
def tiny_molmo2_dir(tiny_models_root: Path) -> Path:
    """A tiny random Molmo2 saved like a hub checkpoint (built once per test session)."""
    from vlm_tools.testing.tiny_molmo2 import build_tiny_molmo2

    return build_tiny_molmo2(tiny_models_root / "molmo2")


REPO = Path(__file__).resolve().parent.parent
SETUP_VLLM = "bash scripts/setup_vllm.sh"


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The interpreter of the vLLM virtual environment (``scripts/setup_vllm.sh``, or ``VLM_TOOLS_VLLM_PYTHON``).

    In CI (``CI`` set) a missing vLLM fails the ``vllm`` tests; elsewhere they skip, naming the setup command.
    """
    configured = os.environ.get("VLM_TOOLS_VLLM_PYTHON")
    python = Path(configured) if configured else REPO / ".vllm-venv" / "bin" / "python"
    ready = python.is_file() and (configured or (REPO / ".vllm-venv" / ".vlm-tools-ready").is_file())
    if not ready:
        message = f"vLLM is not set up at {python}: run `{SETUP_VLLM}`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return python


INSTALL_REDIS = "apt-get install redis-server"


@pytest.fixture(scope="session")
def redis_server_binary() -> str:
    """The ``redis-server`` to start: ``VLM_TOOLS_REDIS_SERVER``, or the one on the PATH (Debian's).

    In CI (``CI`` set) a missing one fails the Redis tests; elsewhere they skip, naming the install command.
    """
    binary = os.environ.get("VLM_TOOLS_REDIS_SERVER") or shutil.which("redis-server")
    if not binary or not Path(binary).is_file():
        message = f"redis-server is not installed: run `{INSTALL_REDIS}`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return binary


@pytest.fixture(scope="session")
def redis_server(redis_server_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One ``redis-server`` for the test session, stopped at its end (failed tests included)."""
    from redis_process import RedisProcess

    with RedisProcess(redis_server_binary, tmp_path_factory.mktemp("redis") / "redis.log") as server:
        yield server
