"""The sender service end to end: a real nats-server, the real token service in process,
and the simulated WeCom API on loopback (harness.py). Outcome events go in with
``append_event``; the assertions read what WeCom received and what the sender wrote to
the log."""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from datetime import datetime, timedelta
from typing import Any

import httpx
import nats
import nats.errors
import nats.js.errors
import pytest
import structlog
from nats.js import JetStreamContext
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from tests.conftest import free_port
from tests.integration.sender.harness import (
    AGENT,
    APP,
    CORP,
    LONG,
    SECRET,
    Envelope,
    System,
)
from tests.waiting import eventually, until
from wecombot.dlq import replay
from wecombot_common import topology
from wecombot_common.bus import append_event, ensure_topology
from wecombot_common.events import (
    ConversationReset,
    DeliveryFailed,
    PartDelivered,
    ReplyDelivered,
    ReplyFailed,
    ReplyGenerated,
    ReplyRequeued,
    decode_event,
    derived_id,
    utcnow,
)
from wecombot_common.settings import EnvReader, NatsSettings, Secret, WeComApiSettings
from wecombot_common.sim.wecom_api import SentMessage, SimulatedWeComApi
from wecombot_sender.domain import PACING_SLACK_S, RECENT_SENDS_KEPT
from wecombot_sender.errors import SendRejected, SendRetryable, TokenRejected
from wecombot_sender.split import split_text
from wecombot_sender.wecom import HttpMessageApi

pytestmark = pytest.mark.integration


async def _settled(js: JetStreamContext, timeout: float = 10.0) -> None:
    """Wait until the sender consumer holds nothing: every delivery was acked (the ack
    follows the last append, so it may trail the event by a moment)."""

    async def settled() -> bool:
        try:
            info = await js.consumer_info(topology.CONVERSATION_STREAM, topology.SENDER_CONSUMER)
        except nats.js.errors.NotFoundError:
            return False
        return bool(info.delivered.stream_seq and not (info.num_pending or info.num_ack_pending))

    await until(settled, timeout=timeout, what="the sender consumer settled", interval=0.02)


async def _consuming(js: JetStreamContext) -> bool:
    """Whether the sender's consumer exists (its service configured its logging)."""
    try:
        await js.consumer_info(topology.CONVERSATION_STREAM, topology.SENDER_CONSUMER)
    except nats.js.errors.NotFoundError:
        return False
    return True


# ---------------------------------------------------------------- the happy paths


async def test_a_short_reply_is_sent_once_and_recorded(system: System) -> None:
    await system.start_token()
    system.start_sender()
    reply = await system.reply("zhang.san", "你好！有什么可以帮你？")
    await system.log.until_finished(reply.event_id)

    [sent] = system.sim.sent
    assert (sent.touser, sent.content, sent.agentid, sent.msgtype) == (
        "zhang.san",
        "你好！有什么可以帮你？",
        AGENT,
        "text",
    )
    history = await system.history("zhang.san")
    assert [type(e) for e in history] == [ReplyGenerated, PartDelivered, ReplyDelivered]
    part, done = history[1], history[2]
    assert isinstance(part, PartDelivered) and isinstance(done, ReplyDelivered)
    assert (part.reply_id, part.index, part.total, part.wecom_msgid) == (
        reply.event_id,
        0,
        1,
        sent.msgid,
    )
    assert (done.reply_id, done.parts, done.wecom_msgids) == (reply.event_id, 1, [sent.msgid])
    assert part.event_id == derived_id(reply.event_id, "part", "0")
    for event in (part, done):
        assert event.causation_id == reply.event_id
        assert event.correlation_id == reply.correlation_id
    await _settled(system.js)


async def test_replies_wait_for_a_token_service_without_spending_their_deliveries(
    system: System,
) -> None:
    """With no token replica running (all down, or their NATS user rotated before their
    pods were), each delivery heard 'no responders' and was handed back with backoff:
    SENDER_MAX_DELIVER deliveries went in three minutes, then the reply was dead-lettered,
    where docs/reliability.md says replies wait. They wait in the sender, each delivery
    held, and go out once a token replica answers."""
    system.start_sender(SENDER_MAX_DELIVER="2")
    await until(
        lambda: _consuming(system.js), timeout=15, what="the sender's consumer", interval=0.02
    )
    with capture_logs() as logs:  # after the sender configured its logging
        replies = [await system.reply(user, "你好") for user in ("zhang.san", "li.si")]
        await until(  # both replies asked, and wait
            lambda: (
                REGISTRY.get_sample_value("wecombot_worker_waiting", {"consumer": "sender"}) == 2
            ),
            timeout=15,
            what=lambda: f"both replies waiting for a token service: {logs}",
        )
        waiting = [e for e in logs if e["event"] == "sender.waiting_for_token_service"]
    await system.start_token()  # (it configures logging anew: nothing captured after)
    await system.log.until_finished(*(r.event_id for r in replies), timeout=30)
    assert sorted(m.touser for m in system.sim.sent) == ["li.si", "zhang.san"]
    assert not system.log.of(DeliveryFailed)
    assert len(waiting) == 1  # once for the outage, not once per reply
    info = await system.js.consumer_info(topology.CONVERSATION_STREAM, topology.SENDER_CONSUMER)
    assert info.num_redelivered == 0  # no delivery spent on the wait
    await _settled(system.js)


