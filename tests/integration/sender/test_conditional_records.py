"""Every record on a conversation's send branch is appended on the condition that the
branch is as the sender last read it. The ``Nats-Msg-Id`` stops a second copy of the same
record within the duplicate window; only that condition stops a record the log already
holds under another id (another build's, or one made after the window)."""

from __future__ import annotations

import asyncio

import pytest

from tests.integration.sender.harness import (
    APP,
    StaticTokens,
    System,
    delivery_of,
    message_api,
    sim_token,
)
from wecombot_common.bus import append_event
from wecombot_common.events import PartDelivered, ReplyDelivered, ReplyGenerated
from wecombot_common.topology import ConversationRef
from wecombot_common.worker import Ack
from wecombot_sender.handler import DeliveryPolicy, ReplySender

pytestmark = pytest.mark.integration


async def test_a_part_another_replica_recorded_meanwhile_is_not_recorded_again(
    system: System,
) -> None:
    """While this replica's send of the only part waits for WeCom's answer, another
    replica records that part under another id. This one's record is refused (the
    branch moved): it reads the log again, finds the part recorded and finishes the
    reply, one record of the part in all."""
    user = "raced"
    text = "你好，这是唯一的一段。"
    conv = ConversationRef(APP, user)
    reply = ReplyGenerated(app=APP, conversation=user, correlation_id="m", text=text)
    stored = await append_event(system.js, reply, msg_id=f"outcome:{reply.event_id}")
    api = message_api(system.sim, timeout_s=30)
    tokens = StaticTokens(await sim_token(system.sim))
    sender = ReplySender(system.js, tokens, api, app=APP, policy=DeliveryPolicy())
    try:
        hold = system.sim.hold_sends(after_accept=True)
        delivering = asyncio.create_task(sender.handle(delivery_of(reply, stored.seq)))
        await hold.wait_held()
        other = PartDelivered(
            app=APP,
            conversation=user,
            causation_id=reply.event_id,
            correlation_id=reply.correlation_id,
            reply_id=reply.event_id,
            index=0,
            total=1,
            wecom_msgid="the-other-replicas",
            start=0,
            end=len(text),
        )
        await append_event(
            system.js,
            other,
            msg_id="part recorded under another id",
            expect_last_seq=0,
            expect_scope=conv.sender_branch,
        )
        hold.release()
        async with asyncio.timeout(30):
            assert await delivering == Ack()
    finally:
        await api.aclose()
    history = await system.history(user)
    parts = [e for e in history if isinstance(e, PartDelivered)]
    assert [p.wecom_msgid for p in parts] == ["the-other-replicas"]
    assert [type(e) for e in history if isinstance(e, ReplyDelivered)] == [ReplyDelivered]
