"""Benchmark: the in-process engine on a local model against the remote backend on vLLM and ``transformers serve``.

Four ways to run the same tiny PaliGemma (shaped like the hub's), each behind the same
:class:`~vlm_tools.engine.Engine` (so the only difference is where the model runs), at each requested concurrency
(callers submitting at once):

* ``local`` — the model in this process; the engine batches concurrent requests into one ``generate``.
* ``vllm`` — :class:`~vlm_tools.backends.remote.RemoteBackend` over vLLM's CPU build (``scripts/setup_vllm.sh``;
  continuous batching); each request is one HTTP chat completion with the image as a PNG data URI.
* ``tf-serve`` — the same over ``transformers serve``; ``tf-serve-cb`` with ``--continuous-batching``.

Every request is a ``detect`` with a fixed token budget (a random tiny model rarely stops early, so each request
decodes about ``--max-new-tokens`` tokens). Prints a table and writes JSON (``--out``). Run::

    .venv/bin/python benchmarks/bench_remote.py --requests 32 --concurrency 1 8 16 --repeat 3 --out bench_remote.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from vlm_tools.backends.base import Backend, Request, Task
from vlm_tools.engine import Engine
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the inference-server helpers the tests use
from inference_servers import transformers_server, vllm_server, with_chat_template  # noqa: E402

log = logging.getLogger("bench_remote")

CB_FALLBACK = "does not support continuous batching"
"""What ``transformers serve`` logs when it runs a model without continuous batching despite the flag."""


def images() -> list[Image.Image]:
    """A few small, different images (the requests cycle through them)."""
    return [
        Image.new("RGB", (40, 30), (200, 10, 10)),
        Image.new("RGB", (64, 64), (10, 10, 200)),
        Image.effect_noise((50, 70), 60).convert("RGB"),
    ]


def request_maker(max_new_tokens: int) -> Callable[[int], Request]:
    pictures = images()
    labels = ("cat", "dog", "cup", "car")
    return lambda i: Request(Task.DETECT, pictures[i % len(pictures)], labels=(labels[i % len(labels)],),
                             max_new_tokens=max_new_tokens)  # fmt: skip


async def measure(
    backend: Backend, make: Callable[[int], Request], count: int, concurrency: int, max_batch_size: int
) -> dict[str, Any]:
    """Run ``count`` requests with ``concurrency`` callers through a fresh engine; time each and the whole."""
    engine = Engine([backend], max_batch_size=max_batch_size, batch_wait_ms=5.0, queue_size=max(64, count),
                    request_timeout_s=600.0)  # fmt: skip
    await engine.start()
    try:
        for i in range(2):  # warm-up: first calls pay for lazy initialisation
            await engine.submit(backend, make(i), tool="detect")
        latencies: list[float] = []
        next_index = iter(range(count))

        async def caller() -> None:
            for i in next_index:
                started = time.perf_counter()
                await engine.submit(backend, make(i), tool="detect")
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    finally:
        await engine.shutdown(5.0)
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": count,
        "wall_s": round(wall, 3),
        "requests_per_s": round(count / wall, 3),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p95_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vlm_tools.backends.loading import load_backend
    from vlm_tools.backends.remote import RemoteBackend
    from vlm_tools.families import get_family
    from vlm_tools.settings import Settings
    from vlm_tools.testing.tiny_paligemma import build_tiny_paligemma

    scratch = None if args.work_dir else tempfile.TemporaryDirectory(prefix="bench-remote-")
    work = Path(args.work_dir or scratch.name)  # type: ignore[union-attr]
    source = Path(args.model_dir) if args.model_dir else build_tiny_paligemma(work / "tiny-paligemma")
    # transformers serve needs a chat template that names the image; vLLM lays the prompt out itself and needs none.
    templated = with_chat_template(source, work / "templated" / source.name)
    threads = args.threads or None
    if threads:
        import torch

        torch.set_num_threads(threads)  # the same budget in process as in each server
    servers = {}
    if args.vllm_python:
        servers["vllm"] = vllm_server(args.vllm_python, source, work, max_model_len=512, threads=threads,
                                      max_num_seqs=max(args.concurrency))  # fmt: skip
    servers["tf-serve"] = transformers_server(templated, work, threads=threads)
    servers["tf-serve-cb"] = transformers_server(templated, work, continuous_batching=True, threads=threads)
    log.info("model %s; starting %s", source, ", ".join(servers))
    results: list[dict[str, Any]] = []
    try:
        for server in servers.values():
            server.wait_ready()
        backends: dict[str, Backend] = {
            "local": load_backend(str(source), Settings(model=(str(source),), device="cpu",
                                                        max_batch_size=args.max_batch_size)),
            **{
                mode: RemoteBackend([server.url], server.model, get_family("paligemma"),
                                    concurrency=args.remote_concurrency, timeout_s=600.0)
                for mode, server in servers.items()
            },
        }  # fmt: skip
        make = request_maker(args.max_new_tokens)
        # Rounds visit every (mode, concurrency) cell in turn, so a burst of load from elsewhere on the machine
        # lands on all modes alike; each cell reports its median round.
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for round_index in range(args.repeat):
            for concurrency in args.concurrency:
                for mode, backend in backends.items():
                    row = asyncio.run(measure(backend, make, args.requests, concurrency, args.max_batch_size))
                    log.info("round %d %s %s", round_index + 1, mode, row)
                    runs.setdefault((mode, concurrency), []).append(row)
        for backend in backends.values():
            backend.close()
        for (mode, _), rows in sorted(runs.items(), key=lambda item: (list(backends).index(item[0][0]), item[0][1])):
            ranked = sorted(rows, key=lambda r: r["requests_per_s"])
            results.append({
                "mode": mode, **ranked[len(ranked) // 2],
                "best_requests_per_s": ranked[-1]["requests_per_s"],
                "rounds_requests_per_s": [r["requests_per_s"] for r in rows],
            })  # fmt: skip
        cb_fallback = CB_FALLBACK in servers["tf-serve-cb"].log_tail(10_000)
    finally:
        for server in servers.values():
            server.stop()
        if scratch is not None:
            scratch.cleanup()
    return {
        "benchmark": "bench_remote",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": _torch_threads()},
        "settings": {"requests": args.requests, "repeat": args.repeat, "threads": threads,
                     "max_new_tokens": args.max_new_tokens,
                     "max_batch_size": args.max_batch_size, "remote_concurrency": args.remote_concurrency},
        "results": results,
        "ratios": ratios(results),
        "ratios_best": ratios(results, "best_requests_per_s"),
        "transformers_serve_cb_fell_back_to_sequential": cb_fallback,
    }  # fmt: skip


def _default_vllm_python() -> Path | None:
    python = Path(__file__).resolve().parent.parent / ".vllm-venv" / "bin" / "python"
    return python if python.is_file() else None


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def ratios(results: list[dict[str, Any]], key: str = "requests_per_s") -> dict[str, float]:
    """Throughput of each mode relative to local at the same concurrency, and each mode's gain from concurrency."""
    rps = {(r["mode"], r["concurrency"]): r[key] for r in results}
    out: dict[str, float] = {}
    levels = sorted({c for _, c in rps})
    for (mode, concurrency), value in sorted(rps.items()):
        if mode != "local" and ("local", concurrency) in rps:
            out[f"{mode}/local@c{concurrency}"] = round(value / rps[("local", concurrency)], 2)
    for mode in sorted({m for m, _ in rps}):
        if len(levels) > 1 and (mode, levels[0]) in rps and (mode, levels[-1]) in rps:
            out[f"{mode}:c{levels[-1]}/c{levels[0]}"] = round(rps[(mode, levels[-1])] / rps[(mode, levels[0])], 2)
    return out


