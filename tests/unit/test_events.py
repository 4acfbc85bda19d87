"""Events: one envelope, one decoder, every type round-trips; garbage is refused."""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path
from types import ModuleType

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wecombot_common import events
from wecombot_common.events import (
    ConversationReset,
    DeliveryFailed,
    Event,
    EventDecodeError,
    ImagePayload,
    LinkPayload,
    LocationPayload,
    MessageReceived,
    NewerEventError,
    PartDelivered,
    ReplyDelivered,
    ReplyFailed,
    ReplyGenerated,
    TextPayload,
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


def _fields(event: Event, **changes: object) -> bytes:
    raw = msgspec.json.decode(encode_event(event))
    for key, value in changes.items():
        node = raw
        *path, last = key.split("__")
        for step in path:
            node = node[step]
        node[last] = value
    return msgspec.json.encode(raw)


PARTS = [e for e in EVENTS if isinstance(e, PartDelivered)]
MESSAGE = msgspec.structs.replace(EVENTS[0], msg_type="text", payload=TextPayload(content="hi"))


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (b'{"type":"ReplyRetracted","app":"a"}', "'ReplyRetracted' (version 1) is unknown"),
        (_fields(MESSAGE, version=2), "'MessageReceived' (version 2) is newer than this"),
        # a new payload kind goes with a version bump: what an older build cannot read
        (_fields(MESSAGE, version=2, payload__kind="file"), "(version 2) is newer"),
    ],
)
def test_an_event_of_a_newer_build_is_told_apart_from_poison(data: bytes, said: str) -> None:
    with pytest.raises(NewerEventError, match=re.escape(said)):
        decode_event(data)


@pytest.mark.parametrize(
    "data",
    [
        _fields(MESSAGE, payload__kind="file"),  # a kind we lack, at our version: poison
        _fields(MESSAGE, occurred_at="2026-01-01T00:00:00"),  # no zone
        _fields(MESSAGE, version="2"),
        b'{"type":1}',
        # They name its subject: one empty names none (topology.subject_for raised
        # ValueError for it, out of the worker's checks and every read of the log).
        _fields(MESSAGE, app=""),
        _fields(MESSAGE, conversation=""),
        # A part's place out of any reply: a negative index sent the reply's last parts
        # twice, a huge one built a list that long.
        _fields(PARTS[0], index=-3),
        _fields(PARTS[0], index=1 << 40),
        _fields(PARTS[1], start=-1),
    ],
)
def test_poison_is_not_taken_for_a_newer_event(data: bytes) -> None:
    with pytest.raises(EventDecodeError) as raised:
        decode_event(data)
    assert not isinstance(raised.value, NewerEventError)


def test_an_unknown_type_is_quoted_short() -> None:
    with pytest.raises(NewerEventError) as raised:
        decode_event(b'{"type":"' + b"X" * 1000 + b'"}')
    assert str(raised.value).count("X") == 60


def test_a_time_without_its_zone_is_refused_and_one_with_an_offset_kept() -> None:
    """A naive time decoded, and broke the sender's comparisons with aware ones (every
    reply to that user failed until the event aged out of its last 64 sends)."""
    with pytest.raises(EventDecodeError, match="occurred_at"):
        decode_event(_fields(MESSAGE, occurred_at="2026-01-01T00:00:00"))
    shanghai = decode_event(_fields(MESSAGE, occurred_at="2026-01-01T08:00:00+08:00"))
    assert shanghai.occurred_at.utcoffset() is not None


def test_unknown_fields_are_ignored_as_an_optional_addition_should_be() -> None:
    assert decode_event(_fields(MESSAGE, quoted_msg_id="m0", payload__mentions=[])) == MESSAGE


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


def _build_with_bumped(type_name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """This events module as a newer build has it once ``type_name`` is bumped to
    version 2 the way docs/architecture.md says: ``version: int = 2`` in its class."""
    source = Path(events.__file__).read_text(encoding="utf-8")
    head = f"class {type_name}(_Event, frozen=True, kw_only=True):\n"
    assert source.count(head) == 1
    newer = ModuleType("newer_events")
    newer.__dict__["__package__"] = "wecombot_common"  # its relative imports
    monkeypatch.setitem(sys.modules, newer.__name__, newer)  # msgspec reads its annotations
    bumped = source.replace(head, head + "    version: int = 2\n")
    exec(compile(bumped, "newer_events.py", "exec"), newer.__dict__)
    return newer


def test_a_bumped_type_is_newer_alone_and_its_older_events_still_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One version for every type: bumping one made each event a newer build wrote
    (its messages, its parts) unreadable to the older replicas beside it."""
    newer = _build_with_bumped("ReplyGenerated", monkeypatch)
    assert newer.VERSIONS["ReplyGenerated"] == 2
    assert {v for k, v in newer.VERSIONS.items() if k != "ReplyGenerated"} == {1}
    their_message = newer.encode_event(
        newer.MessageReceived(
            **msgspec.structs.asdict(MESSAGE) | {"payload": newer.TextPayload("hi")}
        )
    )
    their_reply = newer.encode_event(newer.ReplyGenerated(**ENV, text="你好"))
    assert decode_event(their_message) == MESSAGE  # every other type: as ours
    with pytest.raises(
        NewerEventError, match=r"'ReplyGenerated' \(version 2\) is newer than this build's 1"
    ):
        decode_event(their_reply)
    ours = ReplyGenerated(**ENV, text="你好")
    assert newer.decode_event(encode_event(ours)).text == "你好"  # the newer build reads ours


def test_the_build_that_bumped_a_type_reads_its_events_and_tells_their_poison(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A type's own version is the newest its build reads: held to the number every type
    starts at, the build that bumped one would refuse its own events of it as newer, and
    take a broken one of them for a newer build's instead of poison."""
    newer = _build_with_bumped("ReplyGenerated", monkeypatch)
    theirs = newer.encode_event(newer.ReplyGenerated(**ENV, text="你好"))
    assert newer.decode_event(theirs).text == "你好"
    broken = msgspec.json.encode(msgspec.json.decode(theirs) | {"text": 7})
    with pytest.raises(newer.EventDecodeError) as poison:
        newer.decode_event(broken)
    assert not isinstance(poison.value, newer.NewerEventError), poison.value
    later = msgspec.json.encode(msgspec.json.decode(theirs) | {"version": 3})
    with pytest.raises(
        newer.NewerEventError, match=r"'ReplyGenerated' \(version 3\) is newer than this build's 2"
    ):
        newer.decode_event(later)
