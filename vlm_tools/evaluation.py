"""Grounding accuracy suite: do points and boxes land where they should, through the real tools?

``vlm-tools eval`` asks the real MCP tools about held-out synthetic screenshots (:mod:`vlm_tools.scenes`) and
scores the answers against the known geometry: :func:`evaluate` runs it, :class:`ToolScore` says what is scored,
:func:`run_eval` what the command prints and returns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .errors import InvalidArgument
from .images.encode import png_data_uri
from .settings import Settings

logger = logging.getLogger(__name__)

Box = tuple[float, float, float, float]

DEFAULT_SIZES = "1280x720,600x900,1000x1000"
MIN_INSIDE = 0.95
MIN_IOU = 0.7


# --- scoring ----------------------------------------------------------------------------------------------------


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes; 0 when either is empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
    area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def point_in_box(point: tuple[float, float], box: Box) -> bool:
    """Whether ``point`` lies inside ``box`` (edges included)."""
    x, y = point
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def median(values: Sequence[float]) -> float:
    """The median (mean of the two middle values for an even count); NaN for no values."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return math.nan
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"1280x720,600x900"`` → ``[(1280, 720), (600, 900)]``; :class:`InvalidArgument` for anything else."""
    sizes = []
    for part in text.split(","):
        width, sep, height = part.strip().lower().partition("x")
        if not sep or not width.isdigit() or not height.isdigit():
            raise InvalidArgument(f"size {part.strip()!r} is not WIDTHxHEIGHT; give e.g. --sizes 1280x720,600x900")
        w, h = int(width), int(height)
        if not (64 <= w <= 4096 and 64 <= h <= 4096):
            raise InvalidArgument(f"size {w}x{h} is out of range; each side must be 64..4096 pixels")
        sizes.append((w, h))
    return sizes


def scene_seed(seed: int, size: tuple[int, int]) -> int:
    """The scene seed of one canvas size (different sizes get different scenes).

    Every scene of one size comes from this seed; the fixture models were trained on other seeds.
    """
    return seed * 100_000_000 + size[0] * 10_000 + size[1]


# --- results ----------------------------------------------------------------------------------------------------


@dataclass
class ToolScore:
    """Scores of one tool at one size; ``skipped`` says why it was not measured.

    What comes back is scored against the scene's known geometry:

    * ``point_to_object`` — *inside*: the share of scenes whose first returned point lies inside the target's box (no
      point counts as a miss); *median error*: the median distance from the target's centre to that point, as a share
      of the image's longer side ``max(width, height)`` (a scene with no point counts as error 1.0).
    * ``detect`` — *mean IoU*: the mean IoU of the first returned box with the target's box (no box counts as 0);
      *recall@0.5*: the share of scenes where that IoU is at least 0.5.
    """

    scenes: int = 0
    errors: int = 0
    models: list[str] = field(default_factory=list)
    skipped: str | None = None
    inside: float | None = None
    median_error: float | None = None
    point_source: list[str] = field(default_factory=list)
    mean_iou: float | None = None
    recall50: float | None = None


@dataclass
class SizeReport:
    """Both tools' scores at one canvas size, and whether they meet the targets."""

    width: int
    height: int
    point: ToolScore
    detect: ToolScore
    passed: bool = False


@dataclass
class EvalReport:
    """The whole run."""

    seed: int
    count: int
    min_inside: float
    min_iou: float
    sizes: list[SizeReport]
    passed: bool
    note: str = "median_error is a share of max(width, height); inside/IoU use the first point/box returned"


@dataclass
class _Sample:
    """What came back for one scene."""

    point: tuple[float, float] | None = None
    point_source: str | None = None
    point_model: str | None = None
    box: Box | None = None
    detect_model: str | None = None
    point_error: str | None = None
    detect_error: str | None = None


# --- running the tools ------------------------------------------------------------------------------------------


def _error_text(result: Any) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content).strip()


