"""Where bitsandbytes can quantise a model: known without importing torch, so it can be checked before serving."""

from __future__ import annotations

import importlib.metadata
import platform
import re


def quantization_support(device: str) -> str | None:
    """Why bitsandbytes cannot quantise on ``device`` here, or ``None`` when it can (CUDA; x86-64 CPUs)."""
    if device == "mps":
        return "bitsandbytes does not run on Apple's MPS: drop --quantize or use --device cpu"
    if device == "cpu" and platform.machine().lower() not in ("x86_64", "amd64"):
        return f"bitsandbytes runs on x86-64 CPUs, not {platform.machine()}: drop --quantize or run on a GPU host"
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return "bitsandbytes is not installed: pip install 'vlm-tools[quantize]'"
    if device == "cpu" and _version_tuple(version) < (0, 47):
        return f"bitsandbytes {version} quantises only on CUDA; 0.47 or newer runs on x86-64 CPUs"
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])
