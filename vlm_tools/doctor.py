"""``vlm-tools doctor``: what this machine has for serving, in one report a user can paste into a bug report.

Python and the packages that matter (torch with its CUDA build and devices, transformers, mcp, bitsandbytes), the
Hugging Face hub (reachable, offline mode, cache), each configured model (cached, gated and whether a token is
set, the revision pinned, its family, the memory its weights need at the dtype and quantisation that would be
chosen, and for a Molmo2 whose processor files are here its serving path), whether the models fit together in the
memory they would load into — with the ways out when they do not — the inputs (URL fetching, allowed paths) and
Chromium for the web-automation example. It reports and exits 0 even when things are missing; ``--json`` prints
the same report for machines. Nothing is downloaded and no weights are loaded.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .settings import Settings

if TYPE_CHECKING:
    from .families.base import Family


def run_doctor(settings: Settings, *, as_json: bool = False) -> int:
    """Print the report (text, or JSON with ``as_json``); always 0."""
    report = build_report(settings)
    print(json.dumps(report, indent=2) if as_json else render(report))
    return 0


def build_report(settings: Settings) -> dict[str, Any]:
    """The whole report as plain data."""
    from .logs import route_library_logs

    route_library_logs()
    device = _device(settings)
    bnb = _bitsandbytes(str(device["chosen"]["device"]))
    if settings.backend == "local":
        models, memory = _models(settings, device, bnb)
    else:
        models, memory = _remote(settings), {"verdict": "the models run on the inference servers (--backend openai)"}
    return {
        "vlm_tools": __version__,
        "python": {"version": platform.python_version(), "executable": sys.executable, "platform": platform.platform()},
        "packages": {name: _version(name) for name in ("torch", "torchvision", "transformers", "mcp", "pillow",
                                                       "pypdfium2", "httpx", "playwright")},  # fmt: skip
        "bitsandbytes": bnb,
        "device": device,
        "hub": _hub(),
        "models": models,
        "memory": memory,
        "inputs": {
            "urls": "fetched (public addresses only)" if settings.allow_urls else "not fetched (--no-urls)",
            "private_urls": settings.allow_private_urls,
            "allowed_paths": [{"path": str(p), "exists": p.is_dir()} for p in dict.fromkeys(settings.allowed_roots)],
            "max_image_pixels": settings.max_image_pixels,
        },
        "browser": _chromium(),
    }


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device(settings: Settings) -> dict[str, Any]:
    import torch

    from .backends.placement import resolve_device, resolve_dtype
    from .backends.sizing import cpu_computes_bfloat16
    from .errors import ConfigurationError

    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            major, minor = torch.cuda.get_device_capability(index)
            gpus.append({"name": torch.cuda.get_device_name(index), "memory_gb": round(total / 1e9, 1),
                         "free_gb": round(free / 1e9, 1), "compute_capability": f"{major}.{minor}"})  # fmt: skip
    try:
        chosen = resolve_device(settings.device)
        dtype = str(resolve_dtype(settings.dtype, chosen)).removeprefix("torch.")
    except ConfigurationError as error:
        chosen, dtype = f"unavailable: {error.message}", None
    return {
        "cuda": {"available": torch.cuda.is_available(), "torch_cuda_build": torch.version.cuda, "gpus": gpus},
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "cpu": {"cores": os.cpu_count(), "bfloat16_arithmetic": cpu_computes_bfloat16()},
        "chosen": {"device": chosen, "dtype": dtype, "quantize": settings.quantize},
    }


def _bitsandbytes(device: str) -> dict[str, Any]:
    version = _version("bitsandbytes")
    if version is None:
        return {"installed": False, "usable": False, "note": "pip install 'vlm-tools[quantize]' for --quantize"}
    from .backends.placement import quantization_support

    why_not = quantization_support(device)
    if why_not is not None:
        return {"installed": version, "usable": False, "note": why_not}
    try:
        import bitsandbytes  # noqa: F401
    except Exception as error:  # a broken native library surfaces as any kind of error
        return {"installed": version, "usable": False, "note": f"import fails: {type(error).__name__}: {error}"}
    return {"installed": version, "usable": True, "on": device}


def _hub() -> dict[str, Any]:
    from huggingface_hub import constants, get_token

    from .backends.hub import hub_reachable

    return {
        "endpoint": constants.ENDPOINT,
        "offline_mode": constants.is_offline_mode(),
        "reachable": hub_reachable(),
        "cache": constants.HF_HUB_CACHE,
        "token_set": get_token() is not None,
    }


def _models(settings: Settings, device: dict[str, Any], bnb: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Each configured model (where it comes from, its revision and family, its weights at the precision it would
    run in, whether it fits, Molmo2's serving path), then whether they fit together and the ways out."""
    from .backends.sizing import count_weights, gpus_free, ram_available
    from .memory_fit import fits_alone, judge, memory_for, size_model

    chosen = device["chosen"]["device"]
    where = chosen if chosen in ("cpu", "cuda", "mps") else None
    memory = memory_for(where, ram_available(), gpus_free()) if where else None
    entries, sizes = [], []
    for model in settings.model:
        entry = _model_source(model)
        family, entry["family"] = _family(model)
        count = count_weights(model, local_files_only=_local_files_only(model))
        size = size_model(model, family, count, settings, where)
        entry["parameters"] = count.total if count else None
        if size.bytes is not None:
            entry["weights_gb"] = round(size.bytes / 1e9, 1)
            entry["at"] = settings.quantize if settings.quantize != "none" else size.dtype
            if settings.quantize != "none":
                entry["unquantised_in"] = size.dtype
        if size.dtype_note:
            entry["dtype_note"] = size.dtype_note
        if settings.quantize != "4bit" and size.bytes_at("4bit") is not None:
            entry["weights_gb_at_4bit"] = round((size.bytes_at("4bit") or 0) / 1e9, 1)
        if memory is not None:
            entry["fits"] = fits_alone(size, memory)
        if family is not None and family.probed_at_load:
            entry["serving_path"] = _serving_path(model, family, entry["available"])
        entries.append(entry)
        sizes.append(size)
    fit = judge(sizes, memory, settings, quantizable=bool(bnb.get("usable"))) if memory else {
        "verdict": f"unknown: no device ({chosen})"}  # fmt: skip
    return entries, fit


