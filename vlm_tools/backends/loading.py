"""Loading local models: read each model's family from its config, load the matching backend, skip the unavailable.

The family is read from the model's ``config.json`` (``model_type``), never guessed from its name, so a local
directory, a fine-tune under any name and a hub id all take the same path. Importing this module does not import
torch or transformers; they load inside the functions that need them.

Hub downloads report progress through huggingface_hub's tqdm bars, which write to stderr (tqdm's default;
neither huggingface_hub nor transformers points them at stdout), so the stdio MCP transport stays clean.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigurationError, ModelUnavailable
from .hub import hub_reachable, is_cached, local_files_only, looks_local, model_unavailable

if TYPE_CHECKING:
    from ..settings import Settings
    from .base import Backend

log = logging.getLogger(__name__)

MODEL_TYPES: dict[str, str] = {"paligemma": "paligemma", "molmo2": "molmo2", "molmo": "molmo"}
"""``config.model_type`` → family. Molmo 0924 remote-code checkpoints declare ``molmo``."""


def read_family(model: str, *, local_files_only: bool = False) -> str:
    """The family of ``model`` (hub id or local directory), read from its ``config.json`` ``model_type``.

    The config is read as data (``PretrainedConfig.get_config_dict``), so no repository code runs. Raises
    :class:`ModelUnavailable` when the config cannot be fetched or found, and :class:`ConfigurationError` for a
    family this server does not support.
    """
    if looks_local(model):
        directory = Path(model).expanduser()
        if not directory.is_dir():
            raise ModelUnavailable(
                f"{model} is not a directory: pass --model with a directory made by save_pretrained, or a hub id "
                "such as google/paligemma2-3b-mix-448"
            )
        if not (directory / "config.json").is_file():
            raise ModelUnavailable(
                f"{model} holds no config.json: pass a directory made by save_pretrained (model and processor)"
            )
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(model, local_files_only=local_files_only)
    except (OSError, ValueError) as error:  # hub errors arrive wrapped in OSError by transformers
        raise model_unavailable(model, error) from error
    model_type = str(config.get("model_type", ""))
    family = MODEL_TYPES.get(model_type)
    if family is None:
        supported = ", ".join(sorted(MODEL_TYPES))
        hint = ""
        if config.get("auto_map"):
            hint = " (its code lives in its repository, which this server never runs)"
        raise ConfigurationError(
            f"{model} has model_type {model_type or '(none)'!r}, which this server does not serve{hint}: "
            f"supported model types are {supported}"
        )
    return family


BACKENDS: dict[str, str] = {
    "paligemma": "vlm_tools.backends.paligemma_local:PaliGemmaBackend",
    "molmo2": "vlm_tools.backends.molmo2_local:Molmo2Backend",
}
"""family → the local backend class that serves it, imported only when a model of that family loads."""


def load_backend(model: str, settings: Settings, *, local_files_only: bool = False) -> Backend:
    """Load ``model`` as a resident backend of its family (read from its config); with ``local_files_only`` the hub
    is never asked."""
    family = read_family(model, local_files_only=local_files_only)
    target = BACKENDS.get(family)
    if target is None:  # Molmo (0924): its code lives in its repository and does not run on transformers 5
        raise ConfigurationError(
            f"{model} is a Molmo 0924 model, whose code lives in its repository and does not run on the "
            "transformers this server uses: serve it with vLLM (--trust-remote-code) and use --backend openai "
            "(see docs/remote.md), or use Molmo2"
        )
    module, _, name = target.partition(":")
    backend_class = getattr(importlib.import_module(module), name)
    return backend_class.load(model, settings, local_files_only=local_files_only)


def load_backends(settings: Settings) -> list[Backend]:
    """Load every ``settings.model``; skip the unavailable ones with a log line saying how to enable them.

    The hub is asked only when it can be reached (one quick check per process), so a machine without network fails
    in seconds. Start-up goes on as long as one model loads; each skipped model is said once. Errors that are not
    about availability (an unsupported family, quantisation without CUDA) are configuration mistakes and stop
    start-up at once.
    """
    from ..logs import route_library_logs

    route_library_logs()
    warn_if_heavy_on_cpu(settings)
    backends: list[Backend] = []
    failures: list[tuple[str, str]] = []
    for model in settings.model:
        try:
            backends.append(load_backend(model, settings, local_files_only=local_files_only(model)))
        except ModelUnavailable as error:
            failures.append((model, error.message))
    if not backends:
        raise ModelUnavailable("no model could be loaded:\n  " + "\n  ".join(message for _, message in failures))
    for model, message in failures:
        log.warning("skipping %s: %s %s", model, message, _what_is_lost(model))
    return backends


CPU_WARNING_BYTES = 8e9
"""Above this much weight memory on the CPU, start-up says what it costs and the ways out."""


def warn_if_heavy_on_cpu(settings: Settings) -> None:
    """On the CPU, warn when the configured models' weights need more than :data:`CPU_WARNING_BYTES`."""
    from .placement import resolve_device, resolve_dtype
    from .sizing import cpu_computes_bfloat16, describe, gigabytes, parameter_count, weight_bytes

    if resolve_device(settings.device) != "cpu":
        return
    dtype = str(resolve_dtype(settings.dtype, "cpu")).removeprefix("torch.")
    # Only the models that can load count: a model the hub cannot give fails at once anyway.
    loadable = [m for m in settings.model if looks_local(m) or is_cached(m) or hub_reachable()]
    counts = {m: parameter_count(m, local_files_only=local_files_only(m)) for m in loadable}
    sizes = {m: weight_bytes(n, dtype) if n else None for m, n in counts.items()}
    total = sum(size or 0 for size in sizes.values())
    if total <= CPU_WARNING_BYTES:
        return
    ways = [f"load one model (--model {settings.model[0]})" if len(settings.model) > 1 else None,
            "--dtype bfloat16 (this CPU computes in it)" if dtype == "float32" and cpu_computes_bfloat16() else None,
            "serve the model on a GPU with vLLM and use --backend openai --base-url … (docs/remote.md)"]  # fmt: skip
    log.warning(
        "no GPU: the models load on the CPU in %s and need about %s of memory (%s), and answer slowly. Ways out: %s",
        dtype, gigabytes(total), describe(sizes), "; ".join(w for w in ways if w),
    )  # fmt: skip


def _what_is_lost(model: str) -> str:
    """A hint of which tools go without the skipped model (by its usual name; a hint only, never dispatch)."""
    name = model.lower()
    if "paligemma" in name:
        return "Without it, detect (boxes) is unavailable; enable it as the message says"
    if "molmo" in name:
        return "Without it, native pointing is unavailable; enable it as the message says"
    return "Tools only it serves are unavailable until it loads"
