"""Direct reads of a replicated stream may be answered by a follower that lags its leader
(``allow_direct``; "a lookup after an update" may "not include the message that was just
added", nats.js's DirectStreamAPI docs). A real nats-server has one copy, so the follower
is played in front of it: its direct gets see the log only through a given sequence,
everything else (the leader's reads, appends, the consumer's floor) is the real server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.integration.sender.harness import (
    APP,
    Envelope,
    StaticTokens,
    System,
    delivery_of,
    message_api,
    sim_token,
)
from tests.lagging import LaggingFollower
from wecombot_common import topology
from wecombot_common.bus import Appended, append_event
from wecombot_common.events import (
    DeliveryFailed,
    Event,
    ReplyDelivered,
    ReplyGenerated,
    ReplyRequeued,
    derived_id,
)
from wecombot_common.topology import ConversationRef
from wecombot_common.worker import Ack, Nak
from wecombot_sender.handler import DeliveryPolicy, ReplySender
from wecombot_sender.split import split_text

pytestmark = pytest.mark.integration


async def _append(system: System, event: Event, msg_id: str, **expect: Any) -> int:
    appended: Appended = await append_event(system.js, event, msg_id=msg_id, **expect)
    return appended.seq


async def _handle(
    system: System, follower: LaggingFollower, event: Event, seq: int, *, num_delivered: int = 1
) -> object:
    token = await sim_token(system.sim)
    api = message_api(system.sim, timeout_s=2)
    sender = ReplySender(
        follower,  # type: ignore[arg-type]  # a JetStreamContext in all it is asked
        StaticTokens(token),
        api,
        app=APP,
        policy=DeliveryPolicy(order_wait_s=0.3),
    )
    delivery = delivery_of(event, seq, num_delivered=num_delivered)  # type: ignore[arg-type]
    try:
        return await sender.handle(delivery)
    finally:
        await api.aclose()


async def _two_alike(system: System, user: str) -> list[tuple[ReplyGenerated, int]]:
    """Two replies of the same text to ``user``, appended: each with its sequence."""
    replies = []
    for m in ("m1", "m2"):
        reply = ReplyGenerated(
            **Envelope(app=APP, conversation=user, correlation_id=m), text="好的"
        )
        replies.append((reply, await _append(system, reply, f"outcome:{reply.event_id}")))
    return replies


async def test_a_reply_does_not_overtake_an_earlier_one_a_lagging_follower_missed(
    system: System,
) -> None:
    """The earlier reply (another replica is delivering it) is in the log, not yet on the
    follower that answers the catch-up: the later one must still wait for it."""
    user = "lagging.order"
    base = Envelope(app=APP, conversation=user, correlation_id="m")
    earlier = ReplyGenerated(**base, text="先说这句")
    later = ReplyGenerated(**base, text="再说这句")
    await _append(system, earlier, f"outcome:{earlier.event_id}")
    later_seq = await _append(system, later, f"outcome:{later.event_id}")
    follower = LaggingFollower(system.js, applied=0)
    with capture_logs() as logs:
        settled = await _handle(system, follower, later, later_seq)
    assert isinstance(settled, Nak), settled
    assert "earlier reply" in settled.reason
    assert system.sim.messages_to(user) == []
    assert follower.leader_reads > 0
    lagged = [e for e in logs if e["event"] == "conversation.read_lagged"]
    assert lagged and lagged[0]["reach"] == later_seq and lagged[0]["read_to"] == 0


async def test_a_requeue_a_lagging_follower_cannot_see_yet_is_delivered_not_parked(
    system: System,
) -> None:
    """``wecombot dlq replay`` appended a ReplyRequeued for a failed reply; the follower
    answering the sender's reads has neither the requeue nor the reply yet."""
    user = "lagging.requeue"
    base = Envelope(app=APP, conversation=user, correlation_id="m")
    reply = ReplyGenerated(**base, text="重新投递的回复")
    await _append(system, reply, f"outcome:{reply.event_id}")
    failed = DeliveryFailed(
        **base,
        event_id=derived_id(reply.event_id, "failed"),
        causation_id=reply.event_id,
        reply_id=reply.event_id,
        errcode=-1,
        reason="busy",
        parts_delivered=0,
    )
    conv = ConversationRef(APP, user)
    await _append(
        system,
        failed,
        f"failed:{reply.event_id}",
        expect_last_seq=0,
        expect_scope=conv.sender_branch,
    )
    requeue = ReplyRequeued(
        **base, causation_id=failed.event_id, reply_id=reply.event_id, reason="replay"
    )
    requeue_seq = await _append(system, requeue, f"requeue:{failed.event_id}")
    follower = LaggingFollower(system.js, applied=0)
    settled = await _handle(system, follower, requeue, requeue_seq)
    assert isinstance(settled, Ack), settled
    assert system.sim.messages_to(user) == [reply.text]
    await system.log.until(lambda: bool(system.log.of(ReplyDelivered, reply.event_id)))