def table(report: dict[str, Any]) -> str:
    """The results as a fixed-width text table, then the ratios."""
    header = f"{'mode':<11} {'conc':>4} {'req':>4} {'wall s':>8} {'req/s':>8} {'best':>8} {'p50 ms':>8} {'p95 ms':>8}"
    lines = [header + "  rounds req/s", "(median round; best = fastest round)"]
    for r in report["results"]:
        lines.append(f"{r['mode']:<11} {r['concurrency']:>4} {r['requests']:>4} {r['wall_s']:>8.2f} "
                     f"{r['requests_per_s']:>8.2f} {r['best_requests_per_s']:>8.2f} {r['p50_ms']:>8.1f} "
                     f"{r['p95_ms']:>8.1f}  {' '.join(f'{v:.2f}' for v in r['rounds_requests_per_s'])}")  # fmt: skip
    lines.append("")
    lines.append(f"{'ratio':<26} {'median':>7} {'best':>7}")
    best = report["ratios_best"]
    lines.extend(f"{name:<26} {value:>6.2f}x {best.get(name, float('nan')):>6.2f}x"
                 for name, value in report["ratios"].items())  # fmt: skip
    if report["transformers_serve_cb_fell_back_to_sequential"]:
        lines.append("note: transformers serve ran this vision model without continuous batching (text-only feature)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", help="a PaliGemma directory (default: build the tiny one)")
    parser.add_argument("--work-dir", help="where the model copy, hub cache and server logs go (default: a temp dir)")
    parser.add_argument("--requests", type=int, default=24, help="measured requests per mode and concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8], help="callers at once")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each cell reports its median round")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in this process and in each server (0: torch's default, one per core)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--remote-concurrency", type=int, default=16)
    parser.add_argument(
        "--vllm-python",
        type=Path,
        default=_default_vllm_python(),
        help="the vLLM venv's python (default: .vllm-venv/bin/python when it exists)",
    )
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the progress lines
    report = run(args)
    print(table(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
