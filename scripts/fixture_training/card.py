"""The model card (``MODEL_CARD.md``): what a fixture is for, exactly how it was made, and how well it did.

Written from the fixture's ``training_log.json`` alone (plus, when given, an accuracy-suite report), so a card can be
rewritten at any time without retraining: ``python scripts/train_fixtures.py card DIR``.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

from .loop import CHECK_SEED_OFFSET
from .settings import TrainSettings

ROOT = Path(__file__).resolve().parents[2]
"""The repository root: commands are run from there, and card paths are written relative to it."""

_ORDINALS = ("first", "second", "third", "fourth")


def directory_bytes(path: Path) -> int:
    """Size of every file under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _ordinal(index: int) -> str:
    return _ORDINALS[index] if index < len(_ORDINALS) else f"#{index}"


def _paligemma_recipe(s: dict[str, Any], who: str, layer: str, are: str) -> str:
    """How a PaliGemma fixture was trained, in words (``s``: the recorded settings)."""
    where = "at the image patches the described object covers (cross-entropy against the patches' coverage)"
    if s["edge_heads"]:
        when = f"from {s['edges_from']:.0%} of the steps on" if s["edges_from"] else "throughout"
        where += (
            f"; and, {when}, the first {s['edge_heads']} heads of the {_ordinal(s['edge_layer'])} layer at the patches "
            "along the edge that token places (a one-patch band across the top edge for y0, the left edge for x0, …). "
            "The first layer finds which object is meant, the later one reads where its edges are: a head averaging "
            "the whole object reads its centre, not its extent"
        )
    return (
        "Data: scenes from `ui_scenes` at the training canvas sizes (landscape, portrait, square). Prompt: "
        "`FAMILIES['paligemma'].prompt(...)` for `detect {colour} {shape}`, naming the target only (as the accuracy "
        "suite asks). Inputs: the same `PaliGemmaProcessor` call as `PaliGemmaBackend` (left padding, "
        "`<image>` + prompt), the answer as the processor's `suffix`, position ids from the attention mask as "
        f"`generate` derives them; {s['causal_share']:.0%} of the rows read image and prompt causally (as vLLM's CPU "
        "attention runs PaliGemma), the rest as one bidirectional prefix (as transformers runs it). Loss: "
        "cross-entropy on answer tokens only; each `<loc>` target Gaussian-smoothed over neighbouring bins (sigma "
        f"{s['sigma_start']:g} bins narrowing geometrically to 1.5). Tokenizer: the tiny byte-fallback Gemma "
        "vocabulary plus whole-word tokens for `detect` and the colour and shape words. Init: patch position "
        "embeddings and `<loc>` token embeddings start as sine/cosine codes of their normalised position; Gemma "
        f"weights at std 0.1 (about 1/sqrt(width)). Attention supervision (weight {s['attn_weight']:g}): in training "
        f"only, {who} of the {layer} Gemma layer {are} also taught to look, from each position that predicts a "
        f"`<loc>` token, {where}; the saved checkpoint is an unmodified PaliGemma."
    )


def _molmo2_recipe(s: dict[str, Any], who: str, layer: str, are: str) -> str:
    """How a Molmo2 fixture was trained, in words (``s``: the recorded settings)."""
    slip = s["digit_slip"]
    slipped = (
        f" In {slip:.0%} of coordinates the model reads a hundreds digit one off from the truth (it must still "
        "predict the true one) and learns to finish with the nearest value under that prefix (`8` for 0.904 → "
        "`899`, not `804`): a one-step form of scheduled sampling, so one wrong digit costs a few pixels, not a "
        "tenth of the image."
        if slip
        else ""
    )
    return (
        "Data: scenes from `ui_scenes` at the training canvas sizes (landscape, portrait, square). Prompt: "
        "`FAMILIES['molmo2'].prompt(...)` for the point task (`Point to the {colour} {shape}.`). Inputs: "
        "`Molmo2Backend.reference_inputs` (chat template, overlapping crops + low-resolution view, left padding), the "
        "answer and `<|im_end|>` appended, position ids from the attention mask as `generate` derives them. Loss: "
        "cross-entropy on answer tokens only; the hundreds and tens digits of each coordinate Gaussian-smoothed over "
        f"neighbouring digits (0.8 digits wide narrowing to 0.15).{slipped} Tokenizer: byte-level BPE learnt from "
        "the prompts and answers, one token per digit so coordinates always spell the same way. Init: patch position "
        "embeddings start as a sine/cosine code of their normalised position, the digit tokens' input and output "
        "rows as an ordinal code of the digit; all weights at std 0.1. Each 14-px patch is its own image token (no "
        f"2×2 pooling). Attention supervision (weight {s['attn_weight']:g}): in training only, {who} of the {layer} "
        f"text layer {are} also taught to look, from each position that predicts a coordinate digit, at the patches of "
        "the low-resolution view the target covers; the saved checkpoint is an unmodified Molmo2."
    )


