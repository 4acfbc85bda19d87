"""Building the messages sent to the model: system prompt, trimmed history, question. Pure.

History is trimmed twice, oldest first, and always in whole turns (a user message and
its answer), so the model never sees an answer without its question:

1. to the last ``max_turns`` turns;
2. then until the estimated size fits ``max_tokens``.

The system prompt and the current message are always kept, even if they alone exceed
the budget (the provider then answers with an error, which becomes the apology).

Token estimate
    Real tokenizers differ per model, so a cheap, provider-independent estimate is used:
    each CJK character (Han, kana, Hangul, CJK punctuation and full-width forms) counts
    as one token, an ASCII digit as one (Qwen's tokenizers make each digit a token;
    OpenAI's cl100k and o200k a group of up to three: at a quarter each, a table of
    figures was counted under half its size), other ASCII as one token per four
    characters (rounded up), and any other character as one token per UTF-8 byte (the
    most a byte-level tokenizer can make of it: Cyrillic, Arabic or Thai letters,
    accented Latin, emoji and their joiners), plus four tokens of per-message overhead.
    It over-counts English a little, CJK slightly and other scripts and figures more,
    which errs on the side of fitting the context window (an under-count made the
    provider refuse, and every later message got the apology).

    >>> estimate_tokens("hello world!")   # 12 ASCII chars → 3
    3
    >>> estimate_tokens("你好，世界")        # 5 CJK chars → 5
    5
    >>> estimate_tokens("tel 13800138000")  # 11 digits + 4 other ASCII chars → 11 + 1
    12
    >>> estimate_tokens("😀 привет")       # 4 bytes + ' ' + 6 × 2 bytes → 4 + 1 + 12
    17
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "MESSAGE_OVERHEAD_TOKENS",
    "ChatMessage",
    "Turn",
    "build_prompt",
    "estimate_tokens",
    "message_tokens",
]

MESSAGE_OVERHEAD_TOKENS = 4

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Turn:
    """One answered exchange: what the user said and what the assistant answered."""

    user: str
    assistant: str


_CJK_RANGES = (
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x2E80, 0x2FDF),  # CJK radicals
    (0x3000, 0x303F),  # CJK symbols and punctuation
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x31FF),  # Bopomofo, Hangul compatibility Jamo, …
    (0x3400, 0x4DBF),  # CJK Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xAC00, 0xD7AF),  # Hangul syllables
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF00, 0xFFEF),  # half-width and full-width forms
    (0x20000, 0x3134F),  # CJK Extensions B–G
)


# One class of every CJK range: the counting below is done by the regex engine and the
# codecs, in C. A loop over the characters in Python cost 1-2 µs each, and every message
# estimates its whole history again: 20 turns of 600-character Chinese answers took
# 10-20 ms of CPU per message (0.6 ms now), 20 of 64 KiB half a second, the event loop
# blocked meanwhile.
_CJK = re.compile("[" + "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _CJK_RANGES) + "]")
_DIGITS = "0123456789"  # ASCII's only: counted by str.count, in C


def estimate_tokens(text: str) -> int:
    """Estimated tokens of ``text``: 1 per CJK character, 1 per ASCII digit, 1 per 4
    other ASCII characters, 1 per UTF-8 byte of anything else (see the module doc)."""
    digits = sum(map(text.count, _DIGITS))
    if text.isascii():
        return digits + (len(text) - digits + 3) // 4
    rest = _CJK.sub("", text)
    cjk = len(text) - len(rest)
    ascii_chars = len(rest.encode("ascii", "ignore"))
    other_bytes = len(rest.encode("utf-8", "surrogatepass")) - ascii_chars
    return cjk + other_bytes + digits + (ascii_chars - digits + 3) // 4


def message_tokens(message: ChatMessage) -> int:
    return MESSAGE_OVERHEAD_TOKENS + estimate_tokens(message.content)


def build_prompt(
    system_prompt: str,
    history: Sequence[Turn],
    current: str,
    *,
    max_turns: int,
    max_tokens: int,
) -> list[ChatMessage]:
    """The messages for one model call, history trimmed oldest first (see module doc).

    >>> [m.role for m in build_prompt("sys", [Turn("q1", "a1")], "q2",
    ...                               max_turns=20, max_tokens=8000)]
    ['system', 'user', 'assistant', 'user']
    """
    system = ChatMessage("system", system_prompt)
    question = ChatMessage("user", current)
    kept = list(history[-max_turns:]) if max_turns > 0 else []
    budget = max_tokens - message_tokens(system) - message_tokens(question)
    sizes = [_turn_tokens(t) for t in kept]
    used = sum(sizes)
    start = 0
    while start < len(kept) and used > budget:
        used -= sizes[start]
        start += 1
    messages = [system]
    for turn in kept[start:]:
        messages += [ChatMessage("user", turn.user), ChatMessage("assistant", turn.assistant)]
    messages.append(question)
    return messages


def _turn_tokens(turn: Turn) -> int:
    return message_tokens(ChatMessage("user", turn.user)) + message_tokens(
        ChatMessage("assistant", turn.assistant)
    )
