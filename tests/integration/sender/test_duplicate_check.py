"""WeCom's duplicate check closes the sender's crash window: a part WeCom accepted whose
PartDelivered was never appended is not delivered twice when the reply is redelivered.

The simulated WeCom implements the check (path/90236) as the docs describe it, with the
answer to a dropped duplicate assumed (errcode 0, no msgid; see sim/wecom_api.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

import pytest
from structlog.testing import capture_logs

from tests.integration.sender.harness import (
    APP,
    LONG,
    Envelope,
    StaticTokens,
    System,
    delivery_of,
    message_api,
    sim_token,
)
from tests.waiting import until
from wecombot_common import topology
from wecombot_common.bus import SettledFloor, append_event
from wecombot_common.events import (
    DeliveryFailed,
    PartDelivered,
    ReplyDelivered,
    ReplyFailed,
    ReplyGenerated,
    decode_event,
    derived_id,
    utcnow,
)
from wecombot_common.sim.wecom_api import SimulatedWeComApi
from wecombot_common.topology import ConversationRef
from wecombot_common.worker import Ack
from wecombot_sender.handler import DeliveryPolicy, ReplySender
from wecombot_sender.split import split_text
from wecombot_sender.wecom import HttpMessageApi

pytestmark = pytest.mark.integration


async def test_the_adapter_asks_for_the_check_and_a_repeat_is_dropped(
    sim: SimulatedWeComApi,
) -> None:
    api = message_api(sim, timeout_s=2)
    token = await sim_token(sim)
    try:
        first = await api.send_text(token, "u", "同一句话")
        assert await api.send_text(token, "u", "同一句话", duplicate_check_s=60) == ""
        assert await api.send_text(token, "u", "同一句话") != ""  # no check asked: delivered
        assert await api.send_text(token, "v", "同一句话", duplicate_check_s=60) != ""
        assert await api.send_text(token, "u", "另一句话", duplicate_check_s=60) != ""
    finally:
        await api.aclose()
    assert [m.content for m in sim.sent] == ["同一句话", "同一句话", "同一句话", "另一句话"]
    assert first == sim.sent[0].msgid
    [dropped] = sim.duplicates
    assert (dropped.touser, dropped.content, dropped.msgid) == ("u", "同一句话", "")


async def test_a_part_accepted_but_not_recorded_is_not_sent_again(system: System) -> None:
    parts = split_text(LONG)
    assert len(parts) >= 3
    user = "crash.window"
    reply = await system.reply(user, LONG)
    # A sender recorded part 0, had part 1 accepted by WeCom, and died before recording it.
    await system.record_first_part(reply, len(parts), "msgid-0")
    api = message_api(system.sim, timeout_s=2)
    try:
        await api.send_text(await sim_token(system.sim), user, parts[1])
    finally:
        await api.aclose()
    await system.deliver_once_and_drop(1)

    await system.start_token()
    system.start_sender()
    await system.log.until_finished(reply.event_id)

    assert system.sim.messages_to(user) == parts[1:]  # part 0 went out "before the crash"
    assert [m.content for m in system.sim.duplicates] == [parts[1]]
    [done] = system.log.of(ReplyDelivered, reply.event_id)
    assert done.wecom_msgids[0] == "msgid-0"
    assert done.wecom_msgids[1] == ""  # WeCom dropped the repeat: no new msgid
    assert all(done.wecom_msgids[2:])


async def test_identical_replies_are_all_delivered(system: System) -> None:
    await system.start_token()
    system.start_sender()
    first = await system.reply("polite", "好的")
    await system.log.until_finished(first.event_id)
    second = await system.reply("polite", "好的")  # a fresh send: no check asked
    await system.log.until_finished(second.event_id)
    # The next send may have gone through before the 502, so its retries would ask for
    # the check; but the user's last message is this very text, and the check could not
    # tell a repeat of it from our own unrecorded send: skipped rather than risk losing
    # it. Decided once for the part (it reads the earlier reply), not once per retry.
    system.sim.fail_sends_http(502, times=3)
    with capture_logs() as logs:
        third = await system.reply("polite", "好的")
        await system.log.until_finished(third.event_id)
    assert system.sim.messages_to("polite") == ["好的", "好的", "好的"]
    assert system.sim.duplicates == []
    assert [e["retry"] for e in logs if e["event"] == "sender.send_retry"] == [1, 2, 3]
    assert [e["event"] for e in logs].count("sender.duplicate_check_skipped") == 1


async def test_a_retry_after_a_lost_answer_is_dropped_as_a_duplicate(system: System) -> None:
    await system.start_token()
    system.start_sender(SENDER_HTTP_TIMEOUT="0.5")
    warm = await system.reply("slow.wecom", "warm-up")
    await system.log.until_finished(warm.event_id)
    hold = system.sim.hold_sends(after_accept=True)  # accepted, but the answer never comes
    reply = await system.reply("slow.wecom", "answer")
    await hold.wait_held()
    await system.log.until_finished(reply.event_id)
    hold.release()
    assert system.sim.messages_to("slow.wecom") == ["warm-up", "answer"]
    assert [m.content for m in system.sim.duplicates] == ["answer"]


async def test_a_retry_wecom_handles_late_is_dropped_as_a_duplicate(
    system: System,
) -> None:
    """A retry (it asks the check) that WeCom handles after our timeout, after the next
    retry got through and a later reply went out: its window was measured from when
    it was sent, WeCom measures it back from when it handles it, so it no longer
    reached the copy it repeats: the user's second copy, after the later reply."""
    await system.start_token()
    system.start_sender(SENDER_HTTP_TIMEOUT="0.5")
    warm = await system.reply("slow.retry", "warm-up")
    await system.log.until_finished(warm.event_id)
    system.sim.fail_sends_http(502, times=1)  # the first attempt: maybe sent, so retried
    attempts: list[str] = []

    def first_retry(_user: str, text: str) -> bool:
        attempts.extend([text] if text == "answer" else [])
        return text == "answer" and len(attempts) == 2

    hold = system.sim.hold_sends(first_retry)
    reply = await system.reply("slow.retry", "answer")
    await hold.wait_held()
    await system.log.until_finished(reply.event_id)  # the second retry got through
    later = await system.reply("slow.retry", "later")
    await system.log.until_finished(later.event_id)
    # WeCom handles the held retry seconds later still. Not a wait for something to
    # happen: the time itself is the case.
    await asyncio.sleep(3)
    hold.release()

    def handled() -> list[str]:
        return [m.content for m in system.sim.sent + system.sim.duplicates]

    await until(
        lambda: handled().count("answer") == 2,
        timeout=10,
        what=lambda: f"the held retry handled too (WeCom has {handled()})",
    )
    assert system.sim.messages_to("slow.retry") == ["warm-up", "answer", "later"]
    assert [m.content for m in system.sim.duplicates] == ["answer"]