async def test_a_stop_hands_back_a_reply_waiting_for_a_token_service(system: System) -> None:
    system.start_sender()
    await until(
        lambda: _consuming(system.js), timeout=15, what="the sender's consumer", interval=0.02
    )
    with capture_logs() as logs:
        reply = await system.reply("wang.wu", "你好")
        await until(
            lambda: any(e["event"] == "sender.waiting_for_token_service" for e in logs),
            timeout=15,
            what="the sender waiting for a token service",
        )
    async with asyncio.timeout(10):  # not its 20 s of grace: the wait ends at the stop
        await system.shutdown()
    await system.start_token()
    system.start_sender()
    await system.log.until_finished(reply.event_id, timeout=30)
    assert system.sim.messages_to("wang.wu") == ["你好"]
    assert not system.log.of(DeliveryFailed)


async def test_a_reply_behind_one_held_elsewhere_for_a_token_service_spends_nothing(
    system: System,
) -> None:
    """The user's earlier reply is held by another replica, waiting for a token service:
    this one waited its turn SENDER_ORDER_WAIT, was handed back, and again, each round a
    delivery; its last gave the order up. It waits on now, at no cost, and goes out
    after the earlier one once a token service answers."""
    first = await system.reply("zhao.liu", "first")
    other = await system.other_replica()  # it fetched the first reply and holds it
    [held] = await other.fetch(1, timeout=5)

    async def hold() -> None:  # the other replica's heartbeat
        while True:
            await held.in_progress()
            await asyncio.sleep(1.0)

    holding = asyncio.create_task(hold())
    before = structlog.get_config()["processors"]
    system.start_sender(SENDER_ORDER_WAIT="0.3", SENDER_MAX_DELIVER="3")
    await until(
        lambda: structlog.get_config()["processors"] is not before,
        timeout=15,
        what="the sender's logging configured",
        interval=0.01,
    )
    with capture_logs() as logs:
        second = await system.reply("zhao.liu", "second")
        await until(  # its order wait over, and started again, three times
            lambda: sum(e["event"] == "sender.order_wait_extended" for e in logs) >= 3,
            timeout=15,
            what=lambda: f"the second reply's order wait extended: {logs}",
        )
    assert any(e["event"] == "sender.waiting_for_token_service" for e in logs)
    info = await system.js.consumer_info(topology.CONVERSATION_STREAM, topology.SENDER_CONSUMER)
    assert info.num_redelivered == 0  # the second reply: one delivery, still held
    holding.cancel()
    await held.nak()  # the other replica goes away: this one takes the first reply too
    await other.unsubscribe()
    await system.start_token()
    await system.log.until_finished(first.event_id, second.event_id, timeout=30)
    assert system.sim.messages_to("zhao.liu") == ["first", "second"]
    assert not system.log.of(DeliveryFailed)


async def test_a_long_reply_goes_out_in_parts_that_join_to_it(system: System) -> None:
    await system.start_token()
    system.start_sender()
    reply = await system.reply("li.si", LONG, kind=ReplyFailed)
    await system.log.until_finished(reply.event_id)

    contents = system.sim.messages_to("li.si")
    assert len(contents) >= 3
    assert "".join(contents) == LONG
    assert all(len(c.encode("utf-8")) <= 2048 for c in contents)
    assert not any(m.truncated for m in system.sim.sent)
    parts = system.log.of(PartDelivered, reply.event_id)
    assert [p.index for p in parts] == list(range(len(contents)))
    [done] = system.log.of(ReplyDelivered, reply.event_id)
    assert done.wecom_msgids == [m.msgid for m in system.sim.sent]


async def test_with_markdown_configured_every_part_goes_out_as_markdown(system: System) -> None:
    await system.start_token()
    system.start_sender(SENDER_MESSAGE_TYPE="markdown")
    text = "## 周报提纲\n\n**本周完成**：`wecombot` 的基准测试。\n\n" + LONG
    reply = await system.reply("wang.wu", text)
    await system.log.until_finished(reply.event_id)

    assert "".join(system.sim.messages_to("wang.wu")) == text
    assert len(system.sim.sent) >= 3
    assert {m.msgtype for m in system.sim.sent} == {"markdown"}
    assert not any(m.truncated for m in system.sim.sent)


