"""Splitting long text into segments that are generated one after another.

The reference generates a whole text as one segment whatever its length. shoal does the same for any text of
at most `chunk_length` characters (so short requests stay bit-identical to the reference), and splits longer
texts at sentence ends, then at clause punctuation, then at spaces, so that no segment exceeds `chunk_length`.
`chunk_length=0` turns splitting off. The text itself is never rewritten.

S2 models split differently (`speaker_batches`, fish-speech 2.0's rule): only at `<|speaker:N|>` tags, into
speaker turns, which are grouped into batches of a few turns; each batch is one segment.
"""

from __future__ import annotations

import re

# A sentence end: its punctuation and any closing quotes or brackets. CJK full stops end a sentence without a
# space after them; the others need one, or the end of the text.
_SENTENCE_END = r"[.!?。！？…][\"'”’)\]]*"
_CJK_STOP = r"(?<=[。！？])"
# Where a break is best placed, best first: after a sentence end, after clause punctuation, at a space. Group 1
# is the separator, which is dropped when a segment ends there.
_BREAKS = (
    re.compile(_SENTENCE_END + r"(\s+|" + _CJK_STOP + r"|$)"),
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


#: A sentence end in text that is still arriving: the end of what has arrived so far is none (the next piece may
#: turn "3." into "3.14"), a space after the punctuation or a CJK full stop is.
_ARRIVED_SENTENCE_END = re.compile(_SENTENCE_END + r"(\s+|" + _CJK_STOP + r")")


class SentenceSegmenter:
    """Cuts text that arrives piece by piece into segments: at the first sentence end once a segment would be
    at least `min_length` characters long (0: at every sentence end), or whatever is buffered when the caller
    flushes. Segments are stripped of surrounding whitespace; blank ones are never returned."""

    def __init__(self, min_length: int):
        self.min_length = min_length
        self.buffer = ""

    def push(self, text: str) -> list[str]:
        """Add `text`; the segments it completes, in order."""
        self.buffer += text
        segments = []
        while (cut := self._cut()) is not None:
            segment, self.buffer = self.buffer[:cut].strip(), self.buffer[cut:]
            if segment:
                segments.append(segment)
        return segments

    def flush(self) -> str | None:
        """Everything buffered, however short, as one segment (None when only whitespace is buffered)."""
        segment, self.buffer = self.buffer.strip(), ""
        return segment or None

    def _cut(self) -> int | None:
        """Where the next segment ends in the buffer (after its sentence end's punctuation), if it is complete."""
        for match in _ARRIVED_SENTENCE_END.finditer(self.buffer):
            end = match.start(1)
            if len(self.buffer[:end].strip()) >= self.min_length:
                return end
        return None


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


# S2: a speaker tag, as fish-speech 2.0 matches it.
SPEAKER_TAG = re.compile(r"(<\|speaker:\d+\|>)")
#: S2: the most speaker turns one batch holds (fish-speech 2.0's generate_long passes 5).
MAX_SPEAKERS_PER_BATCH = 5


def speaker_turns(text: str) -> list[str]:
    """S2's speaker turns: each `<|speaker:N|>` tag with the text up to the next tag, stripped of surrounding
    whitespace; [] when the text has no tag. As in fish-speech 2.0 (`split_text_by_speaker`), text before the
    first tag belongs to no turn and is dropped."""
    parts = SPEAKER_TAG.split(text)
    # re.split with one group alternates text and tags: parts[0] is the text before the first tag, then each tag
    # is followed by the text up to the next one.
    return [(parts[i] + parts[i + 1]).strip() for i in range(1, len(parts), 2)]


def before_first_speaker(text: str) -> str:
    """The text before the first `<|speaker:N|>` tag ("" when there is no tag): what S2's turns leave out."""
    parts = SPEAKER_TAG.split(text, maxsplit=1)
    return parts[0] if len(parts) > 1 else ""


def speaker_batches(text: str, chunk_length: int) -> list[str]:
    """S2's segments: the speaker turns grouped in order into batches joined with newlines, a new batch starting
    when the current one holds MAX_SPEAKERS_PER_BATCH turns or the next turn would take it past `chunk_length`
    UTF-8 bytes (a single longer turn is a batch of its own). Without tags, the whole text is one batch.
    `chunk_length` 0 means no byte limit (shoal's "never split"; the reference's server never sends 0)."""
    turns = speaker_turns(text)
    if not turns:
        return [text]
    limit = chunk_length if chunk_length > 0 else None
    batches: list[list[str]] = []
    size = 0
    for turn in turns:
        n = len(turn.encode("utf-8"))
        if batches and len(batches[-1]) < MAX_SPEAKERS_PER_BATCH and (limit is None or size + n <= limit):
            batches[-1].append(turn)
            size += n
        else:
            batches.append([turn])
            size = n
    return ["\n".join(batch) for batch in batches]
