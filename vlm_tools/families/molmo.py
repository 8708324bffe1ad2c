"""Molmo (0924, AI2): served remotely (vLLM with its repository code), percent ``<point x= y=>`` markup."""

from __future__ import annotations

import re

from ..parsing import molmo as molmo_parser
from .freeform import FreeFormFamily

CONTROL_TOKENS = re.compile(r"<\|[a-z_]{1,40}\|>|<(?:im_patch|im_col|im_start|im_end)>")
"""Molmo 0924 (Qwen2 or OLMo tokenizers): their ``<|…|>`` chat specials and the image tokens of its processor."""


class Molmo(FreeFormFamily):
    """Molmo 0924: percent ``<point x= y=>`` markup; its code lives in its repository, so it is served remotely."""

    name = "molmo"
    title = "Molmo (0924)"
    control_tokens = CONTROL_TOKENS
    not_local = (
        "is a Molmo 0924 model, whose code lives in its repository and does not run on the transformers this server "
        "uses: serve it with vLLM (--trust-remote-code) and use --backend openai (see docs/remote.md)"
    )
    detailed_caption = "Describe this image."  # the Molmo card's prompt; PixMo-Cap taught it long captions
    without_it = "native pointing is unavailable"
    parser = molmo_parser
