"""The published checkpoint files the tiny builders scale down (``vlm_tools/testing/hub/``), and JSON writing.

``hub/README.md`` says where each file comes from.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any


def published_text(checkpoint: str, name: str) -> str:
    """File ``name`` of the published ``checkpoint`` (``"molmo2-4b"``, ``"paligemma2-3b-mix-448"``), as text."""
    return resources.files(__package__).joinpath("hub", checkpoint, name).read_text()


def published_json(checkpoint: str, name: str) -> dict[str, Any]:
    """JSON file ``name`` of the published ``checkpoint``."""
    return json.loads(published_text(checkpoint, name))


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as the hub's files are written: indented, keys sorted, a final newline."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def edit_json(path: Path, **values: Any) -> None:
    """Set ``values`` in the JSON file at ``path``."""
    data = json.loads(Path(path).read_text())
    data.update(values)
    write_json(path, data)
