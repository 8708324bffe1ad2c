"""What each tool costs on a GPU, with no download: random-weight models built from the real checkpoints' configs.

For each family the model is made from its published ``config.json`` (``allenai/Molmo2-4B``;
``google/paligemma2-3b-mix-448``, both in ``vlm_tools/testing/hub/``) with random weights: the real compute and
memory, nonsense answers. Its processor is the real processor class at the published image settings (Molmo2: 378 px
crops, up to 8 and a low-resolution view; PaliGemma: 448 px, 1024 image tokens) over the tiny builders' tokenizer,
whose token ids the config is pointed at (ids only: every dimension stays the published one). It runs through the
server's own backend (:meth:`LocalBackend.run_batch`: prompt, processor, vision encoder, batched greedy
``generate``), with the stop tokens switched off so every row decodes exactly ``--new-tokens`` tokens.

For each precision (``bfloat16`` — or what the device computes in —, ``4bit``, ``8bit``), task and batch size it
reports:

* ``latency`` — one ``run_batch`` of ``batch`` requests on different images (no kept encodings);
* ``1st token`` — from the call to the first new token: processor, vision encoder, prefill of the prompt;
* ``decode ms/token`` — the median time between later tokens: one decoding step of the whole batch (timed at the
  backend's per-step stopping check, which reads the new tokens back to the host);
* ``floor ms/token`` — the bandwidth floor of one step: the bytes of the weights a step reads (the decoder layers
  and the output embedding) over the device's measured copy bandwidth (``bandwidth``, a device-to-device copy);
* peak memory of the run (CUDA).

On a CUDA machine (what it is for)::

    python benchmarks/bench_gpu.py --out bench_gpu.json

On the CPU only to prove the script runs, with the layer counts cut down (``tests/test_bench_gpu.py`` does this)::

    python benchmarks/bench_gpu.py --device cpu --cut-layers 1 --precision float32 --batch 1 --new-tokens 3 \
        --task point --repeat 1
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from PIL import Image

FAMILIES = {"molmo2": "molmo2-4b", "paligemma": "paligemma2-3b-mix-448"}
"""Family → the published checkpoint whose config it is built from (``vlm_tools/testing/hub/``)."""

MOLMO2_TOKEN_FIELDS = {
    "image_start_token_id": "<im_start>", "low_res_image_start_token_id": "<low_res_im_start>",
    "image_end_token_id": "<im_end>", "image_patch_id": "<im_patch>", "image_high_res_id": "<im_patch>",
    "image_col_id": "<im_col>", "image_low_res_id": "<im_low>", "frame_start_token_id": "<frame_start>",
    "frame_end_token_id": "<frame_end>",
}  # fmt: skip
"""Molmo2 config fields that hold token ids, and the token each names."""


# --- the models ---------------------------------------------------------------------------------------------


def published_config(family: str, cut_layers: int | None) -> Any:
    """The family's published config, loaded as transformers reads it; with ``cut_layers`` fewer layers."""
    from transformers import AutoConfig

    from vlm_tools.testing.published import published_text

    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "config.json").write_text(published_text(FAMILIES[family], "config.json"))
        config = AutoConfig.from_pretrained(scratch)
    if cut_layers:
        cut(config, family, cut_layers)
    return config


def cut(config: Any, family: str, layers: int) -> None:
    """Keep ``layers`` layers in the text model and in the vision tower (every width stays as published)."""
    text, vision = config.text_config, config.vision_config
    text.num_hidden_layers = min(layers, text.num_hidden_layers)
    vision.num_hidden_layers = min(layers, vision.num_hidden_layers)
    if family == "molmo2":
        text.rope_scaling_layers = [n for n in (text.rope_scaling_layers or []) if n < text.num_hidden_layers]
        deepest = vision.num_hidden_layers - 1
        config.adapter_config.vision_feature_layer = sorted({deepest, max(0, deepest - 1)}, reverse=True)
    else:
        text.layer_types = text.layer_types[: text.num_hidden_layers]


def processor_and_ids(family: str, config: Any) -> Any:
    """The family's real processor at the published image settings, and ``config`` pointed at its token ids."""
    if family == "molmo2":
        from vlm_tools.testing import tiny_molmo2

        published = tiny_molmo2.hub_file("preprocessor_config.json")
        shape = tiny_molmo2.Molmo2Shape(
            crop_size=published["size"]["height"], max_crops=published["max_crops"],
            overlap_margins=tuple(published["overlap_margins"]), pooling=tuple(published["pooling_size"]),
        )  # fmt: skip
        processor = tiny_molmo2.build_processor(tiny_molmo2.build_tokenizer(), shape)
        ids = processor.tokenizer.convert_tokens_to_ids
        for field, token in MOLMO2_TOKEN_FIELDS.items():
            setattr(config, field, ids(token))
    else:
        from vlm_tools.testing import tiny_paligemma

        processor = tiny_paligemma.build_processor(config.vision_config.image_size)
        config.image_token_index = processor.tokenizer.convert_tokens_to_ids(tiny_paligemma.IMAGE_TOKEN)
        config.image_token_id = config.image_token_index
    return processor


