"""The gateway's pure parts: XML parsing, dedupe keys, query and body guards, settings."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from aiohttp import StreamReader, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.test_utils import TestServer, make_mocked_request
from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import MultiDict
from structlog.testing import capture_logs

from wecombot_common.bus import Appended
from wecombot_common.errors import ConfigError
from wecombot_common.events import (
    ImagePayload,
    LinkPayload,
    LocationPayload,
    MessageReceived,
    TextPayload,
    UnknownPayload,
    VideoPayload,
    VoicePayload,
    WeComEventPayload,
    decode_event,
    encode_event,
)
from wecombot_common.runtime import HealthServer
from wecombot_common.sim.callbacks import CallbackBuilder
from wecombot_common.topology import is_user_id
from wecombot_gateway.app import RefusalLog, create_app
from wecombot_gateway.body import (
    check_content_encoding,
    check_content_type,
    check_declared_length,
    read_limited,
)
from wecombot_gateway.callback import CallbackQuery, check_fresh
from wecombot_gateway.errors import (
    BodyTimeout,
    BodyTooLarge,
    InvalidMessage,
    InvalidQuery,
    MalformedXml,
    NoSender,
    StaleTimestamp,
    UnsafeXml,
    UnsupportedMediaType,
    WrongRecipient,
)
from wecombot_gateway.parse import (
    MAX_UNFLAT_ENVELOPE,
    dedupe_key,
    parse_envelope,
    parse_message,
)
from wecombot_gateway.settings import GatewaySettings

CORP = "ww1436e0e65a779aee"
APP = f"{CORP}-1000002"
USER = "zhang.san"

_VECTORS = json.loads(
    (Path(__file__).parent.parent / "data" / "wecom_vectors.json").read_text(encoding="utf-8")
)


def xml(fields: dict[str, str], *, to: str | None = CORP) -> bytes:
    head = "" if to is None else f"<ToUserName><![CDATA[{to}]]></ToUserName>"
    body = "".join(f"<{k}><![CDATA[{v}]]></{k}>" for k, v in fields.items())
    return f"<xml>{head}{body}</xml>".encode()


def message(**fields: str) -> dict[str, str]:
    base = {"FromUserName": USER, "CreateTime": "1409659813", "AgentID": "1000002"}
    return {**base, **fields}


def parse(document: bytes) -> MessageReceived:
    return parse_message(document, corp_id=CORP, agent_id=1000002, app=APP)


# ---------------------------------------------------------------- message types

TYPES: dict[str, tuple[dict[str, str], object]] = {
    "text": (
        message(MsgType="text", Content=" 你好 <b>&amp;", MsgId="1"),
        TextPayload(content=" 你好 <b>&amp;"),
    ),
    "image": (
        message(MsgType="image", PicUrl="https://p/1.jpg", MediaId="mi", MsgId="2"),
        ImagePayload(pic_url="https://p/1.jpg", media_id="mi"),
    ),
    "voice": (
        message(MsgType="voice", MediaId="mv", Format="speex", MsgId="3"),
        VoicePayload(media_id="mv", format="speex"),
    ),
    "video": (
        message(MsgType="video", MediaId="mv", ThumbMediaId="mt", MsgId="4"),
        VideoPayload(media_id="mv", thumb_media_id="mt"),
    ),
    "location": (
        message(
            MsgType="location",
            Location_X="23.134521",
            Location_Y="-113.358803",
            Scale="20",
            Label="广州",
            MsgId="5",
        ),
        LocationPayload(latitude=23.134521, longitude=-113.358803, scale=20, label="广州"),
    ),
    "link": (
        message(MsgType="link", Title="t", Description="d", Url="https://u", PicUrl="https://p"),
        LinkPayload(title="t", description="d", url="https://u", pic_url="https://p"),
    ),
    "event enter_agent": (
        message(MsgType="event", Event="enter_agent", EventKey=""),
        WeComEventPayload(event="enter_agent", event_key=""),
    ),
    "event subscribe": (
        message(MsgType="event", Event="subscribe"),
        WeComEventPayload(event="subscribe", event_key=None),
    ),
    "event click": (
        message(MsgType="event", Event="click", EventKey="#sendmsg#_0_0#"),
        WeComEventPayload(event="click", event_key="#sendmsg#_0_0#"),
    ),
    "event with extra fields": (
        message(MsgType="event", Event="batch_job_result", JobId="j1", JobType="sync_user"),
        WeComEventPayload(event="batch_job_result", fields={"JobId": "j1", "JobType": "sync_user"}),
    ),
    "unknown type": (
        message(MsgType="file", MediaId="mf", Title="report.pdf", MsgId="6"),
        UnknownPayload(msg_type="file", fields={"MediaId": "mf", "Title": "report.pdf"}),
    ),
}


@pytest.mark.parametrize(("fields", "payload"), TYPES.values(), ids=TYPES.keys())
def test_every_message_type_parses_to_its_payload(fields: dict[str, str], payload: object) -> None:
    msg = parse(xml(fields))
    assert msg.payload == payload
    assert msg.msg_type == fields["MsgType"]
    assert msg.app == APP
    assert msg.conversation == msg.from_user == USER
    assert msg.to_user == CORP
    assert msg.agent_id == 1000002
    assert msg.create_time == 1409659813
    assert msg.occurred_at.timestamp() == 1409659813
    assert msg.msg_id == fields.get("MsgId")
    assert msg.correlation_id == (fields.get("MsgId") or dedupe_key(msg))
    assert decode_event(encode_event(msg)) == msg


def test_nested_event_fields_are_flattened_without_loss() -> None:
    document = (
        f"<xml><ToUserName>{CORP}</ToUserName><FromUserName>{USER}</FromUserName>"
        "<CreateTime>1</CreateTime><MsgType>event</MsgType><Event>pic_sysphoto</Event>"
        "<EventKey>k</EventKey><SendPicsInfo><Count>2</Count><PicList>"
        "<item><PicMd5Sum>a</PicMd5Sum></item><item><PicMd5Sum>b</PicMd5Sum></item>"
        '</PicList></SendPicsInfo><Extra kind="x"/></xml>'
    ).encode()
    payload = parse(document).payload
    assert payload == WeComEventPayload(
        event="pic_sysphoto",
        event_key="k",
        fields={
            "SendPicsInfo.Count": "2",
            "SendPicsInfo.PicList.item[0].PicMd5Sum": "a",
            "SendPicsInfo.PicList.item[1].PicMd5Sum": "b",
            "Extra@kind": "x",
            "Extra": "",
        },
    )


def test_unknown_type_keeps_every_field_even_nested() -> None:
    document = xml(message(MsgType="brand_new", MsgId="9"))
    document = document.replace(b"</xml>", b"<Card><Id>7</Id><Id>8</Id></Card></xml>")
    assert parse(document).payload == UnknownPayload(
        msg_type="brand_new", fields={"Card.Id[0]": "7", "Card.Id[1]": "8"}
    )


def test_a_message_for_another_app_of_the_company_is_refused() -> None:
    """Two apps of one company may share a callback URL, Token and key: a message whose
    AgentID is another app's would be stored and answered as ours."""
    with pytest.raises(WrongRecipient, match=r"AgentID 1000003, not for ours \(1000002\)"):
        parse(xml(message(MsgType="text", Content="hi", MsgId="9", AgentID="1000003")))
    # No AgentID (some events), or an empty one: not another app's, kept.
    for agent in (None, "", " "):
        fields = message(MsgType="text", Content="hi", MsgId="9")
        if agent is None:
            del fields["AgentID"]
        else:
            fields["AgentID"] = agent
        assert parse(xml(fields)).agent_id is None


