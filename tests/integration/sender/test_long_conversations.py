"""A long conversation in a sender replica: its cached state keeps only the newest
delivered replies (``domain.compact``), and a reply it forgot is read again from the log
when a delivery of it comes back, never sent again (real NATS, the simulated WeCom)."""

from __future__ import annotations

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
from wecombot_common.bus import append_event
from wecombot_common.events import ReplyGenerated
from wecombot_common.topology import ConversationRef
from wecombot_common.worker import Ack
from wecombot_sender.domain import RECENT_SENDS_KEPT
from wecombot_sender.handler import ConversationCache, DeliveryPolicy, ReplySender

pytestmark = pytest.mark.integration


async def test_a_reply_the_cached_state_forgot_is_read_again_not_sent_again(
    system: System,
) -> None:
    user = "long.talk"
    conv = ConversationRef(APP, user)
    token = await sim_token(system.sim)
    api = message_api(system.sim)
    cache = ConversationCache(system.js, finished_kept=2)
    sender = ReplySender(
        system.js,
        StaticTokens(token),
        api,
        app=APP,
        policy=DeliveryPolicy(per_user_per_minute=0),  # 70 replies at once: no pacing
        cache=cache,
    )
    replies: list[tuple[ReplyGenerated, int]] = []
    try:
        for i in range(RECENT_SENDS_KEPT + 6):  # the first ones' parts out of the recent
            reply = ReplyGenerated(
                **Envelope(app=APP, conversation=user, correlation_id=f"m{i}"), text=f"答{i}"
            )
            seq = (await append_event(system.js, reply, msg_id=f"outcome:{reply.event_id}")).seq
            assert await sender.handle(delivery_of(reply, seq)) == Ack()
            replies.append((reply, seq))
        state = cache.cached(conv)
        assert state is not None
        assert len(state.outcomes) <= RECENT_SENDS_KEPT + 2
        first, first_seq = replies[0]
        assert state.may_have_forgotten(first.event_id)
        assert 0 < state.pruned_through < state.last_seq

        # The first reply delivered again (its ack lost, a consumer made again…): the
        # state read again from the log says it was delivered; nothing goes out.
        with capture_logs() as logs:
            again = delivery_of(first, first_seq, num_delivered=2)
            assert await sender.handle(again) == Ack()
    finally:
        await api.aclose()
    events = [e["event"] for e in logs]
    assert "sender.conversation_read_again" in events
    assert "sender.already_finished" in events
    sent = system.sim.messages_to(user)
    assert sent == [f"答{i}" for i in range(RECENT_SENDS_KEPT + 6)], "each sent once"
