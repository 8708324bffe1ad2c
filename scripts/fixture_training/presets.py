"""The named presets: the stage chains that made the committed fixtures under ``tests/fixtures/models/``.

A preset names a family, an architecture and one or more stages; stage n > 1 starts from the best-checked
weights of stage n - 1 (see :mod:`.runner`). Each committed fixture's ``training_log.json`` records the stages
that made it, and ``tests/test_train_fixtures.py`` holds every preset against that record.
"""

from __future__ import annotations

from dataclasses import dataclass

from .molmo2 import Molmo2Size
from .paligemma import PaliGemmaSize
from .settings import TrainSettings


@dataclass(frozen=True)
class Preset:
    """A family, its architecture and the settings of each stage, in order."""

    family: str
    """``"paligemma"`` or ``"molmo2"``."""
    architecture: PaliGemmaSize | Molmo2Size
    stages: tuple[TrainSettings, ...]
    about: str
    """One line for ``--help``: what the preset makes."""


PRESETS: dict[str, Preset] = {
    "molmo2-ui": Preset(
        family="molmo2",
        # At most one crop (plus the low-resolution view) per image, not the default two.
        architecture=Molmo2Size(max_crops=1),
        stages=(
            TrainSettings(steps=4000, max_minutes=75, check_every=400, check_count=24),
            # The same schedule again at half the peak learning rate, from stage 1's best weights; the committed
            # run met the held-out targets at step 2800.
            TrainSettings(steps=4000, lr=0.001, max_minutes=60, check_every=400, check_count=24),
        ),
        about="tests/fixtures/models/molmo2-ui: Molmo2, 'Point to the red button.' → one point (2 stages)",
    ),
    "paligemma-ui": Preset(
        family="paligemma",
        # A 112-px input (an 8×8 patch grid), and a <loc> token code topping out at 8 cycles per side, not 64.
        architecture=PaliGemmaSize(image_size=112, loc_high=8.0),
        stages=(
            # Three heads look at the object; the edge heads are supervised only after 30 % of the steps, so the
            # early steps learn which object a prompt means. The committed run met the held-out targets at step 5000.
            TrainSettings(
                steps=9000,
                max_minutes=75,
                check_every=500,
                check_count=24,
                attn_heads=3,
                edges_from=0.3,
                edge_layer=2,
                edge_heads=2,
            ),
            # From stage 1's best weights, at half the peak learning rate, the edge heads supervised throughout.
            TrainSettings(
                steps=5000,
                lr=0.001,
                max_minutes=60,
                check_every=500,
                check_count=24,
                attn_heads=3,
                edges_from=0.0,
                edge_layer=2,
                edge_heads=2,
            ),
        ),
        about="tests/fixtures/models/paligemma-ui: PaliGemma 2, 'detect red button' → one box (2 stages)",
    ),
}
"""Every preset by name (the name of the fixture directory it makes)."""