async def test_replies_to_one_user_arrive_in_order(system: System) -> None:
    await system.start_token()
    system.start_sender()
    texts = ["第一条", LONG, "third", "第四条。" * 700, "/reset 完成"]
    replies = [await system.reply("wang.wu", t) for t in texts[:-1]]
    replies.append(await system.reply("wang.wu", texts[-1], kind=ConversationReset))
    await system.log.until_finished(*(r.event_id for r in replies))

    expected = [p for t in texts for p in split_text(t)]
    assert system.sim.messages_to("wang.wu") == expected
    await _settled(system.js)


# ---------------------------------------------------------------- WeCom on a bad day


async def test_a_refused_token_is_refreshed_once_and_the_reply_delivered(system: System) -> None:
    await system.start_token()
    system.start_sender()
    first = await system.reply("zhao.liu", "one")
    await system.log.until_finished(first.event_id)
    assert system.sim.gettoken_calls == 1

    system.sim.fail_sends(40014)  # WeCom refuses a token that has not expired
    second = await system.reply("zhao.liu", "two")
    await system.log.until_finished(second.event_id)
    assert system.sim.gettoken_calls == 2

    # 42001 for the token everyone holds, fetched a moment ago to replace a rejected one:
    # the next gettoken waits TOKEN_MIN_BACKOFF after it, the reply is handed back meanwhile.
    system.sim.expire_tokens()
    third = await system.reply("zhao.liu", "three")
    await system.log.until_finished(third.event_id)
    assert system.sim.gettoken_calls == 3

    assert system.sim.messages_to("zhao.liu") == ["one", "two", "three"]
    assert not system.log.of(DeliveryFailed)


async def test_busy_wecom_and_bad_gateways_are_survived(system: System) -> None:
    await system.start_token()
    system.start_sender(SENDER_RETRY_ATTEMPTS="1")
    # One retry in process absorbs one failure; two in a row hand the message back and a
    # redelivery carries on. The second reply waits its turn, so every fault hits the first.
    system.sim.fail_sends_http(502, times=1)
    system.sim.fail_sends(-1, times=1)
    system.sim.fail_sends(45009, times=1)
    system.sim.fail_sends(45033, times=1)
    first = await system.reply("sun.jiu", "first")
    second = await system.reply("sun.jiu", "second")
    await system.log.until_finished(first.event_id, second.event_id)

    assert system.sim.messages_to("sun.jiu") == ["first", "second"]
    assert system.sim.send_calls == 4 + 2
    assert not system.log.of(DeliveryFailed)
    assert len(system.log.of(PartDelivered)) == 2
    await _settled(system.js)


async def test_the_last_delivery_gives_up_records_it_and_dead_letters(system: System) -> None:
    await system.start_token()
    system.start_sender(SENDER_RETRY_ATTEMPTS="0", SENDER_MAX_DELIVER="2")
    warm = await system.reply("qian.shi", "token fetched")
    await system.log.until_finished(warm.event_id)
    system.sim.set_down(True)
    dead_letters = await system.nc.subscribe(f"{topology.PREFIX}.dlq.>")
    lost = await system.reply("qian.shi", "WeCom is down")
    await system.log.until_finished(lost.event_id)
    [failed] = system.log.of(DeliveryFailed, lost.event_id)
    assert isinstance(failed, DeliveryFailed)
    assert failed.errcode == -1
    assert failed.reason == "gave up after 2 deliveries: WeCom answered HTTP 503"
    dead = await dead_letters.next_msg(timeout=10)  # the worker parks it after our append
    assert decode_event(dead.data).event_id == lost.event_id
    assert dead.headers is not None
    assert "WeCom answered HTTP 503" in dead.headers["Wecombot-Dlq-Reason"]

    system.sim.set_down(False)  # the user's next reply is not held back by the lost one
    later = await system.reply("qian.shi", "back again")
    await system.log.until_finished(later.event_id)
    assert system.sim.messages_to("qian.shi") == ["token fetched", "back again"]


