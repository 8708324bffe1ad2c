"""Settings: one typed, immutable object built once at start-up and passed down explicitly.

Sources, highest priority first: command-line flags, ``VLM_TOOLS_*`` environment variables, defaults. This is
the only module that reads the environment. Every field carries a description; the CLI is generated from them
(see :func:`add_arguments`), so ``vlm-tools serve --help`` documents every setting.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .families import FAMILIES, default_models

DEFAULT_MODELS = default_models()

TOOLS = ("describe_image", "answer_about_image", "point_to_object", "detect", "read_document")


def _flag(name: str, **extra: Any) -> dict[str, Any]:
    return {"flag": name, **extra}


SERVE_ONLY: dict[str, Any] = {"serve_only": True}
"""Marks a setting only a running server uses (transport, binding, shutdown): ``vlm-tools serve`` lists it, the
one-shot commands do not."""


class Settings(BaseSettings):
    """Every setting of the server. Environment variable: ``VLM_TOOLS_<FIELD NAME IN CAPITALS>``."""

    # hide_input_in_errors: a rejected setting is named, never echoed, as a Redis URL or a token may hold a secret.
    model_config = SettingsConfigDict(
        env_prefix="VLM_TOOLS_", frozen=True, extra="forbid", env_parse_none_str="", validate_default=True,
        hide_input_in_errors=True,
    )

    # --- serving ------------------------------------------------------------------------------------------
    transport: Literal["stdio", "http"] = Field(
        "stdio", description="MCP transport: stdio (for a local client) or streamable HTTP at /mcp.",
        json_schema_extra=SERVE_ONLY,
    )
    host: str = Field("127.0.0.1", description="HTTP: address to bind.", json_schema_extra=SERVE_ONLY)
    port: int = Field(
        8000, ge=0, le=65535, description="HTTP: port to bind (0 picks a free one).", json_schema_extra=SERVE_ONLY
    )
    auth_token: SecretStr | None = Field(
        None, description="HTTP: bearer token every request must carry (Authorization: Bearer …).",
        json_schema_extra=SERVE_ONLY,
    )
    allow_public_bind: bool = Field(
        False,
        description="HTTP: allow binding a non-loopback address without --auth-token (not recommended).",
        json_schema_extra=_flag("--allow-public-bind", **SERVE_ONLY),
    )
    allowed_origins: tuple[str, ...] = Field(
        (), description="HTTP: extra browser Origins allowed (repeatable), e.g. https://app.example.com.",
        json_schema_extra=SERVE_ONLY,
    )
    allowed_hosts: tuple[str, ...] = Field(
        (), description="HTTP: extra Host header values allowed (repeatable), e.g. vlm.internal:8000.",
        json_schema_extra=SERVE_ONLY,
    )

    # --- past one process: Ray Serve ------------------------------------------------------------------------
    scale: Literal["none", "ray"] = Field(
        "none", description="HTTP: one process (none), or Ray Serve (ray): an MCP ingress and one autoscaled "
        "deployment of model replicas per model.", json_schema_extra=SERVE_ONLY,
    )
    ray_address: str | None = Field(
        None, description="--scale ray: the Ray cluster to join (auto, or ray://head:10001); default: start one "
        "here.", json_schema_extra=SERVE_ONLY,
    )
    min_replicas: int = Field(
        1, ge=1, le=1000, description="--scale ray: fewest replicas per model.", json_schema_extra=SERVE_ONLY
    )
    max_replicas: int = Field(
        2, ge=1, le=1000, description="--scale ray: most replicas per model.", json_schema_extra=SERVE_ONLY
    )
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="--scale ray: requests in flight per model replica that autoscaling aims for.",
        json_schema_extra=SERVE_ONLY,
    )
    upscale_delay_s: float = Field(
        5.0, ge=0, description="--scale ray: how long the load must stay above the target before a replica is "
        "added.", json_schema_extra=SERVE_ONLY,
    )
    downscale_delay_s: float = Field(
        60.0, ge=0, description="--scale ray: how long the load must stay below the target before one is removed.",
        json_schema_extra=SERVE_ONLY,
    )
    ingress_replicas: int = Field(
        1, ge=1, le=1000, description="--scale ray: MCP ingress replicas (more than one needs --image-store "
        "redis://…).", json_schema_extra=SERVE_ONLY,
    )
    replica_gpus: float = Field(
        0.0, ge=0, description="--scale ray: GPUs per model replica (e.g. 1).", json_schema_extra=SERVE_ONLY
    )
    replica_cpus: float = Field(
        1.0, ge=0, description="--scale ray: CPUs per model replica.", json_schema_extra=SERVE_ONLY
    )

    # --- models -------------------------------------------------------------------------------------------
    backend: Literal["local", "openai"] = Field(
        "local", description="local: models resident in this process; openai: an OpenAI-compatible server (vLLM)."
    )
    model: tuple[str, ...] = Field(
        DEFAULT_MODELS,
        description="Local backend: hub id (pin a revision with id@commit) or local directory of a model "
        "(repeatable; each stays resident). The family is read from the model's config.",
    )
    device: Literal["auto", "cuda", "mps", "cpu"] = Field("auto", description="Where local models run.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype (auto: bfloat16 on GPUs that compute in it, float16 on older GPUs, float32 "
        "on the CPU and MPS; a family that overflows in float16 runs in float32 instead)."
    )
    quantize: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Quantise local models with bitsandbytes (CUDA GPUs and x86-64 CPUs)."
    )
    route: tuple[str, ...] = Field(
        (),
        description="Route a tool to a model: TOOL=MODEL (repeatable), MODEL a loaded model's name or a family name, "
        "e.g. point_to_object=/models/my-finetune.",
    )
    base_url: tuple[str, ...] = Field(
        (), description="openai backend: base URL of an inference server, e.g. http://gpu1:8000/v1 (repeatable)."
    )
    remote_model: str | None = Field(None, description="openai backend: the model name the server serves.")
    remote_family: str = Field(
        "auto", description="openai backend: model family, " + ", ".join(f.name for f in FAMILIES)
        + " (auto: read from the model name the server reports).",
    )
    api_key_env: str = Field(
        "VLM_TOOLS_API_KEY", description="openai backend: name of the environment variable holding the API key."
    )
    api_key: SecretStr | None = Field(None, description="openai backend: API key (prefer api_key_env).")
    remote_concurrency: int = Field(16, ge=1, le=1024, description="openai backend: requests in flight per server.")

    # --- inputs -------------------------------------------------------------------------------------------
    allow_path: tuple[Path, ...] = Field(
        (), description="Directory from which image and document paths may be read (repeatable; default: the "
        "working directory and the system temp directory).",
    )
    allow_urls: bool = Field(True, description="Fetch http(s) URLs (public addresses only).", json_schema_extra=_flag("--urls"))
    allow_private_urls: bool = Field(
        False, description="Also fetch from loopback and private addresses (testing only)."
    )
    max_fetch_bytes: int = Field(20_000_000, ge=1, description="Most bytes fetched from one URL.")
    fetch_timeout_s: float = Field(15.0, gt=0, description="Time limit for fetching one URL, redirects included.")
    max_inline_bytes: int = Field(20_000_000, ge=1, description="Most decoded bytes in a data: URI or base64 argument.")
    max_image_pixels: int = Field(40_000_000, ge=1, description="Most pixels in an image (checked before decoding).")
    max_file_bytes: int = Field(100_000_000, ge=1, description="Most bytes read from a local file.")
    image_store: SecretStr = Field(
        "memory",  # type: ignore[assignment]  # validated into a SecretStr: a Redis URL may carry a password
        description="Where the images behind image_ids are kept: memory (this process only) or a Redis URL, "
        "redis://[:password@]host:port/db (or rediss://), shared by every server process pointed at it.",
    )
    image_store_count: int = Field(
        256, ge=1, description="Images kept for reuse by image_id (oldest evicted first; with Redis, across every "
        "process sharing it).",
    )
    image_store_bytes: int = Field(1_000_000_000, ge=1, description="Most bytes of decoded images kept for reuse.")
    image_store_ttl_s: float = Field(
        3600.0, gt=0, description="Seconds an image stays reusable by image_id after it was sent."
    )
    encoding_cache_bytes: int = Field(
        2_000_000_000, ge=0,
        description="Most bytes (device memory) of image encodings kept for reuse by image_id (with the image's KV "
        "prefix where the model keeps one: ~180 MB per 1280x800 screenshot on a 4B model in bfloat16; with "
        "--backend openai, of the PNG data URIs sent).",
    )
    max_pages: int = Field(50, ge=1, description="Most PDF pages read in one read_document call.")
    page_long_side: int = Field(2048, ge=64, le=10_000, description="Long side in pixels of a rendered PDF page.")

    # --- engine -------------------------------------------------------------------------------------------
    max_batch_size: int = Field(8, ge=1, le=256, description="Most requests run together in one batch.")
    batch_wait_ms: float = Field(5.0, ge=0, description="How long a batch waits for more requests to join.")
    queue_size: int = Field(64, ge=1, description="Requests that may wait; past it calls get `busy` at once.")
    request_timeout_s: float = Field(120.0, gt=0, description="Time limit for one request, queue wait included.")
    drain_timeout_s: float = Field(
        30.0, ge=0, description="On shutdown, how long running requests may finish.", json_schema_extra=SERVE_ONLY
    )

    idle_unload_s: float | None = Field(
        None, gt=0, description="Free a local model's weights after this many seconds without a call (GPU memory "
        "back to the desktop); the next call loads them again, with progress. Default: never.",
        json_schema_extra=SERVE_ONLY,
    )

    max_new_tokens: int | None = Field(
        None, ge=1, le=8192, description="Cap on new tokens per request for every task (default: the per-task limits)."
    )

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level (stderr).")

    @field_validator("allow_path")
    @classmethod
    def _resolve_paths(cls, value: tuple[Path, ...]) -> tuple[Path, ...]:
        return tuple(Path(p).expanduser().resolve() for p in value)

    @field_validator("image_store")
    @classmethod
    def _check_image_store(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value().strip()
        if raw.lower() == "memory":
            return SecretStr("memory")
        redis_location(raw)  # raises ValueError naming what is wrong, never the URL's credentials
        return SecretStr(raw)

    @field_validator("remote_family")
    @classmethod
    def _check_family(cls, value: str) -> str:
        names = [f.name for f in FAMILIES]
        if value != "auto" and value not in names:
            raise ValueError(f"remote_family {value!r} must be auto or one of {', '.join(names)}")
        return value

    @field_validator("route")
    @classmethod
    def _check_routes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            tool, sep, model = item.partition("=")
            if not sep or tool not in TOOLS or not model:
                raise ValueError(f"route {item!r} must be TOOL=MODEL with TOOL one of {', '.join(TOOLS)}")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("the openai backend needs at least one --base-url")
        if self.scale == "ray":
            if self.transport != "http" or self.backend != "local":
                raise ValueError("--scale ray serves streamable HTTP over local models: --transport http, --backend "
                                 "local")
            if self.min_replicas > self.max_replicas:
                raise ValueError(f"--min-replicas {self.min_replicas} is more than --max-replicas {self.max_replicas}")
        return self

    # --- derived ------------------------------------------------------------------------------------------
    @property
    def allowed_roots(self) -> tuple[Path, ...]:
        """Directories paths may be read from: the configured ones, or the working and temp directories."""
        if self.allow_path:
            return self.allow_path
        return (Path.cwd().resolve(), Path(tempfile.gettempdir()).resolve())

    @property
    def image_store_url(self) -> str | None:
        """The Redis URL of a shared image store, or ``None`` for the in-memory one."""
        raw = self.image_store.get_secret_value()
        return None if raw == "memory" else raw

    @property
    def routes(self) -> dict[str, str]:
        """Per-tool model overrides."""
        return dict(item.split("=", 1) for item in self.route)

    def resolved_api_key(self) -> str | None:
        """The remote API key: given directly, or read from the variable named by ``api_key_env``."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        import os

        return os.environ.get(self.api_key_env) or None