@pytest.mark.parametrize("agent", ["x", "1000002x", "-1", "٢", "２", "1" * 19, "1" * 5000])
def test_an_agentid_that_is_no_apps_id_is_refused(agent: str) -> None:
    """WeCom's AgentID is the app's id, digits: anything else was taken as "no AgentID"
    and the message stored as ours. Digits of other scripts are no id either (int() reads
    "٢" as 2), nor digits beyond an int64 (int() refuses 5000 of them: a 500)."""
    fields = message(MsgType="text", Content="hi", MsgId="9", AgentID=agent)
    with pytest.raises(InvalidMessage, match=r"AgentID .* is not an app's id \(digits\)"):
        parse(xml(fields))


@pytest.mark.parametrize(
    "agent",
    [
        "<AgentID>1000003</AgentID><AgentID>1000002</AgentID>",
        "<AgentID>1000002</AgentID><AgentID>1000003</AgentID>",
        "<AgentID><Id>1000003</Id></AgentID>",
        "<AgentID><x/></AgentID>",
    ],
    ids=["repeated, another app's first", "repeated, ours first", "nested", "an element"],
)
def test_an_agentid_the_parser_cannot_read_as_one_value_is_refused(agent: str) -> None:
    """A repeated AgentID, or one holding elements, goes past the flat reading to the
    XML parser, which names it ``AgentID[0]`` or ``AgentID.Id``: no ``AgentID`` at all,
    so the message was stored as ours, another app's id in it (found by review)."""
    fields = message(MsgType="text", Content="hi", MsgId="9")
    del fields["AgentID"]
    document = xml(fields).replace(b"</xml>", agent.encode() + b"</xml>")
    with pytest.raises(InvalidMessage, match=r"AgentID .* is not an app's id"):
        parse(document)


def test_an_agentid_of_eighteen_digits_is_an_apps_id() -> None:
    """The longest AgentID read as an id (18 digits, an int64's): another app's, refused as
    WrongRecipient, not as a malformed message."""
    with pytest.raises(WrongRecipient, match=r"AgentID 1{18}, not for ours"):
        parse(xml(message(MsgType="text", Content="hi", MsgId="9", AgentID="1" * 18)))


def test_an_agentid_with_whitespace_around_it_is_still_that_app() -> None:
    """Whitespace around the digits (a pretty-printed document, a newline in the CDATA)
    hides no app: another app's is refused, ours is kept as ours."""
    for padded in (" 1000003 ", "\n1000003\n"):
        with pytest.raises(WrongRecipient, match="AgentID 1000003"):
            parse(xml(message(MsgType="text", Content="hi", MsgId="9", AgentID=padded)))
    fields = message(MsgType="text", Content="hi", MsgId="9", AgentID="\t1000002 ")
    assert parse(xml(fields)).agent_id == 1000002


def _nested(levels: int) -> bytes:
    document = xml(message(MsgType="event", Event="deep"))
    return document.replace(b"</xml>", b"<a>" * levels + b"x" + b"</a>" * levels + b"</xml>")


def test_nesting_is_kept_to_sixteen_levels_and_refused_beyond() -> None:
    """Flattening recurses per level: a signed message nested thousands deep was a
    RecursionError (500); it is an InvalidMessage (400) instead."""
    fields = parse(_nested(16)).payload
    assert isinstance(fields, WeComEventPayload)
    assert fields.fields == {".".join(["a"] * 16): "x"}
    for levels in (17, 5000):
        with pytest.raises(InvalidMessage, match="deeper than 16"):
            parse(_nested(levels))


