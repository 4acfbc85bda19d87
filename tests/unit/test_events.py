"""Events: one envelope, one decoder, every type round-trips; garbage is refused."""

from __future__ import annotations

import uuid

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wecombot_common.events import (
    ConversationReset,
    DeliveryFailed,
    Event,
    EventDecodeError,
    ImagePayload,
    LinkPayload,
    LocationPayload,
    MessageReceived,
    PartDelivered,
    ReplyDelivered,
    ReplyFailed,
    ReplyGenerated,
    UnknownPayload,
    VideoPayload,
    VoicePayload,
    WeComEventPayload,
    decode_event,
    derived_id,
    encode_event,
)

ENV = {"app": "ww1-1000002", "conversation": "li.si@x", "correlation_id": "4561255354251345929"}
PAYLOADS = [
    ImagePayload(pic_url="http://p", media_id="m"),
    VoicePayload(media_id="m", format="amr"),
    VideoPayload(media_id="m", thumb_media_id="t"),
    LocationPayload(latitude=23.1, longitude=113.3, scale=15, label="广州"),
    LinkPayload(title="t", description="d", url="http://u", pic_url="http://p"),
    WeComEventPayload(event="enter_agent", fields={"EventKey": ""}),
    UnknownPayload(msg_type="miniprogram", fields={"Title": "x"}),
]
EVENTS: list[Event] = [
    *(
        MessageReceived(
            **ENV,
            msg_type="x",
            msg_id="1",
            from_user="li.si@x",
            to_user="ww1",
            agent_id=1000002,
            create_time=1409659813,
            payload=p,
        )
        for p in PAYLOADS
    ),
    ReplyGenerated(**ENV, causation_id="c", text="你好", model="m", prompt_tokens=3),
    ReplyFailed(**ENV, causation_id="c", reason="429", attempts=3, text="抱歉"),
    ConversationReset(**ENV, causation_id="c", text="ok"),
    PartDelivered(**ENV, causation_id="c", reply_id="r", index=0, total=2, wecom_msgid="m1"),
    PartDelivered(
        **ENV, causation_id="c", reply_id="r", index=1, total=2, wecom_msgid="m2", start=9, end=20
    ),
    ReplyDelivered(**ENV, causation_id="c", reply_id="r", parts=2, wecom_msgids=["m1", "m2"]),
    DeliveryFailed(
        **ENV, causation_id="c", reply_id="r", errcode=81013, reason="x", parts_delivered=0
    ),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: type(e).__name__)
def test_round_trip(event: Event) -> None:
    data = encode_event(event)
    assert decode_event(data) == event
    assert f'"type":"{type(event).__name__}"'.encode() in data


@pytest.mark.parametrize(
    "data",
    [b"", b"{}", b"not json", b'{"type":"Nope","event_id":"x"}', b'{"type":"ReplyGenerated"}'],
)
def test_garbage_is_a_typed_error(data: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_event(data)


def test_json_nested_too_deep_is_a_typed_error() -> None:
    """A known type with an unknown field nested 1,000 deep (2 KB) raised RecursionError,
    which every fold and the worker let through: the conversation could not be read."""
    deep = b'{"type":"ReplyGenerated","x":' + b"[" * 1000 + b"]" * 1000 + b"}"
    with pytest.raises(EventDecodeError, match="nested too deeply"):
        decode_event(deep)


def test_events_are_frozen() -> None:
    event = ReplyGenerated(**ENV, text="x")
    with pytest.raises(AttributeError):
        event.text = "y"  # type: ignore[misc]


def test_derived_ids_are_deterministic_and_distinct() -> None:
    assert derived_id("a", "outcome") == derived_id("a", "outcome")
    assert derived_id("a", "outcome") != derived_id("b", "outcome")


@given(st.lists(st.text(), min_size=1, max_size=4))
def test_derived_ids_are_uuid5_of_the_joined_parts(parts: list[str]) -> None:
    # Ids already in event logs were made by uuid.uuid5: the fast path must not change one.
    namespace = uuid.UUID("6f0b9d4e-5c1a-4a7e-9a55-2f4f7f6f2b10")
    assert derived_id(*parts) == str(uuid.uuid5(namespace, "/".join(parts)))


def test_an_older_senders_part_has_no_span_and_a_newer_ones_reads_in_an_older_build() -> None:
    """Rolling upgrades mix both in one log: the span is optional both ways."""
    new = PartDelivered(
        **ENV, causation_id="c", reply_id="r", index=1, total=2, wecom_msgid="m2", start=9, end=20
    )
    raw = msgspec.json.decode(encode_event(new))
    older = {k: v for k, v in raw.items() if k not in ("start", "end")}
    decoded = decode_event(msgspec.json.encode(older))
    assert isinstance(decoded, PartDelivered) and (decoded.start, decoded.end) == (None, None)

    class OlderPartDelivered(msgspec.Struct, tag="PartDelivered", tag_field="type"):
        reply_id: str
        index: int
        total: int
        wecom_msgid: str

    assert msgspec.json.decode(encode_event(new), type=OlderPartDelivered).index == 1