async def test_a_reply_parked_without_its_failure_does_not_hold_back_later_ones(
    system: System,
) -> None:
    # The only allowed delivery of the first reply ends without an outcome (a sender that
    # died holding it), so the next sender dead-letters it on the spot, unsent and with
    # no DeliveryFailed: it stays unfinished in the log. The user's next reply must not
    # wait for it (an order wait of 60 s, then out of order on its last delivery).
    await system.start_token()
    lost = await system.reply("li.shisan", "lost in a crash")
    await system.deliver_once_and_drop(1)
    dead_letters = await system.nc.subscribe(f"{topology.PREFIX}.dlq.>")
    system.start_sender(SENDER_MAX_DELIVER="1", SENDER_ACK_WAIT="1", SENDER_ORDER_WAIT="60")
    dead = await dead_letters.next_msg(timeout=10)
    assert decode_event(dead.data).event_id == lost.event_id
    assert dead.headers is not None
    assert "past the limit of 1" in dead.headers["Wecombot-Dlq-Reason"]
    with capture_logs() as logs:
        later = await system.reply("li.shisan", "the next answer")
        await system.log.until_finished(later.event_id, timeout=20)
    assert system.sim.messages_to("li.shisan") == ["the next answer"]
    assert not system.log.of(DeliveryFailed)
    events = [e["event"] for e in logs]
    assert "sender.waiting_for_earlier_reply" in events  # it saw the lost one first
    assert "sender.order_given_up" not in events
    await _settled(system.js)

    # With no failure recorded, the operator's replay still requeues it.
    dlq = await system.js.stream_info(topology.DEAD_LETTER_STREAM)
    done, said = await replay(system.js, dlq.state.last_seq)
    assert done, said
    await system.log.until_finished(lost.event_id)
    assert system.sim.messages_to("li.shisan") == ["the next answer", "lost in a crash"]
    assert len(system.log.of(ReplyDelivered, lost.event_id)) == 1
    await _settled(system.js)


async def test_a_replayed_reply_goes_out_after_its_recorded_parts_and_in_order(
    system: System,
) -> None:
    await system.start_token()
    system.start_sender(SENDER_RETRY_ATTEMPTS="0", SENDER_MAX_DELIVER="2")
    warm = await system.reply("warm.up", "token fetched")
    await system.log.until_finished(warm.event_id)
    system.sim.set_down(True)
    # A long reply whose first part a crashed sender had recorded; the rest fails.
    lost = ReplyGenerated(app=APP, conversation="zhou.ba", correlation_id="m1", text=LONG)
    parts = split_text(LONG)
    await system.record_first_part(lost, len(parts), "w0")
    await append_event(system.js, lost, msg_id=f"outcome:{lost.event_id}")
    await system.log.until_finished(lost.event_id)
    [failed] = system.log.of(DeliveryFailed, lost.event_id)
    assert isinstance(failed, DeliveryFailed) and failed.parts_delivered == 1

    async def parked() -> int | None:
        info = await system.js.stream_info(topology.DEAD_LETTER_STREAM)
        return int(info.state.last_seq) if info.state.messages else None

    dead_seq = await eventually(parked, timeout=10, what="the reply in the DLQ")
    # Replayed while WeCom is still down: that round fails too, and its requeue is parked.
    done, said = await replay(system.js, dead_seq)
    assert done, said
    await system.log.until(lambda: len(system.log.of(DeliveryFailed, lost.event_id)) == 2)

    async def parked_again() -> int | None:
        last = await parked()
        return last if last is not None and last > dead_seq else None

    dead_seq = await eventually(parked_again, timeout=10, what="the requeue in the DLQ")
    system.sim.set_down(False)
    done, said = await replay(system.js, dead_seq)
    assert done, said
    later = await system.reply("zhou.ba", "after the replay")  # waits for the replay
    await system.log.until(
        lambda: (
            bool(system.log.of(ReplyDelivered, lost.event_id))
            and system.log.finished(later.event_id)
        )
    )

    assert system.sim.messages_to("zhou.ba") == [*parts[1:], "after the replay"]
    history = [e for e in await system.history("zhou.ba") if e.correlation_id == "m1"]
    assert [type(e) for e in history] == [
        PartDelivered,
        ReplyGenerated,
        DeliveryFailed,
        ReplyRequeued,
        DeliveryFailed,
        ReplyRequeued,
        *[PartDelivered] * (len(parts) - 1),
        ReplyDelivered,
    ]
    first_round, failed_again, requeue, done_event = history[3], history[4], history[5], history[-1]
    assert isinstance(first_round, ReplyRequeued) and first_round.causation_id == failed.event_id
    assert isinstance(failed_again, DeliveryFailed) and failed_again.event_id == derived_id(
        lost.event_id, "failed", first_round.event_id
    )
    assert isinstance(requeue, ReplyRequeued) and requeue.causation_id == failed_again.event_id
    assert isinstance(done_event, ReplyDelivered) and done_event.wecom_msgids[0] == "w0"
    assert done_event.event_id == derived_id(lost.event_id, "delivered", requeue.event_id)
    again, said = await replay(system.js, dead_seq)
    assert not again and "was delivered since" in said
    await _settled(system.js)