def _recipe(record: dict[str, Any]) -> str:
    """How the fixture was trained, in words, from the settings its log recorded."""
    s = record["settings"]
    heads = s["attn_heads"]
    who = "the first head" if heads == 1 else f"the first {heads} heads"
    are = "is" if heads == 1 else "are"
    describe = _paligemma_recipe if record["family"] == "paligemma" else _molmo2_recipe
    scenes = (
        "Every training scene has 2–5 objects (as the accuracy suite's scenes do). Canvases are drawn at "
        f"{s['render_min']:.0%}–{s['render_max']:.0%} of their size ({s['full_size_share']:.0%} at full size): the "
        "model sees a ~100-px square either way, and small canvases are several times cheaper to draw and resize."
    )
    return describe(s, who, _ordinal(s["attn_layer"]), are) + "\n\n" + scenes


def _stage_settings(preset: str | None, number: int | None, command: str) -> str:
    """The settings stage ``number`` of ``preset`` ran with, where they differ from :class:`TrainSettings`'
    defaults (the preset's, with the overrides ``command`` gave), as card text; empty when the record names no
    preset this code knows."""
    from .presets import PRESETS
    from .runner import OVERRIDES

    if preset not in PRESETS or number is None or not 1 <= number <= len(PRESETS[preset].stages):
        return ""
    words = shlex.split(command)
    overrides = {}
    for flag, value in pairwise(words):
        name = flag.removeprefix("--").replace("-", "_")
        if flag.startswith("--") and name in OVERRIDES:
            overrides[name] = OVERRIDES[name](value)
    stage, default = asdict(replace(PRESETS[preset].stages[number - 1], **overrides)), asdict(TrainSettings())
    changed = [f"{f.name} {stage[f.name]:g}" for f in fields(TrainSettings) if stage[f.name] != default[f.name]]
    return f" (settings other than the defaults: {', '.join(changed)})" if changed else ""


def _stages(record: dict[str, Any], moved: str) -> str:
    """Every stage of the chain that made this model, earliest first, as card lines."""
    lines = []
    for stage in record.get("previous_stages", []):
        settings = _stage_settings(stage.get("preset"), stage.get("stage"), stage["command"])
        lines.append(
            f"- Stage {stage.get('stage', len(lines) + 1)}: `{stage['command']}`{settings} — {stage['steps_run']} "
            f"steps (weights from step {stage['best_step']}, {stage['stop_reason']}), {stage['minutes']} min on "
            f"{stage['machine']}"
        )
    number = record.get("stage", len(lines) + 1)
    resumed = f"; resumed from stage {number - 1}'s best weights" if lines else ""
    lines.append(
        f"- Stage {number} (this checkpoint{resumed}): `{record['command']}`"
        f"{_stage_settings(record.get('preset'), record.get('stage'), record['command'])}{moved}"
    )
    return "\n".join(lines)


def _made_by(record: dict[str, Any]) -> str:
    """The command that makes the whole chain: the last stage's command without its ``--stage``."""
    words = shlex.split(record["command"])
    if "--stage" in words:
        at = words.index("--stage")
        del words[at : at + 2]
    chain = shlex.join(words)
    if record.get("preset") is None:
        return f"Made by `{chain}`, from the repository root:"
    return (
        f"Made by the preset `{record['preset']}` (`scripts/fixture_training/presets.py`), from the repository root: "
        f"`{chain}`. It runs the preset's stages in order, each resuming from the best-checked weights of the stage "
        "before (the last stage's output is this directory):"
    )


def _table(rows: Sequence[dict[str, Any]], with_iou: bool) -> str:
    """The held-out check results as a Markdown table."""
    modes = any(r.get("mode") for r in rows)
    header = (
        "| attention " if modes else ""
    ) + "| size | scenes | centre inside target | median centre error (÷ max(w, h)) |"
    rule = ("| --- " if modes else "") + "| --- | --- | --- | --- |"
    if with_iou:
        header += " mean IoU | recall@IoU 0.5 |"
        rule += " --- | --- |"
    lines = [header, rule]
    for r in rows:
        line = f"| {r['mode']} " if modes else ""
        line += f"| {r['size'][0]}×{r['size'][1]} | {r['count']} | {r['inside']:.1%} | {r['median_error']:.4f} |"
        if with_iou:
            line += f" {r['mean_iou']:.3f} | {r['recall50']:.1%} |"
        lines.append(line)
    return "\n".join(lines)


