"""Shared text helpers for the family parsers: XML-ish point markup and special tokens.

Everything here is lenient with model output: any ``str`` goes in, nothing raises, and a truncated or
malformed element yields only what was complete. Non-``str`` input is a programming error (``TypeError``).
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from dataclasses import dataclass

# Chat-template specials of the Qwen / OLMo tokenizers Molmo and Molmo2 use (``<|im_end|>``,
# ``<|endoftext|>``, ...), and Molmo2's image placeholders, which appear only when a prompt is echoed.
_CHAT_SPECIAL = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>")
_IMAGE_TOKENS = re.compile(
    r"</?(?:im_patch|im_col|im_start|low_res_im_start|frame_start|im_end|frame_end|im_low)>"
)

# One attribute: name = "value" | 'value' | "unterminated-to-end-of-text.
_ATTR = re.compile(
    r"""(?<![A-Za-z0-9_:-])([A-Za-z_][A-Za-z0-9_:-]*)\s*=\s*(?:"([^"]*)"|'([^']*)'|(["'])(.*)\Z)""",
    re.DOTALL,
)


@dataclass(frozen=True)
class Element:
    """One ``<name attr=...>inner</name>`` element as found in model output.

    Attributes:
        name: the tag name, lower-cased.
        attrs: complete attribute values (HTML entities decoded).
        cut: attributes whose value the end of the output cut off, with the part that came (its last
            characters may be a number cut in half).
        inner: the text between the tags, or ``None`` when there is none (self-closing or never closed).
        complete: whether the element ended properly (a closing tag, or ``/>``).
        start, end: the span of the whole element in the source text.
    """

    name: str
    attrs: dict[str, str]
    cut: dict[str, str]
    inner: str | None
    complete: bool
    start: int
    end: int

    @property
    def label(self) -> str | None:
        """The element's label: its ``alt`` attribute, else its inner text, else ``None``."""
        for candidate in (self.attrs.get("alt"), self.inner):
            if candidate is not None:
                cleaned = collapse_ws(html.unescape(candidate))
                if cleaned:
                    return cleaned
        return None


def require_str(raw: object) -> str:
    """Return ``raw`` if it is a ``str``; raise ``TypeError`` otherwise (a caller bug, not model output)."""
    if not isinstance(raw, str):
        raise TypeError(f"model output must be str, got {type(raw).__name__}")
    return raw


def collapse_ws(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def parse_attrs(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Attributes of a tag body: complete values, and values the output cut off (with what came of them).

    Single or double quotes; any order; names lower-cased; HTML entities decoded; the first of duplicate
    names wins. A value whose closing quote never came (the output ended inside it) is reported in the
    second dict, not the first: its last characters may be a number cut in half.
    """
    attrs: dict[str, str] = {}
    cut: dict[str, str] = {}
    for m in _ATTR.finditer(text):
        name = m.group(1).lower()
        if m.group(4) is not None:
            if name not in attrs:
                cut.setdefault(name, html.unescape(m.group(5)))
            continue
        value = m.group(2) if m.group(2) is not None else m.group(3)
        attrs.setdefault(name, html.unescape(value))
    return attrs, cut


def find_elements(raw: str, names: Iterable[str]) -> list[Element]:
    """All elements with one of the tag ``names`` (case-insensitive), in order, closed or not.

    An opening tag that the output cut off before its ``>`` still yields an element (with its complete
    attributes and ``inner=None``); an element whose closing tag never came has ``inner=None``.
    """
    alternatives = "|".join(sorted((re.escape(n) for n in names), key=len, reverse=True))
    opening = re.compile(rf"<({alternatives})(?=[\s/>]|\Z)([^<>]*)(>|\Z)", re.IGNORECASE)
    found: list[Element] = []
    # Once a closing tag is missing after some position it is missing after every later one: remembering
    # that keeps hostile output (thousands of unclosed tags) linear instead of quadratic.
    no_closing_after: dict[str, int] = {}
    pos = 0
    while True:
        m = opening.search(raw, pos)
        if m is None:
            return found
        name = m.group(1).lower()
        body = m.group(2)
        tag_closed = m.group(3) == ">"
        self_closing = tag_closed and body.rstrip().endswith("/")
        # Whitespace at the end of a cut-off body is information (the last number was complete): keep it.
        attrs, cut = parse_attrs(body.rstrip().removesuffix("/") if self_closing else body)
        inner: str | None = None
        complete = self_closing
        end = m.end()
        if tag_closed and not self_closing and m.end() < no_closing_after.get(name, len(raw) + 1):
            c = re.compile(rf"</{re.escape(name)}\s*>", re.IGNORECASE).search(raw, m.end())
            if c is None:
                no_closing_after[name] = m.end()
            else:
                inner = raw[m.end() : c.start()]
                complete = True
                end = c.end()
        found.append(Element(name, attrs, cut, inner, complete, m.start(), end))
        pos = max(end, m.start() + 1)


def replace_elements(raw: str, names: Iterable[str]) -> str:
    """``raw`` with every named element replaced by the text inside it (or nothing), ends stripped.

    ``"Counting the <points ...>boats</points> shows a total of 3."`` becomes
    ``"Counting the boats shows a total of 3."``. An element that was never closed swallows the rest of the
    output (what follows its opening tag is its unfinished label, not prose). Text without elements comes
    back as it was, only stripped.
    """
    elements = find_elements(raw, tuple(names))
    if not elements:
        return raw.strip()
    pieces: list[str] = []
    pos = 0
    for el in elements:
        if el.start < pos:  # nested inside an element already replaced
            continue
        pieces.append(raw[pos : el.start])
        if not el.complete:
            pos = len(raw)
            break
        pieces.append(collapse_ws(html.unescape(el.inner or "")))
        pos = el.end
    pieces.append(raw[pos:])
    text = "".join(pieces)
    # Tidy the seams a removed element leaves (double spaces, "cats ."); line breaks are layout and stay.
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r" +([.,;:!?])", r"\1", text)
    return text.strip()


def strip_chat_specials(raw: str) -> str:
    """Remove chat-template special tokens (``<|im_end|>``, ``<|endoftext|>``, image placeholders).

    Text after an end-of-turn token is dropped: in a batch it is padding or a new, unrelated turn.
    """
    # A decoded sequence that still holds the prompt: the answer starts after the last assistant header.
    header = raw.rfind("<|im_start|>assistant")
    if header != -1:
        raw = raw[header + len("<|im_start|>assistant") :]
    end = re.search(r"<\|(?:im_end|endoftext|eot_id|end_of_text)\|>", raw)
    if end is not None:
        raw = raw[: end.start()]
    raw = _CHAT_SPECIAL.sub("", raw)
    raw = _IMAGE_TOKENS.sub("", raw)
    return raw.strip()
