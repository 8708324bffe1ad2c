"""How much memory a model's weights take, known before its weights are loaded.

The parameter count comes from the model's config (a local directory, or the hub cache), counted on torch's meta
device — no weights are read; for a published checkpoint whose config is not cached yet, its family knows it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .hub import ModelRef

log = logging.getLogger(__name__)

BYTES_PER_PARAMETER: dict[str, float] = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "8bit": 1.0, "4bit": 0.5}
"""Bytes per weight by dtype or quantisation (4- and 8-bit: the quantised layers; embeddings and the vision tower
stay in the compute dtype, so a real 4-bit model takes somewhat more)."""


def parameter_count(model: str, *, local_files_only: bool = True) -> int | None:
    """The number of parameters of ``model`` (hub id or directory), or ``None`` when its config cannot be had."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ..families import family_from_name

    ref = ModelRef.parse(model)
    try:
        config = AutoConfig.from_pretrained(
            ref.model_id, local_files_only=local_files_only, trust_remote_code=False, **ref.pretrained_kwargs
        )
        with torch.device("meta"):
            network = AutoModelForImageTextToText.from_config(config)
    except (OSError, ValueError, KeyError) as error:
        log.debug("no config for %s: %s", model, error)
        family = family_from_name(ref.model_id)
        return family.known_parameters(ref.model_id) if family else None
    return sum(p.numel() for p in network.parameters())


def weight_bytes(parameters: int, precision: str) -> int:
    """Bytes the weights take at ``precision`` (a dtype name, ``4bit`` or ``8bit``)."""
    return int(parameters * BYTES_PER_PARAMETER[precision])


def cpu_computes_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX-512 BF16 or AMX): only then is ``--dtype bfloat16`` fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gigabytes(size: float) -> str:
    """``12.3 GB``."""
    return f"{size / 1e9:.1f} GB"


def describe(sizes: dict[str, Any]) -> str:
    """``allenai/Molmo2-4B 19.4 GB, … `` for log lines (unknown sizes said so)."""
    return ", ".join(f"{model} {gigabytes(size) if size else 'size unknown'}" for model, size in sizes.items())
