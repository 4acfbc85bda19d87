"""The sender on a replicated stream (three nats-servers, ``WECOMBOT_STREAM_REPLICAS=3``,
as in production), where an append repeating a recorded ``Nats-Msg-Id`` is answered as a
duplicate before its expected sequence is checked (a single server refuses it as a
conflict first)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats.js import JetStreamContext

from tests.cluster import NatsCluster, until_appendable
from tests.integration.sender.harness import (
    APP,
    StaticTokens,
    delivery_of,
    message_api,
    sim_token,
)
from wecombot_common.bus import append_event, connect_when_ready, disconnect, ensure_topology
from wecombot_common.events import ReplyGenerated
from wecombot_common.settings import EnvReader, NatsSettings
from wecombot_common.sim.wecom_api import SimulatedWeComApi
from wecombot_common.worker import Ack, Lease
from wecombot_sender.handler import DeliveryPolicy, ReplySender
from wecombot_sender.split import split_text

pytestmark = pytest.mark.integration


@pytest.fixture
async def replicated(nats_cluster: NatsCluster) -> AsyncIterator[JetStreamContext]:
    """The streams made as the services make them: a fresh cluster's first replicated
    stream may take longer than one request's timeout to be placed (seen on a loaded CI
    machine), which ``connect_when_ready`` retries, as every service does at start; and
    the first appends may meet no responders (the services' are retried: a 503 to WeCom,
    a nak), so the test starts once one is answered."""
    settings = NatsSettings.read(
        EnvReader({"NATS_URL": ",".join(nats_cluster.urls), "WECOMBOT_STREAM_REPLICAS": "3"})
    )
    async with asyncio.timeout(60):
        ready = await connect_when_ready(
            settings, "test", asyncio.Event(), lambda js: ensure_topology(js, settings)
        )
    assert ready is not None  # nothing sets its stop
    nc, _ = ready
    try:
        await until_appendable(nc.jetstream())
        yield nc.jetstream()
    finally:
        await disconnect(nc, "test")


async def test_a_replica_whose_part_was_recorded_by_another_sends_nothing_twice(
    replicated: JetStreamContext, sim: SimulatedWeComApi
) -> None:
    """Replica A (its hold lapsed) has part 1 accepted, its answer slow; the redelivery,
    on replica B, has WeCom's check drop its copy of part 1, records it, sends and
    records part 2 and finishes. A's record of part 1 then comes back a duplicate: A
    went on with part 2, whose text the log now held, so it skipped the check and the
    user got part 2 twice."""
    user = "two.replicas"
    text = "\n\n".join(c * 1500 for c in "abc")
    parts = split_text(text)
    assert len(parts) == 3
    reply = ReplyGenerated(app=APP, conversation=user, correlation_id="m", text=text)
    stored = await append_event(replicated, reply, msg_id=f"outcome:{reply.event_id}")
    token = await sim_token(sim)
    api = message_api(sim, timeout_s=30)

    async def replica(num_delivered: int, lease: Lease) -> object:
        sender = ReplySender(replicated, StaticTokens(token), api, app=APP, policy=DeliveryPolicy())
        return await sender.handle(
            delivery_of(reply, stored.seq, num_delivered=num_delivered, lease=lease)
        )

    try:
        hold = sim.hold_sends(lambda _user, content: content == parts[1], after_accept=True)
        lapsed = asyncio.create_task(replica(1, Lease(0.0)))
        await hold.wait_held()
        assert await replica(2, Lease(30.0)) == Ack()
        hold.release()
        async with asyncio.timeout(30):
            assert await lapsed == Ack()
    finally:
        await api.aclose()
    assert [m.content for m in sim.sent] == parts
