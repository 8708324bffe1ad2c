"""Benchmark the engine and server on the tiny test models: protocol overhead, batching gain, repeat-image cost.

One run measures three things and prints a table (stdout); ``--out`` also writes every number as JSON.

* **overhead** — a full MCP round trip of ``describe_image`` in memory (``mcp.Client(server)``), over stdio (a
  ``vlm-tools serve`` subprocess) and over streamable HTTP (a ``vlm-tools serve --transport http`` subprocess)
  against a bare ``backend.run_batch([request])`` on the same model, image, task and token cap. The image is sent
  once and then named by its ``image_id`` (``--image-source path`` sends a small file path every call instead).
  The modes run interleaved, a block of calls each in turn, so a change in background load lands on all of them.
  Overhead = p50 (or p99) of the mode minus that of the bare call. The servers run with ``batch_wait_ms = 0``:
  the default batch window deliberately holds a lone request up to 5 ms for others to join, which is a latency
  trade, not protocol overhead (``--overhead-batch-wait-ms`` measures it).
* **batching** — throughput (calls/s) of ``concurrency`` concurrent callers against the same number of calls made
  one after another, through the server in memory (callers share one in-memory client, whose requests are
  concurrent) and over HTTP (one HTTP client per caller). ``point_to_object`` with a 32-token cap keeps the model
  the dominant cost. The mean batch size the engine actually ran is read from the server's metrics.
* **repeat image** — the first call with a full 1920×1080 PNG as a ``data:`` URI (transfer, base64 and PNG
  decoding, storing) against a second question about the same ``image_id``, in memory and over HTTP.

Everything runs on the CPU with one torch thread per process by default (``--threads``): on a small shared
machine more threads make the numbers erratic. Run from the repository root::

    python benchmarks/bench_engine.py --out bench.json          # full run (a few minutes)
    python benchmarks/bench_engine.py --quick                   # short smoke run (numbers not meaningful)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("bench_engine")

VLM_TOOLS = str(Path(sys.executable).with_name("vlm-tools"))
OVERHEAD_TARGET_FRACTION = 0.05
OVERHEAD_TARGET_MS = 3.0
BATCHING_TARGET = 4.0


# --- numbers ------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summary_ms(seconds: list[float]) -> dict[str, float]:
    """p50, p99 and mean of durations in seconds, in milliseconds."""
    return {
        "n": len(seconds),
        "p50_ms": round(percentile(seconds, 50) * 1000, 3),
        "p99_ms": round(percentile(seconds, 99) * 1000, 3),
        "mean_ms": round(sum(seconds) / len(seconds) * 1000, 3),
    }


# --- setup --------------------------------------------------------------------------------------------------


def build_models(root: Path) -> Path:
    """The tiny PaliGemma (built once into ``root``; reused when already there)."""
    from vlm_tools.testing.tiny_paligemma import build_tiny_paligemma

    path = root / "tiny-paligemma"
    if not (path / "config.json").is_file():
        build_tiny_paligemma(path)
    return path


def write_images(workdir: Path) -> dict[str, Path]:
    """A small screenshot-like PNG for per-call work and a photo-like 1920×1080 PNG for the repeat-image case."""
    import numpy as np
    from PIL import Image

    small = workdir / "shot.png"
    Image.new("RGB", (320, 200), (30, 60, 200)).save(small)
    # Smooth colour fields plus mild noise compress like a photo (a few MB as PNG), not like a flat screenshot.
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:1080, 0:1920].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(x / 170 + k) * np.cos(y / 130 - k) for k in range(3)], axis=-1)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    big = workdir / "photo_1920x1080.png"
    Image.fromarray(noisy, "RGB").save(big)
    return {"small": small, "big": big}


def server_env(threads: int, max_new_tokens: int) -> dict[str, str]:
    """Environment of a server subprocess: offline, quiet, ``threads`` torch threads, a token cap."""
    env = dict(os.environ)
    env.update({
        "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "VLM_TOOLS_LOG_LEVEL": "warning",
        "VLM_TOOLS_MAX_NEW_TOKENS": str(max_new_tokens), "VLM_TOOLS_DEVICE": "cpu",
    })  # fmt: skip
    return env


def serve_args(model: Path, workdir: Path, **flags: object) -> list[str]:
    """``vlm-tools serve`` arguments for one model, paths confined to ``workdir``, plus ``--flag value`` pairs."""
    args = [VLM_TOOLS, "serve", "--model", str(model), "--allow-path", str(workdir)]
    for name, value in flags.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return args


def in_process_settings(model: Path, workdir: Path, max_new_tokens: int, **values: Any) -> Any:
    """Settings of an in-process server equal to what :func:`serve_args` and :func:`server_env` give a subprocess."""
    from vlm_tools.settings import Settings

    return Settings(
        model=(str(model),), allow_path=(workdir,), device="cpu", max_new_tokens=max_new_tokens,
        log_level="warning", **values,
    )  # fmt: skip


@contextlib.contextmanager
def http_server(args: list[str], env: dict[str, str], workdir: Path) -> Iterator[str]:
    """Run ``vlm-tools serve --transport http`` on a free loopback port; yields its base URL once healthy."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with contextlib.ExitStack() as stack:
        log_file = stack.enter_context(tempfile.TemporaryFile())
        proc = subprocess.Popen(
            [*args, "--transport", "http", "--port", str(port)],
            stdout=subprocess.DEVNULL, stderr=log_file, env=env, cwd=str(workdir),
        )  # fmt: skip
        stack.callback(_stop, proc)
        yield _wait_healthy(f"http://127.0.0.1:{port}", proc, log_file)