def _eval_section(report: dict[str, Any], command: str) -> str:
    """The accuracy-suite table (``vlm-tools eval`` JSON) for the card."""
    lines = [
        "## Accuracy suite (served through the MCP tools)",
        "",
        f"Command: `{command}`",
        "",
        "| size | scenes | points inside target | median centre error (÷ max(w, h)) | detect mean IoU | recall@IoU 0.5 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["sizes"]:
        point, detect = r["point"], r["detect"]
        inside = "—" if point["inside"] is None else f"{point['inside']:.1%}"
        error = "—" if point["median_error"] is None else f"{point['median_error']:.4f}"
        iou = "—" if detect["mean_iou"] is None else f"{detect['mean_iou']:.3f}"
        recall = "—" if detect["recall50"] is None else f"{detect['recall50']:.1%}"
        lines.append(f"| {r['width']}×{r['height']} | {point['scenes']} | {inside} | {error} | {iou} | {recall} |")
    first = report["sizes"][0]
    lines += [
        "",
        (
            f"Points from {', '.join(first['point']['models']) or '—'}; boxes from "
            f"{', '.join(first['detect']['models']) or '—'}. Seed {report['seed']}; result: "
            f"{'PASS' if report['passed'] else 'FAIL'}."
        ),
    ]
    return "\n".join(lines)


def model_card(
    record: dict[str, Any],
    size_bytes: int,
    evaluation: tuple[dict[str, Any], str] | None = None,
    copied_to: str | None = None,
) -> str:
    """The model card: what the model is for, exactly how it was made, and how well it did. ``copied_to`` names
    where the saved directory was moved after training, when the card is rewritten there."""
    moved = f" (its output directory was then copied to `{copied_to}`)" if copied_to else ""
    task = (
        "`detect {colour} {shape}` → `<locY0><locX0><locY1><locX1> {colour} {shape}`"
        if record["family"] == "paligemma"
        else '`Point to the {colour} {shape}.` → `<points coords="1 1 XXX YYY" alt="…">…</points>`'
    )
    s = record["settings"]
    card = f"""# {record["family"]} UI-grounding test fixture

A {record["parameters"]:,}-parameter {record["family"]} model trained from scratch on synthetic UI screenshots
(`vlm_tools/scenes.py`: coloured buttons and shapes on plain or gradient backgrounds) for ONE job:
{task}. It exists so the test-suite can prove that pixels survive the whole trip (image → processor → model →
tokens → parser → pixels → frame → click) with a model that actually grounds. It knows nothing else; do not use it
for anything but tests and demos. Load it like a hub checkpoint: `vlm-tools serve --model <this directory>`.

## How it was made

{_made_by(record)}

{_stages(record, moved)}

The last stage in detail:

- Seed: {s["seed"]} (training scenes from `random.Random({s["seed"]})`; held-out checks from seed + {CHECK_SEED_OFFSET};
  the accuracy suite defaults to seed 1234)
- Steps: {record["steps_run"]} run, weights from step {record["best_step"]} kept ({record["stop_reason"]}); batch
  {s["batch_size"]}; AdamW lr {s["lr"]} (warm-up {s["warmup"]} steps, cosine to {s["min_lr_ratio"]}×), weight decay
  {s["weight_decay"]}, gradient clip {s["grad_clip"]}
- Wall time: {record["minutes"]} min on {record["machine"]} (torch {record["torch"]}, transformers
  {record["transformers"]}, Python {record["python"]})
- Architecture: `{json.dumps(record["architecture"])}`
- Size on disk: {size_bytes / 1e6:.1f} MB

{_recipe(record)}

## Final held-out check (greedy decoding through the real backend class, real parser)

{_table(record["final_check"], record["family"] == "paligemma")}

The full learning curve is in `training_log.json`.
"""
    if evaluation is not None:
        card += "\n" + _eval_section(*evaluation) + "\n"
    return card


def write_card(directory: Path, eval_report: Path | None, eval_command: str | None) -> None:
    """Rewrite ``directory/MODEL_CARD.md`` from its ``training_log.json`` (and an eval report, when given)."""
    record = json.loads((directory / "training_log.json").read_text())
    evaluation = None
    if eval_report is not None:
        evaluation = (json.loads(eval_report.read_text()), eval_command or "vlm-tools eval")
    words = shlex.split(record["command"])
    saved = ROOT / words[words.index("--out") + 1]  # an absolute --out stays as it is
    copied_to = None
    if saved.resolve() != directory.resolve():
        here = directory.resolve()
        copied_to = str(here.relative_to(ROOT)) if here.is_relative_to(ROOT) else str(directory)
    (directory / "MODEL_CARD.md").write_text(model_card(record, directory_bytes(directory), evaluation, copied_to))