def _ago(seconds: float) -> datetime:
    return utcnow() - timedelta(seconds=seconds)


async def _delivered_before(system: System, user: str, key: str, text: str, at: datetime) -> None:
    """A one-part reply delivered earlier, as the log and WeCom remember it."""
    env = Envelope(app=APP, conversation=user, correlation_id=key)
    reply = ReplyGenerated(**env, text=text, occurred_at=at - timedelta(seconds=1))
    done = {"causation_id": reply.event_id, "reply_id": reply.event_id, "occurred_at": at}
    msgid = f"w-{key}"
    part = PartDelivered(**env, **done, index=0, total=1, wecom_msgid=msgid, start=0, end=len(text))
    finished = ReplyDelivered(**env, **done, parts=1, wecom_msgids=[msgid])
    for event in (reply, part, finished):
        await append_event(system.js, event)
    _accepted(system, user, text, msgid, at)


def _accepted(system: System, user: str, text: str, msgid: str, at: datetime) -> None:
    system.sim.sent.append(
        SentMessage(
            touser=user,
            agentid=AGENT,
            content=text,
            msgid=msgid,
            truncated=False,
            at=at.timestamp(),
        )
    )


async def _failed_before(
    system: System, user: str, text: str, *, asked: datetime, failed: datetime
) -> ReplyRequeued:
    """A reply whose delivery failed (parked, later replies went on); its requeue, as
    `wecombot dlq replay` would append it."""
    env = Envelope(app=APP, conversation=user, correlation_id="lost")
    lost = ReplyGenerated(**env, text=text, occurred_at=asked)
    gave_up = DeliveryFailed(
        **env,
        causation_id=lost.event_id,
        reply_id=lost.event_id,
        errcode=-1,
        reason="gave up after 20: no answer from WeCom",
        parts_delivered=0,
        occurred_at=failed,
    )
    for event in (lost, gave_up):
        await append_event(system.js, event)
    return ReplyRequeued(
        **env, causation_id=gave_up.event_id, reply_id=lost.event_id, reason="replayed"
    )


async def _replay(system: System, requeue: ReplyRequeued) -> list[MutableMapping[str, Any]]:
    """Start the services, replay; the sender's log lines while it delivers the replay."""
    await system.start_token()
    system.start_sender()
    await _settled(system.js)  # every reply finished, as the log says: nothing sent
    with capture_logs() as logs:  # after the sender configured its logging
        await append_event(system.js, requeue)  # the operator's `wecombot dlq replay`
        await system.log.until(lambda: bool(system.log.of(ReplyDelivered, requeue.reply_id)))
        await _settled(system.js)
    return logs


async def test_a_replay_asks_the_duplicate_check_back_to_the_failed_round(
    system: System,
) -> None:
    """The failed round had its send accepted, only WeCom's answer lost, and the user got
    a later reply since (parking the failed one lets later ones through). The check's
    window reached back only to that later reply: the replay delivered the lost answer
    a second time. It reaches back to the reply's last recorded part (here, the reply)."""
    user = "chen.qi"
    requeue = await _failed_before(
        system, user, "the lost answer", asked=_ago(120), failed=_ago(80)
    )
    _accepted(system, user, "the lost answer", "w-lost", _ago(90))  # its answer lost
    await _delivered_before(system, user, "later", "a later answer", _ago(30))
    await _replay(system, requeue)
    assert system.sim.messages_to(user) == ["the lost answer", "a later answer"]
    assert [m.content for m in system.sim.duplicates] == ["the lost answer"]


async def test_a_replay_skips_the_check_when_its_window_holds_more_than_is_kept(
    system: System,
) -> None:
    """An hour after the failed round, with more messages since than the sender keeps
    (64): one of the forgotten ones may be the same text (the same apology), and WeCom
    would drop the replay as its repeat, recorded as delivered. It goes out unchecked."""
    user = "zhou.jiu"
    sorry = "抱歉，请稍后再试。"
    requeue = await _failed_before(system, user, sorry, asked=_ago(3600), failed=_ago(3550))
    await _delivered_before(system, user, "same", sorry, _ago(3499))
    for i in range(RECENT_SENDS_KEPT):
        await _delivered_before(system, user, f"k{i}", f"answer {i}", _ago(3400 - i))
    logs = await _replay(system, requeue)
    assert system.sim.messages_to(user)[-1] == sorry
    assert system.sim.duplicates == []
    skipped = [e for e in logs if e["event"] == "sender.duplicate_check_skipped"]
    assert [e["reason"] for e in skipped] == ["more messages in the window than are kept"]