def _wait_healthy(base: str, proc: subprocess.Popen[bytes], log_file: Any) -> str:
    import httpx

    deadline = time.monotonic() + 180
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return base
        if proc.poll() is not None or time.monotonic() > deadline:
            log_file.seek(0)
            raise RuntimeError(f"HTTP server did not start: {log_file.read().decode()[-2000:]}")
        time.sleep(0.2)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def http_client(base: str) -> Any:
    """An MCP client over streamable HTTP (default protocol negotiation, as agents connect)."""
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    return Client(streamable_http_client(f"{base}/mcp", http_client=httpx2.AsyncClient(timeout=300)))


def metrics_text(base: str) -> str:
    """A server's ``/metrics`` exposition text."""
    import httpx

    return httpx.get(f"{base}/metrics", timeout=10).text


def http_batch_stats(base: str) -> dict[str, float]:
    """Mean batch size and batch count from a server's ``/metrics``."""
    return _batch_stats(metrics_text(base))


def _batch_stats(exposition: str) -> dict[str, float]:
    total = count = 0.0
    for line in exposition.splitlines():
        if m := re.match(r"vlm_tools_batch_size_sum\{[^}]*\} (\S+)", line):
            total += float(m.group(1))
        elif m := re.match(r"vlm_tools_batch_size_count\{[^}]*\} (\S+)", line):
            count += float(m.group(1))
    return {"batches": count, "requests": total, "mean_batch_size": round(total / count, 2) if count else 0.0}


def run_ms_mean(exposition: str, tool: str) -> float | None:
    """Mean time (ms) the model ran per ``tool`` call inside a server, from its metrics (batch start to answer)."""
    found: dict[str, float] = {}
    for line in exposition.splitlines():
        if m := re.match(rf'vlm_tools_run_seconds_(sum|count)\{{tool="{tool}"\}} (\S+)', line):
            found[m.group(1)] = float(m.group(2))
    if not found.get("count"):
        return None
    return round(found["sum"] / found["count"] * 1000, 3)


