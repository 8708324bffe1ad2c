"""Control tokens per family, and the one function that keeps caller text from spelling them.

A caller's question, description or label is text. If it spells a control token of the model's tokenizer
(``<image>``, ``<eos>``, ``<|im_end|>``…), the tokenizer would turn that spelling into the token itself: a question
could end the user turn early, forge an image placeholder, or (PaliGemma) plant location tokens that read as
geometry. :func:`neutralise` breaks each such spelling up with a space after its first character
(``<|im_end|>`` → ``< |im_end|>``), and the families apply it to every piece of caller text when they build a
prompt. The local and the remote backends send the family's prompt, so the same caller text gives the same prompt
however the model is served.

The lists are the tokens the real tokenizers treat as special (``tests/test_control_tokens.py`` holds them against
the published tokenizer files), plus PaliGemma's location and segmentation tokens: they are ordinary tokens there,
but text that spells them would be read back as boxes. Everything else passes unchanged — ``<b>``, ``1 < 2``,
HTML in a question — as the real tokenizers leave it.
"""

from __future__ import annotations

import re

PALIGEMMA = re.compile(
    r"<(?:pad|eos|bos|unk|mask|image|start_of_turn|end_of_turn|unused\d{1,3}|loc\d{4}|seg\d{3})>"
)
"""Gemma's special tokens (``<pad>`` 0 … ``<mask>`` 4, ``<unusedN>``, the turn markers), PaliGemma's ``<image>``, and
its ``<locNNNN>`` / ``<segNNN>`` tokens."""

MOLMO2 = re.compile(
    r"<\|(?:endoftext|im_start|im_end|object_ref_start|object_ref_end|box_start|box_end|quad_start|quad_end"
    r"|vision_start|vision_end|vision_pad|image_pad|video_pad|image|video)\|>"
    r"|\|<EXTRA_TOKENS_\d{1,3}>\|"
    r"|<(?:im_start|im_end|im_patch|im_col|low_res_im_start|im_low|frame_start|frame_end)>"
)
"""The special added tokens of Molmo2's Qwen2 tokenizer (``<|endoftext|>`` … ``<|video_pad|>``, the
``|<EXTRA_TOKENS_N>|`` fillers) and its image and video tokens. ``<tool_call>``, ``<think>`` and the other Qwen
tokens that are added but not special stay as they are."""

MOLMO = re.compile(r"<\|[a-z_]{1,40}\|>|<(?:im_patch|im_col|im_start|im_end)>")
"""Molmo 0924 (Qwen2 or OLMo tokenizers): their ``<|…|>`` chat specials and the image tokens of its processor."""

FAMILY_CONTROL_TOKENS: dict[str, re.Pattern[str]] = {"paligemma": PALIGEMMA, "molmo2": MOLMO2, "molmo": MOLMO}


def neutralise(text: str, control: re.Pattern[str]) -> str:
    """``text`` with every spelling that ``control`` matches broken up by a space after its first character."""
    return control.sub(lambda m: m.group(0)[0] + " " + m.group(0)[1:], text)