@pytest.mark.parametrize("msg_type", ["miniprogram", "a", "x" * 32, "_", "future_type_v_"])
def test_a_well_formed_unknown_msgtype_is_kept(msg_type: str) -> None:
    msg = parse(xml(message(MsgType=msg_type, MsgId="9", Extra="e")))
    assert msg.msg_type == msg_type
    assert msg.payload == UnknownPayload(msg_type=msg_type, fields={"Extra": "e"})


@pytest.mark.parametrize(
    ("msg_type", "reason"),
    [
        ("", "MsgType is empty"),
        ("x" * 33, "not a type token"),
        ("Text", "not a type token"),
        ("text ", "not a type token"),
        ("h5", "not a type token"),
        ("mini-program", "not a type token"),
        ("图片", "not a type token"),
        ("a\nb", "not a type token"),
    ],
)
def test_a_msgtype_that_is_no_type_token_is_refused(msg_type: str, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=reason):
        parse(xml(message(MsgType=msg_type, MsgId="9")))


@pytest.mark.parametrize("vectors", [_VECTORS, *_VECTORS["additional_sets"]])
def test_official_vector_plaintexts_parse(vectors: dict[str, Any]) -> None:
    case = next(c for c in vectors["cases"] if c["kind"] == "post_xml")
    plaintext = case["expected_plaintext"]
    agent = 218 if "218" in plaintext else 1000002  # the app each vector's message is for
    msg = parse_message(plaintext.encode(), corp_id=vectors["corp_id"], agent_id=agent, app="a-1")
    assert msg.msg_type == "text"
    assert msg.from_user in ("mycreate", "ChenJiaShun")
    assert msg.msg_id in ("4561255354251345929", "1456453720")
    assert msg.agent_id in (218, 1000002)


@given(st.text(st.characters(exclude_categories=("Cs", "Cc")) | st.sampled_from("\n\t")))
def test_any_text_content_survives(content: str) -> None:
    from xml.sax.saxutils import escape

    document = xml(message(MsgType="text", MsgId="1")).replace(
        b"</xml>", f"<Content>{escape(content)}</Content></xml>".encode()
    )
    assert parse(document).payload == TextPayload(content=content)


# ---------------------------------------------------------------- dedupe keys


def test_dedupe_key_of_a_message_is_app_and_msgid() -> None:
    msg = parse(xml(message(MsgType="text", Content="x", MsgId="4561255354251345929")))
    assert dedupe_key(msg) == f"{APP}:4561255354251345929"


def test_dedupe_key_of_an_event_is_app_user_time_event_and_its_digest() -> None:
    msg = parse(xml(message(MsgType="event", Event="enter_agent")))
    assert re.fullmatch(rf"{APP}:{USER}:1409659813:enter_agent\.[0-9a-f]{{16}}", dedupe_key(msg))
    assert msg.correlation_id == dedupe_key(msg)
    later = parse(xml(message(MsgType="event", Event="enter_agent", CreateTime="1409659814")))
    assert dedupe_key(later) != dedupe_key(msg)
    again = parse(xml(message(MsgType="event", Event="enter_agent")))  # WeCom's retry
    assert (dedupe_key(again), again.event_id) == (dedupe_key(msg), msg.event_id)


def test_the_key_of_an_event_is_made_of_wecoms_fields_not_of_our_payload() -> None:
    """A retry must keep its key across an upgrade that adds a field to a payload: the
    digest is of the message's fields as WeCom wrote them, in any order and however the
    document is read (flat reader or XML parser)."""
    fields = message(MsgType="event", Event="click", EventKey="menu_1")
    msg = parse(xml(fields))
    reordered = parse(xml(dict(reversed(list(fields.items())))))
    declared = parse(b'<?xml version="1.0" encoding="UTF-8"?>' + xml(fields))  # the parser
    assert dedupe_key(msg) == dedupe_key(reordered) == dedupe_key(declared)
    digest = hashlib.sha1(
        msgspec.json.encode(sorted({"ToUserName": CORP, **fields}.items())),
        usedforsecurity=False,
    ).hexdigest()[:16]
    assert dedupe_key(msg) == f"{APP}:{USER}:1409659813:click.{digest}"


def test_two_events_of_one_user_in_one_second_are_two() -> None:
    """Two menu clicks, or contact changes (all from ``sys``) in one second: one key made
    the second a duplicate, answered 200 and never stored."""
    clicks = [
        parse(xml(message(MsgType="event", Event="click", EventKey=f"#sendmsg#_0_{i}")))
        for i in range(2)
    ]
    changes = [
        parse(
            xml(
                message(
                    MsgType="event",
                    Event="change_contact",
                    ChangeType="update_user",
                    UserID=user,
                    FromUserName="sys",
                )
            )
        )
        for user in ("u1", "u2")
    ]
    for first, second in (clicks, changes):
        assert dedupe_key(first) != dedupe_key(second)
        assert first.event_id != second.event_id


def test_dedupe_key_without_msgid_uses_the_msgtype() -> None:
    msg = parse(xml(message(MsgType="brand_new")))
    assert dedupe_key(msg).startswith(f"{APP}:{USER}:1409659813:brand_new.")


def test_a_control_character_in_a_message_is_no_refusal() -> None:
    """XML forbids them; WeChat sends them raw in CDATA (a vertical tab pasted from
    Word). Signed and decrypted, the message is the user's: each retry was a 400."""
    for raw, kept in (("line1\x0bline2", "line1\ufffdline2"), (" \x1dc", " \ufffdc")):
        msg = parse(xml(message(MsgType="text", Content=raw, MsgId="77")))
        assert msg.payload == TextPayload(content=kept)


