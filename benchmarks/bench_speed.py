"""Benchmark the costs an agent feels, over stdio: a follow-up call on an image, a document's pages, concurrency.

Each part starts ``vlm-tools serve`` (stdio, the transport agents use) on a random-weight model built here from
the hub-layout builders, and times whole tool calls from an ``mcp.Client``:

* **follow-up** — ``answer_about_image`` on a new 1280×800 screenshot (a file path: read, decode, store, then the
  processor and vision encoder) against the same question on its ``image_id`` (the kept encoding is reused).
  The model is a tiny Molmo2 whose cost sits in the image, as a real one's does for short answers: real 378 px
  crops with the hub's tiling (up to 8 crops and a low-resolution view, overlap margins 4), a vision tower of
  8 layers × 256 wide and a 2-layer, 64-wide language model. Ratio = median follow-up / median first call.
  Target ≤ 0.5.
* **follow-up, language-model-heavy** — the same on a tiny Molmo2 with the same tiling, a small vision tower and a
  6-layer, 512-wide language model, so that a first call's cost sits in reading the image's ~1,200 tokens: a
  follow-up reads on from the image's kept prefix (its keys and values) and reads only its own turn.
* **document** — ``read_document`` of an 8-page PDF against a 1-page PDF (pages render at the server's default
  long side), on the tiny Molmo2 the tests build. Ratio = 8 pages / 1 page. Target ≤ 4.
* **concurrency** — 8 ``point_to_object`` calls at once against the same 8 one after another, on the tiny Molmo2
  and on the tiny PaliGemma, in two workloads: eight questions about one screenshot sent before (by
  ``image_id``), and one question about each of eight new screenshots (each call also loads and encodes its
  image). Ratio = sequential time / concurrent time. Target ≥ 4.

Random models never stop by themselves, so every call decodes exactly its token cap (``--max-new-tokens``, 16;
``--point-tokens`` for pointing, 32): equal work in every compared pair. Everything runs on the CPU with
``--threads`` torch threads per server (default 1, as in ``bench_engine.py``). Run from the repository root::

    .venv/bin/python benchmarks/bench_speed.py --out bench_speed.json
    .venv/bin/python benchmarks/bench_speed.py --quick          # smoke run, numbers not meaningful
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

# Run as a script, so its own folder is on sys.path: the server helpers are bench_engine's.
from bench_engine import call_ok, serve_args, server_env

TARGETS = {"follow_up": ("<=", 0.5), "follow_up_lm": ("<=", 0.5), "document": ("<=", 4.0), "concurrency": (">=", 4.0)}


# --- models and inputs --------------------------------------------------------------------------------------


def heavy_vision_shape() -> Any:
    """A tiny Molmo2 with the hub's image tiling and a vision tower far heavier than its language model."""
    from vlm_tools.testing.tiny_molmo2 import Molmo2Shape

    return Molmo2Shape(
        crop_size=378, max_crops=8, overlap_margins=(4, 4), vision_hidden=256, vision_heads=4,
        vision_intermediate=1024, vit_layers=(-1, -3), vit_declared_layers=8, init_std=0.02,
    )  # fmt: skip


def heavy_language_shape() -> Any:
    """A tiny Molmo2 with the hub's image tiling, a small vision tower and a language model that outweighs it."""
    from vlm_tools.testing.tiny_molmo2 import Molmo2Shape

    return Molmo2Shape(
        crop_size=378, max_crops=8, overlap_margins=(4, 4), text_hidden=512, text_layers=6, text_heads=8,
        text_kv_heads=2, text_head_dim=64, text_intermediate=1536, adapter_intermediate=512, init_std=0.02,
    )  # fmt: skip


def build_models(root: Path) -> dict[str, Path]:
    """The four models (built once into ``root``, reused when already there)."""
    from vlm_tools.testing.tiny_molmo2 import build_tiny_molmo2
    from vlm_tools.testing.tiny_paligemma import build_tiny_paligemma

    paths = {"heavy_molmo2": root / "molmo2-378", "heavy_lm_molmo2": root / "molmo2-378-lm", "molmo2": root / "molmo2",
             "paligemma": root / "paligemma"}  # fmt: skip
    builders = {
        "heavy_molmo2": lambda path: build_tiny_molmo2(path, shape=heavy_vision_shape()),
        "heavy_lm_molmo2": lambda path: build_tiny_molmo2(path, shape=heavy_language_shape()),
        "molmo2": build_tiny_molmo2,
        "paligemma": build_tiny_paligemma,
    }
    for name, path in paths.items():
        if not (path / "config.json").is_file():
            print(f"building {name} in {path}", file=sys.stderr)
            builders[name](path)
    return paths


