"""Pure parsing of WeCom callback XML: the outer envelope and the decrypted message.

No I/O here. Both documents come from the network (the outer one before any signature
check), so a DTD is refused (by defusedxml, typed as UnsafeXml): no entity expansion
(billion laughs), no external references (XXE). Both must be UTF-8.

>>> envelope = parse_envelope(b"<xml><ToUserName>ww1</ToUserName>"
...                           b"<Encrypt>abc=</Encrypt><AgentID>2</AgentID></xml>")
>>> envelope.encrypt, envelope.agent_id
('abc=', '2')
>>> msg = parse_message(
...     b"<xml><ToUserName>ww1</ToUserName><FromUserName>zhang.san</FromUserName>"
...     b"<CreateTime>1409659813</CreateTime><MsgType>text</MsgType>"
...     b"<Content>hi</Content><MsgId>42</MsgId><AgentID>2</AgentID></xml>",
...     corp_id="ww1", agent_id=2, app="ww1-2")
>>> msg.payload, dedupe_key(msg)
(TextPayload(content='hi'), 'ww1-2:42')

Message formats: https://developer.work.weixin.qq.com/document/path/90239 (messages) and
https://developer.work.weixin.qq.com/document/path/90240 (events); the envelope:
https://developer.work.weixin.qq.com/document/path/90238.
"""

from __future__ import annotations

import hashlib
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

import msgspec
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from wecombot_common.crypto import ParseError
from wecombot_common.events import (
    ImagePayload,
    LinkPayload,
    LocationPayload,
    MessageReceived,
    Payload,
    TextPayload,
    UnknownPayload,
    VideoPayload,
    VoicePayload,
    WeComEventPayload,
    derived_id,
)
from wecombot_common.topology import is_user_id

from .errors import InvalidMessage, MalformedXml, NoSender, UnsafeXml, WrongRecipient

__all__ = [
    "Envelope",
    "dedupe_key",
    "parse_envelope",
    "parse_message",
]

_fields_encoder = msgspec.json.Encoder()
_SAFE_KEY_PART = re.compile(r"[A-Za-z0-9_\-@.]{1,128}")
# A MsgType token: every type WeCom documents (text, image, voice, video, location, link,
# event, file, miniprogram_notice…) is lower-case letters and '_'. A well-formed type we
# do not know is kept (UnknownPayload); anything else is not a MsgType at all: refused.
_MSG_TYPE = re.compile(r"[a-z_]{1,32}")
_MAX_CREATE_TIME_DIGITS = 11  # beyond year 5000: not a real CreateTime
_MAX_AGENT_ID_DIGITS = 18  # an int64; WeCom's are 7 digits (1000002)
# Elements every message carries; they become envelope fields of MessageReceived, so the
# payload's ``fields`` holds everything else.
_COMMON = frozenset(("ToUserName", "FromUserName", "CreateTime", "MsgType", "MsgId", "AgentID"))
_SHOWN = 40  # characters of an offending value quoted in a reason
# WeCom's messages are flat or nearly (an event's list of items); deeper is no message of
# theirs, and flattening it would recurse once per level.
_MAX_DEPTH = 16
_DOCTYPE = "<!DOCTYPE"