def test_an_event_without_a_sender_is_not_a_conversations() -> None:
    """微信客服's kf_msg_or_event has no FromUserName (path/94670): answered 200 and not
    stored, rather than refused (WeCom would retry it in vain)."""
    fields = message(MsgType="event", Event="kf_msg_or_event", Token="ENC", OpenKfId="wk1")
    del fields["FromUserName"]
    with pytest.raises(NoSender, match="kf_msg_or_event"):
        parse(xml(fields))
    # An empty one alike: it was refused 400, a message no retry could make valid.
    with pytest.raises(NoSender, match="kf_msg_or_event"):
        parse(xml({**fields, "FromUserName": ""}))


def test_a_msgid_with_a_colon_is_quoted_in_its_key() -> None:
    """':' separates the key's parts: a MsgId holding one could pose as another key."""
    msg = parse(xml(message(MsgType="text", Content="x", MsgId="a:b")))
    assert dedupe_key(msg) == f"{APP}:a%3Ab"


def test_dedupe_key_is_header_safe() -> None:
    msg = parse(xml(message(MsgType="text", Content="x", MsgId="a:b\r\nX-Evil: 1")))
    key = dedupe_key(msg)
    assert key.startswith(f"{APP}:") and key.count(":") == 1
    assert key.isprintable() and " " not in key


def test_the_same_message_parses_to_the_identical_event() -> None:
    document = xml(message(MsgType="text", Content="x", MsgId="1"))
    assert parse(document) == parse(document)


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "user", ["", ".dot-first", "_under", "-dash", "a" * 65, "zhang san", "张三", "a/b", "a\nb"]
)
def test_invalid_userid_is_refused(user: str) -> None:
    assert not is_user_id(user)
    with pytest.raises(InvalidMessage, match=r"FromUserName .* is not a valid UserID"):
        parse(xml(message(MsgType="text", Content="x", FromUserName=user)))


@pytest.mark.parametrize("user", ["a", "Z9", "zhang.san@corp.com", "a_b-c", "9" * 64])
def test_valid_userids_are_accepted(user: str) -> None:
    assert is_user_id(user)


@pytest.mark.parametrize(
    ("missing", "fields"),
    [
        ("FromUserName", {"CreateTime": "1", "MsgType": "text", "Content": "x"}),
        ("CreateTime", {"FromUserName": USER, "MsgType": "text", "Content": "x"}),
        ("MsgType", {"FromUserName": USER, "CreateTime": "1", "Content": "x"}),
        ("Content", {"FromUserName": USER, "CreateTime": "1", "MsgType": "text"}),
        ("MediaId", {"FromUserName": USER, "CreateTime": "1", "MsgType": "image", "PicUrl": "p"}),
        ("Event", {"FromUserName": USER, "CreateTime": "1", "MsgType": "event"}),
    ],
)
def test_missing_required_field_is_refused(missing: str, fields: dict[str, str]) -> None:
    with pytest.raises(InvalidMessage, match=f"{missing} is missing"):
        parse(xml(fields))


def test_missing_tousername_is_refused() -> None:
    with pytest.raises(InvalidMessage, match="ToUserName is missing"):
        parse(xml(message(MsgType="text", Content="x"), to=None))


def test_repeated_field_is_not_resolved_silently() -> None:
    document = xml(message(MsgType="text", Content="a")).replace(
        b"</xml>", b"<Content>b</Content></xml>"
    )
    with pytest.raises(InvalidMessage, match="Content is missing"):
        parse(document)


@pytest.mark.parametrize("value", ["", "abc", "-1", "1.5", "1e9", "123456789012", "١٢٣"])
def test_bad_createtime_is_refused(value: str) -> None:
    with pytest.raises(InvalidMessage, match="CreateTime"):
        parse(xml(message(MsgType="text", Content="x", CreateTime=value)))


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("Location_X", "north", "is not a number"),
        ("Scale", "nan", "is not a number"),
        ("Location_X", "inf", "is not a finite number"),
        ("Location_Y", "nan", "is not a finite number"),
    ],
)
def test_bad_location_numbers_are_refused(name: str, value: str, reason: str) -> None:
    fields = message(MsgType="location", Location_X="1", Location_Y="2", Scale="3", Label="")
    with pytest.raises(InvalidMessage, match=f"{name} '{value}' {reason}"):
        parse(xml({**fields, name: value}))


def test_an_event_must_name_its_event() -> None:
    with pytest.raises(InvalidMessage, match="Event is empty"):
        parse(xml(message(MsgType="event", Event="")))


def test_an_empty_msgid_is_no_msgid() -> None:
    msg = parse(xml(message(MsgType="text", Content="x", MsgId="")))
    assert msg.msg_id is None
    assert dedupe_key(msg).startswith(f"{APP}:{USER}:1409659813:text.")


def test_an_indented_nested_element_keeps_only_its_children() -> None:
    """The whitespace between nested elements is layout, not a value of the parent."""
    document = xml(message(MsgType="event", Event="pic_sysphoto", EventKey="k")).replace(
        b"</xml>", b"<SendPicsInfo>\n  <Count>1</Count>\n</SendPicsInfo></xml>"
    )
    payload = parse(document).payload
    assert isinstance(payload, WeComEventPayload)
    assert payload.fields == {"SendPicsInfo.Count": "1"}


def test_createtime_of_eleven_digits_is_a_time_and_of_twelve_is_not() -> None:
    assert parse(
        xml(message(MsgType="text", Content="x", CreateTime="1" + "0" * 10))
    ).create_time == (10**10)
    with pytest.raises(InvalidMessage, match="CreateTime"):
        parse(xml(message(MsgType="text", Content="x", CreateTime="1" + "0" * 11)))


def test_message_for_another_corp_is_refused() -> None:
    with pytest.raises(WrongRecipient):
        parse(xml(message(MsgType="text", Content="x"), to="wwsomeoneelse"))


