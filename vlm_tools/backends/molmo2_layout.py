"""How a Molmo2 checkpoint's prompt is laid out around an image, decided once at load by probing the checkpoint.

Molmo2 checkpoints differ in their chat templates; rather than assume one, :func:`plan_layout` probes the
checkpoint's own and picks a serving mode (:class:`Molmo2Layout`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image

Mode = Literal["prefix", "reuse", "processor"]

_PLACEHOLDERS = ("VLMTOOLSPROMPTA", "VLMTOOLSPROMPTB")
_PROBE_PROMPTS = ("Point to the red button.", "What does the sign say? Answer in German.")


@dataclass(frozen=True)
class Molmo2Layout:
    """The serving path chosen for one checkpoint and how to lay a prompt out on it.

    The modes:

    * ``prefix`` — everything up to and including the image is the same for every prompt: the language model's keys
      and values over it are read once per image and kept (:mod:`~vlm_tools.backends.prefixes`);
    * ``reuse`` — the image's encoding is reused, the whole prompt is read each time (the prompt precedes the image);
    * ``processor`` — the processor's own call every time (the fast layouts do not reproduce its tokens).

    Attributes:
        mode: ``prefix``, ``reuse`` or ``processor``.
        reason: why, in words, for the start-up line and ``doctor``.
        render: the prompt's full text as the chat template writes it (image placeholder included).
        image_token: the placeholder the template writes for the image.
        lead_ids: tokens the processor puts before the template's text (BOS, unless the template emits it).
        tokenize: text → token ids, no special tokens added.
    """

    mode: Mode
    reason: str
    render: Callable[[str], str]
    image_token: str
    lead_ids: tuple[int, ...] = ()
    tokenize: Callable[[str], list[int]] = lambda text: []

    def split(self, prompt: str) -> tuple[str, str]:
        """The template's text before and after the image placeholder, for ``prompt``."""
        before, _, after = self.render(prompt).partition(self.image_token)
        return before, after

    def head_ids(self) -> list[int]:
        """``prefix`` mode: the tokens before the image, the same for every prompt."""
        return [*self.lead_ids, *self.tokenize(self.split(_PLACEHOLDERS[0])[0])]

    def turn_ids(self, prompt: str) -> list[int]:
        """The tokens after the image: the user's turn and the generation prompt."""
        return self.tokenize(self.split(prompt)[1])

    def row_ids(self, prompt: str, image_ids: Sequence[int]) -> list[int]:
        """A whole prompt's tokens around an image's tokens, as the processor writes them."""
        before, after = self.split(prompt)
        return [*self.lead_ids, *self.tokenize(before), *image_ids, *self.tokenize(after)]

    def describe(self) -> str:
        """``kv-prefix (…)``: the mode as users read it, with its reason."""
        name = {"prefix": "kv-prefix", "reuse": "encoding reuse", "processor": "processor"}[self.mode]
        return f"{name} ({self.reason})"


def conversation(image: Any, prompt: str) -> list[dict[str, Any]]:
    """One user turn holding the image and the prompt, as the processor's chat template takes it."""
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]


def plan_layout(processor: Any) -> Molmo2Layout:
    """Probe ``processor`` (its chat template, tokenizer and image processor) and choose the serving layout; no
    model weights are needed. ``prefix`` here still has to pass the model's own check at load.

    Molmo2 checkpoints differ in their chat templates: Molmo2-4B hoists the image to the front
    (``<|image|><|im_start|>user\\n…``); others put it inside the user turn, emit BOS themselves, or carry a
    preamble. Rather than assume one, this renders the checkpoint's own template around placeholder prompts, lays
    the tokens out as the fast paths would, and holds them against the processor's own output on a probe image,
    token for token.

    The template's fixed text is rendered once, with a placeholder where the prompt goes, when the template passes a
    prompt through verbatim (checked); otherwise it is rendered per request.
    """
    tokenizer = processor.tokenizer
    image_token = getattr(processor, "image_token", None) or "<|image|>"

    def render_now(prompt: str) -> str:
        return processor.apply_chat_template([conversation(None, prompt)], tokenize=False, add_generation_prompt=True)[0]

    try:
        rendered = [render_now(p) for p in (*_PLACEHOLDERS, *_PROBE_PROMPTS)]
    except Exception as error:  # noqa: BLE001 - a template that cannot render alone is served by the processor
        return Molmo2Layout("processor", f"the chat template does not render on its own: {error}", render_now,
                            image_token)  # fmt: skip
    counts = {text.count(image_token) for text in rendered}
    if counts != {1}:
        return Molmo2Layout("processor", f"the chat template writes {sorted(counts)} image placeholders",
                            render_now, image_token)  # fmt: skip
    render = _fixed_render(rendered, render_now)

    def tokenize(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    lead = _lead_ids(processor, render, image_token, tokenize)
    if lead is None:
        return Molmo2Layout("processor", "the template's text around the image does not tokenize as the processor "
                            "lays it out", render, image_token)  # fmt: skip
    fixed_head = render(_PLACEHOLDERS[0]).partition(image_token)[0] == render(_PLACEHOLDERS[1]).partition(image_token)[0]
    if fixed_head:
        return Molmo2Layout("prefix", "the template puts the image before the prompt", render, image_token, lead,
                            tokenize)  # fmt: skip
    return Molmo2Layout("reuse", "the template puts the prompt before the image", render, image_token, lead, tokenize)


def _fixed_render(rendered: list[str], render_now: Callable[[str], str]) -> Callable[[str], str]:
    """Render once with a placeholder where the prompt goes, when the template passes a prompt through verbatim."""
    first, second, *real = rendered
    pattern = first
    verbatim = pattern.count(_PLACEHOLDERS[0]) == 1 and second == pattern.replace(_PLACEHOLDERS[0], _PLACEHOLDERS[1])
    verbatim = verbatim and all(
        text == pattern.replace(_PLACEHOLDERS[0], prompt) for text, prompt in zip(real, _PROBE_PROMPTS, strict=True)
    )
    if not verbatim:
        return render_now
    head, _, tail = pattern.partition(_PLACEHOLDERS[0])
    return lambda prompt: head + prompt + tail


def _lead_ids(
    processor: Any, render: Callable[[str], str], image_token: str, tokenize: Callable[[str], list[int]]
) -> tuple[int, ...] | None:
    """What the processor puts before the template's text, read off its output on a probe image for two prompts;
    ``None`` when the rest of its tokens is not the template's text around the image's tokens."""
    probe = probe_image()
    grid = processor.image_processor(images=[probe], return_tensors="pt")["image_grids"][0].tolist()
    image_ids = tokenize(processor.replace_image_token({"image_grids": [grid]}, image_idx=0))
    lead: tuple[int, ...] | None = None
    for prompt in _PROBE_PROMPTS:
        text = render(prompt)
        ids = processor(images=[probe], text=[text], return_tensors="pt")["input_ids"][0].tolist()
        before, _, after = text.partition(image_token)
        rest = [*tokenize(before), *image_ids, *tokenize(after)]
        if len(ids) < len(rest) or ids[len(ids) - len(rest) :] != rest:
            return None
        found = tuple(ids[: len(ids) - len(rest)])
        if lead is not None and found != lead:
            return None
        lead = found
    return lead


def probe_image() -> Image.Image:
    """A small deterministic image with structure (a gradient), for probing processors and paths."""
    return Image.linear_gradient("L").resize((96, 64)).convert("RGB")
