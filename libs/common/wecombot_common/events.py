"""The events: the only contract between wecombot services.

Every event is a frozen msgspec struct sharing one envelope and tagged by ``type`` (the
class name), encoded as JSON on the wire. One decoder reads them all::

    >>> e = ConversationReset(app="ww1-1000002", conversation="zhang.san",
    ...     correlation_id="4561255354251345929", causation_id="…", text="记忆已清除")
    >>> decode_event(encode_event(e)) == e
    True

Envelope
    ``event_id``      unique id of this event (uuid; deterministic where a retry must
                      produce the same event, see :func:`derived_id`)
    ``type``          the event's class name (the tag)
    ``version``       schema version of that type, its own (``VERSIONS``): bumped, for that
                      type alone, when older builds could not read it right (a new payload
                      kind, a field whose meaning changes), by declaring ``version: int =
                      2`` in its class; an added optional field needs none (older builds
                      ignore it)
    ``occurred_at``   UTC time the fact happened
    ``app``           the WeCom app, ``{corp_id}-{agent_id}`` (see settings.app_key)
    ``conversation``  the aggregate key: the WeCom UserID the conversation is with
    ``causation_id``  the event_id of the event that caused this one (None for inputs)
    ``correlation_id``the WeCom MsgId (or the dedupe key of a WeCom event) that started
                      the chain; it travels through every event it causes

The family
    ``MessageReceived``   gateway: a callback message stored (every MsgType; unknown kept)
    ``ReplyGenerated``    llm: text to deliver (an answer, or a notice such as /help)
    ``ReplyFailed``       llm: the model could not answer; carries the apology to deliver
    ``ConversationReset`` llm: /reset; earlier turns no longer count; carries the confirmation
    ``PartDelivered``     sender: one part of a reply accepted by WeCom (its msgid)
    ``ReplyDelivered``    sender: every part of a reply delivered
    ``DeliveryFailed``    sender: WeCom refused the reply for good (code and reason)

The three llm events are "outcomes": exactly one per received message that needs an
answer, each with a ``text`` the sender delivers.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal, get_args

import msgspec

from .errors import PermanentError

__all__ = [
    "VERSION",
    "VERSIONS",
    "ConversationReset",
    "DeliveryFailed",
    "Event",
    "EventDecodeError",
    "ImagePayload",
    "LinkPayload",
    "LocationPayload",
    "MessageReceived",
    "NewerEventError",
    "Outcome",
    "PartDelivered",
    "Payload",
    "ReplyDelivered",
    "ReplyFailed",
    "ReplyGenerated",
    "ReplyRequeued",
    "TextPayload",
    "UnknownPayload",
    "VideoPayload",
    "VoicePayload",
    "WeComEventPayload",
    "decode_event",
    "derived_id",
    "encode_event",
    "failure_of_round",
    "new_id",
    "utcnow",
]

_NAMESPACE = uuid.UUID("6f0b9d4e-5c1a-4a7e-9a55-2f4f7f6f2b10")
_NAMESPACE_BYTES = _NAMESPACE.bytes


def new_id() -> str:
    """A fresh random event id."""
    return str(uuid.uuid4())


def derived_id(*parts: str) -> str:
    """A deterministic event id, so a retried append produces the identical event.

    >>> derived_id("abc", "outcome") == derived_id("abc", "outcome")
    True
    """
    # uuid.uuid5 byte for byte (RFC 4122 §4.3: SHA-1, version 5, RFC variant), at a
    # third of its cost: it runs on every callback. tests/unit/test_events.py compares.
    name = _NAMESPACE_BYTES + "/".join(parts).encode()
    digest = bytearray(hashlib.sha1(name, usedforsecurity=False).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def failure_of_round(reply_id: str, requeued_by: str) -> str:
    """The event_id of the DeliveryFailed that ends a reply's delivery round: its first
    (``requeued_by`` empty) or the one a ReplyRequeued (that event_id) started. A failure
    with another id is an earlier round's, recorded late: the sender goes on with the
    round under way, and ``wecombot dlq`` lists it as such."""
    return derived_id(reply_id, "failed", *((requeued_by,) if requeued_by else ()))


def utcnow() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------- message payloads
# One per WeCom MsgType (https://developer.work.weixin.qq.com/document/path/90239),
# tagged by ``kind``. Unknown types are kept whole in UnknownPayload, never dropped.


class _Payload(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    pass


class TextPayload(_Payload, frozen=True, tag="text"):
    content: str


class ImagePayload(_Payload, frozen=True, tag="image"):
    pic_url: str
    media_id: str


class VoicePayload(_Payload, frozen=True, tag="voice"):
    media_id: str
    format: str


class VideoPayload(_Payload, frozen=True, tag="video"):
    media_id: str
    thumb_media_id: str


class LocationPayload(_Payload, frozen=True, tag="location"):
    latitude: float
    longitude: float
    scale: int
    label: str


class LinkPayload(_Payload, frozen=True, tag="link"):
    title: str
    description: str
    url: str
    pic_url: str


class WeComEventPayload(_Payload, frozen=True, tag="event"):
    event: str
    event_key: str | None = None
    fields: dict[str, str] = {}


class UnknownPayload(_Payload, frozen=True, tag="unknown"):
    msg_type: str
    fields: dict[str, str] = {}


Payload = (
    TextPayload
    | ImagePayload
    | VoicePayload
    | VideoPayload
    | LocationPayload
    | LinkPayload
    | WeComEventPayload
    | UnknownPayload
)


# ---------------------------------------------------------------- the envelope


# The version every type starts at. A type older builds could not read right is bumped
# alone, in its class (``version: int = 2``; every field of an event is keyword-only, so
# that one line goes anywhere in the class): VERSIONS has each type's, the newest this
# build reads and writes. An event of a higher version than its type's, or of a type
# this build does not have, comes from a newer build during a rolling upgrade:
# NewerEventError, handed back for a newer replica, never taken as poison (see
# worker.PullWorker). One number for every type made each bump a new version of all:
# every event a newer build wrote, whatever its type, was handed back by the older
# replicas (parked once their deliveries ran out) and skipped by their folds.
VERSION = 1


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    event_id: str = msgspec.field(default_factory=new_id)
    version: int = VERSION
    # A time without its zone is refused when decoded (aware and naive times cannot be
    # compared: one such event would break every fold that orders by time).
    occurred_at: Annotated[datetime, msgspec.Meta(tz=True)] = msgspec.field(default_factory=utcnow)
    # Both name the event's subject (topology.subject_for): an empty one names none, and
    # a body carrying one (by hand, a faulty build) is refused here like any poison.
    app: Annotated[str, msgspec.Meta(min_length=1)]
    conversation: Annotated[str, msgspec.Meta(min_length=1)]
    causation_id: str | None = None
    correlation_id: str


class MessageReceived(_Event, frozen=True, kw_only=True):
    msg_type: str
    msg_id: str | None
    from_user: str
    to_user: str
    agent_id: int | None
    create_time: int
    payload: Payload


class ReplyGenerated(_Event, frozen=True, kw_only=True):
    text: str
    kind: Literal["answer", "notice"] = "answer"
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class ReplyFailed(_Event, frozen=True, kw_only=True):
    reason: str
    attempts: int
    text: str


class ConversationReset(_Event, frozen=True, kw_only=True):
    text: str


# A count of parts, or a place in a reply's text: a reply is far under a million code
# points (an event is at most NATS's max_payload). A record out of these bounds (by hand,
# a faulty build) is refused when decoded, as poison: a negative index sent the last
# parts twice, a huge one built a list that size.
_Count = Annotated[int, msgspec.Meta(ge=0, le=1 << 20)]


class PartDelivered(_Event, frozen=True, kw_only=True):
    reply_id: str
    index: _Count
    total: _Count
    wecom_msgid: str
    # Where the part lies in the reply's text, in code points: a delivery resumed by
    # another build continues at ``end`` whatever its split (None: an older sender's
    # record, resumed by index).
    start: _Count | None = None
    end: _Count | None = None


class ReplyDelivered(_Event, frozen=True, kw_only=True):
    reply_id: str
    parts: _Count
    wecom_msgids: list[str]


class DeliveryFailed(_Event, frozen=True, kw_only=True):
    reply_id: str
    errcode: int
    reason: str
    parts_delivered: _Count


class ReplyRequeued(_Event, frozen=True, kw_only=True):
    """An operator asked for a reply whose delivery failed to be delivered again
    (``wecombot dlq replay``): the sender resumes it after its last recorded part."""

    reply_id: str
    reason: str


Outcome = ReplyGenerated | ReplyFailed | ConversationReset
Event = (
    MessageReceived
    | ReplyGenerated
    | ReplyFailed
    | ConversationReset
    | ReplyRequeued
    | PartDelivered
    | ReplyDelivered
    | DeliveryFailed
)

_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[Event] = msgspec.json.Decoder(Event)


def _version_of(kind: type[_Event]) -> int:
    [field] = [f for f in msgspec.structs.fields(kind) if f.name == "version"]
    assert isinstance(field.default, int)
    return field.default


VERSIONS: dict[str, int] = {t.__name__: _version_of(t) for t in get_args(Event)}
_TYPES = frozenset(VERSIONS)


class EventDecodeError(PermanentError):
    """Bytes that are not a known event: the message is poison and never valid."""


class NewerEventError(EventDecodeError):
    """An event of a type or version this build does not know: written by a newer build
    (a rolling upgrade under way), which can read it. Not to be parked at once.

    >>> decode_event(b'{"type": "ReplyRetracted", "version": 1, "app": "a"}')
    Traceback (most recent call last):
    ...
    wecombot_common.events.NewerEventError: event type 'ReplyRetracted' (version 1) is \