def test_invalid_utf8_is_refused_with_reason() -> None:
    document = xml(message(MsgType="text", Content="ok")).replace(b"ok", b"\xff\xfe")
    with pytest.raises(InvalidMessage, match="not valid UTF-8"):
        parse(document)


XXE = (
    b'<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    b"<xml><Encrypt>&xxe;</Encrypt><Content>&xxe;</Content></xml>"
)
BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    b'<!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    b'<!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">'
    b"]><xml><Encrypt>&lol2;</Encrypt><Content>&lol2;</Content></xml>"
)
EXTERNAL_DTD = (
    b'<!DOCTYPE xml SYSTEM "http://attacker.example/x.dtd"><xml><Encrypt>a</Encrypt></xml>'
)


@pytest.mark.parametrize(
    "document", [XXE, BILLION_LAUGHS, EXTERNAL_DTD], ids=["xxe", "bomb", "dtd"]
)
def test_dtds_and_entities_are_refused_with_a_typed_error(document: bytes) -> None:
    with pytest.raises(UnsafeXml) as outer:
        parse_envelope(document)
    assert outer.value.code == -40002
    with pytest.raises(UnsafeXml):
        parse(document)


def test_entity_reference_without_a_dtd_is_not_expanded() -> None:
    with pytest.raises(MalformedXml, match="undefined entity"):
        parse(
            xml(message(MsgType="text", MsgId="1")).replace(
                b"</xml>", b"<Content>&e;</Content></xml>"
            )
        )


def test_doctype_text_inside_cdata_is_just_text() -> None:
    # Routed to defusedxml (the string is present), which accepts it: it is not a DTD.
    msg = parse(xml(message(MsgType="text", Content="<!DOCTYPE html><p>&amp;</p>", MsgId="1")))
    assert msg.payload == TextPayload(content="<!DOCTYPE html><p>&amp;</p>")


def test_escaped_text_and_declared_encodings() -> None:
    document = xml(message(MsgType="text", MsgId="1")).replace(
        b"</xml>", "<Content>&lt;&amp;&#20013;中</Content></xml>".encode()
    )
    assert parse(document).payload == TextPayload(content="<&中中")
    # The bytes are UTF-8 whatever the declaration says (WeCom sends UTF-8 only).
    declared = b'<?xml version="1.0" encoding="UTF-16"?>' + document
    assert parse(declared).payload == TextPayload(content="<&中中")


def test_envelope_must_be_utf8() -> None:
    with pytest.raises(MalformedXml, match="not valid UTF-8") as exc:
        parse_envelope(b"<xml><Encrypt>\xff</Encrypt></xml>")
    assert exc.value.code == -40002


@pytest.mark.parametrize("document", [b"", b"not xml", b"<xml>", b"<xml></xm>"])
def test_malformed_xml_is_refused(document: bytes) -> None:
    with pytest.raises(MalformedXml) as exc:
        parse_envelope(document)
    assert exc.value.code == -40002
    with pytest.raises((MalformedXml, InvalidMessage)):
        parse(document)


def test_envelope_fields_and_missing_encrypt() -> None:
    env = parse_envelope(_VECTORS["cases"][1]["request_body_example"].encode())
    assert env.encrypt == _VECTORS["cases"][1]["encrypt"]
    assert (env.to_user, env.agent_id) == ("wx5823bf96d3bd56c7", "218")
    with pytest.raises(MalformedXml, match="no Encrypt"):
        parse_envelope(b"<xml><Encrypt></Encrypt></xml>")


ENCRYPT_200K = "A" * 200_000
BIG_ENVELOPES = {
    # Anyone's request is read this far before its signature is checked: a megabyte of
    # these cost the XML parser 50-100 ms each to refuse.
    "nested": b"<xml>" + b"<a>" * 20_000 + b"</a>" * 20_000 + b"</xml>",
    "attributes": b"<xml>" + b'<a b="c"/>' * 10_000 + b"</xml>",
    "many fields": b"<xml>" + b"".join(b"<f%d>x</f%d>" % (i, i) for i in range(10_000)) + b"</xml>",
    "a big Encrypt with a child": f"<xml><Encrypt><a/>{ENCRYPT_200K}</Encrypt></xml>".encode(),
}


@pytest.mark.parametrize("document", BIG_ENVELOPES.values(), ids=BIG_ENVELOPES.keys())
def test_a_big_envelope_not_in_wecoms_shape_is_refused_unparsed(document: bytes) -> None:
    assert len(document) > MAX_UNFLAT_ENVELOPE
    with pytest.raises(MalformedXml, match="not in WeCom's flat XML shape") as exc:
        parse_envelope(document)
    assert exc.value.code == -40002
    # The same shape, small, is parsed as before.
    small = f'<?xml version="1.0"?><xml><Encrypt>{ENCRYPT_200K[:100]}</Encrypt></xml>'
    assert parse_envelope(small.encode()).encrypt == ENCRYPT_200K[:100]


def test_an_envelope_not_in_wecoms_shape_is_parsed_up_to_64_kib_and_refused_past_it() -> None:
    head, tail = '<xml><Encrypt a="1">', "</Encrypt></xml>"
    body = head + "A" * (MAX_UNFLAT_ENVELOPE - len(head) - len(tail)) + tail
    assert len(body) == MAX_UNFLAT_ENVELOPE == 64 * 1024
    assert parse_envelope(body.encode()).encrypt.startswith("AAAA")
    with pytest.raises(MalformedXml, match="not in WeCom's flat XML shape"):
        parse_envelope(body.replace("A", "AA", 1).encode())