def screenshot(path: Path, seed: int, size: tuple[int, int] = (1280, 800)) -> Path:
    """A screenshot-like PNG: flat panels and a grid of text-like bars, different for each seed."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (240, 240, 240))
    draw = ImageDraw.Draw(image)
    for row in range(0, size[1], 40):
        for column in range(0, size[0], 160):
            shade = (row * 7 + column * 3 + seed * 37) % 200
            draw.rectangle((column + 8, row + 12, column + 20 + (shade % 120), row + 26), fill=(shade, 80, 255 - shade))
    image.save(path)
    return path


def pdf(path: Path, pages: int, workdir: Path) -> Path:
    """A PDF of ``pages`` different screenshot-like pages (Pillow writes it, one image per page at 150 dpi)."""
    from PIL import Image

    images = [Image.open(screenshot(workdir / f"page-{n}.png", 500 + n, (1275, 1650))).convert("RGB")
              for n in range(pages)]  # fmt: skip
    images[0].save(path, "PDF", resolution=150.0, save_all=True, append_images=images[1:])
    return path


# --- the server ---------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def stdio_client(model: Path, workdir: Path, args: argparse.Namespace, tokens: int) -> AsyncIterator[Any]:
    """An MCP client on a ``vlm-tools serve`` subprocess over stdio capped at ``tokens`` new tokens a call, the
    model loaded and warmed up."""
    from mcp import Client, StdioServerParameters

    command, *server_args = serve_args(model, workdir)
    params = StdioServerParameters(command=command, args=server_args, env=server_env(args.threads, tokens),
                                   cwd=str(workdir))  # fmt: skip
    async with Client(params) as client:
        await call_ok(client, "describe_image", {"image": str(screenshot(workdir / "warm-up.png", 999))})
        yield client


async def timed(coroutine: Any) -> tuple[float, Any]:
    started = time.perf_counter()
    value = await coroutine
    return time.perf_counter() - started, value


# --- the parts ----------------------------------------------------------------------------------------------


async def measure_follow_up(model: Path, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """First call on a new image against a follow-up on its ``image_id`` (same question, same token count)."""
    first: list[float] = []
    follow: list[float] = []
    question = "What does the button in the top left corner say?"
    async with stdio_client(model, workdir, args, args.max_new_tokens) as client:
        for index in range(args.pairs):
            image = screenshot(workdir / f"shot-{index}.png", index)
            seconds, made = await timed(
                call_ok(client, "answer_about_image", {"image": str(image), "question": question})
            )
            first.append(seconds)
            seconds, again = await timed(
                call_ok(client, "answer_about_image", {"image": made["image_id"], "question": question})
            )
            follow.append(seconds)
            if again["answer"] != made["answer"]:
                raise RuntimeError("the follow-up answered differently from the first call")
    return {
        "first_s": statistics.median(first), "follow_up_s": statistics.median(follow),
        "ratio": statistics.median(follow) / statistics.median(first), "pairs": args.pairs,
    }  # fmt: skip


async def measure_document(model: Path, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``read_document`` of an 8-page PDF against a 1-page one, alternating, ``--repeat`` times each."""
    one, eight = pdf(workdir / "one.pdf", 1, workdir), pdf(workdir / "eight.pdf", 8, workdir)
    times: dict[str, list[float]] = {"1": [], "8": []}
    async with stdio_client(model, workdir, args, args.max_new_tokens) as client:
        for _ in range(args.repeat):
            for name, path in (("1", one), ("8", eight)):
                seconds, result = await timed(call_ok(client, "read_document", {"document": str(path)}))
                assert len(result["pages"]) == int(name)
                times[name].append(seconds)
    one_s, eight_s = statistics.median(times["1"]), statistics.median(times["8"])
    return {"one_page_s": one_s, "eight_pages_s": eight_s, "ratio": eight_s / one_s, "repeat": args.repeat}


