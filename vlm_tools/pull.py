"""Downloading hub models into the Hugging Face cache before they are served: how much first, then the bytes.

:func:`plan_download` asks the hub which files a model needs (those ``from_pretrained`` of a transformers
vision-language model reads: configs, safetensors weights, tokenizer and chat-template files — no second copy of
the weights in another format) and which of them the cache lacks; :func:`download` fetches the lacking ones with
huggingface_hub (``HF_TOKEN`` and ``HF_ENDPOINT`` honoured, the revision pinned), reporting bytes as they come.
A file already complete in the cache is never fetched again, so a pull that stopped half-way goes on from the
files it had finished. ``vlm-tools pull`` (:func:`run_pull`) puts both behind a command line.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .backends.hub import ModelRef, hub_reachable, is_cached, model_unavailable
from .backends.sizing import human_bytes
from .errors import ModelUnavailable, VlmToolsError

ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "tokenizer*", "*.tiktoken")
"""Files ``from_pretrained`` reads for a model and its processor: configs (model, generation, processor,
tokenizer), safetensors weights and their index, chat templates, tokenizer vocabularies."""

IGNORE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.onnx", "*.gguf", "*.ot", "original/*",
                   "onnx/*")  # fmt: skip
"""The same weights in other formats (PyTorch pickles, TensorFlow, Flax, ONNX, GGUF) and the original training
checkpoints some repositories carry beside the transformers ones: never read when safetensors are there."""

BytesCallback = Callable[[int, int], None]
"""``on_bytes(done, total)``: bytes fetched so far and bytes to fetch in all, called as the download goes."""


@dataclass(frozen=True)
class PlannedFile:
    """One file of a model on the hub: its path in the repository, its size, and whether the cache has it."""

    name: str
    size: int | None
    cached: bool


@dataclass(frozen=True)
class DownloadPlan:
    """What pulling one hub model at one commit takes."""

    model: ModelRef
    commit: str
    files: tuple[PlannedFile, ...]

    @property
    def missing(self) -> tuple[PlannedFile, ...]:
        """The files the cache lacks, smallest first (a gated or broken repository then fails on a small file)."""
        return tuple(sorted((f for f in self.files if not f.cached), key=lambda f: (f.size or 0, f.name)))

    @property
    def total_bytes(self) -> int:
        """Bytes of every file the model needs (files of unknown size left out)."""
        return sum(f.size or 0 for f in self.files)

    @property
    def missing_bytes(self) -> int:
        """Bytes still to download (files of unknown size left out)."""
        return sum(f.size or 0 for f in self.missing)

    @property
    def unknown_sizes(self) -> int:
        """How many missing files the hub gave no size for."""
        return sum(1 for f in self.missing if f.size is None)


def _hub_errors() -> tuple[type[BaseException], ...]:
    """The errors a hub call raises when the hub says no or cannot be reached: the hub's own (``OSError``
    subclasses), bad arguments (``ValueError``), and its HTTP library's transport errors."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    for library in ("httpx2", "httpx"):  # huggingface_hub 2 speaks httpx2, 1.x httpx
        try:
            errors.append(__import__(library).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def plan_download(ref: ModelRef) -> DownloadPlan:
    """Ask the hub which files ``ref`` needs at its revision and which of them the cache lacks.

    Raises :class:`ModelUnavailable` (gated, not found, no such revision, hub out of reach) with what to do.
    """
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.utils import filter_repo_objects

    try:
        info = HfApi().model_info(ref.model_id, revision=ref.revision, files_metadata=True, timeout=30)
    except _hub_errors() as error:
        raise model_unavailable(str(ref), error) from error
    if not info.sha:
        raise ModelUnavailable(f"{ref}: the hub gave no commit for it; try again, or pin one with "
                               f"{ref.model_id}@<commit>")  # fmt: skip
    siblings = {s.rfilename: s for s in info.siblings or ()}
    names = filter_repo_objects(sorted(siblings), allow_patterns=list(ALLOW_PATTERNS),
                                ignore_patterns=list(IGNORE_PATTERNS))  # fmt: skip
    files = []
    for name in names:
        sibling = siblings[name]
        size = sibling.lfs.size if sibling.lfs is not None else sibling.size
        cached = isinstance(try_to_load_from_cache(ref.model_id, name, revision=info.sha), str)
        files.append(PlannedFile(name, size, cached))
    if not any(f.name == "config.json" for f in files):
        raise ModelUnavailable(f"{ref} has no config.json on the hub: it is not a transformers model this server "
                               "can load")  # fmt: skip
    return DownloadPlan(ref, info.sha, tuple(files))


def download(ref: ModelRef, plan: DownloadPlan, on_bytes: BytesCallback | None = None) -> Path:
    """Fetch the files of ``plan`` the cache lacks, at the plan's commit; returns the snapshot directory.

    Progress goes to stderr as huggingface_hub's bars (on a terminal) and, when given, to ``on_bytes(done,
    total)``. The revision's name (``main``, a tag) is recorded in the cache afterwards, so the model then loads
    offline by its plain id. Raises :class:`ModelUnavailable` with what to do when the hub refuses or fails.
    """
    from huggingface_hub import hf_hub_download

    counter = _ByteCounter(plan.missing_bytes, on_bytes)
    bar = counter.bar_class()
    try:
        for file in plan.missing:
            path = hf_hub_download(ref.model_id, file.name, revision=plan.commit, tqdm_class=bar)
        # Fetching a cached file by the revision's name costs one HEAD and writes refs/<revision> -> commit.
        first = plan.files[0].name
        path = hf_hub_download(ref.model_id, first, revision=ref.revision)
    except _hub_errors() as error:
        raise model_unavailable(str(ref), error) from error
    snapshot = Path(path).parents[len(Path(first).parts) - 1]
    if snapshot.name != plan.commit:
        raise ModelUnavailable(f"{ref}: the hub moved {ref.revision or 'main'} to commit {snapshot.name} during the "
                               f"pull (planned at {plan.commit}); run vlm-tools pull again")  # fmt: skip
    counter.finish()
    return snapshot


class _ByteCounter:
    """Sums the bytes every per-file progress bar reports, for one ``on_bytes`` callback (thread-safe: the xet
    downloader reports from its own threads)."""

    def __init__(self, total: int, on_bytes: BytesCallback | None) -> None:
        self.total, self.done, self.on_bytes = total, 0, on_bytes
        self.lock = threading.Lock()

    def add(self, count: float | None) -> None:
        if not count:
            return
        with self.lock:
            self.done += int(count)
            done = self.done
        if self.on_bytes is not None:
            self.on_bytes(done, self.total)

    def finish(self) -> None:
        """Report the end once more (files resumed by huggingface_hub may have reported less than their size)."""
        if self.on_bytes is not None:
            self.on_bytes(self.total, self.total)

    def bar_class(self) -> type:
        """A subclass of huggingface_hub's progress bar that also counts into this counter."""
        from huggingface_hub.utils.tqdm import tqdm as hub_tqdm

        counter = self

        class CountingBar(hub_tqdm):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                counter.add(kwargs.get("initial") or 0)  # bytes a resumed file already had

            def update(self, n: float | None = 1) -> bool | None:
                counter.add(n)
                return super().update(n)

        return CountingBar


# --- the command line ------------------------------------------------------------------------------------------


def run_pull(models: Sequence[str]) -> int:
    """``vlm-tools pull``: plan and download each model, saying first how much; 0 when every model is in the cache
    afterwards, 2 (with what to do) when one could not be pulled. Stops at once when the hub cannot be reached."""
    refs = [ModelRef.parse(model) for model in models]
    hub = [ref for ref in refs if not ref.is_local]
    if hub and not hub_reachable():
        raise ModelUnavailable("nothing could be pulled:\n  " + "\n  ".join(_unreachable(str(r)) for r in hub))
    failures = []
    for ref in refs:
        try:
            _pull_one(ref)
        except VlmToolsError as error:
            failures.append(error.message)
            _say(f"{ref}: not pulled")
    if failures:
        raise ModelUnavailable("not every model could be pulled:\n  " + "\n  ".join(failures))
    return 0


def _pull_one(ref: ModelRef) -> None:
    if ref.is_local:
        directory = Path(ref.model_id).expanduser()
        if not (directory / "config.json").is_file():
            raise ModelUnavailable(f"{ref} is a local path without a config.json: pass a directory made by "
                                   "save_pretrained, or a hub id (org/name)")  # fmt: skip
        _say(f"{ref}: a local directory; nothing to pull")
        return
    plan = plan_download(ref)
    _say(plan_line(plan))
    _check_disk(plan)
    progress = _ProgressLines(str(ref)) if plan.missing and not sys.stderr.isatty() else None
    snapshot = download(ref, plan, on_bytes=progress)
    what = f"pulled {human_bytes(plan.missing_bytes)}" if plan.missing else "already in the cache"
    _say(f"{ref}: {what}; commit {plan.commit} in {snapshot}")


def plan_line(plan: DownloadPlan) -> str:
    """``org/name@main (commit 1a2b3c4): 12 files, 9.7 GB; will download 9.7 GB (12 files)`` — what a pull takes."""
    from huggingface_hub import constants

    revision = plan.model.revision or "main"
    head = f"{plan.model.model_id}@{revision} (commit {plan.commit[:7]}): {_files(len(plan.files))}, " \
           f"{human_bytes(plan.total_bytes)}"  # fmt: skip
    if not plan.missing:
        return f"{head}; will download 0 bytes: every file is in the cache"
    unknown = f" and {plan.unknown_sizes} of unknown size" if plan.unknown_sizes else ""
    return (f"{head}; will download {human_bytes(plan.missing_bytes)} ({plan.missing_bytes} bytes, "
            f"{_files(len(plan.missing))}{unknown}) into {constants.HF_HUB_CACHE}")  # fmt: skip


def _files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


def _check_disk(plan: DownloadPlan) -> None:
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    existing = next((p for p in (cache, *cache.parents) if p.exists()), None)
    if existing is None or not plan.missing:
        return
    free = shutil.disk_usage(existing).free
    if plan.missing_bytes > free:
        raise ModelUnavailable(f"{plan.model} needs {human_bytes(plan.missing_bytes)} in {cache} and "
                               f"{human_bytes(free)} is free there: free some space, or set HF_HOME to a bigger "
                               "disk")  # fmt: skip


def _unreachable(model: str) -> str:
    if is_cached(model):
        return (f"{model}: the hub cannot be reached from here, so whether its cached files are complete cannot be "
                "checked; they load without the hub (HF_HUB_OFFLINE=1)")  # fmt: skip
    return model_unavailable(model, ConnectionError("the hub cannot be reached")).message


class _ProgressLines:
    """``on_bytes`` for a stderr that is not a terminal (huggingface_hub's bars are off there): a line at most
    every few seconds, and one at the end."""

    def __init__(self, name: str, every_s: float = 5.0) -> None:
        self.name, self.every_s, self.last, self.ended = name, every_s, 0.0, False

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.ended or (done < total and now - self.last < self.every_s):
            return
        self.last, self.ended = now, done >= total
        share = f" ({100 * done / total:.0f} %)" if total else ""
        print(f"{self.name}: {human_bytes(done)} of {human_bytes(total)}{share}", file=sys.stderr, flush=True)


def _say(line: str) -> None:
    print(line, flush=True)
