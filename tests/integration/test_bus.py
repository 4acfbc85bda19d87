"""The NATS adapters against a real nats-server."""

from __future__ import annotations

import pytest
from nats.js import JetStreamContext

from wecombot_common import topology
from wecombot_common.bus import (
    ConcurrencyConflict,
    append_event,
    ensure_topology,
    read_conversation,
)
from wecombot_common.events import ConversationReset, ReplyGenerated
from wecombot_common.settings import EnvReader, NatsSettings
from wecombot_common.topology import ConversationRef

pytestmark = pytest.mark.integration


def _settings() -> NatsSettings:
    return NatsSettings.read(EnvReader({}))


async def test_topology_is_idempotent_and_updates(js: JetStreamContext) -> None:
    await ensure_topology(js, _settings())
    await ensure_topology(js, _settings())
    info = await js.stream_info(topology.CONVERSATION_STREAM)
    assert info.config.duplicate_window == 900
    changed = NatsSettings.read(EnvReader({"WECOMBOT_DUPLICATE_WINDOW": "1200"}))
    await ensure_topology(js, changed)
    info = await js.stream_info(topology.CONVERSATION_STREAM)
    assert info.config.duplicate_window == 1200


async def test_append_dedupes_and_reads_back_in_order(js: JetStreamContext) -> None:
    await ensure_topology(js, _settings())
    conv = ConversationRef("ww1-1", "zhang.san@x")
    other = ConversationRef("ww1-1", "zhang")
    first = ReplyGenerated(app=conv.app, conversation=conv.user, correlation_id="m1", text="a")
    a1 = await append_event(js, first, msg_id="k1")
    again = await append_event(js, first, msg_id="k1")
    assert again.duplicate and again.seq == a1.seq
    await append_event(
        js, ReplyGenerated(app=other.app, conversation=other.user, correlation_id="m2", text="x")
    )
    second = ConversationReset(app=conv.app, conversation=conv.user, correlation_id="m3", text="r")
    await append_event(js, second)
    got = [s.event async for s in read_conversation(js, conv)]
    assert got == [first, second]
    later = [s.event async for s in read_conversation(js, conv, after_seq=a1.seq)]
    assert later == [second]


async def test_expected_last_sequence_is_scoped_to_a_branch(js: JetStreamContext) -> None:
    await ensure_topology(js, _settings())
    conv = ConversationRef("ww1-1", "li.si")

    def reply(text: str) -> ReplyGenerated:
        return ReplyGenerated(app=conv.app, conversation=conv.user, correlation_id="c", text=text)

    a = await append_event(js, reply("1"), expect_last_seq=0, expect_scope=conv.llm_branch)
    await append_event(js, reply("2"), expect_last_seq=a.seq, expect_scope=conv.llm_branch)
    with pytest.raises(ConcurrencyConflict):
        await append_event(js, reply("3"), expect_last_seq=a.seq, expect_scope=conv.llm_branch)