def test_a_big_envelope_in_wecoms_shape_is_read() -> None:
    body = f"<xml><ToUserName><![CDATA[ww1]]></ToUserName><Encrypt><![CDATA[{ENCRYPT_200K}]]>"
    body += "</Encrypt>\n<AgentID><![CDATA[2]]></AgentID>\n</xml>"
    assert parse_envelope(body.encode()).encrypt == ENCRYPT_200K


@pytest.mark.parametrize(
    ("before", "between", "after"),
    [
        ("", "\r\n", ""),
        ("", "\n", "\n"),
        ("\ufeff", "", ""),
        ('<?xml version="1.0" encoding="UTF-8"?>\n', "\n", "\r\n"),
    ],
    ids=["CR LF", "a trailing newline", "a BOM", "a declaration"],
)
def test_a_big_envelope_as_any_parser_reads_it_flat_is_read(
    before: str, between: str, after: str
) -> None:
    """What an XML parser reads as the flat shape (and read so under 64 KiB) was refused
    for good over it: 400, and WeCom's retries too."""
    body = (
        f"{before}<xml>{between}<ToUserName><![CDATA[ww1]]></ToUserName>{between}"
        f"<Encrypt><![CDATA[{ENCRYPT_200K}]]></Encrypt>{between}"
        f"<AgentID>2</AgentID>{between}</xml>{after}"
    )
    assert len(body) > MAX_UNFLAT_ENVELOPE
    envelope = parse_envelope(body.encode())
    assert (envelope.encrypt, envelope.to_user, envelope.agent_id) == (ENCRYPT_200K, "ww1", "2")


# ---------------------------------------------------------------- query and body guards


def test_query_needs_each_parameter_exactly_once() -> None:
    good = MultiDict(msg_signature="s", timestamp="1", nonce="n", echostr="a b", extra="x")
    query = CallbackQuery.parse(good, url_check=True)
    assert query.echostr == "a+b"  # an unencoded '+' decodes to ' '
    assert CallbackQuery.parse(good, url_check=False).echostr is None
    with pytest.raises(InvalidQuery, match="echostr is missing"):
        CallbackQuery.parse(MultiDict(msg_signature="s", timestamp="1", nonce="n"), url_check=True)
    repeated = MultiDict([("msg_signature", "s"), ("msg_signature", "t")])
    with pytest.raises(InvalidQuery, match="msg_signature is repeated 2 times"):
        CallbackQuery.parse(repeated, url_check=False)
    with pytest.raises(InvalidQuery, match="nonce is empty"):
        CallbackQuery.parse(MultiDict(msg_signature="s", timestamp="1", nonce=""), url_check=False)
    with pytest.raises(InvalidQuery, match="timestamp"):
        CallbackQuery.parse(
            MultiDict(msg_signature="s", timestamp="-1", nonce="n"), url_check=False
        )
    eleven = MultiDict(msg_signature="s", timestamp="9" * 11, nonce="n")
    assert CallbackQuery.parse(eleven, url_check=False).timestamp == "9" * 11
    with pytest.raises(InvalidQuery, match="timestamp"):
        CallbackQuery.parse(
            MultiDict(msg_signature="s", timestamp="9" * 12, nonce="n"), url_check=False
        )


def test_replay_window() -> None:
    check_fresh("1000", now=1300.0, window_s=300)
    check_fresh("1000", now=700.0, window_s=300)
    check_fresh("1", now=1e9, window_s=0)  # 0 disables the check
    with pytest.raises(StaleTimestamp, match="window"):
        check_fresh("1000", now=1301.0, window_s=300)
    with pytest.raises(StaleTimestamp):
        check_fresh("1000", now=699.0, window_s=300)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "text/xml",
        "text/xml; charset=utf-8",
        "Text/XML; charset=UTF-8",
        " application/xml ",
        "application/atom+xml",
    ],
)
def test_xml_content_types_are_accepted(header: str | None) -> None:
    check_content_type(header)


@pytest.mark.parametrize("header", [None, "", "identity", " Identity "])
def test_an_uncoded_body_is_accepted(header: str | None) -> None:
    check_content_encoding(header)


@pytest.mark.parametrize("header", ["gzip", "deflate", "br", "gzip, identity"])
def test_a_coded_body_is_refused(header: str) -> None:
    with pytest.raises(UnsupportedMediaType, match="Content-Encoding"):
        check_content_encoding(header)


async def _read(chunks: list[bytes], limit: int, *, complete: bool = True) -> bytes:
    loop = asyncio.get_running_loop()
    protocol = BaseProtocol(loop)
    protocol.connection_made(asyncio.Transport())  # a connection still open
    stream = StreamReader(protocol, 2**16, loop=loop)
    for chunk in chunks:
        stream.feed_data(chunk)
    if complete:
        stream.feed_eof()
    return await read_limited(stream, limit, timeout_s=0.05)


async def test_a_body_is_read_up_to_its_limit_and_not_a_byte_past_it() -> None:
    """Chunked bodies declare no length: the limit holds while reading."""
    assert await _read([b"a" * 6, b"b" * 4], 10) == b"a" * 6 + b"b" * 4
    assert await _read([b"x" * 10], 10) == b"x" * 10
    assert await _read([], 10) == b""
    with pytest.raises(BodyTooLarge, match="body exceeds 10 bytes"):
        await _read([b"a" * 6, b"b" * 5], 10)


async def test_a_body_that_stops_arriving_is_given_up_on() -> None:
    """A client that declares a length and sends less held its connection for good."""
    with pytest.raises(BodyTimeout, match=r"body not received within 0\.05 s"):
        await _read([b"<xml>"], 1024, complete=False)


@pytest.mark.parametrize(
    "header",
    ["application/json", "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"],
)
def test_other_content_types_are_refused(header: str) -> None:
    with pytest.raises(UnsupportedMediaType):
        check_content_type(header)


