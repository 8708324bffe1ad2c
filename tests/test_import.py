"""Importing the package and its light layers must not import torch or transformers (they load with a backend)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers")

MODULES = [
    "vlm_tools",
    "vlm_tools.images",
    "vlm_tools.images.decode",
    "vlm_tools.images.paths",
    "vlm_tools.images.fetch",
    "vlm_tools.images.store",
    "vlm_tools.images.lru",
    "vlm_tools.images.memory_store",
    "vlm_tools.images.redis_store",
    "vlm_tools.images.stores",
    "vlm_tools.images.sources",
    "vlm_tools.documents",
    "vlm_tools.settings",
    "vlm_tools.results",
    "vlm_tools.geometry",
    "vlm_tools.errors",
    "vlm_tools.backends.base",
]


def _imported_heavy(modules: list[str]) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(180)
def test_light_modules_import_without_torch_or_transformers() -> None:
    assert _imported_heavy(MODULES) == []


@pytest.mark.timeout(180)
def test_the_check_can_see_torch() -> None:
    """The subprocess check would notice: importing torch directly shows up."""
    assert _imported_heavy(["torch"]) == ["torch"]
