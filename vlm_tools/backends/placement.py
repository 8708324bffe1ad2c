"""Where and how a local model runs: device, weights dtype, quantisation, attention kernel, and memory care.

Imported only when a local backend loads (it imports torch at module level).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigurationError
from .quantization import quantization_support

if TYPE_CHECKING:
    from ..families.base import Family
    from ..settings import Settings

log = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_device(setting: str) -> str:
    """The device to load onto: the setting itself, or for ``auto`` CUDA, then MPS, then CPU.

    An explicit device that this machine lacks is a configuration error, not a silent fallback.
    """
    if setting == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if _mps_available():
            return "mps"
        return "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError("--device cuda was asked for but no CUDA GPU is visible: use --device auto or cpu")
    if setting == "mps" and not _mps_available():
        raise ConfigurationError("--device mps was asked for but MPS is not available: use --device auto or cpu")
    if setting not in ("cuda", "mps", "cpu"):
        raise ConfigurationError(f"unknown device {setting!r}: use auto, cuda, mps or cpu")
    return setting


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    """Weights dtype: the setting, or for ``auto`` bfloat16 on a GPU that computes in it, float16 on an older GPU
    (compute capability < 8: T4, V100, which emulate bfloat16 slowly or not at all), float32 on MPS and the CPU."""
    if setting == "auto":
        if device != "cuda":
            return torch.float32  # CPU bfloat16 matmuls are slow on most CPUs; MPS bfloat16 needs a recent macOS
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    try:
        return _DTYPES[setting]
    except KeyError:
        raise ConfigurationError(f"unknown dtype {setting!r}: use auto, bfloat16, float16 or float32") from None


def family_dtype(family: Family, setting: str, device: str) -> tuple[torch.dtype, str | None]:
    """The dtype ``family``'s weights run in, and why it is not the one asked for (``None`` when it is): a family
    unstable in a dtype (PaliGemma 2 in float16) runs in float32 instead, wherever that dtype was picked."""
    dtype = resolve_dtype(setting, device)
    name = str(dtype).removeprefix("torch.")
    if name in family.unstable_dtypes:
        source = "this GPU has no bfloat16" if setting == "auto" else f"--dtype {setting} was asked for"
        return torch.float32, f"{family.title} overflows in {name} ({source}): it runs in float32"
    return dtype, None


def quantization_config(setting: str, device: str, compute_dtype: torch.dtype, keep: Sequence[str]) -> Any | None:
    """A bitsandbytes config for ``4bit`` (NF4) / ``8bit`` (LLM.int8), or ``None`` for ``none``; ``keep`` names the
    modules left in ``compute_dtype``. bitsandbytes runs them on CUDA and, from 0.47, on x86-64 CPUs."""
    if setting in ("none", "", None):
        return None
    if setting not in ("4bit", "8bit"):
        raise ConfigurationError(f"unknown quantisation {setting!r}: use none, 4bit or 8bit")
    where = quantization_support(device)
    if where is not None:
        raise ConfigurationError(f"--quantize {setting} cannot run here: {where}")
    from transformers import BitsAndBytesConfig

    if setting == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=list(keep),
        )  # fmt: skip
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(keep))


@dataclass(frozen=True)
class Placement:
    """How one model is loaded: ``from_pretrained`` keyword arguments and what they mean, for the start-up line."""

    device: str
    dtype: torch.dtype
    quantize: str
    attention: str | dict[str, str]
    kwargs: dict[str, Any] = field(default_factory=dict)
    note: str | None = None

    @classmethod
    def for_family(cls, family: Family, settings: Settings) -> Placement:
        """Resolve the settings for a model of ``family``; the weights load straight onto the device."""
        where = resolve_device(settings.device)
        weights, note = family_dtype(family, settings.dtype, where)
        quant = quantization_config(settings.quantize, where, weights, family.keep_unquantised)
        kwargs: dict[str, Any] = {"dtype": weights, "device_map": where, "attn_implementation": family.attention}
        if quant is not None:
            kwargs["quantization_config"] = quant
        return cls(where, weights, settings.quantize, family.attention, kwargs, note)

    def describe(self) -> str:
        """``cuda, bfloat16, 4bit, attention sdpa`` — for the start-up line (with why the dtype was changed)."""
        dtype = str(self.dtype).removeprefix("torch.")
        quant = "" if self.quantize in ("none", "") else f", {self.quantize}"
        if isinstance(self.attention, dict):
            attention = ", ".join(f"{part} {kind}" for part, kind in self.attention.items())
        else:
            attention = self.attention
        note = f" ({self.note})" if self.note else ""
        return f"{self.device}, {dtype}{quant}, attention {attention}{note}"


def memory_taken(model: Any, device: str) -> str:
    """What the loaded weights take, e.g. ``7.62 GB``; on CUDA also the device's free memory after loading."""
    size = model.get_memory_footprint()
    text = f"{size / 1e9:.2f} GB of weights" if size >= 1e8 else f"{size / 1e6:.1f} MB of weights"
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        text += f" ({free / 1e9:.1f} of {total / 1e9:.1f} GB free on the GPU after loading)"
    return text


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` means the device ran out of memory."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def free_memory() -> None:
    """Collect garbage and hand cached CUDA memory back after an out-of-memory error."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
