"""Train the tiny grounding fixture models committed under ``tests/fixtures/models/``.

Two models, each a few MB, each trained for minutes on a CPU to do one real, simple grounding job on the synthetic
screenshots of :mod:`vlm_tools.scenes`:

* ``paligemma-ui`` — a PaliGemma 2 (SigLIP + Gemma 2) that answers ``detect red button`` with one box in its native
  ``<locY0><locX0><locY1><locX1> red button`` format;
* ``molmo2-ui`` — a Molmo2 that answers ``Point to the red button.`` with its native
  ``<points coords="1 1 XXX YYY" alt="red button">red button</points>`` at the centre of the target.

Training and serving cannot drift apart: prompts come from the families' own ``prompt()``, inputs are built with
the same processor calls, chat template, padding side and position ids as the backends build them for
``generate``, and the held-out checks decode greedily through the real backend classes and read the answers with
the real parsers. The loss covers only the answer tokens (prompt, image and padding are -100). Location bins are
ordinal, so PaliGemma's four ``<loc>`` targets are Gaussian-smoothed over neighbouring bins (a sharp one-hot on a
1024-way choice teaches "near" nothing); the Gaussian narrows as training goes on.

Each committed model was made by a named preset (``scripts/fixture_training/presets.py``): a family, an
architecture and a chain of stages, each resuming from the best weights of the one before. From the repository
root::

    python scripts/train_fixtures.py train molmo2-ui --out tests/fixtures/models/molmo2-ui
    python scripts/train_fixtures.py train paligemma-ui --out tests/fixtures/models/paligemma-ui

Stages before the last are saved under ``--work`` (default: ``.fixture-stages/PRESET``, git-ignored); ``--stage N``
runs stage N alone, resuming from ``--work``'s stage N - 1. ``--steps``, ``--check-every``, ``--check-count``,
``--max-minutes`` and ``--min-steps`` override every stage run, for short trial runs. ``card DIR`` rewrites a
model card from the directory's ``training_log.json``, with ``--eval-report`` adding a ``vlm-tools eval`` report.

Deterministic for a given seed and thread count on one machine (CI never trains; it loads the committed
directories). Progress goes to stderr. The code is in the ``fixture_training`` package next to this script.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# OpenMP threads that spin while waiting burn the CPU other processes need, and a descheduled spinner stalls every
# step on a shared machine; passive waiting keeps step times steady. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The package lives next to this script, which is run as a file rather than installed.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixture_training.card import write_card
from fixture_training.presets import PRESETS
from fixture_training.runner import OVERRIDES, run_preset


def _parser() -> argparse.ArgumentParser:
    """The command line: ``train PRESET --out DIR ...`` and ``card DIR ...``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    presets = "; ".join(f"{name}: {preset.about}" for name, preset in PRESETS.items())
    train = commands.add_parser("train", help="Train a preset's stages and save the result.", description=presets)
    train.add_argument("preset", choices=sorted(PRESETS))
    train.add_argument("--out", type=Path, required=True, help="Directory the last stage is saved to.")
    train.add_argument(
        "--work", type=Path, help="Directory of the earlier stages (default: .fixture-stages/PRESET in the repository)."
    )
    train.add_argument("--stage", type=int, help="Run only this stage (from 1), resuming from the stage before it.")
    for name, kind in OVERRIDES.items():
        train.add_argument("--" + name.replace("_", "-"), type=kind, help="Override the preset's value, every stage.")
    card = commands.add_parser("card", help="Rewrite a fixture's MODEL_CARD.md from its training log.")
    card.add_argument("directory", type=Path)
    card.add_argument("--eval-report", type=Path, help="JSON written by `vlm-tools eval --out`.")
    card.add_argument("--eval-command", help="The command that wrote it.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Train a preset (``train``) or rewrite a model card (``card``)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.command == "card":
        write_card(args.directory, args.eval_report, args.eval_command)
        return 0
    overrides = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name) is not None}
    run_preset(args.preset, args.out, args.work, args.stage, overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