def _local_files_only(model: str) -> bool:
    from .backends.hub import local_files_only

    return local_files_only(model)


def _model_source(model: str) -> dict[str, Any]:
    """Where ``model`` comes from: a local directory, or the hub (cached, gated, token, revision)."""
    from huggingface_hub import get_token

    from .backends.hub import ModelRef, hub_reachable, is_cached

    entry: dict[str, Any] = {"model": model}
    ref = ModelRef.parse(model)
    if ref.is_local:
        entry["source"] = "local directory"
        entry["available"] = (Path(model).expanduser() / "config.json").is_file()
        return entry
    entry["source"] = "hub"
    entry["revision"] = ref.revision or "main (not pinned: pin one with --model id@<commit>)"
    entry["available"] = cached = is_cached(model)
    entry["cached"] = cached
    entry["gated"] = _gated(ref.model_id) if hub_reachable() else _gated_by_family(ref.model_id)
    entry["token_set"] = get_token() is not None
    return entry


def _family(model: str) -> tuple[Family | None, str]:
    """``model``'s family and how it is known: from its config.json when it is here, else by its name."""
    from .backends.hub import ModelRef
    from .backends.loading import read_family
    from .errors import ConfigurationError, ModelUnavailable
    from .families import family_from_name

    try:
        family = read_family(model, local_files_only=True)
    except ModelUnavailable:  # (a ConfigurationError too: caught first)
        family = family_from_name(ModelRef.parse(model).model_id)
        if family is None:
            return None, "unknown until its config.json is here (vlm-tools pull)"
        return family, f"{family.title} (by its name; its config.json is not here yet)"
    except ConfigurationError as error:  # a family this server does not serve
        return None, error.message
    return family, f"{family.title} (from its config.json)"


def _serving_path(model: str, family: Any, available: bool) -> str:
    """How the family's backend will lay this checkpoint's prompts out, probed from its processor files when they are
    here (its family says how); no weights are read."""
    from .backends.hub import ModelRef

    if not available:
        return "known at load (its processor files are not here)"
    ref = ModelRef.parse(model)
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(ref.model_id, local_files_only=True, **ref.pretrained_kwargs)
        return family.serving_path(processor)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"known at load (its processor cannot be read here: {type(error).__name__}: {error})"


def _gated_by_family(model: str) -> str:
    """What the model's family says of its gating, for when the hub cannot be asked."""
    from .families import family_from_name

    family = family_from_name(model)
    if family is None:
        return "unknown (the hub cannot be asked)"
    return f"yes (every {family.title} checkpoint is)" if family.gated else f"no ({family.title} checkpoints are open)"


def _gated(model: str) -> str:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        gated = HfApi().model_info(model, timeout=5).gated
    except (HfHubHTTPError, OSError) as error:
        return f"unknown ({type(error).__name__})"
    return "no" if not gated else f"yes ({gated})"


def _remote(settings: Settings) -> list[dict[str, Any]]:
    from .backends.remote import probe
    from .errors import ConfigurationError

    servers = []
    for url in settings.base_url:
        try:
            listed = probe(url, settings.resolved_api_key())
            servers.append({"server": url, "reachable": True, "models": [
                {"id": m["id"], "max_model_len": m.get("max_model_len")} for m in listed]})  # fmt: skip
        except (ConnectionError, ConfigurationError) as error:
            servers.append({"server": url, "reachable": False, "error": str(error)})
    return servers


def _chromium() -> dict[str, Any]:
    path = os.environ.get("VLM_TOOLS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        return {"chromium": None, "note": "for examples/web_automation.py: apt-get install chromium"}
    try:
        shown = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        shown = f"does not run: {error}"
    return {"chromium": path, "version": shown}


def render(report: dict[str, Any]) -> str:
    """The report as indented ``key: value`` lines, one section per top-level key."""
    lines = [f"vlm-tools {report['vlm_tools']}"]
    for section, value in report.items():
        if section == "vlm_tools":
            continue
        lines.append(f"{section}:")
        lines.extend(_lines(value, "  "))
    return "\n".join(lines)


def _lines(value: Any, indent: str) -> list[str]:
    if isinstance(value, dict):
        out = []
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                out.append(f"{indent}{key}:")
                out.extend(_lines(item, indent + "  "))
            else:
                out.append(f"{indent}{key}: {_show(item)}")
        return out
    if isinstance(value, list):
        out = []
        for item in value:
            rows = _lines(item, indent + "  ")
            out.append(f"{indent}- {rows[0].strip()}" if rows else f"{indent}-")
            out.extend(rows[1:])
        return out
    return [f"{indent}{_show(value)}"]


def _show(value: Any) -> str:
    if value is None:
        return "—"
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if value == [] or value == {}:
        return "none"
    return str(value)
