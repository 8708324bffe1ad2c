"""Families that take English instructions and point natively (Molmo2, Molmo): their shared prompts."""

from __future__ import annotations

import re
from types import ModuleType

from ..backends.base import Output, Request, Task
from ..errors import InvalidArgument
from ..geometry import NormPoint
from .base import Family, check_task, language_code, one_line, require_text

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


class FreeFormFamily(Family):
    """Free-form English instructions; the answer read by :attr:`parser` (``parse_points``, ``unread_markup``,
    ``clean_text``: one of :mod:`vlm_tools.parsing`)."""

    native = frozenset({Task.CAPTION, Task.ANSWER, Task.POINT, Task.OCR})
    supported = native

    brief_caption = "Describe this image in one or two sentences."
    detailed_caption = "Describe this image in detail."
    ocr_instruction = "Transcribe all the text in this image. Keep the reading order."
    parser: ModuleType

    def prompt(self, request: Request) -> str:
        """A free-form instruction; for a language other than English, " Answer in <language>." is added."""
        check_task(self, request.task)
        if request.task is Task.POINT:
            return self.point_instruction(self.caller_text(require_text(request.text, "description")))
        if request.task is Task.CAPTION:
            text = self.detailed_caption if request.detail == "detailed" else self.brief_caption
        elif request.task is Task.ANSWER:
            text = self.caller_text(request.text.strip())
            if not text:
                raise InvalidArgument("question is empty; give a non-empty question")
        else:
            text = self.ocr_instruction
        lang = language_code(self, request)
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
        text = self.parser.clean_text(raw)
        if request.task is not Task.POINT:
            return Output(raw=raw, text=text)
        fallback, limit = one_line(request.text) or None, max(request.max_points, 0)
        points = [p if p.label else NormPoint(p.x, p.y, fallback) for p in self.parser.parse_points(raw)[:limit]]
        unreadable = self.parser.unread_markup(raw)
        return Output(raw=raw, text=text, points=points, point_source="native", unreadable=unreadable)
