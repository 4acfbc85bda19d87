"""PipelinedAppender against a real nats-server: the gateway's append, many in flight."""

from __future__ import annotations

import asyncio

import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from tests.conftest import NatsHandle
from tests.waiting import until
from wecombot_common import topology
from wecombot_common.bus import (
    Appended,
    AppendUnavailable,
    PipelinedAppender,
    append_event,
    ensure_topology,
    read_conversation,
)
from wecombot_common.events import ReplyGenerated
from wecombot_common.settings import EnvReader, NatsSettings
from wecombot_common.topology import ConversationRef

pytestmark = pytest.mark.integration

APP = "ww1-1000002"


def reply(user: str, text: str) -> ReplyGenerated:
    return ReplyGenerated(app=APP, conversation=user, correlation_id=text, text=text)


async def test_many_appends_in_flight_each_get_their_own_pub_ack(
    nc: NATS, js: JetStreamContext
) -> None:
    await ensure_topology(js, NatsSettings.read(EnvReader({})))
    appender = await PipelinedAppender.start(nc)
    try:
        events = [reply(f"user{i % 7}", f"m{i}") for i in range(300)]
        results = await asyncio.gather(
            *(appender.append(e, msg_id=f"k{i}", timeout=5) for i, e in enumerate(events))
        )
        assert not any(r.duplicate for r in results)
        assert sorted(r.seq for r in results) == list(range(1, 301))
        # Each answer is the sequence its own event was stored at: every event read back
        # (all users together), by the sequence it was read at.
        read = {
            stored.seq: stored.event
            for user in sorted({e.conversation for e in events})
            async for stored in read_conversation(js, ConversationRef(APP, user))
        }
        assert len(read) == 300
        assert [read.get(r.seq) for r in results] == events
        # A repeated msg_id is JetStream's duplicate, at the first copy's sequence, exactly
        # what append_event answers.
        again = await appender.append(events[5], msg_id="k5", timeout=5)
        assert again == Appended(seq=results[5].seq, duplicate=True)
        assert again == await append_event(js, events[5], msg_id="k5")
        assert appender.in_flight == 0
    finally:
        await appender.close()


async def test_no_stream_is_a_clear_refusal_not_a_timeout(nc: NATS) -> None:
    appender = await PipelinedAppender.start(nc)  # no topology: nothing captures the subject
    try:
        with pytest.raises(AppendUnavailable, match="no stream answered"):
            await appender.append(reply("a", "x"), msg_id="k", timeout=30)
    finally:
        await appender.close()


async def test_a_refused_append_carries_jetstream_s_reason(nc: NATS, js: JetStreamContext) -> None:
    await js.add_stream(
        StreamConfig(name="TINY", subjects=[topology.CONVERSATION_SUBJECTS], max_msg_size=16)
    )
    appender = await PipelinedAppender.start(nc)
    try:
        with pytest.raises(AppendUnavailable, match=r"JetStream refused the append: .*size"):
            await appender.append(reply("a", "far more than sixteen bytes"), msg_id="k", timeout=5)
    finally:
        await appender.close()


async def test_no_pub_ack_in_time_is_unavailable_and_close_fails_what_waits(
    nats_server: NatsHandle, nc: NATS, js: JetStreamContext
) -> None:
    await ensure_topology(js, NatsSettings.read(EnvReader({})))
    appender = await PipelinedAppender.start(nc)
    nats_server.pause()  # connected, answering nothing
    try:
        with pytest.raises(AppendUnavailable, match=r"no PubAck within 0\.2s"):
            await appender.append(reply("a", "x"), msg_id="k1", timeout=0.2)
        assert appender.in_flight == 0
        waiting = asyncio.create_task(appender.append(reply("a", "y"), msg_id="k2", timeout=30))
        async with asyncio.timeout(5):  # published, its PubAck awaited
            while appender.in_flight == 0:
                assert not waiting.done(), waiting
                await asyncio.sleep(0)  # a condition polled under a deadline, not a delay
        await appender.close()
        with pytest.raises(AppendUnavailable, match="closed"):
            await waiting
    finally:
        nats_server.resume()
    fresh = await PipelinedAppender.start(nc)  # a new appender on the client works again
    try:
        assert (await fresh.append(reply("a", "z"), msg_id="k3", timeout=5)).seq >= 1
    finally:
        await fresh.close()


async def test_an_append_while_nats_is_away_is_refused_at_once_and_never_sent_later(
    nats_server: NatsHandle, nc: NATS, js: JetStreamContext
) -> None:
    """nats-py keeps what is published while it reconnects and sends it once back: the
    gateway had answered 503 (WeCom retries, another replica stores the retry), and the
    late copy was stored too, a second time once past the duplicate window."""
    await ensure_topology(js, NatsSettings.read(EnvReader({})))
    appender = await PipelinedAppender.start(nc)
    nats_server.stop()
    await until(lambda: not nc.is_connected, timeout=10, what="the client to see it gone")
    with pytest.raises(AppendUnavailable, match="NATS is away"):
        await appender.append(reply("a", "while away"), msg_id="away", timeout=30)
    assert appender.in_flight == 0
    nats_server.start()
    await until(lambda: nc.is_connected, timeout=20, what="the client back")
    after = await appender.append(reply("a", "after"), msg_id="after", timeout=5)
    await appender.close()
    assert after.seq == 1, "the refused append was sent at the reconnect"


async def test_a_server_that_stops_reading_is_refused_at_once_and_loses_nothing(
    nats_server: NatsHandle, nc: NATS, js: JetStreamContext
) -> None:
    # A hung server keeps the connection open and reads nothing: the socket fills, then
    # nats-py's outgoing buffer. An append that would take that buffer past the limit is
    # refused at once (the gateway answers 503, WeCom retries), not left waiting inside
    # nats-py's publish for the socket; the appends already published are not lost.
    await ensure_topology(js, NatsSettings.read(EnvReader({})))
    appender = await PipelinedAppender.start(nc, pending_limit=256 * 1024)
    text = "x" * 60_000
    published: list[asyncio.Task[Appended]] = []
    nats_server.pause()
    try:
        async with asyncio.timeout(30):
            while True:
                task = asyncio.create_task(
                    appender.append(reply("a", text), msg_id=f"k{len(published)}", timeout=120)
                )
                await asyncio.sleep(0)  # it runs to its PubAck wait, or is refused
                if task.done():
                    break
                published.append(task)
        with pytest.raises(AppendUnavailable, match="NATS is not taking writes"):
            task.result()
        assert nc.pending_data_size <= 256 * 1024
        assert appender.in_flight == len(published) > 0
    finally:
        nats_server.resume()
    async with asyncio.timeout(30):
        results = await asyncio.gather(*published)
    assert sorted(r.seq for r in results) == list(range(1, len(published) + 1))
    again = await appender.append(reply("a", "after"), msg_id="after", timeout=5)
    assert again.seq == len(published) + 1
    await appender.close()
