"""Whether the configured models fit in this machine's memory, and the ways out when they do not.

Each model's weights are sized at the dtype it would run in (its family may move it to float32) and under the
configured quantisation (:mod:`~vlm_tools.backends.sizing`), then held against the memory of the device they load
on: free RAM on the CPU and MPS (one memory), the first GPU's free memory on CUDA (``device_map="cuda"`` puts
every model there). Every model stays resident, so they must fit together. Nothing here loads weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .backends.sizing import WeightCount, human_bytes, weight_bytes, weights_bytes

if TYPE_CHECKING:
    from .families.base import Family
    from .settings import Settings

REMOTE_WAY_OUT = ("run the models on a GPU machine with vLLM and point this server at it: --backend openai "
                  "--base-url http://gpu1:8000/v1 (docs/remote.md)")  # fmt: skip


@dataclass(frozen=True)
class ModelSize:
    """One model's weights at the precision it would run in."""

    model: str
    family: Family | None
    count: WeightCount | None
    dtype: str | None
    """The dtype its weights (or, quantised, the layers left unquantised) would be in; ``None``: no device."""
    dtype_note: str | None = None
    """Why its dtype is not the one chosen for the device (a family unstable in it)."""
    quantize: str = "none"

    def bytes_at(self, quantize: str) -> int | None:
        """Bytes of its weights under ``quantize`` (``none``, ``4bit``, ``8bit``); ``None`` when not known."""
        if self.count is None or self.dtype is None:
            return None
        return weights_bytes(self.count, self.dtype, quantize)

    @property
    def bytes(self) -> int | None:
        """Bytes of its weights as configured."""
        return self.bytes_at(self.quantize)


def size_model(model: str, family: Family | None, count: WeightCount | None, settings: Settings,
               device: str | None) -> ModelSize:  # fmt: skip
    """Size ``model`` (of ``family``, counted as ``count``) for ``device`` under the settings' dtype and
    quantisation; ``device`` ``None`` when none can be chosen."""
    if device is None:
        return ModelSize(model, family, count, None, None, settings.quantize)
    from .backends.placement import family_dtype, resolve_dtype

    if family is not None:
        dtype, note = family_dtype(family, settings.dtype, device)
    else:
        dtype, note = resolve_dtype(settings.dtype, device), None
    return ModelSize(model, family, count, str(dtype).removeprefix("torch."), note, settings.quantize)


@dataclass(frozen=True)
class Memory:
    """The memory the models would load into: ``where`` in words and its free bytes, and every GPU's."""

    device: str
    where: str
    free: int
    gpus: Sequence[tuple[str, int]] = ()


def memory_for(device: str, ram_free: int, gpus: Sequence[tuple[str, int]]) -> Memory:
    """Where ``device``'s models go: the first GPU on CUDA, RAM on the CPU and MPS (unified memory)."""
    if device == "cuda" and gpus:
        return Memory(device, gpus[0][0], gpus[0][1], gpus)
    return Memory(device, "RAM", ram_free, gpus)


def fits_alone(size: ModelSize, memory: Memory) -> str:
    """``yes (19.4 of 120.3 GB of RAM free)`` / ``no (…)`` / ``unknown (…)`` for one model."""
    need = size.bytes
    if need is None:
        return "unknown (its size is known once its config is here)"
    word = "yes" if need <= memory.free else "no"
    return f"{word} ({human_bytes(need)}; {human_bytes(memory.free)} of {memory.where} free)"