def backend_class(family: str) -> Any:
    import importlib

    from vlm_tools.families import get_family

    module, name = (get_family(family).local_backend or "").split(":")
    return getattr(importlib.import_module(module), name)


def random_backend(family: str, device: str, precision: str, cut_layers: int | None, scratch: Path) -> Any:
    """A backend over a random-weight model of the published shape at ``precision``.

    A float precision is built straight on the device. ``4bit`` and ``8bit`` go the way a real checkpoint does:
    the random model is saved and loaded back by :meth:`LocalBackend.load`, which quantises it with bitsandbytes.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from vlm_tools.settings import Settings

    config = published_config(family, cut_layers)
    processor = processor_and_ids(family, config)
    cls = backend_class(family)
    from vlm_tools.families import get_family

    family_object = get_family(family)
    float_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    build_dtype = float_dtype.get(precision, torch.bfloat16)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=build_dtype, attn_implementation=family_object.attention)
    model.eval()
    name = f"random {FAMILIES[family]}"
    if precision in float_dtype:
        return cls(name, family_object, model, processor, device=device)
    directory = scratch / f"{family}-{precision}"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    del model
    free(device)
    settings = Settings(model=(str(directory),), device=device, dtype="bfloat16", quantize=precision)
    return cls.load(str(directory), family_object, settings, local_files_only=True)


def without_stopping(backend: Any) -> None:
    """No stop token ends a row: every row decodes exactly its ``max_new_tokens``."""
    backend.eos_token_ids = []
    backend.model.generation_config.eos_token_id = None


def decode_bytes(model: Any) -> int:
    """Bytes of the weights one decoding step reads: the text model's layers and norm, and the output embedding."""
    text_model = model.model.language_model
    tensors = [p for name, p in text_model.named_parameters() if not name.startswith("embed_tokens")]
    tensors.append(model.get_output_embeddings().weight)  # tied models: the input embedding itself
    return sum(t.numel() * t.element_size() for t in tensors)


def free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


# --- measuring ----------------------------------------------------------------------------------------------


def copy_bandwidth(device: str, megabytes: int = 1024, repeat: int = 10) -> float:
    """Bytes per second a device-to-device copy moves (read + write), the best of ``repeat``."""
    import torch

    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeat):
        synchronize(device)
        started = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() / best


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def images(count: int) -> list[Image.Image]:
    """``count`` different screenshot-sized images (1280×800, noise over colour panels)."""
    pictures = []
    for index in range(count):
        picture = Image.effect_noise((1280, 800), 40 + index).convert("RGB")
        pictures.append(Image.blend(picture, Image.new("RGB", picture.size, (index * 30 % 255, 90, 160)), 0.5))
    return pictures


def requests(task: Any, pictures: list[Image.Image], new_tokens: int) -> list[Any]:
    from vlm_tools.backends.base import Request, Task

    words = {
        Task.CAPTION: {"detail": "brief"}, Task.ANSWER: {"text": "What does the dialog say?"},
        Task.POINT: {"text": "the close button"}, Task.DETECT: {"labels": ("button",)}, Task.OCR: {},
    }  # fmt: skip
    return [Request(task, picture, max_new_tokens=new_tokens, **words[task]) for picture in pictures]


