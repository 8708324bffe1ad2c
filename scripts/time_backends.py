"""Time every task of the tiny test models at batch 1 and batch 8 on this machine.

Builds the tiny random models offline (PaliGemma 2 always; Molmo2 when its builder and backend are present),
loads each through the public ``load_backend`` path, and times ``run_batch`` per task: the wall time of one
batch-1 call, of one batch-8 call, the tokens each generated, and the time per generated token at each batch size
(a random model may stop at EOS early on some inputs, so time per token is the fair comparison). Each request may
generate up to ``--max-new-tokens`` tokens. Prints a table; writes the measurements as JSON to ``--out`` when given.

    python scripts/time_backends.py --out timings.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("time_backends")

BATCH_SIZES = (1, 8)


def builders() -> dict[str, Callable[[Path], Path]]:
    """The tiny-model builders available in this checkout, by family."""
    from vlm_tools.testing.tiny_paligemma import build_tiny_paligemma

    found: dict[str, Callable[[Path], Path]] = {"paligemma": build_tiny_paligemma}
    molmo2_parts = ("vlm_tools.testing.tiny_molmo2", "vlm_tools.backends.molmo2_local")
    if all(importlib.util.find_spec(name) is not None for name in molmo2_parts):
        from vlm_tools.testing.tiny_molmo2 import build_tiny_molmo2

        found["molmo2"] = build_tiny_molmo2
    else:
        log.warning("molmo2 skipped: its tiny builder or backend is not in this checkout")
    return found


def make_requests(task: Any, count: int, max_new_tokens: int) -> list[Any]:
    """``count`` requests of ``task`` on different random-pixel images with prompts of different lengths."""
    import numpy as np
    from PIL import Image

    from vlm_tools.backends.base import Request, Task

    requests = []
    for index in range(count):
        rng = np.random.default_rng(index)
        image = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8), "RGB")
        fields: dict[str, Any] = {}
        if task is Task.ANSWER:
            fields["text"] = "what is " + "in this picture " * (1 + index % 3) + "?"
        elif task is Task.DETECT:
            fields["labels"] = ("cat", "dog", "traffic light")[: 1 + index % 3]
        elif task is Task.POINT:
            fields["text"] = "the red button" if index % 2 else "every window"
        requests.append(Request(task=task, image=image, max_new_tokens=max_new_tokens, **fields))
    return requests


class TokenCounter:
    """Counts the new tokens each ``generate_rows`` call returns (both local backends generate through it).

    A random model may stop at EOS early on some inputs; counting lets the table show time per generated token,
    which compares fairly across tasks and batch sizes.
    """

    def __init__(self) -> None:
        from vlm_tools.backends import generation

        self.tokens = 0
        self._generation = generation
        self._original = generation.generate_rows

    def __enter__(self) -> TokenCounter:
        def counting(*args: Any, **kwargs: Any) -> Any:
            rows = self._original(*args, **kwargs)
            self.tokens += sum(len(row) for row in rows if not isinstance(row, BaseException))
            return rows

        self._generation.generate_rows = counting
        return self

    def __exit__(self, *exc: object) -> None:
        self._generation.generate_rows = self._original


def time_task(backend: Any, task: Any, batch: int, max_new_tokens: int, repeats: int) -> tuple[float, int]:
    """Fastest wall seconds of ``repeats`` ``run_batch`` calls of ``batch`` requests, and the tokens one call made.

    The minimum, not the median: on a shared machine other processes only ever add time.
    """
    requests = make_requests(task, batch, max_new_tokens)
    backend.run_batch(requests)  # warm-up
    times = []
    for _ in range(repeats):
        with TokenCounter() as counter:
            start = time.perf_counter()
            outcomes = backend.run_batch(requests)
            times.append(time.perf_counter() - start)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        if failed:
            raise RuntimeError(f"{backend.family} {task.value}: {failed[0]!r}")
    return min(times), counter.tokens


def measure(family: str, model_dir: Path, max_new_tokens: int, repeats: int, device: str) -> list[dict[str, Any]]:
    """One row per supported task of ``family``: batch-1 and batch-8 times, per-request times, speed-up."""
    from vlm_tools.backends.loading import load_backend
    from vlm_tools.settings import Settings

    backend = load_backend(str(model_dir), Settings(model=(str(model_dir),), device=device, max_batch_size=8))
    rows = []
    for task in sorted(backend.supported, key=lambda t: t.value):
        measured = {b: time_task(backend, task, b, max_new_tokens, repeats) for b in BATCH_SIZES}
        seconds = {b: measured[b][0] for b in BATCH_SIZES}
        tokens = {b: measured[b][1] for b in BATCH_SIZES}
        per_token = {b: seconds[b] / max(tokens[b], 1) for b in BATCH_SIZES}
        rows.append(
            {
                "family": family,
                "task": task.value,
                "batch1_s": round(seconds[1], 4),
                "batch8_s": round(seconds[8], 4),
                "batch1_tokens": tokens[1],
                "batch8_tokens": tokens[8],
                "per_request_batch1_s": round(seconds[1], 4),
                "per_request_batch8_s": round(seconds[8] / 8, 4),
                "ms_per_token_batch1": round(per_token[1] * 1000, 2),
                "ms_per_token_batch8": round(per_token[8] * 1000, 2),
                "speedup_per_token": round(per_token[1] / per_token[8], 2),
            }
        )
        log.info("%s %s done", family, task.value)
    backend.close()
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table."""
    header = (
        "family",
        "task",
        "batch 1 (s)",
        "tokens",
        "batch 8 (s)",
        "tokens",
        "per req b1 (ms)",
        "per req b8 (ms)",
        "ms/token b1",
        "ms/token b8",
        "speed-up/token",
    )
    lines = [header] + [
        (
            r["family"],
            r["task"],
            f"{r['batch1_s']:.3f}",
            str(r["batch1_tokens"]),
            f"{r['batch8_s']:.3f}",
            str(r["batch8_tokens"]),
            f"{r['per_request_batch1_s'] * 1000:.0f}",
            f"{r['per_request_batch8_s'] * 1000:.0f}",
            f"{r['ms_per_token_batch1']:.1f}",
            f"{r['ms_per_token_batch8']:.1f}",
            f"{r['speedup_per_token']:.1f}x",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the measurements as JSON here")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per request [16]")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per cell; the fastest is kept [5]")
    parser.add_argument("--models-dir", type=Path, help="build the tiny models here (default: a temp dir)")
    parser.add_argument("--family", action="append", help="only these families (repeatable)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; one gives steady numbers on a shared machine, 0 keeps torch's choice [1]",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps", "auto"), help="where to run [cpu]")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from vlm_tools.testing import tiny_model_dir

    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        root = args.models_dir or Path(scratch)
        rows: list[dict[str, Any]] = []
        for family, build in builders().items():
            if args.family and family not in args.family:
                continue
            model_dir = tiny_model_dir(f"tiny-{family}", build, root)
            rows.extend(measure(family, model_dir, args.max_new_tokens, args.repeats, args.device))
    print(table(rows))
    if args.out:
        report = {
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "torch_threads": torch.get_num_threads(),
                "device": args.device,
            },
            "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats,
            "rows": rows,
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