async def test_a_reply_over_wecoms_hourly_limit_waits_instead_of_being_dropped(
    system: System,
) -> None:
    # WeCom drops a member's messages beyond its hourly limit without an error; here the
    # limit is 3 and one delivery is allowed, so the fourth reply is dead-lettered with
    # the reason rather than handed back for the hour (it could be replayed later).
    await system.start_token()
    system.start_sender(SENDER_PER_USER_PER_HOUR="3", SENDER_MAX_DELIVER="1")
    dead_letters = await system.nc.subscribe(f"{topology.PREFIX}.dlq.>")
    replies = [await system.reply("busy.user", f"answer {i}") for i in range(4)]
    other = await system.reply("calm.user", "你好")
    await system.log.until_finished(*(r.event_id for r in replies[:3]), other.event_id)
    dead = await dead_letters.next_msg(timeout=10)
    assert decode_event(dead.data).event_id == replies[3].event_id
    assert dead.headers is not None
    assert "limit of 3 messages an hour per member" in dead.headers["Wecombot-Dlq-Reason"]
    assert system.sim.messages_to("busy.user") == ["answer 0", "answer 1", "answer 2"]
    assert system.sim.messages_to("calm.user") == ["你好"]
    await _settled(system.js)


async def test_replies_behind_one_held_for_the_hour_wait_for_the_hour_too(
    system: System,
) -> None:
    # Waiting for the held reply in turn (SENDER_ORDER_WAIT a delivery) would spend the
    # later replies' deliveries until, on their last, they were dead-lettered unsent.
    await system.start_token()
    system.start_sender(SENDER_PER_USER_PER_HOUR="2", SENDER_ORDER_WAIT="60")
    warm = await system.reply("calm.user", "你好")
    await system.log.until_finished(warm.event_id)
    with capture_logs() as logs:
        replies = [await system.reply("busy.user", f"answer {i}") for i in range(4)]
        await system.log.until_finished(*(r.event_id for r in replies[:2]))

        def held() -> list[dict[str, object]]:
            return [e for e in logs if e["event"] == "sender.hourly_limit"]

        await until(lambda: len(held()) >= 2, timeout=15, what=lambda: f"two held: {logs}")
    assert system.sim.messages_to("busy.user") == ["answer 0", "answer 1"]
    assert not [e for e in logs if e["event"] == "sender.waiting_for_earlier_reply"]
    assert all(3500 < int(str(e["wait_s"])) <= 3660 for e in held())


async def test_a_user_paced_for_the_minute_does_not_hold_up_other_users(
    system: System,
) -> None:
    """A reply waiting for its user's minute to have room (SENDER_PER_USER_PER_MINUTE)
    gives up its slot: with one slot, the next user's reply went out only after that
    wait, up to a minute, and so did every other reply."""
    await system.start_token()
    system.start_sender(SENDER_MAX_CONCURRENCY="1", SENDER_PER_USER_PER_MINUTE="2")
    warm = await system.reply("calm.user", "早")  # the sender has set up its logging
    await system.log.until_finished(warm.event_id)
    with capture_logs() as logs:
        for i in range(3):
            await system.reply("busy.user", f"answer {i}")
        await until(
            lambda: any(e["event"] == "sender.rate_limited" for e in logs),
            timeout=10,
            what=lambda: f"the third reply paced: {logs}",
        )
        other = await system.reply("calm.user", "你好")
        await system.log.until_finished(other.event_id)
    assert system.sim.messages_to("calm.user") == ["早", "你好"]
    assert system.sim.messages_to("busy.user") == ["answer 0", "answer 1"]
    paced = [e for e in logs if e["event"] == "sender.rate_limited"]
    assert len(paced) == 1 and 50 < float(str(paced[0]["wait_s"])) <= 60 + PACING_SLACK_S


async def test_a_permanent_refusal_fails_that_reply_only(system: System) -> None:
    await system.start_token()
    system.start_sender()
    system.sim.reject_user("left.company", 81013)
    gone = await system.reply("left.company", "再见")
    other = await system.reply("still.here", "你好")
    empty = await system.reply("still.here", "")
    await system.log.until_finished(gone.event_id, other.event_id, empty.event_id)

    [failed] = system.log.of(DeliveryFailed, gone.event_id)
    assert isinstance(failed, DeliveryFailed)
    assert (failed.errcode, failed.parts_delivered) == (81013, 0)
    assert "not a member the app can reach" in failed.reason
    assert failed.causation_id == gone.event_id
    [nothing] = system.log.of(DeliveryFailed, empty.event_id)
    assert nothing.errcode == 44004
    assert system.sim.messages_to("still.here") == ["你好"]  # the empty one never reached WeCom

    # a refusal does not block the user's later replies
    system.sim.faults.always_fail_users.clear()
    system.sim.fail_sends(82001)
    refused = await system.reply("left.company", "first")
    later = await system.reply("left.company", "second")
    await system.log.until_finished(refused.event_id, later.event_id)
    assert system.log.of(DeliveryFailed, refused.event_id)[0].errcode == 82001
    assert system.sim.messages_to("left.company") == ["second"]
    await _settled(system.js)


