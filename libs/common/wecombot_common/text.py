"""What a text shows in WeCom: one rule for the llm (a message or an answer with nothing
in it) and the sender (a part of a long reply its cuts left with nothing in it).

>>> shows_nothing(" \\u200b\\n\\ufeff"), shows_nothing("\\u200ba")
(True, False)
>>> without_invisible("/re\\u200dset")
'/reset'
"""

from __future__ import annotations

import unicodedata

__all__ = ["shows_nothing", "without_invisible"]

# Format characters (Unicode's Cf) that do show: the prepended concatenation marks, an
# Arabic or Kaithi number sign drawn with the digits after it, or alone.
_SHOWN_FORMAT = frozenset("\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f\u0890\u0891\u08e2")
_SHOWN_FORMAT |= {"\U000110bd", "\U000110cd"}


def _invisible(ch: str) -> bool:
    """A format character drawn as nothing: zero-width space, non-joiner and joiner, word
    joiner, BOM, direction marks and embeddings, soft hyphen, invisible operators…"""
    return unicodedata.category(ch) == "Cf" and ch not in _SHOWN_FORMAT


def shows_nothing(text: str) -> bool:
    """True if ``text`` is whitespace and invisible format characters only (or empty)."""
    return all(ch.isspace() or _invisible(ch) for ch in text)


def without_invisible(text: str) -> str:
    """``text`` with its invisible format characters left out."""
    return "".join(ch for ch in text if not _invisible(ch))
