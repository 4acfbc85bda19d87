"""Split a reply into parts WeCom will not truncate. Pure: no I/O.

WeCom silently truncates ``text.content`` beyond 2048 UTF-8 bytes
(https://developer.work.weixin.qq.com/document/path/90236), so a longer reply goes out as
several messages. The parts concatenate to the reply exactly: nothing is added (no
"(1/3)", no re-opened code fences) and nothing is trimmed, but for one thing: a part the
cuts would leave showing nothing (whitespace and invisible format characters only, such
as zero-width spaces) is left out::

    >>> split_text("第一段。\\n\\nsecond paragraph", limit=16)
    ['第一段。\\n\\n', 'second paragraph']
    >>> "".join(split_text("x" * 5000)) == "x" * 5000
    True

Each cut is the best boundary that fits in the byte budget, by rank: a paragraph (blank
line), a line, a sentence end (``。！？；`` or ``.!?;`` before whitespace, with closing
quotes and the whitespace after it), a run of whitespace, a character boundary that does
not break a grapheme, and as a last resort any code point. Separators stay at the end of
the part before the cut, so every part but a forced one starts with content.

Graphemes are Unicode's extended grapheme clusters (UAX #29: emoji ZWJ sequences, flags,
keycaps, skin tones, combining marks, Hangul syllables, Indic conjuncts), as the
``regex`` module's ``\\X`` finds them; the tests hold them to Unicode's own
GraphemeBreakTest. Only a boundary between two graphemes can rank better than a code
point: a space before a combining mark is no place to cut.

Two refinements keep the result readable:

- A cut never falls inside a fenced ``` code block while any allowed boundary outside
  fences exists in the budget; but a block over the limit is cut anyway, so when the
  boundaries outside would all leave the part under ``min_fill``, a cut inside such a
  block is taken first (cutting before it sent its intro line alone, a stub).
- A better-ranked boundary only wins if its part fills at least ``min_fill`` bytes (half
  the limit by default); otherwise a blank line near the start would send a stub, and
  WeCom drops a member's messages beyond 30 a minute (path/90454).
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from enum import IntEnum
from itertools import accumulate

import regex

from wecombot_common.text import shows_nothing

__all__ = [
    "WECOM_TEXT_LIMIT",
    "Boundary",
    "boundaries",
    "fenced_spans",
    "split_spans",
    "split_text",
]

WECOM_TEXT_LIMIT = 2048  # bytes of text.content, path/90236


class Boundary(IntEnum):
    """Ranks of cut positions, best first."""

    PARAGRAPH = 0
    LINE = 1
    SENTENCE = 2
    SPACE = 3
    GRAPHEME = 4
    CODEPOINT = 5


_PARAGRAPH = re.compile(r"\n[ \t\r\f\v\u3000]*\n(?:[ \t\r\f\v\u3000]*\n)*")
_CLOSERS = "”’」』）》〉】)]\"'"
_SENTENCE = re.compile(
    rf"(?:[。！？；][{re.escape(_CLOSERS)}]*|[.!?;][{re.escape(_CLOSERS)}]*(?=\s))\s*"
)
# A run of whitespace; a cut goes after it when content follows. (``\s+(?=\S)`` said the
# same, but retried from every space of a run at the window's end: quadratic.)
_SPACE_RUN = re.compile(r"\s+")
# A line that may open or close a fenced code block: its run of three or more backticks
# or tildes, and what follows on the line. Any indentation: a block in a list item is
# indented as deep as the item's text.
_FENCE_LINE = re.compile(r"^[ \t]*(`{3,}|~{3,})(.*)$", re.MULTILINE)
_GRAPHEME = regex.compile(r"\X")  # one extended grapheme cluster (UAX #29)


def split_text(
    text: str, *, limit: int = WECOM_TEXT_LIMIT, min_fill: int | None = None
) -> list[str]:
    """Split ``text`` into parts of at most ``limit`` UTF-8 bytes (see the module doc)."""
    return [text[start:end] for start, end in split_spans(text, limit=limit, min_fill=min_fill)]


def split_spans(
    text: str, *, limit: int = WECOM_TEXT_LIMIT, min_fill: int | None = None
) -> list[tuple[int, int]]:
    """Each part of :func:`split_text` as its ``(start, end)`` code point offsets in
    ``text``: in order and apart; what lies between them shows nothing
    (``wecombot_common.text.shows_nothing``).

    >>> split_spans("a" * 6 + " " * 20 + "b", limit=8)
    [(0, 8), (24, 27)]
    """
    if limit < 4:
        raise ValueError("limit must hold at least one character (4 bytes)")
    fill = limit // 2 if min_fill is None else min_fill
    offsets = [0, *accumulate(len(ch.encode("utf-8")) for ch in text)]
    fences = fenced_spans(text)
    fitting = [(b, e) for b, e in fences if offsets[e] - offsets[b] <= limit]
    too_big = [(b, e) for b, e in fences if offsets[e] - offsets[b] > limit]
    spans: list[tuple[int, int]] = []
    start = 0
    while start < len(text):
        cut = len(text)
        if offsets[-1] - offsets[start] > limit:
            end = bisect_right(offsets, offsets[start] + limit) - 1
            cut = _best_cut(text, start, end, offsets, (fitting, too_big), fill)
        # A part the cuts left whitespace only (inside a long run of blank lines or
        # spaces) shows nothing, and WeCom refuses empty content (44004, the global
        # error codes, path/90313): it is not sent. Nor one of zero-width characters,
        # an empty bubble. Nothing visible is lost.
        if not shows_nothing(text[start:cut]):
            spans.append((start, cut))
        start = cut
    return spans


def fenced_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each fenced code block, fences included; an unclosed one runs
    to the end of the text. Paired as Markdown (CommonMark) pairs them: a block is
    closed only by a fence of its own character, at least as long, with nothing after
    it on the line (so a ```` block may show ``` blocks, and a ```python line inside a
    block closes nothing); a line starting with ```x``` is inline code, not a fence.

    >>> fenced_spans("a\\n```py\\nx = 1\\n```\\nb")
    [(2, 18)]
    >>> fenced_spans("````md\\n```py\\nx\\n```\\n````\\nb")
    [(0, 24)]
    """
    spans: list[tuple[int, int]] = []
    opened: tuple[int, str, int] | None = None  # where, its character, its length
    for match in _FENCE_LINE.finditer(text):
        run, rest = match.group(1), match.group(2)
        if opened is None:
            if run[0] == "`" and "`" in rest:
                continue  # ```inline``` at a line's start: no fence
            opened = (match.start(), run[0], len(run))
            continue
        start, char, length = opened
        if run[0] != char or len(run) < length or rest.strip():
            continue  # inside the block, not its closing fence
        newline = text.find("\n", match.end())
        end = len(text) if newline < 0 else newline + 1
        spans.append((start, end))
        opened = None
    if opened is not None:
        spans.append((opened[0], len(text)))
    return spans