async def _call(client: Any, tool: str, arguments: dict[str, Any], refused: dict[str, str]) -> tuple[Any, str | None]:
    """Call ``tool``; (structured result, None) or (None, error text). Once a tool has been refused because no
    loaded model can do it, later calls are not made: the refusal is the answer."""
    if tool in refused:
        return None, refused[tool]
    result = await client.call_tool(tool, arguments)
    if not result.is_error:
        return result.structured_content, None
    text = _error_text(result)
    if "unsupported_by_model" in text:
        refused[tool] = text
    return None, text


async def _ask(client: Any, scene: Any, refused: dict[str, str]) -> _Sample:
    """Ask point_to_object, then detect (by image_id when the first call stored the image), about the target."""
    sample = _Sample()
    name = scene.target.name
    image = png_data_uri(scene.image)
    data, sample.point_error = await _call(client, "point_to_object", {"image": image, "description": name}, refused)
    if data is not None:
        image = data["image_id"]
        sample.point_model = data["model"]
        if data["points"]:
            first = data["points"][0]
            sample.point = (first["x"], first["y"])
            sample.point_source = first["source"]
    data, sample.detect_error = await _call(client, "detect", {"image": image, "labels": [name]}, refused)
    if data is not None:
        sample.detect_model = data["model"]
        if data["detections"]:
            b = data["detections"][0]["box"]
            sample.box = (b["x0"], b["y0"], b["x1"], b["y1"])
    return sample


def _unsupported(errors: Sequence[str | None]) -> str | None:
    """The refusal, when every call of a tool was refused because no loaded model can do it."""
    if errors and all(e is not None and "unsupported_by_model" in e for e in errors):
        return errors[0]
    return None


def _score(scenes: Sequence[Any], samples: Sequence[_Sample]) -> tuple[ToolScore, ToolScore]:
    point, detect = ToolScore(scenes=len(scenes)), ToolScore(scenes=len(scenes))
    point.skipped = _unsupported([s.point_error for s in samples])
    detect.skipped = _unsupported([s.detect_error for s in samples])
    if point.skipped is None:
        inside, errors = [], []
        for scene, sample in zip(scenes, samples, strict=True):
            if sample.point is None:
                inside.append(False)
                errors.append(1.0)
                continue
            inside.append(point_in_box(sample.point, scene.target.box))
            errors.append(math.dist(sample.point, scene.target.center) / max(scene.size))
        point.inside = sum(inside) / len(inside)
        point.median_error = median(errors)
        point.errors = sum(s.point_error is not None for s in samples)
        point.models = sorted({s.point_model for s in samples if s.point_model})
        point.point_source = sorted({s.point_source for s in samples if s.point_source})
    if detect.skipped is None:
        ious = [box_iou(s.box, scene.target.box) if s.box else 0.0 for scene, s in zip(scenes, samples, strict=True)]
        detect.mean_iou = sum(ious) / len(ious)
        detect.recall50 = sum(i >= 0.5 for i in ious) / len(ious)
        detect.errors = sum(s.detect_error is not None for s in samples)
        detect.models = sorted({s.detect_model for s in samples if s.detect_model})
    return point, detect


async def evaluate(
    settings: Settings,
    *,
    seed: int,
    count: int,
    sizes: Sequence[tuple[int, int]],
    min_inside: float = MIN_INSIDE,
    min_iou: float = MIN_IOU,
    load_backends: Callable[[Settings], Sequence[Any]] | None = None,
) -> EvalReport:
    """Run the suite against a server built from ``settings`` (its models load once, in the server's lifespan).

    ``vlm-tools eval --model DIR [--model DIR …]`` draws held-out synthetic screenshots (:mod:`vlm_tools.scenes`)
    at several canvas sizes, asks the REAL MCP tools about each scene's target through an in-memory MCP client
    (images sent as ``data:`` URIs, exactly as an agent would send them; the second tool reuses the ``image_id`` the
    first returned), and scores what comes back against the known geometry (:class:`ToolScore`).

    Up to ``settings.max_batch_size`` scenes are in flight at once, so the engine batches them as it would batch
    concurrent agents.
    """
    from mcp import Client

    from .server import build_server
    from . import scenes as ui_scenes

    if count < 1:
        raise InvalidArgument("count must be at least 1")
    server = build_server(settings, load_backends=load_backends)
    limit = asyncio.Semaphore(settings.max_batch_size)
    reports = []
    refused: dict[str, str] = {}
    async with Client(server) as client:

        async def one(scene: Any) -> _Sample:
            async with limit:
                return await _ask(client, scene, refused)

        for size in sizes:
            scenes = list(ui_scenes.scenes(scene_seed(seed, size), count, size))
            samples = await asyncio.gather(*(one(s) for s in scenes))
            point, detect = _score(scenes, samples)
            report = SizeReport(size[0], size[1], point, detect)
            report.passed = _meets(report, min_inside, min_iou)
            reports.append(report)
            logger.info("eval %dx%d done", *size)
    measured = any(r.point.skipped is None or r.detect.skipped is None for r in reports)
    passed = measured and all(r.passed for r in reports)
    return EvalReport(seed, count, min_inside, min_iou, reports, passed)


