"""What shows nothing in WeCom: the rule the llm (a blank message or answer) and the
sender (a part of a reply left out) share."""

from __future__ import annotations

import pytest

from wecombot_common.text import shows_nothing, without_invisible


@pytest.mark.parametrize(
    "text",
    [
        "",
        " \n\t\u3000",
        "\u200b\u200c\u200d\u2060\ufeff",  # zero-width space, (non-)joiner, word joiner, BOM
        "\u200e\u200f\u202a\u202e\u2066\u2069",  # direction marks, embeddings, isolates
        "\u00ad\u2062\u180e",  # soft hyphen, invisible times, Mongolian vowel separator
    ],
)
def test_whitespace_and_invisible_format_characters_show_nothing(text: str) -> None:
    assert shows_nothing(text)
    assert without_invisible(text).strip() == ""


@pytest.mark.parametrize(
    "text",
    [
        "\u200ba",
        "\u0600",  # Arabic number sign: a format character that is drawn
        "\U000110bd",  # Kaithi number sign, the same
        "\u0301",  # a combining mark alone shows (on a dotted circle)
        "\u2800",  # Braille blank: shows as a blank, but a glyph (not a format character)
    ],
)
def test_anything_drawn_shows(text: str) -> None:
    assert not shows_nothing(text)


# Unicode's Prepended_Concatenation_Mark (PropList.txt): format characters drawn with
# the digits after them, or as a sign alone. One left out, a message of it alone was
# answered "nothing in it", and a part of a reply of it dropped.
@pytest.mark.parametrize(
    "mark",
    [
        *"\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f\u0890\u0891\u08e2",
        "\U000110bd",
        "\U000110cd",
    ],
    ids=ascii,
)
def test_every_prepended_concatenation_mark_shows(mark: str) -> None:
    assert not shows_nothing(mark)
    assert without_invisible(mark) == mark


def test_without_invisible_keeps_what_is_drawn() -> None:
    assert without_invisible("\u200b/re\u200dset\u0600\ufeff") == "/reset\u0600"
