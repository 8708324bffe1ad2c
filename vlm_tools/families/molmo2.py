"""Molmo2 (AI2, native in transformers): free-form instructions through its chat template, ``<points coords=…>`` on
0–1000 of the image."""

from __future__ import annotations

import re
from typing import Any

from ..parsing import molmo2 as molmo2_parser
from .base import Checkpoint
from .freeform import FreeFormFamily

CONTROL_TOKENS = re.compile(
    r"<\|(?:endoftext|im_start|im_end|object_ref_start|object_ref_end|box_start|box_end|quad_start|quad_end"
    r"|vision_start|vision_end|vision_pad|image_pad|video_pad|image|video)\|>"
    r"|\|<EXTRA_TOKENS_\d{1,3}>\|"
    r"|<(?:im_start|im_end|im_patch|im_col|low_res_im_start|im_low|frame_start|frame_end)>"
)
"""The special added tokens of Molmo2's Qwen2 tokenizer (``<|endoftext|>`` … ``<|video_pad|>``, the
``|<EXTRA_TOKENS_N>|`` fillers) and its image and video tokens. ``<tool_call>``, ``<think>`` and the other Qwen
tokens that are added but not special stay as they are."""


class Molmo2(FreeFormFamily):
    """Molmo2: ``<points coords=…>`` on 0–1000, through the checkpoint's own chat template."""

    name = "molmo2"
    title = "Molmo2"
    control_tokens = CONTROL_TOKENS
    local_backend = "vlm_tools.backends.molmo2_local:Molmo2Backend"
    attention = "sdpa"  # exact; flash attention would drop the bidirectional mask over image tokens
    # The vision tower cut to the 25 layers it reads; 3.6 B of the weights are the language model's linear layers.
    checkpoints = (Checkpoint("allenai/Molmo2-4B", 4_850_869_200, quantisable=3_633_315_840),)
    serve_by_default = True
    offline_fixture = "tests/fixtures/models/molmo2-ui"
    without_it = "native pointing is unavailable"
    parser = molmo2_parser
    probed_at_load = True

    def serving_path(self, processor: Any) -> str:
        """The layout the checkpoint's chat template allows: kept KV prefixes, encoding reuse, or the processor."""
        from ..backends.molmo2_layout import plan_layout

        return plan_layout(processor).describe()