async def test_the_duplicate_checks_window_is_read_from_the_leader(system: System) -> None:
    """The first delivery of an earlier reply died before its send; a later one of the
    same text overtook it (on its last try) and another replica delivered it. The
    follower answering the redelivery's reads has both replies, not that record: asked
    with the duplicate check, WeCom would drop the earlier reply as a repeat of it."""
    user = "lagging.window"
    (earlier, earlier_seq), (later, later_seq) = await _two_alike(system, user)
    token = await sim_token(system.sim)
    api = message_api(system.sim, timeout_s=2)
    try:
        msgid = await api.send_text(token, user, later.text)  # the other replica's send
    finally:
        await api.aclose()
    await system.record_first_part(later, 1, msgid, span=(0, len(later.text)))
    follower = LaggingFollower(system.js, applied=later_seq)
    settled = await _handle(system, follower, earlier, earlier_seq, num_delivered=2)
    assert isinstance(settled, Ack), settled
    assert system.sim.messages_to(user) == ["好的", "好的"]
    assert system.sim.duplicates == []


async def test_a_retry_does_not_drop_a_reply_for_one_a_lagging_follower_shows_unfinished(
    system: System,
) -> None:
    """Another replica delivered an earlier reply of the same text and acked it: the
    consumer's ack floor says it is settled, but the follower answering this first
    delivery's reads has neither its parts nor its end. This reply's first send meets a
    502 (it may have gone through), so its retry asks the duplicate check: the window
    as that follower shows it holds no message of that text, but the earlier reply,
    unfinished there, has it: the check is skipped (asked, WeCom dropped this reply as
    a repeat of the earlier one: lost)."""
    user = "lagging.fresh"
    (earlier, earlier_seq), (later, later_seq) = await _two_alike(system, user)
    token = await sim_token(system.sim)
    api = message_api(system.sim, timeout_s=2)
    try:
        other = ReplySender(system.js, StaticTokens(token), api, app=APP, policy=DeliveryPolicy())
        assert await other.handle(delivery_of(earlier, earlier_seq)) == Ack()
    finally:
        await api.aclose()
    # ... and the other replica's worker acked it: the consumer's floor passes it.
    config = topology.work_consumer(
        topology.SENDER_CONSUMER, topology.OUTCOME_FILTER, ack_wait_s=30, max_ack_pending=10
    )
    await system.js.add_consumer(topology.CONVERSATION_STREAM, config)
    pulled = await system.js.pull_subscribe_bind(
        durable=topology.SENDER_CONSUMER, stream=topology.CONVERSATION_STREAM
    )
    [msg] = await pulled.fetch(1, timeout=5)
    assert msg.metadata.sequence.stream == earlier_seq
    await msg.ack_sync()
    await pulled.unsubscribe()

    follower = LaggingFollower(system.js, applied=later_seq)
    system.sim.fail_sends_http(502, times=1)
    settled = await _handle(system, follower, later, later_seq)
    assert isinstance(settled, Ack), settled
    assert system.sim.messages_to(user) == ["好的", "好的"]
    assert system.sim.duplicates == []


async def test_a_repeat_of_a_delivered_reply_is_acked_while_the_stream_has_no_leader(
    system: System,
) -> None:
    """A node was lost and the stream elects a leader (seconds): leader reads time out,
    followers answer. A redelivery of a reply another delivery finished reads its window
    from the leader; it must still be acknowledged from what the followers show, not
    crash the handler and, on its last try, be dead-lettered though delivered."""
    user = "lagging.leaderless"
    reply = await system.reply(user, "已经送达的回复")
    token = await sim_token(system.sim)
    api = message_api(system.sim, timeout_s=2)
    try:
        first = ReplySender(system.js, StaticTokens(token), api, app=APP, policy=DeliveryPolicy())
        assert await first.handle(delivery_of(reply, 1)) == Ack()
    finally:
        await api.aclose()
    seq = (await system.js.stream_info(topology.CONVERSATION_STREAM)).state.last_seq
    follower = LaggingFollower(system.js, applied=seq, leaderless=True)
    with capture_logs() as logs:
        settled = await _handle(system, follower, reply, 1, num_delivered=2)
    assert isinstance(settled, Ack), settled
    assert follower.leader_reads > 0
    assert "sender.leader_unavailable" in [e["event"] for e in logs]
    assert system.sim.messages_to(user) == [reply.text]


async def test_a_conflict_reads_the_log_from_the_leader(system: System) -> None:
    """While WeCom's answer to our send of part 0 is slow, another replica (our hold
    lapsed) delivers the whole reply. The follower answering our catch-up has the reply,
    not those records. Our append of part 0 is refused (the send branch moved): the
    catch-up after it must not ask the same follower again, round after round, until
    the delivery gives up."""
    user = "lagging.conflict"
    text = "\n\n".join(c * 1500 for c in "ab")
    parts = split_text(text)
    assert len(parts) == 2
    reply = await system.reply(user, text)
    follower = LaggingFollower(system.js, applied=1)  # the reply, not its records
    hold = system.sim.hold_sends(lambda _user, content: content == parts[0], after_accept=True)
    with capture_logs() as logs:
        ours = asyncio.create_task(_handle(system, follower, reply, 1))
        await hold.wait_held()
        assert await _handle(system, follower, reply, 1, num_delivered=2) == Ack()
        hold.release()
        settled = await ours
    events = [e["event"] for e in logs]
    # the records are real events: the append must not be put after them unseen
    assert "event.appending_after_unreadable" not in events, events
    assert "sender.append_conflict" in events
    assert isinstance(settled, Ack), settled
    assert system.sim.messages_to(user) == parts  # the other's part 0 was a repeat
    assert len(system.log.of(ReplyDelivered, reply.event_id)) == 1
