"""Split a document into overlapping chunks of whole words, each an exact slice of the text.

Windows of ``size`` words advance by ``size - overlap`` words, so a sentence cut
at one chunk's end starts whole in the next. A chunk keeps the document's own
spacing and line breaks (it is ``text[start:end]``), so markdown stays readable.
"""

from __future__ import annotations

import re

import msgspec

_WORD = re.compile(r"\S+")


class Chunk(msgspec.Struct, frozen=True):
    text: str
    start: int  # character offsets into the document
    end: int


def chunk(text: str, *, size: int, overlap: int) -> list[Chunk]:
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"need size >= 1 and 0 <= overlap < size (got size={size}, overlap={overlap})")
    words = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    chunks: list[Chunk] = []
    step = size - overlap
    for first in range(0, len(words), step):
        window = words[first : first + size]
        start, end = window[0][0], window[-1][1]
        chunks.append(Chunk(text[start:end], start, end))
        if first + size >= len(words):
            break
    return chunks