def test_declared_length_over_the_limit_is_refused() -> None:
    check_declared_length(None, 10)
    check_declared_length(10, 10)
    with pytest.raises(BodyTooLarge):
        check_declared_length(11, 10)


# ---------------------------------------------------------------- settings

TOKEN = "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo"
AES_KEY = "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt"
ENV = {
    "WECOM_CORP_ID": CORP,
    "WECOM_AGENT_ID": "1000002",
    "WECOM_TOKEN": TOKEN,
    "WECOM_ENCODING_AES_KEY": AES_KEY,
}


def test_settings_defaults() -> None:
    s = GatewaySettings.from_env(ENV)
    assert (s.host, s.port, s.callback_path) == ("0.0.0.0", 8080, "/wecom/callback")
    assert (s.timestamp_window_s, s.max_body_bytes, s.publish_timeout_s) == (300, 1048576, 2.0)
    assert s.app == APP
    assert {x.reveal() for x in s.secrets} == {TOKEN, AES_KEY}


def test_settings_read_every_variable() -> None:
    s = GatewaySettings.from_env(
        {
            **ENV,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": "9000",
            "GATEWAY_CALLBACK_PATH": "/cb",
            "GATEWAY_TIMESTAMP_WINDOW": "0",
            "GATEWAY_MAX_BODY_BYTES": "4096",
            "GATEWAY_PUBLISH_TIMEOUT": "1.5",
        }
    )
    assert (s.host, s.port, s.callback_path) == ("127.0.0.1", 9000, "/cb")
    assert (s.timestamp_window_s, s.max_body_bytes, s.publish_timeout_s) == (0, 4096, 1.5)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WECOM_ENCODING_AES_KEY": "short"}, "WECOM_ENCODING_AES_KEY must be 43 characters"),
        ({"WECOM_TOKEN": ""}, "WECOM_TOKEN is required"),
        ({"WECOM_CORP_ID": "ww-1"}, "WECOM_CORP_ID must be letters and digits"),
        ({"GATEWAY_CALLBACK_PATH": "wecom"}, "GATEWAY_CALLBACK_PATH must start with '/'"),
        ({"GATEWAY_CALLBACK_PATH": "/healthz"}, "GATEWAY_CALLBACK_PATH must not be"),
        ({"GATEWAY_PORT": "80x"}, "GATEWAY_PORT must be an integer"),
        ({"GATEWAY_TIMESTAMP_WINDOW": "-1"}, "GATEWAY_TIMESTAMP_WINDOW must be an integer"),
        (
            {"GATEWAY_TIMESTAMP_WINDOW": "1000", "WECOMBOT_DUPLICATE_WINDOW": "900"},
            r"twice GATEWAY_TIMESTAMP_WINDOW \(2 × 1000 s\) must not exceed "
            r"WECOMBOT_DUPLICATE_WINDOW \(900 s\)",
        ),
        (
            # as long as the window: a replay at its far end, of a callback that came at
            # its near end (our clock behind WeCom's), is 2 × 300 s after the original
            {"GATEWAY_TIMESTAMP_WINDOW": "300", "WECOMBOT_DUPLICATE_WINDOW": "300"},
            r"twice GATEWAY_TIMESTAMP_WINDOW \(2 × 300 s\) must not exceed "
            r"WECOMBOT_DUPLICATE_WINDOW \(300 s\)",
        ),
        ({"GATEWAY_MAX_BODY_BYTES": "10"}, "GATEWAY_MAX_BODY_BYTES must be an integer"),
        ({"GATEWAY_PUBLISH_TIMEOUT": "30"}, "GATEWAY_PUBLISH_TIMEOUT must be a number of seconds"),
    ],
)
def test_settings_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GatewaySettings.from_env({**ENV, **env})


def test_a_replay_window_within_half_the_dedupe_window_or_off_is_accepted() -> None:
    """The window spans 2 × GATEWAY_TIMESTAMP_WINDOW: the dedupe must outlast both halves."""
    for window, dedupe in (("450", "900"), ("0", "60"), ("300", ""), ("30", "60")):
        settings = GatewaySettings.from_env(
            {**ENV, "GATEWAY_TIMESTAMP_WINDOW": window, "WECOMBOT_DUPLICATE_WINDOW": dedupe}
        )
        assert settings.timestamp_window_s == int(window)


async def _ready() -> tuple[bool, str]:
    return True, "ready"


# What the gateway serves itself, on the callback's port (create_app): /healthz, /readyz
# and /metrics.
OWN_PATHS = sorted(route.path for route in HealthServer("127.0.0.1", 0, _ready).routes())


@pytest.mark.parametrize("path", OWN_PATHS)
def test_the_callback_path_is_none_of_the_gateways_own(path: str) -> None:
    """On /metrics the callback's URL check would answer every Prometheus scrape (400)."""
    with pytest.raises(ConfigError, match=f"GATEWAY_CALLBACK_PATH must not be one of .*'{path}'"):
        GatewaySettings.from_env({**ENV, "GATEWAY_CALLBACK_PATH": path})


@pytest.mark.parametrize("path", ["/{tail:.*}", "/wecom/{", "/wecom/}", "/wecom/{app}/callback"])
def test_the_callback_path_is_literal_not_a_route_pattern(path: str) -> None:
    """'/{tail:.*}' would take /healthz and /readyz (the probes fail); '/wecom/{' made
    create_app raise ValueError (exit 1, no setting named) instead of a ConfigError."""
    with pytest.raises(ConfigError, match="GATEWAY_CALLBACK_PATH must be a literal path"):
        GatewaySettings.from_env({**ENV, "GATEWAY_CALLBACK_PATH": path})