async def test_a_resumed_reply_that_was_never_sent_is_delivered(system: System) -> None:
    await system.start_token()
    system.start_sender()
    first = await system.reply("resumed", "first answer")
    await system.log.until_finished(first.event_id)
    await system.shutdown()
    second = await system.reply("resumed", "second answer")
    await system.deliver_once_and_drop(1)  # died before sending anything
    await system.start_token()
    system.start_sender()
    await system.log.until_finished(second.event_id)
    assert system.sim.messages_to("resumed") == ["first answer", "second answer"]
    assert system.sim.duplicates == []


async def test_a_reply_wecom_refuses_is_recorded_and_dead_lettered(system: System) -> None:
    await system.start_token()
    system.start_sender()
    dead_letters = await system.nc.subscribe(f"{topology.PREFIX}.dlq.>")
    system.sim.reject_user("gone.user", 81013)
    refused = await system.reply("gone.user", "再见")
    await system.log.until_finished(refused.event_id)
    [failed] = system.log.of(DeliveryFailed, refused.event_id)
    assert failed.errcode == 81013
    dead = await dead_letters.next_msg(timeout=10)
    assert decode_event(dead.data).event_id == refused.event_id
    assert dead.headers is not None
    assert "81013" in dead.headers["Wecombot-Dlq-Reason"]
    assert dead.headers["Wecombot-Dlq-Consumer"] == topology.SENDER_CONSUMER
    later = await system.reply("other.user", "still flowing")
    await system.log.until_finished(later.event_id)
    assert isinstance(later, ReplyGenerated)
    assert system.sim.messages_to("other.user") == ["still flowing"]