def redis_location(url: str) -> str:
    """Where a Redis URL points, as ``redis://host:port/db`` without its user name or password (for messages).

    Raises:
        ValueError: for anything but a ``redis://`` or ``rediss://`` URL with a host, an optional port and an
            optional database number; the message says which part is wrong and never repeats the URL.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss") or not url.lower().startswith(scheme + "://"):
        raise ValueError("image_store must be memory or a Redis URL: redis://[:password@]host:port/db or rediss://…")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("image_store: the Redis URL's port is not a number from 0 to 65535") from None
    host = parts.hostname
    if not host:
        raise ValueError("image_store: the Redis URL names no host, e.g. redis://localhost:6379/0")
    db = parse_qs(parts.query).get("db", [parts.path.lstrip("/") or "0"])[0]
    if not db.isdigit():
        raise ValueError("image_store: the Redis database (the URL's path) must be a number, e.g. /0")
    shown_host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown_host}:{port}/{int(db)}"


# --- command line ---------------------------------------------------------------------------------------


def _flag_name(name: str, info: Any) -> str:
    extra = info.json_schema_extra or {}
    return str(extra.get("flag") or "--" + name.replace("_", "-"))


def is_serve_only(name: str) -> bool:
    """Whether setting ``name`` matters only to a running server (see :data:`SERVE_ONLY`)."""
    extra = Settings.model_fields[name].json_schema_extra
    return bool(isinstance(extra, dict) and extra.get("serve_only"))


def add_arguments(
    parser: argparse.ArgumentParser, *, serving: bool = True, only: Collection[str] | None = None
) -> None:
    """Add one flag per setting to ``parser`` (flags left out keep their environment value or default).

    ``serving=False`` leaves out the settings only a running server uses; ``only`` names the settings to offer
    (a command that reads a few of them)."""
    group = parser.add_argument_group("settings (each also from the environment as VLM_TOOLS_<NAME>)")
    for name, info in Settings.model_fields.items():
        if (not serving and is_serve_only(name)) or (only is not None and name not in only):
            continue
        flag = _flag_name(name, info)
        env = f"VLM_TOOLS_{name.upper()}"
        default_text = "" if info.default is None else f" [default: {_show(info.default)}]"
        help_text = f"{info.description}{default_text} (env {env})"
        annotation = info.annotation
        if annotation is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif str(annotation).startswith("tuple"):
            group.add_argument(flag, dest=name, action="append", default=None, metavar="VALUE", help=help_text)
        else:
            group.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=help_text)
    parser.add_argument_group()


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value) or "none"
    return str(value)


def from_arguments(args: argparse.Namespace) -> Settings:
    """Build settings from parsed flags (only those given) over the environment and defaults."""
    given = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    return Settings(**given)
