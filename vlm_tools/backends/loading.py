"""Loading local models: read each model's family from its config, load that family's backend, skip the unavailable.

The family is read from the model's ``config.json`` (``model_type``), never guessed from its name, so a local
directory, a fine-tune under any name and a hub id all take the same path. Importing this module does not import
torch or transformers; they load inside the functions that need them.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigurationError, ModelUnavailable
from ..families import FAMILIES, family_for_model_type, family_from_name
from .hub import ModelRef, hub_reachable, is_cached, local_files_only, model_unavailable

if TYPE_CHECKING:
    from ..families.base import Family
    from ..settings import Settings
    from .base import Backend
    from .resident import ResidentModel

log = logging.getLogger(__name__)


def read_config(ref: ModelRef, *, local_files_only: bool = False) -> dict:
    """The model's ``config.json`` as data (no repository code runs): from its directory, the hub cache, or the hub.

    Raises :class:`ModelUnavailable` when it cannot be had.
    """
    if ref.is_local:
        directory = Path(ref.model_id).expanduser()
        if not directory.is_dir():
            raise ModelUnavailable(f"{ref} is not a directory: pass --model with a directory made by save_pretrained, "
                                   "or a hub id (org/name)")  # fmt: skip
        path = directory / "config.json"
        if not path.is_file():
            raise ModelUnavailable(f"{ref} holds no config.json: pass a directory made by save_pretrained (model and "
                                   "processor)")  # fmt: skip
        return _json(path, ref)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(ref.model_id, "config.json", revision=ref.revision, local_files_only=local_files_only)
    except (OSError, HfHubHTTPError, LocalEntryNotFoundError, ValueError) as error:
        raise model_unavailable(str(ref), error) from error
    return _json(Path(path), ref)


def _json(path: Path, ref: ModelRef) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelUnavailable(f"{ref}: its config.json cannot be read ({error})") from error
    if not isinstance(data, dict):
        raise ModelUnavailable(f"{ref}: its config.json is not a JSON object")
    return data


def read_family(model: str, *, local_files_only: bool = False) -> Family:
    """The family of ``model`` (hub id, ``id@revision`` or local directory), read from its ``config.json``.

    Raises :class:`ModelUnavailable` when the config cannot be had, :class:`ConfigurationError` for a family this
    server does not serve.
    """
    ref = ModelRef.parse(model)
    config = read_config(ref, local_files_only=local_files_only)
    model_type = str(config.get("model_type", ""))
    family = family_for_model_type(model_type)
    if family is None:
        supported = ", ".join(sorted(t for f in FAMILIES for t in f.model_types))
        hint = " (its code lives in its repository, which this server never runs)" if config.get("auto_map") else ""
        raise ConfigurationError(f"{model} has model_type {model_type or '(none)'!r}, which this server does not "
                                 f"serve{hint}: supported model types are {supported}")  # fmt: skip
    return family


def local_backend_class(family: Family, model: str) -> type[Backend]:
    """The in-process backend class of ``family`` (imported now); :class:`ConfigurationError` when it has none."""
    if family.local_backend is None:
        raise ConfigurationError(f"{model} {family.not_local}")
    module, _, name = family.local_backend.partition(":")
    return getattr(importlib.import_module(module), name)


def load_backend(model: str, settings: Settings, *, local_files_only: bool = False) -> Backend:
    """Load ``model`` as a resident backend of its family (read from its config); with ``local_files_only`` the hub
    is never asked.

    Hub downloads report progress on stderr (tqdm's default), so the stdio MCP transport stays clean.
    """
    family = read_family(model, local_files_only=local_files_only)
    backend_class = local_backend_class(family, model)
    return backend_class.load(model, family, settings, local_files_only=local_files_only)  # type: ignore[attr-defined]


def prepare_models(settings: Settings) -> list[ResidentModel]:
    """Every ``settings.model`` known by its family (read from its config) and ready to load in the background;
    no weights are read and neither torch nor transformers is imported, so the server can answer clients at once.

    What can fail fast fails here: a model the hub cannot give is skipped with a line saying how to enable it,
    and when none is left :class:`ModelUnavailable` lists them all; a family that cannot run in process, or a
    quantisation this machine cannot run, is a :class:`ConfigurationError`. The hub is asked only when it can be
    reached (one quick check per process), so a machine without network fails in seconds.
    """
    from .resident import ResidentModel

    if settings.quantize != "none" and settings.device in ("cpu", "mps"):
        _check_quantization(settings.quantize, settings.device)
    models: list[ResidentModel] = []
    failures: list[tuple[str, str]] = []
    for model in settings.model:
        only_local = local_files_only(model)
        try:
            family = read_family(model, local_files_only=only_local)
        except ModelUnavailable as error:
            failures.append((model, error.message))
            continue
        if family.local_backend is None:
            raise ConfigurationError(f"{model} {family.not_local}")
        models.append(ResidentModel.local(model, family, settings, local_files_only=only_local))
    if not models:
        raise ModelUnavailable("no model could be loaded:\n  " + "\n  ".join(message for _, message in failures))
    for model, message in failures:
        log.warning("skipping %s: %s %s", model, message, what_is_lost(model))
    return models


def before_loading(settings: Settings) -> None:
    """What runs once before the first weights load (on the loading thread): the libraries' logs routed to ours,
    and the memory warning on the CPU."""
    from ..logs import route_library_logs

    route_library_logs()
    warn_if_heavy_on_cpu(settings)


def _check_quantization(quantize: str, device: str) -> None:
    from .quantization import quantization_support

    why_not = quantization_support(device)
    if why_not is not None:
        raise ConfigurationError(f"--quantize {quantize} cannot run here: {why_not}")


CPU_WARNING_BYTES = 8e9
"""Above this much weight memory on the CPU, start-up says what it costs and the ways out."""


def warn_if_heavy_on_cpu(settings: Settings) -> None:
    """On the CPU, warn when the configured models' weights need more than :data:`CPU_WARNING_BYTES`."""
    from .placement import resolve_device, resolve_dtype
    from .sizing import count_weights, cpu_computes_bfloat16, describe, gigabytes, weights_bytes

    if resolve_device(settings.device) != "cpu":
        return
    dtype = str(resolve_dtype(settings.dtype, "cpu")).removeprefix("torch.")
    precision = settings.quantize if settings.quantize != "none" else dtype
    # Only the models that can load count: a model the hub cannot give fails at once anyway.
    loadable = [m for m in settings.model if ModelRef.parse(m).is_local or is_cached(m) or hub_reachable()]
    counts = {m: count_weights(m, local_files_only=local_files_only(m)) for m in loadable}
    sizes = {m: weights_bytes(n, dtype, settings.quantize) if n else None for m, n in counts.items()}
    total = sum(size or 0 for size in sizes.values())
    if total <= CPU_WARNING_BYTES:
        return
    ways = [f"load one model (--model {settings.model[0]})" if len(settings.model) > 1 else None,
            "--quantize 4bit (bitsandbytes runs it on x86-64 CPUs)" if settings.quantize == "none" else None,
            "--dtype bfloat16 (this CPU computes in it)" if dtype == "float32" and cpu_computes_bfloat16() else None,
            "serve the model on a GPU with vLLM and use --backend openai --base-url … (docs/remote.md)"]  # fmt: skip
    log.warning(
        "no GPU: the models load on the CPU in %s and need about %s of memory (%s), and answer slowly. Ways out: %s",
        precision, gigabytes(total), describe(sizes), "; ".join(w for w in ways if w),
    )  # fmt: skip


def what_is_lost(model: str) -> str:
    """Which tools go without a model that did not load, by the family its name says (a hint, never dispatch)."""
    family = family_from_name(model)
    if family is None or not family.without_it:
        return "Tools only it serves are unavailable until it loads"
    return f"Without it, {family.without_it}; enable it as the message says"