@pytest.mark.parametrize("lapsed", [True, False])
async def test_a_delivery_whose_lease_lapsed_asks_for_the_check(
    system: System, lapsed: bool
) -> None:
    """Two replicas on one reply (ours held it past ack_wait, the broker gave it to
    another, which got part 0 accepted): ours must not deliver part 0 a second time."""
    from wecombot_common.worker import Lease

    user = "two.replicas"
    reply = await system.reply(user, "只说一次")
    token = await sim_token(system.sim)
    api = message_api(system.sim, timeout_s=2)
    try:
        await api.send_text(token, user, "只说一次")  # the other replica's send
        sender = ReplySender(system.js, StaticTokens(token), api, app=APP, policy=DeliveryPolicy())
        await sender.handle(delivery_of(reply, 1, lease=Lease(0.0 if lapsed else 30.0)))
    finally:
        await api.aclose()
    assert system.sim.messages_to(user) == ["只说一次"] * (1 if lapsed else 2)


async def test_a_reply_that_gave_up_its_turn_is_sent_unchecked(system: System) -> None:
    """On its last try (a redelivery: it asks the check) a reply stops waiting for an
    earlier one (``order_given_up``), whose replica may have got the same text accepted
    and not recorded it yet: asked, WeCom dropped the later reply as a repeat of that
    one (lost). The earlier one is unfinished: the check is skipped."""
    user = "gave.up"
    earlier, later = (
        ReplyGenerated(**Envelope(app=APP, conversation=user, correlation_id=m), text="好的")
        for m in ("m1", "m2")
    )
    await append_event(system.js, earlier, msg_id=f"outcome:{earlier.event_id}")
    later_seq = (await append_event(system.js, later, msg_id=f"outcome:{later.event_id}")).seq
    token = await sim_token(system.sim)
    api = message_api(system.sim, timeout_s=2)
    try:
        await api.send_text(token, user, "好的")  # the earlier reply's replica, unrecorded
        sender = ReplySender(
            system.js, StaticTokens(token), api, app=APP, policy=DeliveryPolicy(order_wait_s=0.1)
        )
        last_try = dataclasses.replace(
            delivery_of(later, later_seq, num_delivered=5), last_try=True
        )
        with capture_logs() as logs:
            assert await sender.handle(last_try) == Ack()
    finally:
        await api.aclose()
    assert system.sim.messages_to(user) == ["好的", "好的"]
    assert system.sim.duplicates == []
    skipped = [e["reason"] for e in logs if e["event"] == "sender.duplicate_check_skipped"]
    assert skipped == ["a message in the window may be the same text"]