async def call_ok(client: Any, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Call a tool and return its structured result; a tool error stops the benchmark (it would skew it)."""
    result = await client.call_tool(tool, arguments)
    if result.is_error:
        raise RuntimeError(f"{tool} failed: {' '.join(getattr(c, 'text', '') for c in result.content)}")
    return dict(result.structured_content or {})


# --- a model that costs nothing: what the protocol alone costs ---------------------------------------------

INSTANT_RAW = "a blue rectangle on a plain background, seen from the front, with nothing else in the picture"


def instant_backend() -> Any:
    """A PaliGemma-shaped backend that answers at once: round trips through it cost only the server and protocol."""
    from vlm_tools.backends.base import BatchBackend, Output
    from vlm_tools.families import get_family

    class InstantBackend(BatchBackend):
        name = "instant"
        family = get_family("paligemma")
        native = family.native
        supported = family.supported

        def run_batch(self, requests: Any) -> list[Any]:
            return [Output(raw=INSTANT_RAW, text=INSTANT_RAW) for _ in requests]

    return InstantBackend()


def serve_instant(argv: list[str]) -> int:
    """``bench_engine.py serve-instant [serve flags]``: ``vlm-tools serve`` with :func:`instant_backend`."""
    import anyio

    from vlm_tools.server import build_server
    from vlm_tools.settings import add_arguments, from_arguments

    parser = argparse.ArgumentParser(prog="bench_engine.py serve-instant")
    add_arguments(parser)
    settings = from_arguments(parser.parse_args(argv))
    logging.basicConfig(level=settings.log_level.upper(), stream=sys.stderr)
    server = build_server(settings, load_backends=lambda _settings: [instant_backend()])
    if settings.transport == "stdio":
        anyio.run(server.run_stdio_async)
    else:
        from vlm_tools.http_app import serve_http

        anyio.run(serve_http, server, settings)
    return 0


# --- overhead -----------------------------------------------------------------------------------------------


async def measure_overhead(model: Path, workdir: Path, images: dict[str, Path], args: argparse.Namespace) -> dict:
    """Per-call latency of each transport against the bare backend call, interleaved in blocks."""
    from mcp import Client, StdioServerParameters
    from PIL import Image

    from vlm_tools.backends.base import Request, Task
    from vlm_tools.backends.loading import load_backend
    from vlm_tools.server import build_server

    tokens, wait = args.overhead_tokens, args.overhead_batch_wait_ms
    settings = in_process_settings(model, workdir, tokens, batch_wait_ms=wait)
    backend = load_backend(str(model), settings)
    image = Image.open(images["small"]).convert("RGB")  # the pixels the server decodes from the same file
    env = server_env(args.threads, tokens)
    sargs = serve_args(model, workdir, batch_wait_ms=wait)
    floor_args = [sys.executable, str(Path(__file__).resolve()), "serve-instant", *sargs[2:]]
    samples: dict[str, list[float]] = {
        name: [] for name in ("bare", "memory", "stdio", "http", "floor_memory", "floor_stdio", "floor_http")
    }
    outputs: dict[str, str] = {}

    def bare_call() -> None:
        out = backend.run_batch([Request(Task.CAPTION, image, detail="brief", language="en", max_new_tokens=tokens)])
        outputs["bare"] = out[0].raw

    async with contextlib.AsyncExitStack() as stack:
        memory_server = build_server(settings)
        clients = {"memory": await stack.enter_async_context(Client(memory_server))}
        stdio = StdioServerParameters(command=VLM_TOOLS, args=sargs[1:], env=env, cwd=str(workdir))
        clients["stdio"] = await stack.enter_async_context(Client(stdio))
        base = stack.enter_context(http_server(sargs, env, workdir))
        clients["http"] = await stack.enter_async_context(http_client(base))
        instant = in_process_settings(model, workdir, tokens, batch_wait_ms=wait)
        floor_server = build_server(instant, load_backends=lambda _settings: [instant_backend()])
        clients["floor_memory"] = await stack.enter_async_context(Client(floor_server))
        floor_stdio = StdioServerParameters(command=floor_args[0], args=floor_args[1:], env=env, cwd=str(workdir))
        clients["floor_stdio"] = await stack.enter_async_context(Client(floor_stdio))
        floor_base = stack.enter_context(http_server(floor_args, env, workdir))
        clients["floor_http"] = await stack.enter_async_context(http_client(floor_base))
        sources = {}
        for name, client in clients.items():  # first call: the image is sent and stored; also warms up
            first = await call_ok(client, "describe_image", {"image": str(images["small"])})
            sources[name] = first["image_id"] if args.image_source == "id" else str(images["small"])
            for _ in range(5):
                await call_ok(client, "describe_image", {"image": sources[name]})
        for _ in range(5):
            bare_call()

        async def timed(name: str) -> None:
            if name == "bare":
                started = time.perf_counter()
                bare_call()
                samples[name].append(time.perf_counter() - started)
                return
            started = time.perf_counter()
            result = await call_ok(clients[name], "describe_image", {"image": sources[name]})
            samples[name].append(time.perf_counter() - started)
            outputs[name] = result["raw"]

        block = max(1, min(args.block, args.calls))
        while len(samples["bare"]) < args.calls:
            for name, taken in samples.items():
                for _ in range(min(block, args.calls - len(taken))):
                    await timed(name)
        # How long the model itself ran inside each server (stdio has no metrics endpoint to ask).
        model_ms = {
            "memory": run_ms_mean(memory_server.metrics.render()[0].decode(), "describe_image"),
            "http": run_ms_mean(await asyncio.to_thread(metrics_text, base), "describe_image"),
        }
    bare = summary_ms(samples["bare"])
    modes: dict[str, Any] = {}
    for name in ("memory", "stdio", "http"):
        stats = summary_ms(samples[name])
        over50 = stats["p50_ms"] - bare["p50_ms"]
        allowed = max(OVERHEAD_TARGET_FRACTION * bare["p50_ms"], OVERHEAD_TARGET_MS)
        modes[name] = {
            **stats,
            "overhead_p50_ms": round(over50, 3),
            "overhead_p99_ms": round(stats["p99_ms"] - bare["p99_ms"], 3),
            "overhead_p50_fraction": round(over50 / bare["p50_ms"], 4),
            "target_ms": round(allowed, 3),
            "target_met": over50 <= allowed,
            "same_output_as_bare": outputs[name] == outputs["bare"],
            "model_run_mean_ms_in_server": model_ms.get(name),
        }
    floor = {name: summary_ms(samples[f"floor_{name}"]) for name in ("memory", "stdio", "http")}
    return {
        "task": "describe_image (caption, brief)", "max_new_tokens": tokens, "batch_wait_ms": wait,
        "image": "320x200 PNG sent once, then named by its image_id"
        if args.image_source == "id" else "320x200 PNG as a file path on every call",
        "block": block, "bare": bare, "modes": modes, "floor": floor,
        "bare_mean_ms": bare["mean_ms"],
    }  # fmt: skip


# --- batching -----------------------------------------------------------------------------------------------


async def run_callers(call: Callable[[int], Awaitable[None]], callers: int, total: int) -> float:
    """Run ``total`` calls spread over ``callers`` concurrent loops; returns the wall time in seconds."""
    per_caller = [total // callers + (1 if i < total % callers else 0) for i in range(callers)]

    async def loop(index: int, count: int) -> None:
        for _ in range(count):
            await call(index)

    started = time.perf_counter()
    await asyncio.gather(*(loop(i, n) for i, n in enumerate(per_caller)))
    return time.perf_counter() - started


async def measure_batching(model: Path, workdir: Path, images: dict[str, Path], args: argparse.Namespace) -> dict:
    """Throughput of concurrent callers against sequential calls, in memory and over HTTP."""
    from mcp import Client

    from vlm_tools.server import build_server

    tokens, total = args.batch_tokens, args.batch_calls
    batch_size = args.max_batch_size
    arguments = {"description": "the blue square", "max_points": 5}
    report: dict[str, Any] = {
        "task": "point_to_object", "max_new_tokens": tokens, "calls": total, "max_batch_size": batch_size,
        "batch_wait_ms": args.batch_wait_ms, "transports": {},
    }  # fmt: skip

    async def measure(clients: list[Any], image: str, stats: Callable[[], dict[str, float]]) -> dict[str, Any]:
        async def call(index: int) -> None:
            await call_ok(clients[index % len(clients)], "point_to_object", {"image": image, **arguments})

        for _ in range(3):
            await call(0)
        before = stats()
        sequential = await run_callers(call, 1, total)
        after = stats()
        rows: dict[str, Any] = {"sequential": _throughput(total, sequential, before, after)}
        for callers in args.concurrency:
            before = stats()
            seconds = await run_callers(call, callers, total)
            after = stats()
            row = _throughput(total, seconds, before, after)
            row["speedup"] = round(row["calls_per_s"] / rows["sequential"]["calls_per_s"], 2)
            rows[f"concurrent_{callers}"] = row
        return rows

    settings = in_process_settings(model, workdir, tokens, max_batch_size=batch_size, batch_wait_ms=args.batch_wait_ms)
    server = build_server(settings)
    async with Client(server) as client:
        first = await call_ok(client, "describe_image", {"image": str(images["small"])})
        report["transports"]["memory"] = await measure(
            [client], first["image_id"], lambda: _batch_stats(server.metrics.render()[0].decode())
        )
    if not args.skip_http:
        sargs = serve_args(model, workdir, max_batch_size=batch_size, batch_wait_ms=args.batch_wait_ms)
        with http_server(sargs, server_env(args.threads, tokens), workdir) as base:
            async with contextlib.AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(http_client(base)) for _ in range(max(args.concurrency))]
                # Without sessions (the default protocol) image ids are shared by every client of the server.
                first = await call_ok(clients[0], "describe_image", {"image": str(images["small"])})
                report["transports"]["http"] = await measure(clients, first["image_id"], lambda: http_batch_stats(base))
    for rows in report["transports"].values():
        for name, row in rows.items():
            if name.startswith("concurrent_"):
                row["target_met"] = row["speedup"] >= BATCHING_TARGET if name == "concurrent_8" else None
    return report


def _throughput(calls: int, seconds: float, before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    batches = after["batches"] - before["batches"]
    requests = after["requests"] - before["requests"]
    return {
        "seconds": round(seconds, 3),
        "calls_per_s": round(calls / seconds, 2),
        "batches": int(batches),
        "mean_batch_size": round(requests / batches, 2) if batches else 0.0,
    }


# --- repeat image -------------------------------------------------------------------------------------------


async def measure_repeat(model: Path, workdir: Path, images: dict[str, Path], args: argparse.Namespace) -> dict:
    """First call with the full image as a data URI against a second question about its image_id."""
    from mcp import Client

    from vlm_tools.server import build_server

    tokens = args.overhead_tokens
    png = images["big"].read_bytes()
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    report: dict[str, Any] = {
        "task": "answer_about_image", "max_new_tokens": tokens, "pairs": args.repeat_pairs,
        "image": f"1920x1080 PNG, {len(png):,} bytes ({len(uri):,} characters as a data URI)", "transports": {},
    }  # fmt: skip

    async def pairs(client: Any) -> dict[str, Any]:
        first_s: list[float] = []
        second_s: list[float] = []
        await call_ok(client, "answer_about_image", {"image": uri, "question": "warm-up?"})
        for index in range(args.repeat_pairs):
            started = time.perf_counter()
            first = await call_ok(client, "answer_about_image", {"image": uri, "question": f"What is shown? {index}"})
            first_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            await call_ok(client, "answer_about_image", {"image": first["image_id"], "question": f"Colours? {index}"})
            second_s.append(time.perf_counter() - started)
        first_stats, second_stats = summary_ms(first_s), summary_ms(second_s)
        return {
            "first_data_uri": first_stats,
            "second_image_id": second_stats,
            "second_over_first_p50": round(second_stats["p50_ms"] / first_stats["p50_ms"], 3),
            "first_over_second_p50": round(first_stats["p50_ms"] / second_stats["p50_ms"], 2),
        }

    settings = in_process_settings(model, workdir, tokens, batch_wait_ms=args.overhead_batch_wait_ms)
    async with Client(build_server(settings)) as client:
        report["transports"]["memory"] = await pairs(client)
    if not args.skip_http:
        sargs = serve_args(model, workdir, batch_wait_ms=args.overhead_batch_wait_ms)
        with http_server(sargs, server_env(args.threads, tokens), workdir) as base:
            async with http_client(base) as client:
                report["transports"]["http"] = await pairs(client)
    return report


# --- report -------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the numbers were measured on, and how busy it was."""
    import torch
    import transformers

    return {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
        "processor": platform.processor() or _cpu_model(), "load_average": [round(v, 2) for v in os.getloadavg()],
        "torch": torch.__version__, "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
        "other_busy_processes": busy_processes(),
    }  # fmt: skip


def busy_processes(threshold: float = 10.0) -> list[str]:
    """Other processes using more than ``threshold`` % of a CPU over one second (what competes with the run)."""
    try:
        import psutil
    except ImportError:
        return ["unknown (psutil not installed)"]
    mine = {os.getpid(), *(child.pid for child in psutil.Process().children(recursive=True))}
    procs = [p for p in psutil.process_iter(["pid", "cmdline"]) if p.info["pid"] not in mine]
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.cpu_percent(None)
    time.sleep(1.0)
    busy = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            percent = proc.cpu_percent(None)
            if percent > threshold:
                busy.append(f"{percent:.0f}% {' '.join(proc.info['cmdline'] or [])[:100]}")
    return busy


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def render_table(report: dict[str, Any]) -> str:
    """The report as plain-text tables."""
    lines: list[str] = []
    m = report["machine"]
    lines.append(f"machine: {m['cpus']} CPUs ({m['processor']}), load {m['load_average']} at start, "
                 f"{m['load_average_end']} at end, {m['torch_threads']} torch thread(s), torch {m['torch']}")  # fmt: skip
    for when in ("other_busy_processes", "other_busy_processes_end"):
        lines.append(f"{when.replace('_', ' ')}: {'; '.join(m.get(when) or []) or 'none'}")
    if "overhead" in report:
        o = report["overhead"]
        lines += ["", (f"OVERHEAD  {o['task']}, {o['max_new_tokens']} new tokens, batch_wait_ms {o['batch_wait_ms']}, "
                       f"{o['image']}, {o['bare']['n']} calls each")]  # fmt: skip
        lines.append(f"{'mode':<14}{'p50 ms':>9}{'p99 ms':>9}{'over p50':>10}{'over p99':>10}{'p50 %':>8}"
                     f"{'target ms':>11}{'met':>6}{'model in server, mean ms':>26}")  # fmt: skip
        b = o["bare"]
        lines.append(f"{'bare':<14}{b['p50_ms']:>9.2f}{b['p99_ms']:>9.2f}{'':>54}{b['mean_ms']:>26.2f}")
        for name, row in o["modes"].items():
            lines.append(
                f"{name:<14}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['overhead_p50_ms']:>10.2f}"
                f"{row['overhead_p99_ms']:>10.2f}{row['overhead_p50_fraction'] * 100:>7.1f}%{row['target_ms']:>11.2f}"
                f"{'yes' if row['target_met'] else 'NO':>6}"
                + (f"{row['model_run_mean_ms_in_server']:>26.2f}" if row["model_run_mean_ms_in_server"] else "")
            )
        lines.append("protocol floor: the same round trip against a model that answers at once")
        for name, row in o["floor"].items():
            lines.append(f"{'floor ' + name:<14}{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}")
    if "batching" in report:
        bt = report["batching"]
        lines += ["", (f"BATCHING  {bt['task']}, {bt['max_new_tokens']} new tokens, {bt['calls']} calls per row, "
                       f"max_batch_size {bt['max_batch_size']}, batch_wait_ms {bt['batch_wait_ms']}")]  # fmt: skip
        lines.append(f"{'transport':<10}{'callers':<16}{'calls/s':>9}{'seconds':>9}{'batches':>9}{'mean batch':>12}"
                     f"{'speedup':>9}{'met':>6}")  # fmt: skip
        for transport, rows in bt["transports"].items():
            for name, row in rows.items():
                speed = f"{row['speedup']:.2f}x" if "speedup" in row else ""
                met = {True: "yes", False: "NO", None: ""}[row.get("target_met")]
                lines.append(f"{transport:<10}{name:<16}{row['calls_per_s']:>9.2f}{row['seconds']:>9.2f}"
                             f"{row['batches']:>9}{row['mean_batch_size']:>12.2f}{speed:>9}{met:>6}")  # fmt: skip
    if "repeat_image" in report:
        r = report["repeat_image"]
        lines += ["", f"REPEAT IMAGE  {r['task']}, {r['max_new_tokens']} new tokens, {r['image']}, {r['pairs']} pairs"]
        lines.append(f"{'transport':<10}{'first p50':>11}{'first p99':>11}{'again p50':>11}{'again p99':>11}"
                     f"{'again/first':>13}")  # fmt: skip
        for transport, row in r["transports"].items():
            f, s = row["first_data_uri"], row["second_image_id"]
            lines.append(f"{transport:<10}{f['p50_ms']:>11.2f}{f['p99_ms']:>11.2f}{s['p50_ms']:>11.2f}"
                         f"{s['p99_ms']:>11.2f}{row['second_over_first_p50']:>13.3f}")  # fmt: skip
    return "\n".join(lines) + "\n"


# --- command line -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="Write the full report as JSON here.")
    p.add_argument("--models-dir", type=Path, help="Where the tiny models are built (reused); default: a temp dir.")
    p.add_argument("--threads", type=int, default=1, help="Torch threads per process [1].")
    p.add_argument("--only", choices=("overhead", "batching", "repeat"), action="append", help="Run only these.")
    p.add_argument("--calls", type=int, default=200, help="Overhead: calls per mode [200].")
    p.add_argument("--block", type=int, default=10, help="Overhead: calls per mode before switching mode [10].")
    p.add_argument("--overhead-tokens", type=int, default=16, help="Overhead and repeat: new-token cap [16].")
    p.add_argument("--overhead-batch-wait-ms", type=float, default=0.0, help="Overhead: batch window [0].")
    p.add_argument("--image-source", choices=("id", "path"), default="id", help="Overhead: how the image is named.")
    p.add_argument("--batch-calls", type=int, default=128, help="Batching: calls per row [128].")
    p.add_argument("--batch-tokens", type=int, default=32, help="Batching: new-token cap [32].")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="Batching: batch window [5, the default].")
    p.add_argument("--max-batch-size", type=int, default=8, help="Batching: most calls per batch [8, the default].")
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 16], help="Batching: concurrent callers [8 16].")
    p.add_argument("--repeat-pairs", type=int, default=20, help="Repeat image: first/second call pairs [20].")
    p.add_argument("--skip-http", action="store_true", help="Batching and repeat image: in memory only.")
    p.add_argument("--quick", action="store_true", help="A short smoke run: few calls, numbers not meaningful.")
    args = p.parse_args(argv)
    if args.quick:
        args.calls, args.block, args.batch_calls, args.repeat_pairs = 20, 5, 32, 3
    return args


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the models and images, run the selected measurements, return the report."""
    import torch

    torch.set_num_threads(args.threads)
    only = set(args.only or ("overhead", "batching", "repeat"))
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        models_root = args.models_dir or Path(tmp) / "models"
        models_root.mkdir(parents=True, exist_ok=True)
        workdir = Path(tmp) / "work"
        workdir.mkdir()
        model = build_models(models_root)
        images = write_images(workdir)
        report: dict[str, Any] = {"machine": machine(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
        steps: list[tuple[str, str, Callable[..., Awaitable[dict]]]] = [
            ("overhead", "overhead", measure_overhead),
            ("batching", "batching", measure_batching),
            ("repeat", "repeat_image", measure_repeat),
        ]
        for key, name, step in steps:
            if key in only:
                log.info("measuring %s", name)
                started = time.monotonic()
                report[name] = await step(model, workdir, images, args)
                log.info("%s took %.0f s", name, time.monotonic() - started)
        report["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        report["machine"]["other_busy_processes_end"] = busy_processes()
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table; write JSON to ``--out``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-instant"]:
        return serve_instant(argv[1:])
    args = parse_args(argv)
    # Before torch is imported anywhere (here or in a server subprocess): one OpenMP thread per process.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpx2", "mcp", "vlm_tools", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report = asyncio.run(run(args))
    sys.stdout.write(render_table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
