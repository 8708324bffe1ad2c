"""PaliGemma 2 ``mix``: fixed task prefixes (``caption en``, ``answer en …``, ``detect a ; b``, ``ocr``), no chat
template, ``<locNNNN>`` boxes. It cannot point: a point request runs ``detect`` and answers with box centres,
marked ``point_source="box_center"``.
"""

from __future__ import annotations

import re

from ..backends.base import Output, Request, Task
from ..errors import InvalidArgument, UnsupportedByModel
from ..geometry import NormBox
from ..parsing import paligemma as parser
from .base import Checkpoint, Family, check_task, language_code, one_line, require_text

CONTROL_TOKENS = re.compile(
    r"<(?:pad|eos|bos|unk|mask|image|start_of_turn|end_of_turn|unused\d{1,3}|loc\d{4}|seg\d{3})>"
)
"""Gemma's special tokens (``<pad>`` 0 … ``<mask>`` 4, ``<unusedN>``, the turn markers), PaliGemma's ``<image>``, and
its ``<locNNNN>`` / ``<segNNN>`` tokens: ordinary tokens there, but text that spells them would read back as boxes."""


class PaliGemma(Family):
    """PaliGemma 2 ``mix`` checkpoints: task-prefix prompts, ``<loc>`` boxes, box centres as points."""

    name = "paligemma"
    title = "PaliGemma 2"
    native = frozenset({Task.CAPTION, Task.ANSWER, Task.DETECT, Task.OCR})
    supported = native | {Task.POINT}
    control_tokens = CONTROL_TOKENS
    local_backend = "vlm_tools.backends.paligemma_local:PaliGemmaBackend"
    # Gemma 2 soft-caps its attention scores, which SDPA cannot do: transformers refuses it for the text model, so
    # the text model runs eager attention (exact); the SigLIP vision tower has no soft-capping and runs SDPA.
    attention = {"text_config": "eager", "vision_config": "sdpa"}
    unstable_dtypes = frozenset({"float16"})  # Gemma 2 activations overflow float16 (vLLM refuses it too)
    # Embeddings tied to the output head; 2.0 B of the weights are the language model's linear layers.
    checkpoints = (Checkpoint("google/paligemma2-3b-mix-448", 3_033_127_152, quantisable=2_024_275_968),)
    serve_by_default = True
    offline_fixture = "tests/fixtures/models/paligemma-ui"
    gated = True
    without_it = "detect (boxes) is unavailable"

    def prompt(self, request: Request) -> str:
        """The task prefix, e.g. ``"caption en"`` or ``"detect cat ; dog"``; user text kept on one line."""
        check_task(self, request.task)
        lang = language_code(self, request)
        if request.task is Task.CAPTION:
            return f"{'describe' if request.detail == 'detailed' else 'caption'} {lang}"
        if request.task is Task.ANSWER:
            return f"answer {lang} {self.caller_text(require_text(request.text, 'question'))}"
        if request.task is Task.DETECT:
            return "detect " + " ; ".join(self._prompt_labels(request))
        if request.task is Task.POINT:
            return f"detect {self._prompt_thing(request.text)}"
        return "ocr"

    def interpret(self, request: Request, raw: str) -> Output:
        """Text for caption / answer / OCR; boxes for detect; box centres (and their boxes) for point."""
        if request.task is Task.DETECT:
            boxes = parser.parse_detections(raw)
            return Output(raw=raw, boxes=self._map_labels(request, boxes), unreadable=parser.unread_boxes(raw, boxes))
        if request.task is Task.POINT:
            description = one_line(request.text) or None
            found = parser.parse_detections(raw)
            boxes = [NormBox(b.x0, b.y0, b.x1, b.y1, description or b.label) for b in found[: max(request.max_points, 0)]]
            return Output(raw=raw, boxes=boxes, points=[b.center() for b in boxes], point_source="box_center",
                          unreadable=parser.unread_boxes(raw, found))  # fmt: skip
        return Output(raw=raw, text=parser.strip_special(raw, self._echo(request)))

    def _prompt_thing(self, label: str) -> str:
        # " ; " separates things in a detect prompt: a ';' inside one label would split it in two.
        return self.caller_text(require_text(label.replace(";", ","), "description"))

    def _prompt_labels(self, request: Request) -> list[str]:
        if not request.labels:
            raise InvalidArgument("labels is empty; give at least one thing to detect")
        return [self._prompt_thing(label) for label in request.labels]

    def _map_labels(self, request: Request, boxes: list[NormBox]) -> list[NormBox]:
        """Give each box the requested label it names (case- and whitespace-insensitive); a box naming no requested
        label keeps the model's; an unlabelled box gets the requested label when exactly one was requested."""
        wanted: dict[str, str] = {}
        for requested in request.labels:
            # As asked, and as the prompt spelt it (a ';' made ',', control-token spellings broken up).
            for spelling in (requested, self.caller_text(requested.replace(";", ","))):
                wanted.setdefault(one_line(spelling).casefold(), requested)
        only = request.labels[0] if len(request.labels) == 1 else None
        mapped = []
        for box in boxes:
            label: str | None = only
            if box.label:
                label = wanted.get(one_line(box.label).casefold(), box.label)
            mapped.append(NormBox(box.x0, box.y0, box.x1, box.y1, label))
        return mapped

    def _echo(self, request: Request) -> str | None:
        """The prompt as the model may echo it, or ``None`` when the request cannot make one."""
        try:
            return self.prompt(request)
        except (InvalidArgument, UnsupportedByModel):
            return None