def boundaries(text: str, start: int, end: int) -> dict[int, Boundary]:
    """Every cut position in ``(start, end]`` with its best rank."""
    stop = min(len(text), end + 1)
    # a cluster starting at ``end`` needs ``text[end]``; a cut at the end of the text is whole
    graphemes = {match.start() for match in _GRAPHEME.finditer(text, start, stop)}
    graphemes.add(len(text))
    found: dict[int, Boundary] = {}

    def mark(pos: int, rank: Boundary) -> None:
        if not start < pos <= end:
            return
        if pos not in graphemes:
            rank = Boundary.CODEPOINT
        if pos not in found or rank < found[pos]:
            found[pos] = rank

    window = text[start:stop]
    for match in _PARAGRAPH.finditer(window):
        mark(start + match.end(), Boundary.PARAGRAPH)
    for index, ch in enumerate(window):
        if ch == "\n":
            mark(start + index + 1, Boundary.LINE)
    for match in _SENTENCE.finditer(text, start, stop):
        mark(match.end(), Boundary.SENTENCE)
    for match in _SPACE_RUN.finditer(window):
        if match.end() < len(window):
            mark(start + match.end(), Boundary.SPACE)
    for pos in range(start + 1, end + 1):
        mark(pos, Boundary.GRAPHEME)
    return found


def _best_cut(
    text: str,
    start: int,
    end: int,
    offsets: list[int],
    fences: tuple[list[tuple[int, int]], list[tuple[int, int]]],
    fill: int,
) -> int:
    """``fences``: the fenced blocks that fit in one part, and those that do not."""
    found = boundaries(text, start, end)
    fitting, too_big = fences
    fits_in, big_in = [begin for begin, _ in fitting], [begin for begin, _ in too_big]
    outside: dict[int, Boundary] = {}
    in_big: dict[int, Boundary] = {}
    for pos, rank in found.items():
        if not _inside(pos, fitting, fits_in):
            (in_big if _inside(pos, too_big, big_in) else outside)[pos] = rank
    tiers = (
        [(True, outside), (True, outside | in_big), (False, outside)]
        if outside
        else [(True, found), (False, found)]
    )
    for full_enough, allowed in tiers:
        best: tuple[Boundary, int] | None = None
        for pos, rank in allowed.items():
            # Filling a part never justifies breaking a grapheme (an emoji sequence).
            if full_enough and (rank is Boundary.CODEPOINT or offsets[pos] - offsets[start] < fill):
                continue
            # lowest rank wins; within a rank, the furthest position
            if best is None or (rank, -pos) < (best[0], -best[1]):
                best = (rank, pos)
        if best is not None:
            return best[1]
    raise AssertionError("a non-empty window always has a cut")  # pragma: no cover


def _inside(pos: int, fences: list[tuple[int, int]], begins: list[int]) -> bool:
    """Strictly inside a fenced block. The blocks are in order and apart (``begins``
    their starts): only the last one to begin before ``pos`` can hold it."""
    last = bisect_left(begins, pos) - 1
    return last >= 0 and pos < fences[last][1]