@contextmanager
def peak_memory(device: str, into: dict[str, Any]) -> Iterator[None]:
    """Record the peak device memory allocated inside the block (CUDA only)."""
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    yield
    if device == "cuda":
        into["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)


@contextmanager
def step_clock() -> Iterator[list[float]]:
    """Timestamps of every decoding step of the ``generate`` calls inside the block.

    ``generate`` calls the stopping criterion once per new token, and the backend's criterion reads the last
    tokens back to the host (a device sync), so its call times are when each token was ready.
    """
    from vlm_tools.backends import generation

    stamps: list[float] = []
    original = generation.RowStopping

    class Timed(original):  # type: ignore[misc, valid-type]
        def __call__(self, input_ids: Any, scores: Any = None, **kwargs: Any) -> Any:
            done = super().__call__(input_ids, scores, **kwargs)
            stamps.append(time.perf_counter())
            return done

    generation.RowStopping = Timed
    try:
        yield stamps
    finally:
        generation.RowStopping = original


def timed_batch(backend: Any, device: str, batch: list[Any]) -> tuple[float, float, float]:
    """One ``run_batch(batch)``: seconds in all, seconds to the first token, median seconds per later token."""
    from vlm_tools.backends.base import Output

    synchronize(device)
    with step_clock() as stamps:
        started = time.perf_counter()
        outcomes = backend.run_batch(batch)
        synchronize(device)
        ended = time.perf_counter()
    failed = [o for o in outcomes if not isinstance(o, Output)]
    if failed:
        raise RuntimeError(f"{backend.name}: {failed[0]!r}")
    steps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    return ended - started, stamps[0] - started, statistics.median(steps) if steps else float("nan")


def measure_task(backend: Any, device: str, task: Any, batch: int, args: argparse.Namespace, floor_s: float) -> dict:
    """Latency, time to the first token and decode time per token of one task at one batch size (medians)."""
    pictures = images(batch)
    timed_batch(backend, device, requests(task, pictures, 2))  # warm-up: kernels, allocator
    row: dict[str, Any] = {"task": task.value, "batch": batch}
    runs = []
    with peak_memory(device, row):
        for _ in range(args.repeat):
            runs.append(timed_batch(backend, device, requests(task, pictures, args.new_tokens)))
    latency, first, step = (statistics.median(values) for values in zip(*runs, strict=True))
    row.update({
        "latency_s": round(latency, 4), "first_token_s": round(first, 4), "decode_ms_per_token": round(step * 1e3, 3),
        "floor_ms_per_token": round(floor_s * 1e3, 3), "of_floor": round(step / floor_s, 2) if floor_s else None,
    })  # fmt: skip
    return row


def measure_family(family: str, precision: str, args: argparse.Namespace, bandwidth: float, scratch: Path) -> dict:
    """Every supported task of ``family`` at ``precision``, at each batch size."""
    print(f"building {family} ({precision}) on {args.device}", file=sys.stderr)
    started = time.perf_counter()
    backend = random_backend(family, args.device, precision, args.cut_layers, scratch)
    built_s = time.perf_counter() - started
    try:
        without_stopping(backend)
        weights = backend.model.get_memory_footprint()
        step_bytes = decode_bytes(backend.model)
        report: dict[str, Any] = {
            "family": family, "precision": precision, "built_s": round(built_s, 1),
            "weights_gb": round(weights / 1e9, 2), "decode_bytes_gb": round(step_bytes / 1e9, 3), "rows": [],
        }  # fmt: skip
        tasks = [t for t in sorted(backend.supported, key=lambda t: t.value) if not args.task or t.value in args.task]
        for task in tasks:
            for batch in args.batch:
                row = measure_task(backend, args.device, task, batch, args, step_bytes / bandwidth)
                print(f"  {row}", file=sys.stderr)
                report["rows"].append(row)
        return report
    finally:
        backend.close()
        free(args.device)


# --- running ------------------------------------------------------------------------------------------------


def precisions(args: argparse.Namespace) -> list[str]:
    """The precisions asked for; ``auto`` is what the device computes in (bfloat16 on a recent GPU)."""
    from vlm_tools.backends.placement import resolve_dtype

    chosen = []
    for precision in args.precision:
        if precision == "auto":
            precision = str(resolve_dtype("auto", args.device)).removeprefix("torch.")
        chosen.append(precision)
    return chosen


def render(report: dict[str, Any]) -> str:
    title = f"{report['device_name']}: copy bandwidth {report['bandwidth_gb_s']:.0f} GB/s, "
    title += f"{report['new_tokens']} new tokens, layers {report['cut_layers'] or 'as published'}"
    lines = [title]
    header = f"{'model':10} {'precision':9} {'task':8} {'batch':>5} {'latency s':>10} {'1st token s':>11} "
    header += f"{'ms/token':>9} {'floor ms':>9} {'x floor':>8} {'peak GB':>8}"
    lines.append(header)
    for family in report["families"]:
        for row in family["rows"]:
            lines.append(
                f"{family['family']:10} {family['precision']:9} {row['task']:8} {row['batch']:5d} "
                f"{row['latency_s']:10.3f} {row['first_token_s']:11.3f} {row['decode_ms_per_token']:9.2f} "
                f"{row['floor_ms_per_token']:9.2f} {row['of_floor'] or 0:8.2f} {row.get('peak_memory_gb', '-'):>8}"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES))
    parser.add_argument("--precision", nargs="+", default=["auto", "4bit", "8bit"],
                        choices=["auto", "bfloat16", "float16", "float32", "4bit", "8bit"])  # fmt: skip
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens every row decodes")
    parser.add_argument(
        "--task",
        nargs="+",
        choices=["answer", "caption", "detect", "ocr", "point"],
        help="only these tasks (default: every task the family supports)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (the median counts)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--cut-layers", type=int, help="keep this many text and vision layers (CPU smoke runs)")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (one step is prefill)")
    return args


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --device cpu --cut-layers 1 to check the script only")
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    bandwidth = copy_bandwidth(args.device, megabytes=1024 if args.device == "cuda" else 256)
    report: dict[str, Any] = {
        "device_name": name, "bandwidth_gb_s": bandwidth / 1e9, "new_tokens": args.new_tokens,
        "cut_layers": args.cut_layers, "families": [],
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch:
        for family in args.family:
            for precision in precisions(args):
                if precision in ("4bit", "8bit") and args.device != "cuda":
                    log(f"skipping {family} {precision}: bitsandbytes quantisation needs CUDA")
                    continue
                report["families"].append(measure_family(family, precision, args, bandwidth, Path(scratch)))
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args, log=lambda line: print(line, file=sys.stderr))
    print(render(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
