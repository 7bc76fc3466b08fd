"""Cutting a document's pages into chunks sized in the office model's tokens, with overlap.

A chunk never spans two pages (so it cites one).  Pages are cut at paragraphs, then sentences,
then words when one is too long; each chunk starts with the last ``overlap`` tokens' worth of
sentences of the one before, so a fact cut in two is whole in one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import regex

_SENTENCE_END = regex.compile(r"(?<=[.!?。！？])\s+|\n+")


@dataclass(frozen=True, slots=True)
class Chunk:
    page: int | None  # 1-based, for paged documents
    start: int  # character range within the page's text
    end: int
    text: str
    tokens: int


def _pieces(text: str) -> list[tuple[int, int]]:
    """Sentence (or line) spans of ``text``, without the whitespace between them."""
    spans: list[tuple[int, int]] = []
    at = 0
    for found in _SENTENCE_END.finditer(text):
        if found.start() > at:
            spans.append((at, found.start()))
        at = found.end()
    if at < len(text):
        spans.append((at, len(text)))
    return [(a, b) for a, b in spans if text[a:b].strip()]


def _split_long(
    text: str, span: tuple[int, int], size: int, count: Callable[[str], int]
) -> list[tuple[int, int]]:
    """A span longer than ``size`` tokens, cut at spaces (or anywhere, in text without any)."""
    start, end = span
    out: list[tuple[int, int]] = []
    while start < end:
        # Characters per token vary; halve the guess until it fits.
        step = max(1, size * 3)
        stop = min(end, start + step)
        while stop - start > 1 and count(text[start:stop]) > size:
            stop = start + max(1, (stop - start) // 2)
        if stop < end:
            space = text.rfind(" ", start + 1, stop)
            if space > start + (stop - start) // 2:
                stop = space
        out.append((start, stop))
        start = stop
        while start < end and text[start].isspace():
            start += 1
    return out


def chunk_pages(
    pages: Sequence[str],
    paged: bool,
    count: Callable[[str], int],
    size: int,
    overlap: int,
) -> list[Chunk]:
    """``pages`` as chunks of at most ``size`` tokens (as ``count`` counts them)."""
    chunks: list[Chunk] = []
    for number, page in enumerate(pages, start=1):
        spans: list[tuple[int, int, int]] = []  # start, end, tokens
        for span in _pieces(page):
            n = count(page[span[0] : span[1]])
            if n > size:
                for part in _split_long(page, span, size, count):
                    spans.append((*part, count(page[part[0] : part[1]])))
            else:
                spans.append((*span, n))
        i = 0
        while i < len(spans):
            total, j = 0, i
            while j < len(spans) and (j == i or total + spans[j][2] + 1 <= size):
                total += spans[j][2] + 1
                j += 1
            start, end = spans[i][0], spans[j - 1][1]
            text = page[start:end].strip()
            # The sentences' counts, plus one per join: not tokenized again (a chunk's
            # tokens differ from its sentences' by a token or two at the joins).
            chunks.append(Chunk(number if paged else None, start, end, text, total))
            if j >= len(spans):
                break
            # Step back over the last sentences that fit in the overlap, never to ``i``.
            back, carried = j, 0
            while back - 1 > i and carried + spans[back - 1][2] <= overlap:
                back -= 1
                carried += spans[back][2]
            i = back
    return chunks
