"""The flat-document fast path of parse.py against the XML parser it stands in for.

``_flat_fields`` reads WeCom's usual shape (``<xml>`` + simple elements) without building
a tree. It may decline any document (the parser then reads it); where it answers, the
answer must be exactly the parser's, and it must never accept a document the parser
refuses.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from hypothesis import example, given, settings
from hypothesis import strategies as st

from wecombot_common.crypto import generate_encoding_aes_key
from wecombot_common.sim.callbacks import CallbackBuilder
from wecombot_gateway.parse import _as_a_parser_reads, _children, _flat_fields, _flatten

# Characters that matter to XML (markup, CDATA's end, entities, whitespace a parser
# normalises, characters XML forbids), a few others, and some CJK.
_TRICKY = "<>&;]]!?[/='\"#x\r\n\t \x00\x01\x0b\x1f\x7f\ufffe\uffff\ufeff中文aZ09_-.:"
_PLAIN = "abcXYZ0189 _-.@,中文\n\t"
text = st.one_of(
    st.text(alphabet=_PLAIN, max_size=12),
    st.text(alphabet=_PLAIN, max_size=12),
    st.text(alphabet=_PLAIN + "]>", max_size=8),
    st.text(alphabet=_TRICKY, max_size=12),
    st.text(max_size=6),
)
tags = st.sampled_from(
    ["ToUserName", "Content", "MsgId", "a", "A_b", "_1"] * 3
    + ["x-y", "1a", "a:b", "xml", "中", "ToUserName"]
)
spaces = st.sampled_from([""] * 8 + [" ", "\n", "\t", "\r\n", "\r"])


@st.composite
def element(draw: st.DrawFn) -> str:
    tag = draw(tags)
    close = tag if draw(st.integers(0, 19)) else draw(tags)
    kind = draw(st.sampled_from(["cdata"] * 10 + ["plain"] * 6 + ["empty", "two-cdata", "nested"]))
    value = draw(text)
    if kind == "cdata":
        inner = f"<![CDATA[{value}]]>"
    elif kind == "plain":
        inner = value
    elif kind == "empty":
        return f"<{tag}/>"
    elif kind == "two-cdata":
        inner = f"<![CDATA[{value}]]><![CDATA[{draw(text)}]]>"
    else:
        inner = f"<b>{value}</b>"
    return f"<{tag}>{inner}</{close}>"


@st.composite
def document(draw: st.DrawFn) -> str:
    head = draw(st.sampled_from(["<xml>"] * 20 + ["<xml a='1'>", " <xml>", "<x>", "<?xml?><xml>"]))
    parts = [head]
    for item in draw(st.lists(element(), max_size=4)):
        parts += [draw(spaces), item]
    parts += [draw(spaces), draw(st.sampled_from(["</xml>"] * 20 + ["</x>", "</xml> ", ""]))]
    return "".join(parts)


def _parsed(document: str) -> ET.Element | None:
    try:
        return ET.fromstring(document)
    except ET.ParseError:
        return None


@settings(max_examples=2000)
@given(document())
@example("<xml><A><![CDATA[]]]]></A></xml>")
@example("<xml><A><![CDATA[a]]]></A></xml>")
@example("<xml><A>]]></A></xml>")
@example("<xml><A>a\r\nb</A></xml>")
@example("<xml><A><![CDATA[a\rb]]></A></xml>")
@example("<xml><A>1</A><A>2</A></xml>")
@example("<xml><A>&amp;</A></xml>")
@example("<xml>\n<A>x</A>\n</xml>")
def test_fast_path_answers_exactly_what_the_parser_does(document: str) -> None:
    fields = _flat_fields(document)
    if fields is None:
        return  # declined: the parser reads it
    root = _parsed(document)
    assert root is not None, "accepted a document the XML parser refuses"
    assert root.tag == "xml" and not root.attrib
    assert fields == _children(root) == _flatten(root)


@settings(max_examples=1500)
@given(
    document(),
    st.sampled_from(["", "\ufeff", '<?xml version="1.0"?>', '\ufeff<?xml version="1.0"?>\r\n']),
    st.sampled_from(["", "\n", "\r\n", " \t\n"]),
)
def test_the_envelopes_second_reading_answers_what_the_parser_does(
    document: str, before: str, after: str
) -> None:
    """A BOM, a declaration, CR and whitespace after the root, taken off as the parser
    takes them (the envelope's second try at the flat shape, before the size limit)."""
    decorated = before + document + after
    fields = _flat_fields(_as_a_parser_reads(decorated))
    if fields is None:
        return
    root = _parsed(decorated.removeprefix("\ufeff"))  # ElementTree takes no BOM in a str
    assert root is not None, "accepted a document the XML parser refuses"
    assert root.tag == "xml" and not root.attrib
    assert fields == _children(root)


def test_fast_path_declines_what_it_cannot_read_exactly() -> None:
    for document in [
        "<xml><A>1</A><A>2</A></xml>",  # repeated: the envelope takes the first, messages refuse
        "<xml><A>&lt;</A></xml>",  # an entity
        "<xml><A><![CDATA[a\r\nb]]></A></xml>",  # CR: parsers normalise it
        "<xml><A><B>x</B></A></xml>",  # nested
        '<xml><A k="v">x</A></xml>',  # an attribute
        "<!DOCTYPE xml><xml><A>x</A></xml>",
        "<xml><A>x</A></xml><!-- trailing -->",
    ]:
        assert _flat_fields(document) is None, document


def test_everything_wecom_sends_takes_the_fast_path() -> None:
    """The fast path is what the gateway's benchmark stands on: real shapes must hit it."""
    wecom = CallbackBuilder(
        corp_id="ww1", agent_id=1000002, token="t", encoding_aes_key=generate_encoding_aes_key()
    )
    callbacks = [
        wecom.text("zhang.san", "你好 <b> & ]] > \n 再见"),
        wecom.message("li.si", "image", {"PicUrl": "http://p/1.png", "MediaId": "m1"}),
        wecom.message("li.si", "location", {"Location_X": "23.1", "Location_Y": "113.3",
                                            "Scale": "15", "Label": "广州"}),
        wecom.event("wang.wu", "enter_agent"),
    ]  # fmt: skip
    for cb in callbacks:
        envelope = _flat_fields(cb.body.decode())
        assert envelope is not None and envelope["Encrypt"]
        assert _flat_fields(cb.inner_xml) is not None, cb.inner_xml