# The shape WeCom writes both documents in: ``<xml>`` then simple elements, each holding
# one CDATA section or plain text, then ``</xml>``. A document of exactly that shape is
# read by the expressions below; anything else (attributes, nesting, entities, comments,
# a declaration, a repeated tag, CR, a character XML forbids) goes to the XML parser.
# tests/unit/test_gateway_parse_flat.py checks both readings agree on generated input.
_NOT_XML_CHAR = "\x00-\x08\x0b-\x1f\ufffe\uffff"  # and CR, which parsers normalise
_FLAT_ELEMENT = re.compile(
    r"[ \t\n]*+<([A-Za-z_][A-Za-z0-9_]{0,63})>(?:"
    rf"<!\[CDATA\[([^\]{_NOT_XML_CHAR}]*+(?:\](?!\]>)[^\]{_NOT_XML_CHAR}]*+)*+)\]\]>"
    rf"|([^<&>\]{_NOT_XML_CHAR}]*+))</\1>"
)
_FLAT_END = re.compile(r"[ \t\n]*+</xml>")
# The envelope is read before its signature is checked, by anyone's request: WeCom's has
# three fields and is always flat. One in another shape goes to the XML parser only up to
# this size: a megabyte of nested or attributed elements cost ≈ 50-100 ms of the
# gateway's CPU to refuse, so ten such requests a second, from anyone, filled a core.
_ENVELOPE_FIELDS = 16
MAX_UNFLAT_ENVELOPE = 64 * 1024  # characters
# Characters XML 1.0 forbids. WeCom's sibling WeChat sends them raw inside CDATA (a
# vertical tab pasted from Word, \x1d…): in the decrypted message, already signed, they
# become U+FFFD rather than make every retry of the user's message a 400.
_FORBIDDEN_IN_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass(frozen=True, slots=True)
class Envelope:
    """The outer POST body: ``<xml><ToUserName/><AgentID/><Encrypt/></xml>``."""

    encrypt: str
    to_user: str | None
    agent_id: str | None