class _NoPublisher:
    async def append(self, event: MessageReceived, *, msg_id: str) -> Appended:
        raise AssertionError("no callback is handled here")


async def _resources_serving(app: web.Application, paths: list[str]) -> list[web.AbstractResource]:
    matches = [await app.router.resolve(make_mocked_request("GET", p, app=app)) for p in paths]
    return [match.route.resource for match in matches if match.route.resource is not None]


async def _url_verification(app: web.Application, path: str) -> tuple[int, str]:
    """WeCom's URL verification of ``path`` (GET, signed, the echo encrypted), sent by a
    real client (httpx, as ``wecombot doctor`` sends it) to the app on a real server:
    the answer's status and body, which is the echo when the callback got it."""
    wecom = CallbackBuilder(corp_id=CORP, agent_id=1000002, token=TOKEN, encoding_aes_key=AES_KEY)
    async with TestServer(app) as server, httpx.AsyncClient() as http:
        url = f"http://{server.host}:{server.port}{path}"
        response = await http.get(url, params=wecom.verify_url(ECHO))
    return response.status_code, response.text


ECHO = "reached-the-callback"
# What an operator may type: '%'-escapes, dot segments, spaces, controls, non-ASCII, the
# route pattern's braces and characters a URL reserves.
_PATH_CHARS = "/az26dF.:*%-_~{}?#+;=@\\ \t\x01\x7fé回"


@settings(deadline=None)  # a real server per example
@given(st.text(alphabet=_PATH_CHARS, max_size=12).map(lambda tail: f"/{tail}"))
@example("/{tail:.*}")
@example("/wecom/{")
@example("/metrics")
@example("/%6detrics")
@example("/wecom%2Fcallback")
@example("/wecom/../callback")
@example("/wecom/./callback")
@example("/wecom\x01callback")
@example("/企业微信/回调")
def test_an_accepted_callback_path_is_reached_and_leaves_the_gateways_own(path: str) -> None:
    """Whatever path the setting accepts, create_app builds (no ValueError: exit 1),
    WeCom's URL verification sent to it reaches the callback (the echo comes back), and
    /healthz, /readyz and /metrics still reach their own handlers."""
    try:
        gateway = GatewaySettings.from_env({**ENV, "GATEWAY_CALLBACK_PATH": path})
    except ConfigError:
        return  # refused at start, with the setting named: exit 2
    app = create_app(gateway, _NoPublisher(), ready=_ready)
    callback = {r for r in app.router.resources() if any(route.method == "POST" for route in r)}
    serving = asyncio.run(_resources_serving(app, OWN_PATHS))
    assert len(serving) == len(OWN_PATHS)
    assert not callback.intersection(serving), f"{path!r} takes one of {OWN_PATHS}"
    reached = asyncio.run(_url_verification(app, gateway.callback_path))
    assert reached == (200, ECHO), f"{path!r} is not reached"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/%6detrics", "must not hold '%'"),
        ("/wecom%2Fcallback", "must not hold '%'"),
        ("/wecom/../callback", "must not hold '.' or '..' segments"),
        ("/wecom/./callback", "must not hold '.' or '..' segments"),
        ("/.", "must not hold '.' or '..' segments"),
        ("/wecom\x01callback", "must start with '/' and hold no '\\?', '#', spaces or"),
        ("/wecom\u00a0callback", "must start with '/' and hold no '\\?', '#', spaces or"),
    ],
)
def test_a_callback_path_no_request_would_reach_is_refused(path: str, message: str) -> None:
    """'/%6detrics' was routed as itself but arrives decoded, as /metrics (404 for
    WeCom); whether '%2F' stays '%2F' depends on every proxy on the way. '..' and '.'
    are resolved by the client before sending, and a control character is refused by
    clients (httpx: InvalidURL, which the doctor's callback check did not catch)."""
    with pytest.raises(ConfigError, match=f"GATEWAY_CALLBACK_PATH {message}"):
        GatewaySettings.from_env({**ENV, "GATEWAY_CALLBACK_PATH": path})


def test_settings_report_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as exc:
        GatewaySettings.from_env({"GATEWAY_PORT": "0"})
    text = str(exc.value)
    for name in ("WECOM_CORP_ID", "WECOM_AGENT_ID", "WECOM_TOKEN", "WECOM_ENCODING_AES_KEY"):
        assert name in text
    assert "GATEWAY_PORT" in text


def test_secrets_never_appear_in_repr_or_errors() -> None:
    s = GatewaySettings.from_env({**ENV, "NATS_USER": "u", "NATS_PASSWORD": "pw-secret-1"})
    for text in (repr(s), str(s)):
        assert TOKEN not in text and AES_KEY not in text and "pw-secret-1" not in text
    with pytest.raises(ConfigError) as exc:
        GatewaySettings.from_env({**ENV, "WECOM_ENCODING_AES_KEY": AES_KEY + "x"})
    assert AES_KEY not in str(exc.value)


def test_refusals_of_one_kind_are_written_a_few_a_second_and_the_rest_counted() -> None:
    now = [0.0]
    refusals = RefusalLog(burst=3, period_s=1.0, clock=lambda: now[0])
    with capture_logs() as logs:
        for _ in range(10):
            refusals.refused(400, "InvalidQuery", reason="no query")
        refusals.refused(403, "SignatureError", reason="forged")  # another kind
        now[0] = 1.0
        refusals.refused(400, "InvalidQuery", reason="no query")
    lines = [(e["status"], e.get("suppressed")) for e in logs]
    assert lines == [(400, None), (400, None), (400, None), (403, None), (400, 7)]
    assert all(e["event"] == "callback.rejected" and e["log_level"] == "warning" for e in logs)
