"""A reply's delivery rounds: its first, and one per ``wecombot dlq replay`` (a
ReplyRequeued), against a real nats-server and the simulated WeCom, the sender run by
hand as two replicas would run it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.integration.sender.harness import (
    AGENT,
    APP,
    Envelope,
    StaticTokens,
    System,
    delivery_of,
    message_api,
    sim_token,
)
from wecombot_common.bus import append_event
from wecombot_common.events import (
    DeliveryFailed,
    Event,
    PartDelivered,
    ReplyDelivered,
    ReplyGenerated,
    ReplyRequeued,
    derived_id,
    failure_of_round,
)
from wecombot_common.sim.wecom_api import SentMessage
from wecombot_common.worker import Ack
from wecombot_sender.handler import DeliveryPolicy, ReplySender
from wecombot_sender.wecom import HttpMessageApi

pytestmark = pytest.mark.integration

SORRY = "抱歉，请稍后再试。"


async def _append(system: System, event: Event, msg_id: str | None = None) -> int:
    return (await append_event(system.js, event, msg_id=msg_id)).seq


def _replica(system: System, token: str, api: HttpMessageApi) -> ReplySender:
    return ReplySender(
        system.js, StaticTokens(token), api, app=APP, policy=DeliveryPolicy(order_wait_s=0.3)
    )


def _round_failed(env: Envelope, reply: ReplyGenerated, requeue: str = "") -> DeliveryFailed:
    """The DeliveryFailed that ends a round of ``reply`` (its first, or ``requeue``'s)."""
    return DeliveryFailed(
        **env,
        event_id=failure_of_round(reply.event_id, requeue),
        causation_id=reply.event_id,
        reply_id=reply.event_id,
        errcode=-1,
        reason="gave up after 20 deliveries: no answer from WeCom",
        parts_delivered=0,
    )


def _requeue(env: Envelope, reply: ReplyGenerated, failed: DeliveryFailed) -> ReplyRequeued:
    """The ReplyRequeued ``wecombot dlq replay`` appends for that failed round."""
    return ReplyRequeued(
        **env, causation_id=failed.event_id, reply_id=reply.event_id, reason="wecombot dlq replay"
    )


async def _delivered_alike(system: System, user: str) -> None:
    """A later reply of the same text, delivered (the same apology twice): the duplicate
    check cannot tell a repeat of the failed reply from it, so its rounds send unchecked."""
    env = Envelope(app=APP, conversation=user, correlation_id="later")
    later = ReplyGenerated(**env, text=SORRY)
    done: dict[str, Any] = {"causation_id": later.event_id, "reply_id": later.event_id}
    part = PartDelivered(
        **env, **done, index=0, total=1, wecom_msgid="w-later", start=0, end=len(SORRY)
    )
    for event in (later, part, ReplyDelivered(**env, **done, parts=1, wecom_msgids=["w-later"])):
        await _append(system, event)
    system.sim.sent.append(
        SentMessage(
            touser=user,
            agentid=AGENT,
            content=SORRY,
            msgid="w-later",
            truncated=False,
            at=part.occurred_at.timestamp(),
        )
    )


@pytest.mark.parametrize("redelivered", ["older requeue", "reply"])
async def test_a_round_a_newer_requeue_took_over_is_settled_unsent(
    system: System, redelivered: str
) -> None:
    """The reply failed, was replayed (RQ1), failed again, and was replayed again (RQ2).
    The broker then delivers RQ1 (or the reply itself) once more (the replica that
    parked it died before acking it) while another replica delivers RQ2, its send
    accepted, WeCom's answer still on its way. Both rounds sent the reply: the user got
    it twice (its text is the later reply's, so neither could ask the duplicate check).
    The older one is settled unsent; RQ2's round delivers the reply, once."""
    user = f"requeue.superseded.{redelivered.split()[0]}"
    env = Envelope(app=APP, conversation=user, correlation_id="lost")
    reply = ReplyGenerated(**env, text=SORRY)
    reply_seq = await _append(system, reply, f"outcome:{reply.event_id}")
    first_failed = _round_failed(env, reply)
    await _append(system, first_failed)
    older = _requeue(env, reply, first_failed)
    older_seq = await _append(system, older, f"requeue:{first_failed.event_id}")
    older_failed = _round_failed(env, reply, older.event_id)
    await _append(system, older_failed)
    await _delivered_alike(system, user)
    newer = _requeue(env, reply, older_failed)
    newer_seq = await _append(system, newer, f"requeue:{older_failed.event_id}")

    token = await sim_token(system.sim)
    api = message_api(system.sim, timeout_s=10)
    try:
        hold = system.sim.hold_sends(lambda to, _text: to == user, after_accept=True)
        newest = asyncio.create_task(
            _replica(system, token, api).handle(delivery_of(newer, newer_seq))
        )
        await hold.wait_held()
        again = (
            delivery_of(older, older_seq, num_delivered=2)
            if redelivered == "older requeue"
            else delivery_of(reply, reply_seq, num_delivered=2)
        )
        with capture_logs() as logs:
            settled = await _replica(system, token, api).handle(again)
        hold.release()
        assert await newest == Ack()
    finally:
        await api.aclose()

    assert settled == Ack()
    assert system.sim.messages_to(user) == [SORRY, SORRY]  # the later reply's, and this one
    assert "sender.requeue_superseded" in [e["event"] for e in logs]
    # The test's copy of the log follows the stream (its rounds' failures are in it already)
    await system.log.until(lambda: bool(system.log.of(ReplyDelivered, reply.event_id)))
    [done] = system.log.of(ReplyDelivered, reply.event_id)
    assert done.event_id == derived_id(reply.event_id, "delivered", newer.event_id)


async def test_a_requeue_delivered_again_after_its_round_ended_sends_nothing(
    system: System,
) -> None:
    """Its round delivered the reply; the broker delivers the requeue once more (its ack
    lost): acknowledged, nothing sent again."""
    user = "requeue.redelivered"
    env = Envelope(app=APP, conversation=user, correlation_id="lost")
    reply = ReplyGenerated(**env, text="重新投递的回复")
    await _append(system, reply, f"outcome:{reply.event_id}")
    failed = _round_failed(env, reply)
    await _append(system, failed)
    requeue = _requeue(env, reply, failed)
    requeue_seq = await _append(system, requeue, f"requeue:{failed.event_id}")
    token = await sim_token(system.sim)
    api = message_api(system.sim)
    try:
        first = _replica(system, token, api)
        assert await first.handle(delivery_of(requeue, requeue_seq)) == Ack()
        other = _replica(system, token, api)
        assert await other.handle(delivery_of(requeue, requeue_seq, num_delivered=2)) == Ack()
    finally:
        await api.aclose()
    assert system.sim.messages_to(user) == [reply.text]
    await system.log.until(lambda: bool(system.log.of(ReplyDelivered, reply.event_id)))
    assert len(system.log.of(ReplyDelivered, reply.event_id)) == 1