async def test_an_identical_reply_after_one_that_failed_maybe_sent_is_delivered(
    system: System,
) -> None:
    """The apology A's last delivery: WeCom accepted its part but the answer was lost,
    and the retries met 502s, so A was recorded as failed, with nothing recorded sent.
    The user's next message got the same apology B, redelivered: asked with the check,
    WeCom dropped B as a repeat of A's unrecorded copy (one apology for two messages)."""
    user = "apology.twice"
    apology = "抱歉，模型暂时不可用。"

    def failed(m: str) -> ReplyFailed:
        envelope = Envelope(app=APP, conversation=user, correlation_id=m)
        return ReplyFailed(**envelope, reason="model timed out", attempts=3, text=apology)

    a, b = failed("m1"), failed("m2")
    a_seq = (await append_event(system.js, a, msg_id=f"outcome:{a.event_id}")).seq
    token = await sim_token(system.sim)
    api = message_api(system.sim, timeout_s=0.3)
    try:
        policy = DeliveryPolicy(retry_attempts=1)
        sender = ReplySender(system.js, StaticTokens(token), api, app=APP, policy=policy)
        hold = system.sim.hold_sends(after_accept=True)  # accepted; the answer is lost
        last_try = dataclasses.replace(delivery_of(a, a_seq, num_delivered=5), last_try=True)
        handling = asyncio.create_task(sender.handle(last_try))
        await hold.wait_held()
        system.sim.fail_sends_http(502, times=5)  # the retries meet a bad front end
        await handling
        hold.release()
        system.sim.faults.send_http.clear()  # the front end is fine again
        await system.log.until(lambda: bool(system.log.of(DeliveryFailed, a.event_id)))
        [recorded] = system.log.of(DeliveryFailed, a.event_id)
        assert isinstance(recorded, DeliveryFailed)
        assert recorded.parts_delivered == 0
        b_seq = (await append_event(system.js, b, msg_id=f"outcome:{b.event_id}")).seq
        with capture_logs() as logs:  # B's redelivery (its first died unsent): it asks
            assert await sender.handle(delivery_of(b, b_seq, num_delivered=2)) == Ack()
    finally:
        await api.aclose()
    assert system.sim.messages_to(user) == [apology, apology]
    skipped = [e["reason"] for e in logs if e["event"] == "sender.duplicate_check_skipped"]
    assert skipped == ["a message in the window may be the same text"]


async def test_a_replica_clock_behind_does_not_lose_an_identical_reply(
    system: System,
) -> None:
    """The replica that recorded A's part runs 1.5 s behind: its record looks older than
    it is. B, the same text 0.8 s later and redelivered, looked for it only as far back as WeCom's
    window reaches: it missed it, asked the check, and WeCom, which sees the real
    times, dropped B as a repeat of A."""
    user = "skewed.clock"
    conv = ConversationRef(APP, user)
    a = ReplyGenerated(**Envelope(app=APP, conversation=user, correlation_id="m1"), text="好的")
    await append_event(system.js, a, msg_id=f"outcome:{a.event_id}")
    token = await sim_token(system.sim)
    api = message_api(system.sim, timeout_s=2)
    try:
        msgid = await api.send_text(token, user, "好的")  # replica X delivers A
        recorded_at = utcnow() - timedelta(seconds=1.5)  # on X's clock
        envelope = {"app": APP, "conversation": user, "causation_id": a.event_id}
        part = PartDelivered(
            **envelope,
            correlation_id=a.correlation_id,
            event_id=derived_id(a.event_id, "part", "0"),
            reply_id=a.event_id,
            index=0,
            total=1,
            wecom_msgid=msgid,
            start=0,
            end=2,
            occurred_at=recorded_at,
        )
        done = ReplyDelivered(
            **envelope,
            correlation_id=a.correlation_id,
            event_id=derived_id(a.event_id, "delivered"),
            reply_id=a.event_id,
            parts=1,
            wecom_msgids=[msgid],
            occurred_at=recorded_at,
        )
        branch = conv.sender_branch
        p = await append_event(system.js, part, msg_id="p", expect_last_seq=0, expect_scope=branch)
        await append_event(system.js, done, msg_id="d", expect_last_seq=p.seq, expect_scope=branch)
        # The case is the time between the two (not a wait for something to happen).
        await asyncio.sleep(0.8)
        b = ReplyGenerated(**Envelope(app=APP, conversation=user, correlation_id="m2"), text="好的")
        b_seq = (await append_event(system.js, b, msg_id=f"outcome:{b.event_id}")).seq
        # No slack: the window is only the seconds since B, the margin the clocks' alone.
        policy = DeliveryPolicy(check_slack_s=0)
        sender = ReplySender(system.js, StaticTokens(token), api, app=APP, policy=policy)
        # B's redelivery (its first died before sending): it asks the check.
        assert await sender.handle(delivery_of(b, b_seq, num_delivered=2)) == Ack()
    finally:
        await api.aclose()
    assert system.sim.messages_to(user) == ["好的", "好的"]
    assert system.sim.duplicates == []


