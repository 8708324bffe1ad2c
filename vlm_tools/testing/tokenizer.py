"""A tiny byte-fallback vocabulary for test models built offline.

Every string tokenises: printable ASCII characters are single tokens and anything else (``"\\n"``, accented
letters, emoji) falls back to the 256 ``<0xNN>`` byte tokens, so the trailing newline PaliGemma's prompt layout
needs survives (a whitespace pre-tokenizer would silently drop it). Deterministic: the same call gives the same
ids on every machine.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

SPACE_MARK = "▁"
"""SentencePiece's visible space: Gemma-style normalisers replace ``" "`` with it before the model sees text."""

PRINTABLE = string.ascii_letters + string.digits + string.punctuation
"""Characters given their own token (space is :data:`SPACE_MARK`)."""


def byte_tokens() -> list[str]:
    """The 256 byte-fallback tokens ``<0x00>`` … ``<0xFF>`` in byte order."""
    return [f"<0x{value:02X}>" for value in range(256)]


def byte_fallback_vocab(special_tokens: Sequence[str], *, space_mark: str = SPACE_MARK) -> dict[str, int]:
    """A vocabulary: ``special_tokens`` first (in order, so their ids are fixed), the byte tokens, then characters.

    Args:
        special_tokens: tokens that must have the lowest ids, e.g. ``("<pad>", "<eos>", "<bos>", "<unk>")``.
        space_mark: the token standing for a space (``"▁"`` for Gemma-style, ``"Ġ"`` for byte-level BPE).
    """
    vocab: dict[str, int] = {}
    for token in [*special_tokens, *byte_tokens(), space_mark, *PRINTABLE]:
        if token not in vocab:
            vocab[token] = len(vocab)
    return vocab