async def test_a_failed_reply_whose_dead_lettering_failed_is_parked_on_redelivery(
    system: System,
) -> None:
    # The failure is recorded before the dead letter; if the dead-lettering fails, the
    # redelivery finds the reply finished. It must still park it, or the operator has
    # nothing to replay.
    await system.start_token()
    system.start_sender()
    warm = await system.reply("chen.qi", "streams in place")
    await system.log.until_finished(warm.event_id)
    await system.js.delete_stream(topology.DEAD_LETTER_STREAM)
    system.sim.reject_user("chen.qi", 81013)
    with capture_logs() as logs:
        refused = await system.reply("chen.qi", "不会送达")
        await system.log.until_finished(refused.event_id)
        await until(
            lambda: any(e["event"] == "worker.dead_letter_failed" for e in logs),
            timeout=10,
            what="the dead-lettering failed",
        )
    await ensure_topology(system.js, NatsSettings.read(EnvReader({})))

    async def parked() -> bool:
        info = await system.js.stream_info(topology.DEAD_LETTER_STREAM)
        return int(info.state.messages) == 1

    await until(parked, timeout=20, what="the refused reply dead-lettered")
    dead = await system.js.get_msg(topology.DEAD_LETTER_STREAM, 1)
    assert decode_event(dead.data or b"").event_id == refused.event_id
    assert dead.headers is not None
    assert "recorded as failed" in dead.headers["Wecombot-Dlq-Reason"]
    assert "not a member the app can reach" in dead.headers["Wecombot-Dlq-Reason"]
    assert len(system.log.of(DeliveryFailed, refused.event_id)) == 1
    assert system.sim.messages_to("chen.qi") == ["streams in place"]
    await _settled(system.js)


async def test_a_bad_secret_fails_the_reply_with_the_token_error(system: System) -> None:
    await system.start_token(WECOM_SECRET="not-the-secret")
    system.start_sender()
    reply = await system.reply("zhou.qi", "hello")
    await system.log.until_finished(reply.event_id)
    [failed] = system.log.of(DeliveryFailed, reply.event_id)
    assert failed.errcode == 40001
    assert system.sim.sent == []


@pytest.mark.parametrize("errcode", [45033, 40056], ids=["concurrency-limit", "unknown"])
async def test_a_gettoken_failure_that_may_pass_is_retried_not_the_replys_end(
    system: System, errcode: int
) -> None:
    """WeCom's 45033 (too many calls at once), or an errcode we do not know, while no
    token is cached: the reply used to be recorded as failed and dead-lettered at its
    first delivery. It is handed back, and delivered once a token comes."""
    system.sim.fail_gettoken(errcode, times=1)
    await system.start_token(TOKEN_MIN_BACKOFF="0.05")
    system.start_sender()
    reply = await system.reply("feng.jiu", "你好")
    await system.log.until_finished(reply.event_id)
    assert system.log.of(DeliveryFailed, reply.event_id) == []
    assert system.sim.messages_to("feng.jiu") == ["你好"]


# ---------------------------------------------------------------- crashes and replicas


async def test_a_restart_resumes_after_the_recorded_parts_and_never_resends(
    system: System,
) -> None:
    parts = split_text(LONG)
    assert len(parts) >= 3
    reply = await system.reply("wu.ba", LONG)
    # a sender crashed after part 0 was accepted and recorded
    await system.record_first_part(reply, len(parts), "msgid-before-crash")
    await system.start_token()
    system.start_sender()
    await system.log.until_finished(reply.event_id)
    assert system.sim.messages_to("wu.ba") == parts[1:]
    [done] = system.log.of(ReplyDelivered, reply.event_id)
    assert isinstance(done, ReplyDelivered)
    assert done.wecom_msgids == ["msgid-before-crash", *(m.msgid for m in system.sim.sent)]

    # every outcome delivered again from scratch (a new consumer): nothing is re-sent
    await system.shutdown()
    await system.js.delete_consumer(topology.CONVERSATION_STREAM, topology.SENDER_CONSUMER)
    sends = system.sim.send_calls
    await system.start_token()
    system.start_sender()
    await _settled(system.js)
    assert system.sim.send_calls == sends
    assert len(system.log.of(ReplyDelivered, reply.event_id)) == 1