async def test_a_part_another_build_split_differently_is_recognised(system: System) -> None:
    """Another build split A at 1500 characters and recorded both parts; this build
    splits it elsewhere, so its own split of A holds no part equal to 'a' * 1500, which
    the user got seconds ago. B is that very text, redelivered (it asks the check):
    compared with this build's split of A, it was taken for new and dropped by WeCom."""
    user = "split.changed"
    conv = ConversationRef(APP, user)
    head = "a" * 1500
    text = head + "b" * 1500
    assert head not in split_text(text)
    envelope = Envelope(app=APP, conversation=user, correlation_id="m1")
    a = ReplyGenerated(**envelope, text=text)
    await append_event(system.js, a, msg_id=f"outcome:{a.event_id}")
    token = await sim_token(system.sim)
    api = message_api(system.sim, timeout_s=2)
    try:
        last, msgids = 0, []
        for i, (start, end) in enumerate(((0, 1500), (1500, 3000))):
            msgids.append(await api.send_text(token, user, text[start:end]))
            part = PartDelivered(
                **envelope,
                event_id=derived_id(a.event_id, "part", str(i)),
                causation_id=a.event_id,
                reply_id=a.event_id,
                index=i,
                total=2,
                wecom_msgid=msgids[-1],
                start=start,
                end=end,
            )
            branch = conv.sender_branch
            appended = await append_event(
                system.js, part, msg_id=f"p{i}", expect_last_seq=last, expect_scope=branch
            )
            last = appended.seq
        done = ReplyDelivered(
            **envelope,
            event_id=derived_id(a.event_id, "delivered"),
            causation_id=a.event_id,
            reply_id=a.event_id,
            parts=2,
            wecom_msgids=msgids,
        )
        await append_event(
            system.js, done, msg_id="d", expect_last_seq=last, expect_scope=conv.sender_branch
        )
        b = ReplyGenerated(**Envelope(app=APP, conversation=user, correlation_id="m2"), text=head)
        b_seq = (await append_event(system.js, b, msg_id=f"outcome:{b.event_id}")).seq
        sender = ReplySender(system.js, StaticTokens(token), api, app=APP, policy=DeliveryPolicy())
        assert await sender.handle(delivery_of(b, b_seq, num_delivered=2)) == Ack()
    finally:
        await api.aclose()
    assert system.sim.messages_to(user) == [head, "b" * 1500, head]
    assert system.sim.duplicates == []


@pytest.mark.parametrize("aged_out", [False, True])
async def test_an_unfinished_reply_aged_out_does_not_turn_the_check_off(
    system: System, aged_out: bool
) -> None:
    """A, dead-lettered without an outcome, stays unfinished for good; once it aged out
    of the stream, a long-running sender's cached state still had it, its text could not
    be read, and every checked send to that user skipped the check: B's first delivery,
    accepted and then dead, was sent again by its redelivery."""
    user = "aged.out"
    conv = ConversationRef(APP, user)
    a, b = (
        ReplyGenerated(**Envelope(app=APP, conversation=user, correlation_id=m), text=t)
        for m, t in (("m1", "早上好"), ("m2", "晚安"))
    )
    a_seq = (await append_event(system.js, a, msg_id=f"outcome:{a.event_id}")).seq
    b_seq = (await append_event(system.js, b, msg_id=f"outcome:{b.event_id}")).seq
    token = await sim_token(system.sim)
    api = message_api(system.sim, timeout_s=2)
    try:
        sender = ReplySender(system.js, StaticTokens(token), api, app=APP, policy=DeliveryPolicy())

        async def floor() -> int:  # A was dead-lettered: the ack floor is past it
            return a_seq

        sender._settled = SettledFloor(floor, refresh_s=0.0)
        await sender._cache.load(conv, through=b_seq, leader=True)  # the process saw A
        if aged_out:  # WECOMBOT_HISTORY_MAX_AGE passed for A; the cache still has it
            await system.js.delete_msg(topology.CONVERSATION_STREAM, a_seq)
        await api.send_text(token, user, "晚安")  # B's first delivery: accepted, died
        assert await sender.handle(delivery_of(b, b_seq, num_delivered=2)) == Ack()
    finally:
        await api.aclose()
    assert system.sim.messages_to(user) == ["晚安"]
    assert [m.content for m in system.sim.duplicates] == ["晚安"]


