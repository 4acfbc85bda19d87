"""The reply splitter: parts WeCom will not truncate, cut where a reader expects."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from wecombot_common.text import shows_nothing
from wecombot_sender.split import (
    WECOM_TEXT_LIMIT,
    Boundary,
    boundaries,
    fenced_spans,
    split_spans,
    split_text,
)

FAMILY = "👨\u200d👩\u200d👧"  # one grapheme, five code points, 18 bytes
FLAG = "🇨🇳"  # two regional indicators, 8 bytes
ACCENT = "e\u0301"  # e + combining acute
# more graphemes of several code points, one per rule of UAX #29 a cut could break
KEYCAP = "1\ufe0f\u20e3"
HEART = "\u2764\ufe0f"  # emoji presentation selector
THUMB = "👍🏽"  # skin tone modifier
SCOTLAND = "🏴\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"  # tag sequence
HANGUL = "\u1112\u1161\u11ab"  # 한 as conjoining jamo L V T
CONJUNCT = "\u0915\u094d\u0937\u093f"  # क्षि: consonant, virama, consonant, vowel sign
CRLF = "\r\n"
GRAPHEME_BREAK_TEST = Path(__file__).parent.parent / "data" / "GraphemeBreakTest-15.0.0.txt"

PIECES = [
    "你好",
    "世界",
    "今天天气很好",
    "。",
    "！",
    "？",
    "；",
    "，",
    "Hello",
    "world",
    "3.14",
    ". ",
    "! ",
    "? ",
    " ",
    "  ",
    "\n",
    "\n\n",
    "\r\n",
    "```\n",
    "```python\n",
    "x = 1\n",
    "”",
    "😀",
    FAMILY,
    FLAG,
    ACCENT,
    "\u3000",
]

mixed_text = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=8)), max_size=400).map(
    "".join
)


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def check_invariants(text: str, parts: list[str], limit: int) -> None:
    spans = split_spans(text, limit=limit)
    assert parts == [text[start:end] for start, end in spans]
    # the parts are the text, in order, but for whitespace left out between them
    ends, starts = [0, *(e for _, e in spans)], [*(s for s, _ in spans), len(text)]
    gaps = zip(ends, starts, strict=True)
    assert all(a == b or (a < b and shows_nothing(text[a:b])) for a, b in gaps)
    assert all(not shows_nothing(part) for part in parts), "no part shows nothing"
    assert all(nbytes(p) <= limit for p in parts)
    # every part is valid UTF-8 on its own
    assert all(p.encode("utf-8").decode("utf-8") == p for p in parts)


# ---------------------------------------------------------------- properties


@given(text=mixed_text, limit=st.integers(min_value=4, max_value=300))
@settings(max_examples=400)
@example(text=FAMILY * 40, limit=20)
@example(text="a\u0301" * 50, limit=4)
def test_parts_fit_join_to_the_text_and_never_cut_a_character(text: str, limit: int) -> None:
    check_invariants(text, split_text(text, limit=limit), limit)


def _beyond_one_part(text: str) -> str:
    return text * (2 * WECOM_TEXT_LIMIT // nbytes(text) + 1)


long_text = (
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=300).map("".join).map(_beyond_one_part)
)


@given(text=long_text)
@settings(max_examples=60)
def test_default_limit_is_wecoms_2048_bytes(text: str) -> None:
    # WeCom's own figure, not the module's constant: a test against that would follow
    # it anywhere (https://developer.work.weixin.qq.com/document/path/90236, 文本消息).
    assert WECOM_TEXT_LIMIT == 2048
    parts = split_text(text)
    check_invariants(text, parts, 2048)
    assert len(parts) >= nbytes("".join(parts)) // 2048


@given(text=mixed_text)
def test_short_text_is_one_part(text: str) -> None:
    assume(0 < nbytes(text) <= WECOM_TEXT_LIMIT and not text.isspace())
    assert split_text(text) == [text]


@given(text=mixed_text, limit=st.integers(min_value=24, max_value=300))
@settings(max_examples=300)
def test_a_cut_never_breaks_a_grapheme_when_it_need_not(text: str, limit: int) -> None:
    for start, pos in split_spans(text, limit=limit)[:-1]:
        found = boundaries(text, start, pos)
        if found[pos] is Boundary.CODEPOINT:
            # only when the whole budget held no grapheme boundary at all
            end = start
            while end < len(text) and nbytes(text[start : end + 1]) <= limit:
                end += 1
            assert all(r is Boundary.CODEPOINT for r in boundaries(text, start, end).values())


sentence = st.lists(
    st.sampled_from(["你好", "世界", "天气", "很好", "ok", "fine"]), min_size=1, max_size=6
).map(lambda words: "".join(words) + "。")


@given(
    first=st.lists(sentence, min_size=4, max_size=200),
    second=st.lists(sentence, min_size=1, max_size=50),
    slack=st.integers(min_value=20, max_value=2000),
)
def test_a_paragraph_break_beats_a_later_sentence_end(
    first: list[str], second: list[str], slack: int
) -> None:
    para = "".join(first) + "\n\n"
    # the paragraph fills at least half a part; sentence ends follow it within budget
    limit = nbytes(para) + min(slack, nbytes(para))
    rest = "".join(second)
    rest = rest * (limit // nbytes(rest) + 1)
    parts = split_text(para + rest, limit=limit)
    assert parts[0] == para


@given(
    intro=st.lists(sentence, min_size=1, max_size=80).map("".join),
    lines=st.lists(st.sampled_from(["x = 1", "print('你好。 ok')", "a; b; c", ""]), max_size=60),
    outro=st.lists(sentence, max_size=80).map("".join),
    limit=st.integers(min_value=64, max_value=1024),
)
def test_a_code_block_that_fits_is_never_cut(
    intro: str, lines: list[str], outro: str, limit: int
) -> None:
    block = "```python\n" + "".join(f"{line}\n" for line in lines) + "```\n"
    assume(nbytes(block) <= limit)
    text = f"{intro}\n{block}{outro}"
    parts = split_text(text, limit=limit)
    check_invariants(text, parts, limit)
    assert any(block in part for part in parts)


# ---------------------------------------------------------------- exact cases


def test_empty_text_has_no_parts() -> None:
    assert split_text("") == []


@pytest.mark.parametrize(
    "text",
    [
        "a" * 2000 + " " * 1500 + "b" * 1000,  # cut at 2048, then after the run
        "a" * 2000 + "\n" * 1500 + "b" * 1000,  # a line end inside the blank lines
        "a" * 100 + " " * 5000 + "b",  # a run longer than a part
        "a" * 2000 + "\n\n" + "\u3000" * 1000,  # trailing whitespace beyond a part
    ],
    ids=["spaces", "blank lines", "longer than a part", "at the end"],
)
def test_no_part_is_whitespace_only(text: str) -> None:
    """A part of only whitespace shows nothing, and WeCom refuses empty content
    (44004): the run of 1 KB and more a cut falls in was sent alone (found by review)."""
    parts = split_text(text)
    assert not any(part.isspace() for part in parts)
    check_invariants(text, parts, WECOM_TEXT_LIMIT)


def test_no_part_is_zero_width_characters_only() -> None:
    """A part of zero-width characters (a run of them a cut falls in) is an empty bubble
    in WeCom: left out as whitespace is."""
    text = "a" * 2000 + "\u200b" * 1000 + "\n" + "\u200d\ufeff" * 400 + "b" * 10
    parts = split_text(text)
    assert len(parts) == 2  # not four: two of zero-width characters only between them
    assert parts[0] == "a" * 2000 + "\u200b" * 16
    assert parts[1].endswith("\u200d\ufeff" + "b" * 10)
    check_invariants(text, parts, WECOM_TEXT_LIMIT)
    assert split_text("\u200b" * 3000) == []


def test_a_whitespace_only_text_has_no_parts() -> None:
    """The sender then records it as empty content (44004) without a send."""
    assert split_text(" \n\u3000") == []
    assert split_text("\n" * 5000) == []


def test_exactly_at_the_limit_is_one_part() -> None:
    text = "好" * 682 + "ab"  # 2046 + 2 bytes
    assert split_text(text) == [text]
    assert split_text(text + "c") == [text, "c"]


def test_a_text_of_exactly_the_limit_with_a_paragraph_break_is_one_part() -> None:
    text = "a" * 60 + "\n\n" + "b" * 38  # 100 bytes
    assert split_text(text, limit=100) == [text]


def test_a_better_boundary_wins_only_if_its_part_fills_half_the_limit() -> None:
    """A paragraph break 42 bytes in would leave a part under half full: a plain cut at
    the limit fills the part instead (min_fill defaults to half the limit)."""
    text = "a" * 40 + "\n\n" + "b" * 100
    assert [nbytes(p) for p in split_text(text, limit=100)] == [100, 42]
    assert [nbytes(p) for p in split_text(text, limit=100, min_fill=0)] == [42, 100]


def test_a_grapheme_is_never_broken_to_fill_a_part() -> None:
    """An e with a hundred combining marks is one grapheme over the limit: it goes
    whole in a part of its own (the only cut it allows is no cut at all)."""
    cluster = "e" + "\u0301" * 100
    parts = split_text("ab " + cluster + " tail", limit=100)
    assert parts[0] == "ab "
    assert "".join(parts) == "ab " + cluster + " tail"


def test_a_code_block_is_cut_after_its_closing_fence_or_before_its_opening() -> None:
    block = "```\n" + "c" * 50 + "\n```\n"
    assert split_text(block + "d" * 80, limit=100) == [block, "d" * 80]
    intro = "intro text that is long enough to fill.\n"
    parts = split_text(intro + "```\n" + "c" * 200 + "\n```\n", limit=60)
    assert parts[0] == intro


def test_a_code_block_over_the_limit_is_not_preceded_by_a_stub() -> None:
    """It is cut anyway: keeping the cut out of it sent "Here is the code:" alone, one
    more message against WeCom's 30 a minute (found by review)."""
    code = "```python\n" + "".join(f"print('line {i:03}')  # a comment\n" for i in range(120))
    text = "Here is the code:\n\n" + code + "```\nDone."
    parts = split_text(text)
    assert "".join(parts) == text
    assert len(parts) == 2  # 3,758 bytes: not "Here is the code:" and then two more
    assert all(len(p.encode()) >= WECOM_TEXT_LIMIT // 2 for p in parts[:-1])
    assert parts[0].startswith("Here is the code:\n\n```python\n")


def test_a_fence_may_be_indented_as_a_list_items_text_is() -> None:
    """A model's numbered steps indent their code blocks four spaces and more: taken
    for indented code lines (CommonMark's rule at the top level), such a block was cut
    in the middle though it fitted in one part."""
    assert fenced_spans("   ```\nx\n   ```\n") == [(0, 16)]
    assert fenced_spans("    ```\nx\n    ```\n") == [(0, 18)]
    steps = "1. Install the tool with the following command and then wait.\n" * 20
    block = "    ```bash\n" + "    pip install something --upgrade --user\n" * 25 + "    ```\n"
    parts = split_text(steps + block + "2. Done.\n")
    assert any(block in part for part in parts), [len(p.encode()) for p in parts]


@pytest.mark.parametrize(
    "block",
    [
        # a ```` block showing ``` blocks: closed by ```` alone
        "````markdown\n# Example\n```python\nprint(1)\n```\n"
        + "doc line inside outer block\n" * 25
        + "````\n",
        # ```text inside an open block opens nothing, closes nothing
        "```\nA\n```text\nB\n" + "code line\n" * 60 + "```\n",
        # tildes
        "~~~\n" + "code line with ``` in it\n" * 30 + "~~~\n",
        # a ~~~ line inside a ``` block is code: only backticks close it
        "```\n~~~\n" + "code line\n" * 60 + "```\n",
    ],
    ids=["longer fence", "info string inside", "tildes", "tildes inside backticks"],
)
def test_a_block_that_fits_is_never_cut_however_its_fences_look(block: str) -> None:
    """Fences were paired one after another, any length or kind: a ```python line in a
    block closed it, and a block that fitted in a part was cut, its fence left open."""
    parts = split_text("Intro sentence here. " * 80 + "\n" + block + "After.")
    assert any(block in part for part in parts), [len(p.encode()) for p in parts]


def test_a_block_of_exactly_the_limit_fits_and_goes_whole() -> None:
    """A block of exactly ``limit`` bytes is one that fits: it is not cut, though its
    line before must then go alone."""
    block = "```\n" + "c" * 91 + "\n```\n"
    assert nbytes(block) == 100
    assert split_text("ab\n" + block + "tail", limit=100) == ["ab\n", block, "tail"]


def test_a_blank_line_early_in_a_block_over_the_limit_makes_no_stub() -> None:
    """Inside a block too big for a part, every cut is in code: the fill floor still
    holds, so a blank line after its first line does not send that line alone."""
    block = "```\nx = 1\n\n" + "y = 2\n" * 600 + "```\n"
    parts = split_text(block)
    assert "".join(parts) == block
    assert all(nbytes(p) >= WECOM_TEXT_LIMIT // 2 for p in parts[:-1])


def test_several_blank_lines_stay_with_the_part_before() -> None:
    text = "a" * 60 + "\n\n\n" + "b" * 60
    assert split_text(text, limit=100) == ["a" * 60 + "\n\n\n", "b" * 60]
    text = "a" * 60 + "\n \n\u3000\n" + "b" * 60
    assert split_text(text, limit=100) == ["a" * 60 + "\n \n\u3000\n", "b" * 60]


def test_a_line_starting_with_inline_code_opens_no_block() -> None:
    assert fenced_spans("```x``` is inline\n```\ncode\n```\n") == [(18, 31)]


def test_paragraph_then_rest() -> None:
    assert split_text("第一段。\n\nsecond paragraph", limit=16) == [
        "第一段。\n\n",
        "second paragraph",
    ]


def test_ascii_sentence_end_keeps_its_space() -> None:
    assert split_text("Hello world. This is fine.", limit=20) == ["Hello world. ", "This is fine."]


def test_chinese_sentence_end() -> None:
    assert split_text("今天天气很好。我们去公园吧！", limit=24) == [
        "今天天气很好。",
        "我们去公园吧！",
    ]


def test_closing_quote_stays_with_its_sentence() -> None:
    text = "他说：“好的。”然后走了很远很远"
    parts = split_text(text, limit=30)
    assert parts[0] == "他说：“好的。”"


def test_a_decimal_point_is_not_a_sentence_end() -> None:
    found = boundaries("pi is 3.14 ok", 0, 13)
    assert found[8] is Boundary.GRAPHEME  # after "3."
    assert found[11] is Boundary.SPACE


def test_line_beats_sentence_and_space() -> None:
    text = "first line. still\nsecond line here. and more words"
    assert split_text(text, limit=30)[0] == "first line. still\n"


def test_a_tiny_paragraph_does_not_make_a_stub_part() -> None:
    text = "Hi\n\n" + "b" * 3000
    parts = split_text(text)
    assert [nbytes(p) for p in parts] == [2048, 956]
    # with no fill floor the blank line wins
    assert split_text(text, min_fill=0)[0] == "Hi\n\n"


def test_code_block_goes_whole_into_the_next_part() -> None:
    intro = "看这段代码：\n"
    block = "```python\n" + "print('hello')\n" * 100 + "```\n"
    text = intro + "说明。" * 400 + "\n" + block + "完。"
    parts = split_text(text)
    check_invariants(text, parts, WECOM_TEXT_LIMIT)
    assert any(block in p for p in parts)
    assert all(p.count("```") in (0, 2) for p in parts)


def test_a_block_larger_than_a_part_is_cut_at_lines() -> None:
    block = "```\n" + "".join(f"line {i}\n" for i in range(600)) + "```\n"
    parts = split_text(block)
    check_invariants(block, parts, WECOM_TEXT_LIMIT)
    assert len(parts) > 1
    assert all(p.endswith("\n") for p in parts)


def _official_cases() -> list[tuple[str, set[int], str]]:
    """Unicode's GraphemeBreakTest: each line a string with ``÷`` (break) and ``×`` (no
    break) between its code points."""
    cases = []
    for line in GRAPHEME_BREAK_TEST.read_text(encoding="utf-8").splitlines():
        spec = line.split("#")[0].strip()
        if not spec:
            continue
        text, breaks = "", set()
        for token in spec.split():
            if token == "÷":
                breaks.add(len(text))
            elif token != "×":
                text += chr(int(token, 16))
        cases.append((text, breaks, spec))
    return cases


# regex does not count U+2701 UPPER BLADE SCISSORS as Extended_Pictographic (Unicode does)
KNOWN_DIFFERENCES = {"÷ 2701 × 200D × 2701 ÷"}


def test_graphemes_are_unicodes_own() -> None:
    cases = _official_cases()
    assert len(cases) == 602
    assert {spec for _, _, spec in cases} >= KNOWN_DIFFERENCES
    wrong = []
    for text, breaks, spec in cases:
        found = boundaries(text, 0, len(text))
        cuts = {0} | {pos for pos, rank in found.items() if rank is not Boundary.CODEPOINT}
        if cuts != breaks and spec not in KNOWN_DIFFERENCES:
            wrong.append(spec)
    assert wrong == []


def test_a_space_before_a_combining_mark_is_no_place_to_cut() -> None:
    found = boundaries("a \u0301b", 0, 4)
    assert found[2] is Boundary.CODEPOINT  # " " + U+0301 is one grapheme
    assert found[3] is Boundary.GRAPHEME
    text = ("word \u0301" * 600)[:-2]
    for part in split_text(text, limit=100)[1:]:
        assert not part.startswith("\u0301")


def test_emoji_sequences_flags_and_accents_stay_whole() -> None:
    for unit in (FAMILY, FLAG, ACCENT, KEYCAP, HEART, THUMB, SCOTLAND, HANGUL, CONJUNCT, CRLF):
        text = unit * (3 * WECOM_TEXT_LIMIT // nbytes(unit))
        for part in split_text(text):
            assert part == unit * (len(part) // len(unit))


def test_fenced_spans_include_an_unclosed_fence() -> None:
    text = "a\n```\ncode\n```\nb\n```\nopen"
    assert fenced_spans(text) == [(2, 15), (17, len(text))]


def test_limit_must_hold_a_character() -> None:
    with pytest.raises(ValueError, match="limit"):
        split_text("abc", limit=3)