async def test_a_reply_started_by_a_sender_that_split_otherwise_goes_on_where_it_ended(
    system: System,
) -> None:
    """A rolling upgrade: the old build cut part 0 before a combining mark (at 1,501),
    where this build would cut at 2,047. Resumed by index, the user lost 546 characters
    and the reply was recorded as delivered; resumed at the recorded end, nothing is
    lost or repeated."""
    text = "x" * 1500 + " \u0301" + "y" * 2000
    assert len(split_text(text)[0]) != 1501
    reply = await system.reply("zheng.shi", text)
    await system.record_first_part(reply, 3, "msgid-old-build", span=(0, 1501))
    await system.start_token()
    system.start_sender()
    await system.log.until_finished(reply.event_id)
    assert text[:1501] + "".join(system.sim.messages_to("zheng.shi")) == text
    parts = system.log.of(PartDelivered, reply.event_id)
    assert [(p.index, p.start, p.end) for p in parts] == [(0, 0, 1501), (1, 1501, len(text))]
    [done] = system.log.of(ReplyDelivered, reply.event_id)
    assert isinstance(done, ReplyDelivered) and done.parts == 2


async def test_two_senders_deliver_every_part_once_in_order_per_user(system: System) -> None:
    system.sim.latency_s = 0.005
    await system.start_token()
    system.start_sender()
    system.start_sender()
    users = [f"user.{i}" for i in range(12)]
    texts = {
        u: [f"{u} 第{j}条" if (i + j) % 3 else f"{u}#{j}\n\n" + LONG for j in range(4)]
        for i, u in enumerate(users)
    }

    async def send_all(user: str) -> list[str]:
        return [(await system.reply(user, t)).event_id for t in texts[user]]

    reply_ids = [r for ids in await asyncio.gather(*map(send_all, users)) for r in ids]
    await system.log.until_finished(*reply_ids, timeout=30)

    for user in users:
        assert system.sim.messages_to(user) == [p for t in texts[user] for p in split_text(t)]
    expected_parts = sum(len(split_text(t)) for ts in texts.values() for t in ts)
    assert system.sim.send_calls == expected_parts
    recorded = [(p.reply_id, p.index) for p in system.log.of(PartDelivered)]
    assert len(recorded) == len(set(recorded)) == expected_parts
    assert len(system.log.of(ReplyDelivered)) == len(reply_ids)
    assert system.sim.gettoken_calls == 1
    await _settled(system.js)


# ---------------------------------------------------------------- the HTTP adapter


async def test_the_adapter_translates_wecom_answers(sim: SimulatedWeComApi) -> None:
    settings = WeComApiSettings(CORP, AGENT, Secret(""), sim.base_url)
    async with httpx.AsyncClient() as http:
        answer = await http.get(
            f"{sim.base_url}/cgi-bin/gettoken", params={"corpid": CORP, "corpsecret": SECRET}
        )
    token = answer.json()["access_token"]
    api = HttpMessageApi(settings, timeout_s=2)
    markdown = HttpMessageApi(settings, timeout_s=2, message_type="markdown")
    try:
        assert await api.send_text(token, "u", "你好") == sim.sent[-1].msgid
        assert await markdown.send_text(token, "u", "**你好**") == sim.sent[-1].msgid
        assert [(m.msgtype, m.content) for m in sim.sent] == [
            ("text", "你好"),
            ("markdown", "**你好**"),
        ]
        async with httpx.AsyncClient() as http:  # the simulator refuses what we never send
            other = await http.post(
                f"{sim.base_url}/cgi-bin/message/send",
                params={"access_token": token},
                json={"touser": "u", "agentid": AGENT, "msgtype": "news", "news": {"content": "x"}},
            )
        assert other.json()["errcode"] == 40008
        with pytest.raises(TokenRejected) as refused:
            await api.send_text("no-such-token", "u", "x")
        assert refused.value.errcode == 40014
        sim.fail_sends_http(502)
        with pytest.raises(SendRetryable, match="HTTP 502"):
            await api.send_text(token, "u", "x")
        sim.reject_user("gone", 82001)
        with pytest.raises(SendRejected) as rejected:
            await api.send_text(token, "gone", "x")
        assert rejected.value.errcode == 82001
    finally:
        await api.aclose()
        await markdown.aclose()
    unreachable = WeComApiSettings(CORP, AGENT, Secret(""), f"http://127.0.0.1:{free_port()}")
    api = HttpMessageApi(unreachable, timeout_s=2)
    try:
        with pytest.raises(SendRetryable, match="cannot reach WeCom") as down:
            await api.send_text(token, "u", "x")
        assert token not in str(down.value)
    finally:
        await api.aclose()