def parse_envelope(body: bytes) -> Envelope:
    """Parse the outer XML; MalformedXml / UnsafeXml (official code -40002) otherwise."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedXml(
            f"callback body is not valid UTF-8 (byte {exc.start})", code=ParseError.code
        ) from None
    fields = _flat_fields(text, max_fields=_ENVELOPE_FIELDS)
    if fields is None:
        # What any XML parser reads the same way as the flat shape: a BOM, a declaration,
        # CR LF or CR between elements (a parser makes them LF), whitespace after the root.
        # Else a large body in such a shape was refused for good (400), WeCom's retries
        # too, where a small one was read by the parser.
        fields = _flat_fields(_as_a_parser_reads(text), max_fields=_ENVELOPE_FIELDS)
    if fields is None:
        if len(text) > MAX_UNFLAT_ENVELOPE:
            raise MalformedXml(
                f"callback body is over {MAX_UNFLAT_ENVELOPE // 1024} KiB and not in WeCom's "
                "flat XML shape: not parsed before its signature is checked",
                code=ParseError.code,
            )
        fields = _children(_parse_xml(text, "callback body", code=ParseError.code))
    encrypt = fields.get("Encrypt")
    if not encrypt:
        raise MalformedXml("callback body has no Encrypt element", code=ParseError.code)
    return Envelope(
        encrypt=encrypt, to_user=fields.get("ToUserName"), agent_id=fields.get("AgentID")
    )


def parse_message(plaintext: bytes, *, corp_id: str, agent_id: int, app: str) -> MessageReceived:
    """Turn a decrypted callback into a MessageReceived; unknown MsgTypes are kept whole.

    An unknown but well-formed MsgType (``[a-z_]{1,32}``, e.g. a future ``miniprogram``)
    becomes an UnknownPayload with every field; a MsgType that is no type token at all
    (empty, longer than 32, other characters) is refused as InvalidMessage.

    Raises InvalidMessage (not UTF-8, a required field missing or malformed, an AgentID
    that is no app's id), MalformedXml, UnsafeXml, or WrongRecipient (ToUserName is not
    ``corp_id``, or an AgentID is there and is not ``agent_id``: another app of the
    company posting to our URL with the same Token and key; stored as ours, its users
    would be answered by our app).
    """
    try:
        text = plaintext.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(
            f"decrypted message is not valid UTF-8 (byte {exc.start}: {exc.reason})"
        ) from None
    fields = _flat_fields(text)  # refuses a forbidden character: then sanitised below
    if fields is None and _FORBIDDEN_IN_XML.search(text) is not None:
        text = _FORBIDDEN_IN_XML.sub("\ufffd", text)
        fields = _flat_fields(text)
    if fields is None:
        fields = _flatten(_parse_xml(text, "decrypted message"))
    to_user = _required(fields, "ToUserName")
    if to_user != corp_id:
        raise WrongRecipient(
            f"message addressed to {_show(to_user)}, not to our CorpID", setting="WECOM_CORP_ID"
        )
    agent = _agent_id(fields)
    if agent is not None and agent != agent_id:
        raise WrongRecipient(
            f"message for AgentID {agent}, not for ours ({agent_id})", setting="WECOM_AGENT_ID"
        )
    if not fields.get("FromUserName") and fields.get("MsgType") == "event":
        # absent or empty alike (an empty one was refused 400, and retried in vain)
        raise NoSender(f"event {_show(fields.get('Event', ''))} has no FromUserName")
    from_user = _required(fields, "FromUserName")
    if not is_user_id(from_user):
        raise InvalidMessage(f"FromUserName {_show(from_user)} is not a valid UserID")
    create_time = _create_time(_required(fields, "CreateTime"))
    msg_type = _msg_type(_required(fields, "MsgType"))
    msg_id = fields.get("MsgId") or None
    payload = _payload(msg_type, fields)
    key = _key(app, msg_id, from_user, create_time, msg_type, payload, fields)
    return MessageReceived(
        event_id=derived_id(key, "received"),
        occurred_at=datetime.fromtimestamp(create_time, UTC),
        app=app,
        conversation=from_user,
        correlation_id=msg_id or key,
        msg_type=msg_type,
        msg_id=msg_id,
        from_user=from_user,
        to_user=to_user,
        agent_id=agent,
        create_time=create_time,
        payload=payload,
    )


def dedupe_key(message: MessageReceived) -> str:
    """The Nats-Msg-Id of a received message: WeCom retries must map to the same key.

    ``{app}:{MsgId}`` for messages; events have no MsgId, so
    ``{app}:{FromUserName}:{CreateTime}:{Event}.{digest}`` (a message without MsgId
    uses its MsgType in place of Event), the digest of everything the event carries.
    WeCom retries a callback it got no 200 for and advises deduplicating by MsgId, and
    events by FromUserName + CreateTime
    (https://developer.work.weixin.qq.com/document/path/90238); two different events
    of one user in one second (two menu clicks; contact changes, all from ``sys``) are
    not one event, so the digest tells them apart.
    """
    if message.msg_id:
        return f"{message.app}:{_key_part(message.msg_id)}"
    return message.correlation_id  # the key parse_message made (and digested) already


# ---------------------------------------------------------------- XML


_DECLARATION = re.compile(r"<\?xml[ \t\r\n][^<>?]*\?>[ \t\r\n]*")


def _as_a_parser_reads(document: str) -> str:
    """``document`` without what an XML parser drops or normalises around a flat
    document's elements: a leading BOM and declaration, CR LF and CR (made LF, as the
    parser makes them everywhere), whitespace after the root element."""
    document = document.removeprefix("\ufeff")
    if declaration := _DECLARATION.match(document):
        document = document[declaration.end() :]
    return document.replace("\r\n", "\n").replace("\r", "\n").rstrip(" \t\n")


def _flat_fields(document: str, *, max_fields: int | None = None) -> dict[str, str] | None:
    """Tag → text of a document in WeCom's flat shape; None if it is not in that shape
    (or has more than ``max_fields`` elements).

    Where it answers, the answer is the XML parser's (``_children`` and ``_flatten`` read
    a flat document with unique tags the same way), at under half the cost: this runs
    twice per callback.
    """
    if not document.startswith("<xml>"):
        return None
    fields: dict[str, str] = {}
    match = _FLAT_ELEMENT.match
    pos = 5
    while (element := match(document, pos)) is not None:
        tag, cdata, plain = element.groups()
        if tag in fields or len(fields) == max_fields:
            return None
        fields[tag] = plain if cdata is None else cdata
        pos = element.end()
    end = _FLAT_END.match(document, pos)
    if end is None or end.end() != len(document):
        return None
    return fields


def _parse_xml(document: str, what: str, *, code: int | None = None) -> ET.Element:
    """Parse ``document`` (already decoded, so no declared encoding can hide markup).

    Entities can only be declared, and external references only made, inside a DTD, and
    a DTD only starts with ``<!DOCTYPE``. A document containing that string goes to
    defusedxml, which refuses the DTD with a typed error; one without it has no DTD, so
    the C parser (2-3x faster than defusedxml's pure-Python one, which matters on the
    hot path) is exactly as safe: only the five predefined entities exist.
    """
    try:
        if _DOCTYPE in document:
            root: ET.Element = fromstring(document, forbid_dtd=True)
        else:
            root = ET.fromstring(document)  # noqa: S314 (no DTD: see above)
    except DefusedXmlException as exc:
        raise UnsafeXml(
            f"{what} refused: {type(exc).__name__} (no DTD, entity or external reference "
            "is accepted)",
            code=code,
        ) from None
    except ET.ParseError as exc:
        raise MalformedXml(f"{what} is not well-formed XML: {exc}", code=code) from None
    return root


def _children(root: ET.Element) -> dict[str, str]:
    """Direct children as tag → text (the first of a repeated tag wins: envelope only)."""
    out: dict[str, str] = {}
    for child in root:
        out.setdefault(child.tag, child.text or "")
    return out


def _flatten(root: ET.Element) -> dict[str, str]:
    """Every element below the root as path → text, losing nothing.

    Nested elements join with '.', repeated siblings get ``[i]`` (so a repeated top-level
    field such as two <Content> is not silently resolved: it is missing as ``Content``),
    attributes become ``path@name``.
    """
    out: dict[str, str] = {}
    for child in root:  # fast path: the usual flat message, no repeats, no attributes
        if len(child) or child.attrib or child.tag in out:
            break
        out[child.tag] = child.text or ""
    else:
        return out
    out.clear()
    _collect(root, "", out, depth=1)
    return out


def _collect(element: ET.Element, prefix: str, out: dict[str, str], *, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise InvalidMessage(f"decrypted message nests elements deeper than {_MAX_DEPTH}")
    tags = [child.tag for child in element]
    repeated = {t for t in tags if tags.count(t) > 1} if len(set(tags)) != len(tags) else set()
    index: dict[str, int] = {}
    for child in element:
        name = child.tag
        if name in repeated:
            i = index.get(name, 0)
            index[name] = i + 1
            name = f"{name}[{i}]"
        path = prefix + name
        for attr, value in child.attrib.items():
            out[f"{path}@{attr}"] = value
        if len(child):
            # Text among the elements (mixed content) is kept whole, the elements' text
            # and what follows each: only the text before the first was, and a Content
            # of 'a <b>b</b> c' (markup instead of CDATA) was stored as 'a '.
            if any(part.strip() for part in (child.text or "", *(c.tail or "" for c in child))):
                out[path] = "".join(child.itertext())
            _collect(child, path + ".", out, depth=depth + 1)
        else:
            out[path] = child.text or ""


# ---------------------------------------------------------------- fields


def _show(value: str) -> str:
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "…")


def _required(fields: dict[str, str], name: str) -> str:
    value = fields.get(name)
    if value is None:
        raise InvalidMessage(f"{name} is missing")
    return value


def _create_time(raw: str) -> int:
    value = raw.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > _MAX_CREATE_TIME_DIGITS:
        raise InvalidMessage(f"CreateTime {_show(raw)} is not a Unix time in seconds")
    return int(value)


def _msg_type(raw: str) -> str:
    """A type token (``[a-z_]{1,32}``), known or not; anything else is InvalidMessage."""
    if not raw:
        raise InvalidMessage("MsgType is empty")
    if _MSG_TYPE.fullmatch(raw) is None:
        raise InvalidMessage(f"MsgType {_show(raw)} is not a type token ([a-z_], 1-32)")
    return raw


def _agent_id(fields: dict[str, str]) -> int | None:
    """The app a message is for; None when it has none (absent or empty: some events).

    WeCom's AgentID is the app's id, an integer
    (https://developer.work.weixin.qq.com/document/path/90238); anything else is no app's:
    refused, not taken as "no AgentID" and stored as ours. So is one repeated or holding
    only elements, which ``_flatten`` names ``AgentID[0]`` or ``AgentID.x`` (leaving no
    ``AgentID``): another app's id may be among them. Text beside elements
    (``<AgentID>1000002<x/></AgentID>``) is read as the text: its digits are the id.
    """
    raw = fields.get("AgentID")
    if raw is None and any(key.startswith(("AgentID[", "AgentID.")) for key in fields):
        raise InvalidMessage("AgentID repeated or holding elements is not an app's id")
    value = (raw or "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > _MAX_AGENT_ID_DIGITS:
        raise InvalidMessage(f"AgentID {_show(raw or '')} is not an app's id (digits)")
    return int(value)


def _number(fields: dict[str, str], name: str, parse: Callable[[str], float]) -> float:
    raw = _required(fields, name)
    try:
        value = parse(raw.strip())
    except ValueError:
        raise InvalidMessage(f"{name} {_show(raw)} is not a number") from None
    if not math.isfinite(value):
        raise InvalidMessage(f"{name} {_show(raw)} is not a finite number")
    return value


def _payload(msg_type: str, fields: dict[str, str]) -> Payload:
    build = _BUILDERS.get(msg_type)
    if build is not None:
        return build(fields)
    return UnknownPayload(msg_type=msg_type, fields=_rest(fields, ()))


def _rest(fields: dict[str, str], named: tuple[str, ...]) -> dict[str, str]:
    return {k: v for k, v in fields.items() if k not in _COMMON and k not in named}


def _text(f: dict[str, str]) -> Payload:
    return TextPayload(content=_required(f, "Content"))


def _image(f: dict[str, str]) -> Payload:
    return ImagePayload(pic_url=_required(f, "PicUrl"), media_id=_required(f, "MediaId"))


def _voice(f: dict[str, str]) -> Payload:
    # Self-built apps get no Recognition field: the audio must be transcribed by us.
    return VoicePayload(media_id=_required(f, "MediaId"), format=_required(f, "Format"))


def _video(f: dict[str, str]) -> Payload:
    return VideoPayload(
        media_id=_required(f, "MediaId"), thumb_media_id=_required(f, "ThumbMediaId")
    )


def _location(f: dict[str, str]) -> Payload:
    return LocationPayload(
        latitude=_number(f, "Location_X", float),
        longitude=_number(f, "Location_Y", float),
        scale=int(_number(f, "Scale", int)),
        label=f.get("Label", ""),
    )


def _link(f: dict[str, str]) -> Payload:
    return LinkPayload(
        title=_required(f, "Title"),
        description=f.get("Description", ""),
        url=_required(f, "Url"),
        pic_url=f.get("PicUrl", ""),
    )


def _event(f: dict[str, str]) -> Payload:
    event = _required(f, "Event")
    if not event:
        raise InvalidMessage("Event is empty")
    return WeComEventPayload(
        event=event, event_key=f.get("EventKey"), fields=_rest(f, ("Event", "EventKey"))
    )


_BUILDERS: dict[str, Callable[[dict[str, str]], Payload]] = {
    "text": _text,
    "image": _image,
    "voice": _voice,
    "video": _video,
    "location": _location,
    "link": _link,
    "event": _event,
}


# ---------------------------------------------------------------- dedupe key


def _discriminator(msg_type: str, payload: Payload, fields: dict[str, str]) -> str:
    """What tells apart two callbacks without MsgId from one user in one second: the
    event (or type), and a digest of every field of the message as WeCom wrote it. Two
    menu clicks, or two contact changes from ``sys``, differ by their fields; a WeCom
    retry does not. The digest is of WeCom's fields, not of our payload, so a field we
    add to a payload later does not change the key of a retry across an upgrade."""
    label = payload.event if isinstance(payload, WeComEventPayload) else msg_type
    canonical = _fields_encoder.encode(sorted(fields.items()))
    digest = hashlib.sha1(canonical, usedforsecurity=False)
    return f"{label}.{digest.hexdigest()[:16]}"


def _key_part(value: str) -> str:
    # Nats-Msg-Id is a header: keep it printable ASCII (no CR/LF, no ':' ambiguity).
    return value if _SAFE_KEY_PART.fullmatch(value) else quote(value, safe="")


def _key(
    app: str,
    msg_id: str | None,
    from_user: str,
    create_time: int,
    msg_type: str,
    payload: Payload,
    fields: dict[str, str],
) -> str:
    if msg_id:
        return f"{app}:{_key_part(msg_id)}"
    # only here: a digest costs what a message saves
    disc = _discriminator(msg_type, payload, fields)
    return f"{app}:{from_user}:{create_time}:{_key_part(disc)}"
