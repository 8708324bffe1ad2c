"""How much memory a model's weights take, known before its weights are loaded, and whether they fit here.

The parameter count comes from the model's config (a local directory, or the hub cache), counted on torch's meta
device — no weights are read; for a published checkpoint whose config is not cached yet, its family knows it. The
count also says how many of the weights bitsandbytes would quantise (the linear layers outside the modules a
family keeps in the compute dtype), so the size under ``--quantize`` is told as it would be, not as if every
weight shrank.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hub import ModelRef

log = logging.getLogger(__name__)

BYTES_PER_PARAMETER: dict[str, float] = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "8bit": 1.0,
                                         "4bit": 0.5 + 4 / 64}  # fmt: skip
"""Bytes per weight by dtype or quantisation. 4-bit (NF4) adds one float32 scale per block of 64 weights; 8-bit's
one scale per row is left out (a few bytes per thousand weights). Under 4/8-bit only the quantised layers take
these sizes: the rest stays in the compute dtype (:func:`weights_bytes`)."""


@dataclass(frozen=True)
class WeightCount:
    """A model's parameters, and how many of them bitsandbytes would quantise (``None`` when not known)."""

    total: int
    quantisable: int | None = None


def count_weights(model: str, *, local_files_only: bool = True) -> WeightCount | None:
    """The parameters of ``model`` (hub id or directory) from its config, else from its family's published
    figures; ``None`` when neither is to be had."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from ..families import family_for_model_type, family_from_name

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
        checkpoint = family.known_checkpoint(ref.model_id) if family else None
        return WeightCount(checkpoint.parameters, checkpoint.quantisable) if checkpoint else None
    family = family_for_model_type(str(getattr(config, "model_type", "")))
    from ..families.base import DEFAULT_KEEP_UNQUANTISED

    keep = family.keep_unquantised if family else DEFAULT_KEEP_UNQUANTISED
    return WeightCount(sum(p.numel() for p in network.parameters()), quantisable_parameters(network, keep))


def quantisable_parameters(network: Any, keep: Sequence[str]) -> int:
    """Weights of the linear layers of ``network`` that bitsandbytes replaces when ``keep`` is skipped — decided by
    transformers' own rule, so the count is what loading does."""
    import torch
    from transformers.quantizers.quantizers_utils import should_convert_module

    skip = [*keep, *(getattr(network, "_keep_in_fp32_modules", None) or ())]
    return sum(
        module.weight.numel()
        for name, module in network.named_modules()
        if type(module) is torch.nn.Linear and should_convert_module(name, skip)
    )


def parameter_count(model: str, *, local_files_only: bool = True) -> int | None:
    """The number of parameters of ``model`` (hub id or directory), or ``None`` when its config cannot be had."""
    count = count_weights(model, local_files_only=local_files_only)
    return count.total if count else None


def weight_bytes(parameters: int, precision: str) -> int:
    """Bytes ``parameters`` weights take at ``precision`` (a dtype name, ``4bit`` or ``8bit``), all of them."""
    return int(parameters * BYTES_PER_PARAMETER[precision])


def weights_bytes(count: WeightCount, dtype: str, quantize: str = "none") -> int | None:
    """Bytes a model's weights take in ``dtype`` under ``quantize``: the quantised layers at their size, the rest
    in ``dtype``; ``None`` under quantisation when which weights are quantised is not known."""
    if quantize in ("none", ""):
        return weight_bytes(count.total, dtype)
    if count.quantisable is None:
        return None
    kept = count.total - count.quantisable
    return weight_bytes(count.quantisable, quantize) + weight_bytes(kept, dtype)


def cpu_computes_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX-512 BF16 or AMX): only then is ``--dtype bfloat16`` fast."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def ram_available() -> int:
    """Bytes of RAM the system can give a new allocation without swapping (``psutil``'s ``available``)."""
    import psutil

    return int(psutil.virtual_memory().available)


def gpus_free() -> list[tuple[str, int]]:
    """``("cuda:0 NVIDIA H200", free bytes)`` for each CUDA GPU torch sees (none without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [(f"cuda:{i} {torch.cuda.get_device_name(i)}", int(torch.cuda.mem_get_info(i)[0]))
            for i in range(torch.cuda.device_count())]  # fmt: skip


def human_bytes(count: float) -> str:
    """``1.5 GB``, ``820.0 kB``, ``512 bytes`` (powers of 1000, as the hub shows sizes)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{int(count)} bytes"


def gigabytes(size: float) -> str:
    """``12.3 GB``."""
    return f"{size / 1e9:.1f} GB"


def describe(sizes: dict[str, Any]) -> str:
    """``allenai/Molmo2-4B 19.4 GB, … `` for log lines (unknown sizes said so)."""
    return ", ".join(f"{model} {gigabytes(size) if size else 'size unknown'}" for model, size in sizes.items())