def _meets(report: SizeReport, min_inside: float, min_iou: float) -> bool:
    point_ok = report.point.skipped is not None or (report.point.inside or 0.0) >= min_inside
    detect_ok = report.detect.skipped is not None or (report.detect.mean_iou or 0.0) >= min_iou
    return point_ok and detect_ok


# --- presenting -------------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "skipped" if value is None else f"{value:.1%}"


def _num(value: float | None, digits: int = 3) -> str:
    return "skipped" if value is None else f"{value:.{digits}f}"


def format_table(report: EvalReport) -> str:
    """The report as a Markdown table (one row per size), with the targets and the models that answered."""
    lines = [
        (
            f"Grounding eval: {report.count} scenes per size, seed {report.seed}; targets: points inside >= "
            f"{report.min_inside:.0%}, mean IoU >= {report.min_iou:.2f} on every size"
        ),
        "",
        "| size | points inside | median centre error (÷ max(w, h)) | detect mean IoU | recall@IoU 0.5 | tool errors | pass |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report.sizes:
        errors = r.point.errors + r.detect.errors
        lines.append(
            f"| {r.width}×{r.height} | {_pct(r.point.inside)} | {_num(r.point.median_error, 4)} | "
            f"{_num(r.detect.mean_iou)} | {_pct(r.detect.recall50)} | {errors} | {'yes' if r.passed else 'NO'} |"
        )
    first = report.sizes[0] if report.sizes else None
    if first is not None:
        lines.append("")
        for tool, score in (("point_to_object", first.point), ("detect", first.detect)):
            if score.skipped:
                lines.append(f"{tool}: skipped ({score.skipped})")
            else:
                source = f" ({', '.join(score.point_source)} points)" if score.point_source else ""
                lines.append(f"{tool}: {', '.join(score.models) or 'no answer'}{source}")
    lines.append(f"result: {'PASS' if report.passed else 'FAIL'}")
    return "\n".join(lines)


def run_eval(settings: Settings, args: argparse.Namespace, *, stdout: TextIO | None = None) -> int:
    """The ``vlm-tools eval`` command: run, print the table, write ``args.out``; 0 when every target is met.

    It prints a table to stdout (this command is not the stdio MCP server, so stdout is free), writes the full report
    as JSON when ``--out`` is given, and exits 0 when every size meets the targets (``--min-inside``, default 0.95;
    ``--min-iou``, default 0.7), 1 otherwise. A tool that no loaded model can serve is reported as skipped; a run in
    which neither tool could be measured fails.
    """
    sizes = parse_sizes(getattr(args, "sizes", DEFAULT_SIZES) or DEFAULT_SIZES)
    min_inside = float(getattr(args, "min_inside", None) or MIN_INSIDE)
    min_iou = float(getattr(args, "min_iou", None) or MIN_IOU)
    report = asyncio.run(
        evaluate(settings, seed=args.seed, count=args.count, sizes=sizes, min_inside=min_inside, min_iou=min_iou)
    )
    out = stdout or sys.stdout
    print(format_table(report), file=out)
    if getattr(args, "out", None):
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0 if report.passed else 1
