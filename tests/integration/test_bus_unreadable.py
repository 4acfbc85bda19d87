"""A message on a conversation branch that is not an event (corrupt, or written by a
newer version) must not wedge the conditional appends to that branch for good."""

from __future__ import annotations

import pytest
from nats.js import JetStreamContext

from wecombot_common.bus import (
    ConcurrencyConflict,
    append_event,
    ensure_topology,
    read_conversation,
)
from wecombot_common.events import ReplyGenerated
from wecombot_common.settings import EnvReader, NatsSettings
from wecombot_common.topology import ConversationRef

pytestmark = pytest.mark.integration

CONV = ConversationRef("ww1-1000002", "zhang.san")


def reply(text: str) -> ReplyGenerated:
    return ReplyGenerated(app=CONV.app, conversation=CONV.user, correlation_id=text, text=text)


async def test_an_append_goes_after_messages_that_are_not_events(js: JetStreamContext) -> None:
    await ensure_topology(js, NatsSettings.read(EnvReader({})))
    first = await append_event(js, reply("one"), expect_last_seq=0, expect_scope=CONV.llm_branch)
    await js.publish(f"{CONV.root}.llm.reply", b"\x00 not an event")
    await js.publish(f"{CONV.root}.llm.v2", b'{"type": "FromTheFuture"}')
    # The fold saw only "one": its expected sequence is first.seq.
    second = await append_event(
        js, reply("two"), expect_last_seq=first.seq, expect_scope=CONV.llm_branch
    )
    assert second.seq == first.seq + 3
    texts = [s.event.text async for s in read_conversation(js, CONV, branch=CONV.llm_branch)]  # type: ignore[union-attr]
    assert texts == ["one", "two"]


async def test_a_real_event_after_the_expected_sequence_is_still_a_conflict(
    js: JetStreamContext,
) -> None:
    await ensure_topology(js, NatsSettings.read(EnvReader({})))
    first = await append_event(js, reply("one"), expect_last_seq=0, expect_scope=CONV.llm_branch)
    await js.publish(f"{CONV.root}.llm.reply", b"\x00 not an event")
    await append_event(js, reply("other writer"))
    with pytest.raises(ConcurrencyConflict):
        await append_event(
            js, reply("two"), expect_last_seq=first.seq, expect_scope=CONV.llm_branch
        )
    with pytest.raises(ConcurrencyConflict):  # a stale expectation ahead of the log
        await append_event(js, reply("three"), expect_last_seq=99, expect_scope=CONV.llm_branch)


async def test_an_event_naming_no_app_is_skipped_not_raised(js: JetStreamContext) -> None:
    """Its subject cannot be worked out (an empty subject token): every read of the
    conversation raised ValueError, so every later message of that user failed."""
    await ensure_topology(js, NatsSettings.read(EnvReader({})))
    first = await append_event(js, reply("one"), expect_last_seq=0, expect_scope=CONV.llm_branch)
    await js.publish(
        f"{CONV.root}.llm.reply",
        b'{"type":"ReplyGenerated","app":"","conversation":"zhang.san",'
        b'"correlation_id":"c","text":"no app"}',
    )
    second = await append_event(
        js, reply("two"), expect_last_seq=first.seq, expect_scope=CONV.llm_branch
    )
    texts = [s.event.text async for s in read_conversation(js, CONV)]  # type: ignore[union-attr]
    assert texts == ["one", "two"]
    assert second.seq == first.seq + 2
