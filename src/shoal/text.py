"""Splitting long text into segments that are generated one after another.

The reference generates a whole text as one segment whatever its length. shoal does the same for any text of
at most `chunk_length` characters (so short requests stay bit-identical to the reference), and splits longer
texts at sentence ends, then at clause punctuation, then at spaces, so that no segment exceeds `chunk_length`.
`chunk_length=0` turns splitting off. The text itself is never rewritten.
"""

from __future__ import annotations

import re

# Where a break is best placed, best first: after a sentence end (and any closing quotes or brackets), after
# clause punctuation, at a space. Group 1 is the separator, which is dropped when a segment ends there.
_BREAKS = (
    re.compile(r"[.!?。！？…][\"'”’)\]]*(\s+|(?<=[。！？])|$)"),
    re.compile(r"[,;:，；：、](\s*)"),
    re.compile(r"(\s+)"),
)


def split_text(text: str, chunk_length: int, min_length: int = 0) -> list[str]:
    """Split `text` into segments of at most `chunk_length` characters (0: never split).

    Segments are slices of the original text: only the whitespace at a break is dropped. A run of
    `chunk_length` characters with no break at all is cut hard. A segment shorter than `min_length` is joined
    to the one before it (the first, to the one after), even past `chunk_length`: a few words alone make a
    segment too short to carry the voice.
    """
    if chunk_length <= 0 or len(text) <= chunk_length:
        return [text]
    spans = _split(text, 0, len(text), chunk_length, 0)
    if min_length > 0:
        spans = _join_short(spans, min_length)
    return [text[a:b] for a, b in spans]


def _join_short(spans: list[tuple[int, int]], min_length: int) -> list[tuple[int, int]]:
    joined: list[tuple[int, int]] = []
    for a, b in spans:
        if joined and (b - a < min_length or joined[-1][1] - joined[-1][0] < min_length):
            joined[-1] = (joined[-1][0], b)
        else:
            joined.append((a, b))
    return joined


def _split(text: str, start: int, end: int, limit: int, level: int) -> list[tuple[int, int]]:
    """Spans of text[start:end], each at most `limit` long, packed greedily from `level`'s pieces."""
    start, end = _trim(text, start, end)
    if end - start <= limit:
        return [(start, end)] if end > start else []
    if level == len(_BREAKS):
        return [(i, min(i + limit, end)) for i in range(start, end, limit)]
    spans: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for a, b in _pieces(text, start, end, _BREAKS[level]):
        if b - a > limit:
            if current:
                spans.append(current)
                current = None
            spans.extend(_split(text, a, b, limit, level + 1))
        elif current and b - current[0] <= limit:
            current = (current[0], b)
        else:
            if current:
                spans.append(current)
            current = (a, b)
    if current:
        spans.append(current)
    return spans


def _pieces(text: str, start: int, end: int, pattern: re.Pattern) -> list[tuple[int, int]]:
    """Spans between separators (group 1 of each match of `pattern`)."""
    pieces, begin = [], start
    for m in pattern.finditer(text, start, end):
        cut, resume = m.span(1)
        if cut > begin:
            pieces.append(_trim(text, begin, cut))
        begin = max(resume, begin)
    if begin < end:
        pieces.append(_trim(text, begin, end))
    return [(a, b) for a, b in pieces if b > a]


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end