class _Interleaved:
    """The real WeCom adapter, with each replica's sends held at the points where the
    race below needs them (the test's own scheduling, not a fake WeCom)."""

    def __init__(
        self, api: HttpMessageApi, name: str, parts: list[str], gates: dict[str, asyncio.Event]
    ) -> None:
        self.api, self.name, self.parts, self.gates = api, name, parts, gates
        self.sends: list[tuple[str, int, int | None]] = []

    async def send_text(
        self, token: str, touser: str, content: str, *, duplicate_check_s: int | None = None
    ) -> str:
        index, g = self.parts.index(content), self.gates
        if (self.name, index) == ("lapsed", 0):
            await g["redelivered sent 0"].wait()
        if (self.name, index) == ("lapsed", 1):
            g["lapsed recorded 0"].set()
        if (self.name, index) == ("redelivered", 1):
            g["redelivered at 1"].set()
            await g["lapsed sent 1"].wait()
        msgid = await self.api.send_text(
            token, touser, content, duplicate_check_s=duplicate_check_s
        )
        self.sends.append((self.name, index, duplicate_check_s))
        if (self.name, index) == ("redelivered", 0):
            g["redelivered sent 0"].set()
            await g["lapsed recorded 0"].wait()
        if (self.name, index) == ("lapsed", 1):
            g["lapsed sent 1"].set()
            await g["redelivered at 1"].wait()
        return msgid


async def test_two_replicas_in_lockstep_deliver_each_part_once(system: System) -> None:
    """A restarted broker redelivers a reply while the replica holding it carries on (its
    lease lapsed, so it asks for the check). The redelivery loses the race to record
    part 0, catches up and sends part 1 right after the lapsed one did: it must ask for
    the check too, or the user gets part 1 twice."""
    from wecombot_common.worker import Lease

    user = "lock.step"
    text = "\n\n".join(c * 1500 for c in "abc")
    parts = split_text(text)
    assert len(parts) == 3
    reply = await system.reply(user, text)
    token = await sim_token(system.sim)
    api = message_api(system.sim, timeout_s=5)
    gates = {
        name: asyncio.Event()
        for name in ("redelivered sent 0", "lapsed recorded 0", "lapsed sent 1", "redelivered at 1")
    }
    adapters = {name: _Interleaved(api, name, parts, gates) for name in ("lapsed", "redelivered")}

    async def replica(name: str, num_delivered: int, lease: Lease) -> object:
        sender = ReplySender(
            system.js, StaticTokens(token), adapters[name], app=APP, policy=DeliveryPolicy()
        )
        return await sender.handle(delivery_of(reply, 1, num_delivered=num_delivered, lease=lease))

    try:
        async with asyncio.timeout(30):
            await asyncio.gather(
                replica("lapsed", 1, Lease(0.0)), replica("redelivered", 2, Lease(30.0))
            )
    finally:
        await api.aclose()
    assert system.sim.messages_to(user) == parts, adapters["redelivered"].sends
    assert len(system.log.of(ReplyDelivered, reply.event_id)) == 1
