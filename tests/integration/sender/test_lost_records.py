"""A long-running sender whose cached conversation counts records the log has dropped
(aged out after WECOMBOT_HISTORY_MAX_AGE, past WECOMBOT_HISTORY_MAX_MB, purged)."""

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
from wecombot_common import topology
from wecombot_common.bus import append_event
from wecombot_common.events import ReplyGenerated
from wecombot_common.topology import ConversationRef
from wecombot_common.worker import Ack
from wecombot_sender.handler import DeliveryPolicy, ReplySender

pytestmark = pytest.mark.integration


async def test_a_conversation_whose_records_left_the_log_is_read_again(system: System) -> None:
    """The cached state expected the user's send branch at a sequence the log no longer
    has: every record of the next reply was refused as a conflict, its first part sent
    again at each delivery (WeCom's duplicate check skipped: the window could not be
    read) until it was dead-lettered, and the user's later replies waited behind it."""
    user = "quiet.user"
    conv = ConversationRef(APP, user)
    first, second = (
        ReplyGenerated(**Envelope(app=APP, conversation=user, correlation_id=m), text=t)
        for m, t in (("m1", "第一个回答"), ("m2", "第二个回答"))
    )
    token = await sim_token(system.sim)
    api = message_api(system.sim, timeout_s=2)
    try:
        sender = ReplySender(system.js, StaticTokens(token), api, app=APP, policy=DeliveryPolicy())
        first_seq = (await append_event(system.js, first, msg_id=f"o:{first.event_id}")).seq
        assert await sender.handle(delivery_of(first, first_seq)) == Ack()
        assert sender._cache.cached(conv) is not None  # the process keeps the state
        # The user is quiet; their events leave the log (all of them, as an age would).
        await system.js.purge_stream(topology.CONVERSATION_STREAM, subject=f"{conv.root}.>")
        second_seq = (await append_event(system.js, second, msg_id=f"o:{second.event_id}")).seq
        with capture_logs() as logs:
            assert await sender.handle(delivery_of(second, second_seq)) == Ack()
    finally:
        await api.aclose()
    assert system.sim.messages_to(user) == ["第一个回答", "第二个回答"]
    assert [e["event"] for e in logs if e["event"] == "sender.conversation_rebuilt"] == [
        "sender.conversation_rebuilt"
    ]
