"""Shared fixtures: images made on the fly, tiny models built once per session."""

from __future__ import annotations

import os
from pathlib import Path

# Tiny models on a small CPU: one thread per process is steadier and faster than oversubscribed cores, for this
# process and for the servers the tests start (they inherit the environment).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from helpers import png_bytes


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