async def measure_concurrency(model: Path, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """8 ``point_to_object`` calls at once against the same 8 in sequence, in two workloads: eight questions about
    one screenshot already sent (named by its ``image_id``), and one question about each of eight new screenshots
    (file paths: each call also loads, stores and encodes its image)."""
    descriptions = ["the blue button", "the red link", "the search box", "the menu", "the close icon", "the logo",
                    "the first row", "the scroll bar"]  # fmt: skip
    new_images = [str(screenshot(workdir / f"point-{index}.png", 100 + index, (640, 400))) for index in range(8)]
    report: dict[str, Any] = {}
    async with stdio_client(model, workdir, args, args.point_tokens) as client:
        sent = await call_ok(client, "describe_image", {"image": str(screenshot(workdir / "one.png", 42, (640, 400)))})
        workloads = {
            "one_image": [{"image": sent["image_id"], "description": text} for text in descriptions],
            "new_images": [{"image": image, "description": "the blue button"} for image in new_images],
        }
        for name, calls in workloads.items():
            sequential: list[float] = []
            concurrent: list[float] = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                for arguments in calls:
                    await call_ok(client, "point_to_object", arguments)
                sequential.append(time.perf_counter() - started)
                started = time.perf_counter()
                await asyncio.gather(*(call_ok(client, "point_to_object", arguments) for arguments in calls))
                concurrent.append(time.perf_counter() - started)
            seq_s, con_s = statistics.median(sequential), statistics.median(concurrent)
            report[name] = {"sequential_s": seq_s, "concurrent_s": con_s, "ratio": seq_s / con_s}
    return report


# --- report -------------------------------------------------------------------------------------------------


def verdict(part: str, ratio: float) -> str:
    sign, target = TARGETS[part]
    met = ratio <= target if sign == "<=" else ratio >= target
    return f"{ratio:5.2f}  (target {sign} {target}: {'met' if met else 'NOT met'})"


def render(report: dict[str, Any]) -> str:
    lines = [f"vlm-tools speed over stdio — {report['machine']}, {report['threads']} torch thread(s) per server"]
    for part, label in (("follow_up", "vision-heavy"), ("follow_up_lm", "LM-heavy    ")):
        if part in report:
            row = report[part]
            lines.append(f"follow-up / first call, {label}   first {row['first_s']:.3f} s, follow-up "
                         f"{row['follow_up_s']:.3f} s   ratio {verdict(part, row['ratio'])}")  # fmt: skip
    if "document" in report:
        row = report["document"]
        lines.append(f"8-page PDF / 1 page      1 page {row['one_page_s']:.3f} s, 8 pages {row['eight_pages_s']:.3f} s"
                     f"   ratio {verdict('document', row['ratio'])}")  # fmt: skip
    for family in ("molmo2", "paligemma"):
        for workload, label in (("one_image", "8 questions, 1 image"), ("new_images", "8 new images")):
            row = report.get(f"concurrency_{family}", {}).get(workload)
            if row:
                lines.append(f"8 at once / in turn  {family:9} {label:20} in turn {row['sequential_s']:.3f} s, at "
                             f"once {row['concurrent_s']:.3f} s   speed-up {verdict('concurrency', row['ratio'])}")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["follow_up", "follow_up_lm", "document", "concurrency"], action="append")
    parser.add_argument("--pairs", type=int, default=5, help="follow-up: first/follow-up pairs (one image each)")
    parser.add_argument("--repeat", type=int, default=3, help="document and concurrency: rounds")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="follow-up and document: token cap a call")
    parser.add_argument(
        "--point-tokens",
        type=int,
        default=32,
        help="concurrency: token cap a call (a one-point Molmo2 answer is about 30 tokens)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--models-dir", type=Path, help="keep the built models here between runs")
    parser.add_argument("--out", type=Path, help="also write the numbers as JSON")
    parser.add_argument("--quick", action="store_true", help="smoke run: one round of each part")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.repeat, args.max_new_tokens, args.point_tokens = 1, 1, 4, 4
    return args


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import platform

    parts = args.only or ["follow_up", "follow_up_lm", "document", "concurrency"]
    report: dict[str, Any] = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "threads": args.threads,
                              "max_new_tokens": args.max_new_tokens, "point_tokens": args.point_tokens}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as scratch:
        models = build_models(args.models_dir or Path(scratch) / "models")
        workdir = Path(scratch) / "work"
        workdir.mkdir()
        if "follow_up" in parts:
            report["follow_up"] = await measure_follow_up(models["heavy_molmo2"], workdir, args)
        if "follow_up_lm" in parts:
            report["follow_up_lm"] = await measure_follow_up(models["heavy_lm_molmo2"], workdir, args)
        if "document" in parts:
            report["document"] = await measure_document(models["molmo2"], workdir, args)
        if "concurrency" in parts:
            for family in ("molmo2", "paligemma"):
                report[f"concurrency_{family}"] = await measure_concurrency(models[family], workdir, args)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    print(render(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