def judge(sizes: Sequence[ModelSize], memory: Memory, settings: Settings, *, quantizable: bool) -> dict[str, Any]:
    """The memory verdict for every model together, with the ways out when they do not fit. ``quantizable``:
    whether bitsandbytes can run here (said beside the quantisation way out)."""
    needs = [s.bytes for s in sizes]
    report: dict[str, Any] = {"loads_on": memory.where, "free_gb": round(memory.free / 1e9, 1)}
    if memory.gpus:
        report["gpus"] = [{"gpu": name, "free_gb": round(free / 1e9, 1)} for name, free in memory.gpus]
    unknown = [s.model for s, need in zip(sizes, needs, strict=True) if need is None]
    if unknown:
        report["fits"] = None
        report["verdict"] = (f"unknown: the size of {', '.join(unknown)} is known once its config is here "
                             f"(vlm-tools pull {' '.join(unknown)})")  # fmt: skip
        return report
    total = sum(need or 0 for need in needs)
    report["needs_gb"] = round(total / 1e9, 1)
    report["fits"] = total <= memory.free
    if report["fits"]:
        left = memory.free - total
        report["verdict"] = (f"fits: the weights take {human_bytes(total)} of the {human_bytes(memory.free)} of "
                             f"{memory.where} free, leaving {human_bytes(left)} for the work (kept image encodings "
                             f"take up to {human_bytes(settings.encoding_cache_bytes)})")  # fmt: skip
        return report
    report["verdict"] = (f"does not fit: the weights take {human_bytes(total)} and {human_bytes(memory.free)} of "
                         f"{memory.where} is free")  # fmt: skip
    report["ways_out"] = ways_out(sizes, memory, settings, quantizable=quantizable)
    return report


def ways_out(sizes: Sequence[ModelSize], memory: Memory, settings: Settings, *, quantizable: bool) -> list[str]:
    """What to do when the models do not fit, each with the size it comes to."""
    ways = []
    if settings.quantize != "4bit":
        ways.append(_quantise(sizes, memory, quantizable))
    if len(sizes) > 1:
        ways.extend(f"load one model: --model {s.model} ({human_bytes(s.bytes or 0)})" for s in sizes
                    if (s.bytes or 0) <= memory.free)  # fmt: skip
    ways.extend(_smaller_checkpoints(sizes))
    ways.extend(_other_gpus(sum(s.bytes or 0 for s in sizes), memory))
    from .backends.sizing import cpu_computes_bfloat16

    if memory.device == "cpu" and settings.dtype == "auto" and cpu_computes_bfloat16():
        ways.append("--dtype bfloat16 (this CPU computes in it): half of float32")
    ways.append(REMOTE_WAY_OUT)
    return ways


def _quantise(sizes: Sequence[ModelSize], memory: Memory, quantizable: bool) -> str:
    at_4bit = [s.bytes_at("4bit") for s in sizes]
    if any(size is None for size in at_4bit):
        text = "--quantize 4bit (bitsandbytes): the size it comes to is known once every config is here"
    else:
        total = sum(size or 0 for size in at_4bit)
        each = ", ".join(f"{s.model} {human_bytes(size or 0)}" for s, size in zip(sizes, at_4bit, strict=True))
        verdict = "fits" if total <= memory.free else "still more than is free"
        text = f"--quantize 4bit (bitsandbytes): {human_bytes(total)} in all ({each}): {verdict}"
    return text if quantizable else text + " — bitsandbytes cannot run here yet (see bitsandbytes above)"


def _other_gpus(total: int, memory: Memory) -> list[str]:
    """GPUs the models would fit on: another CUDA device, or a GPU at all when ``--device cpu`` was asked for."""
    if memory.device == "cuda":
        return [f"another GPU: CUDA_VISIBLE_DEVICES={name.split()[0].removeprefix('cuda:')} ({human_bytes(free)} free "
                "there)" for name, free in memory.gpus[1:] if free >= total]  # fmt: skip
    if memory.gpus and memory.gpus[0][1] >= total:
        return [f"--device cuda: {memory.gpus[0][0]} has {human_bytes(memory.gpus[0][1])} free"]
    return []


def _smaller_checkpoints(sizes: Sequence[ModelSize]) -> list[str]:
    ways = []
    for size in sizes:
        if size.family is None or size.count is None or size.dtype is None:
            continue
        for checkpoint in size.family.checkpoints:
            if checkpoint.parameters < size.count.total:
                ways.append(f"a smaller {size.family.title} checkpoint: --model {checkpoint.model_id} "
                            f"({human_bytes(weight_bytes(checkpoint.parameters, size.dtype))})")  # fmt: skip
    return ways