unknown to this build: written by a newer one?
    """


class _Peek(msgspec.Struct):
    type: str
    version: int = 1


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(data: bytes) -> Event:
    """Decode any event; raises :class:`EventDecodeError` with the reason, or
    :class:`NewerEventError` for an event of a newer build."""
    try:
        event = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise _undecodable(data, exc) from exc
    except RecursionError:  # JSON nested deeper than msgspec follows: never an event
        raise EventDecodeError("undecodable event: nested too deeply") from None
    if event.version > VERSIONS[type(event).__name__]:
        raise _newer(type(event).__name__, event.version)
    return event


def _undecodable(data: bytes, exc: msgspec.DecodeError) -> EventDecodeError:
    """A newer build's event (its type or version unknown here), or poison."""
    try:
        peek = msgspec.json.decode(data, type=_Peek)
    except (msgspec.DecodeError, RecursionError):
        return EventDecodeError(f"undecodable event: {exc}")
    if peek.type not in _TYPES or peek.version > VERSIONS[peek.type]:
        return _newer(peek.type, peek.version)
    return EventDecodeError(f"undecodable event: {exc}")


def _newer(name: str, version: int) -> NewerEventError:
    known = (
        "unknown to this build"
        if name not in _TYPES
        else f"newer than this build's {VERSIONS[name]}"
    )
    return NewerEventError(
        f"event type {name[:60]!r} (version {version}) is {known}: written by a newer one?"
    )
