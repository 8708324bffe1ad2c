"""The three model families: their task prompts and how their answers become an :class:`Output`.

* PaliGemma 2 (mix) follows fixed task prefixes (``caption en``, ``answer en …``, ``detect a ; b``, ``ocr``)
  and has no chat template; its prompt ends at a newline, so user text is kept on one line. It has no
  pointing: a point request runs ``detect`` and reports box centres, marked ``point_source="box_center"``.
* Molmo2 and Molmo (0924) take free-form English instructions and point natively; they have no boxes.

Prompts are the text of the user turn; the backend puts the image beside it (PaliGemma's processor, or a
chat template). Caller text in a prompt (questions, descriptions, labels, language codes) goes through the
family's control-token neutraliser. Invalid requests raise :class:`~vlm_tools.errors.InvalidArgument` /
:class:`~vlm_tools.errors.UnsupportedByModel`; odd model output never raises.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..errors import InvalidArgument, UnsupportedByModel
from ..geometry import NormBox, NormPoint
from ..parsing import molmo, molmo2, paligemma
from . import control_tokens as control
from .base import Output, Request, Task
from .family import Family

LANGUAGE_NAMES: dict[str, str] = {
    "ar": "Arabic", "bg": "Bulgarian", "bn": "Bengali", "ca": "Catalan", "cs": "Czech", "da": "Danish",
    "de": "German", "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian", "fa": "Persian",
    "fi": "Finnish", "fil": "Filipino", "fr": "French", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian",
    "hu": "Hungarian", "id": "Indonesian", "it": "Italian", "ja": "Japanese", "ko": "Korean",
    "lt": "Lithuanian", "lv": "Latvian", "ms": "Malay", "nl": "Dutch", "no": "Norwegian", "pl": "Polish",
    "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sk": "Slovak", "sl": "Slovenian", "sr": "Serbian",
    "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "te": "Telugu", "th": "Thai", "tr": "Turkish",
    "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese", "zh": "Chinese",
}  # fmt: skip
"""ISO 639-1 codes → English names, for free-form prompts ("Answer in German."). Unknown codes pass as is."""

_DETERMINER = re.compile(r"(?i)(the|a|an|all|every|each|any|some|this|that|these|those|my|your|its|their)\b")


def one_line(text: str) -> str:
    """``text`` on one line: every line break and run of whitespace becomes one space; ends stripped."""
    return " ".join(text.split())


def _require_text(value: str, what: str) -> str:
    text = one_line(value)
    if not text:
        raise InvalidArgument(f"{what} is empty; give a non-empty {what}")
    return text


def _language(family: Family, request: Request) -> str:
    return family.caller_text(one_line(request.language)) or "en"


def _check_task(family: Family, task: Task) -> None:
    if task not in family.supported:
        can = ", ".join(sorted(t.value for t in family.supported))
        raise UnsupportedByModel(f"{family.name} models cannot do '{task.value}'; they can do: {can}")


def _labelled(points: list[NormPoint], fallback: str | None, limit: int) -> list[NormPoint]:
    """At most ``limit`` points; a point without a label gets ``fallback``."""
    return [p if p.label else NormPoint(p.x, p.y, fallback) for p in points[: max(limit, 0)]]


class PaliGemma(Family):
    """PaliGemma 2 ``mix`` checkpoints: task-prefix prompts, ``<loc>`` boxes, box centres as points."""

    name = "paligemma"
    native = frozenset({Task.CAPTION, Task.ANSWER, Task.DETECT, Task.OCR})
    supported = native | {Task.POINT}
    control_tokens = control.PALIGEMMA

    def prompt(self, request: Request) -> str:
        """The task prefix, e.g. ``"caption en"`` or ``"detect cat ; dog"``; user text kept on one line."""
        _check_task(self, request.task)
        lang = _language(self, request)
        if request.task is Task.CAPTION:
            return f"{'describe' if request.detail == 'detailed' else 'caption'} {lang}"
        if request.task is Task.ANSWER:
            return f"answer {lang} {self.caller_text(_require_text(request.text, 'question'))}"
        if request.task is Task.DETECT:
            return "detect " + " ; ".join(self._prompt_labels(request))
        if request.task is Task.POINT:
            return f"detect {self._prompt_thing(request.text)}"
        return "ocr"

    def interpret(self, request: Request, raw: str) -> Output:
        """Text for caption / answer / OCR; boxes for detect; box centres (and their boxes) for point."""
        if request.task is Task.DETECT:
            return Output(raw=raw, boxes=self._map_labels(request, paligemma.parse_detections(raw)))
        if request.task is Task.POINT:
            description = one_line(request.text) or None
            boxes = [
                NormBox(b.x0, b.y0, b.x1, b.y1, description or b.label)
                for b in paligemma.parse_detections(raw)[: max(request.max_points, 0)]
            ]
            return Output(raw=raw, boxes=boxes, points=[b.center() for b in boxes], point_source="box_center")
        return Output(raw=raw, text=paligemma.strip_special(raw, self._echo(request)))

    def _prompt_thing(self, label: str) -> str:
        # " ; " separates things in a detect prompt: a ';' inside one label would split it in two.
        return self.caller_text(_require_text(label.replace(";", ","), "description"))

    def _prompt_labels(self, request: Request) -> list[str]:
        if not request.labels:
            raise InvalidArgument("labels is empty; give at least one thing to detect")
        return [self._prompt_thing(label) for label in request.labels]

    def _map_labels(self, request: Request, boxes: list[NormBox]) -> list[NormBox]:
        """Give each box the requested label it names (case-insensitive, whitespace-insensitive).

        A box whose label matches no requested label keeps the model's label; an unlabelled box gets the
        requested label when exactly one was requested.
        """
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


class _FreeForm(Family):
    """A family that takes English instructions and points natively (Molmo2, Molmo)."""

    native = frozenset({Task.CAPTION, Task.ANSWER, Task.POINT, Task.OCR})
    supported = native

    brief_caption = "Describe this image in one or two sentences."
    detailed_caption = "Describe this image in detail."
    ocr_instruction = "Transcribe all the text in this image. Keep the reading order."
    parse_points: Callable[[str], list[NormPoint]]
    clean_text: Callable[[str], str]

    def prompt(self, request: Request) -> str:
        """A free-form instruction; for a language other than English, " Answer in <language>." is added."""
        _check_task(self, request.task)
        if request.task is Task.POINT:
            return self.point_instruction(self.caller_text(_require_text(request.text, "description")))
        if request.task is Task.CAPTION:
            text = self.detailed_caption if request.detail == "detailed" else self.brief_caption
        elif request.task is Task.ANSWER:
            text = self.caller_text(request.text.strip())
            if not text:
                raise InvalidArgument("question is empty; give a non-empty question")
        else:
            text = self.ocr_instruction
        lang = _language(self, request)
        if lang.casefold() != "en":
            text += f" Answer in {LANGUAGE_NAMES.get(lang.casefold(), lang)}."
        return text

    @staticmethod
    def point_instruction(description: str) -> str:
        """``"Point to the <description>."``, without a doubled article (``"Point to all cats."``)."""
        description = description.rstrip(" .")
        if _DETERMINER.match(description):
            return f"Point to {description}."
        return f"Point to the {description}."

    def interpret(self, request: Request, raw: str) -> Output:
        """Points (at most ``max_points``, labelled by ``alt`` or the description) and the prose around them."""
        text = self.clean_text(raw)
        if request.task is not Task.POINT:
            return Output(raw=raw, text=text)
        points = _labelled(self.parse_points(raw), one_line(request.text) or None, request.max_points)
        return Output(raw=raw, text=text, points=points, point_source="native")


class Molmo2(_FreeForm):
    """Molmo2 (native in transformers 5.23): ``<points coords=…>`` on 0–1000."""

    name = "molmo2"
    control_tokens = control.MOLMO2
    parse_points = staticmethod(molmo2.parse_points)
    clean_text = staticmethod(molmo2.clean_text)


class Molmo(_FreeForm):
    """Molmo 0924 (served remotely, e.g. by vLLM): percent ``<point x= y=>`` markup."""

    name = "molmo"
    control_tokens = control.MOLMO
    detailed_caption = "Describe this image."  # the Molmo card's prompt; PixMo-Cap taught it long captions
    parse_points = staticmethod(molmo.parse_points)
    clean_text = staticmethod(molmo.clean_text)


FAMILIES: dict[str, Family] = {f.name: f for f in (PaliGemma(), Molmo2(), Molmo())}
"""Every family by name (the ``model_type`` of its checkpoints)."""


def get_family(name: str) -> Family:
    """The family object for a ``model_type`` / family name; raises ``KeyError`` for an unknown one."""
    return FAMILIES[name]
