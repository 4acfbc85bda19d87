"""PullWorker against a real nats-server: bounded concurrency, order per key, poison
messages dead-lettered with the reason, in-flight work handed back on stop."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest
from nats.js import JetStreamContext

from tests.waiting import until
from wecombot_common import topology
from wecombot_common.bus import append_event, ensure_topology
from wecombot_common.errors import PermanentError, TransientError
from wecombot_common.events import Event, ReplyGenerated
from wecombot_common.settings import EnvReader, NatsSettings
from wecombot_common.worker import Ack, Delivery, Outcome, PullWorker

pytestmark = pytest.mark.integration


def _config(name: str = "w", *, max_deliver: int = 3, ack_wait: float = 30.0):  # type: ignore[no-untyped-def]
    return topology.work_consumer(
        name, topology.OUTCOME_FILTER, ack_wait_s=ack_wait, max_deliver=max_deliver,
        max_ack_pending=1000,
    )  # fmt: skip


def _reply(user: str, text: str) -> ReplyGenerated:
    return ReplyGenerated(app="ww1-1", conversation=user, correlation_id=text, text=text)


def _key(event: Event) -> str:
    return event.conversation


@pytest.fixture
async def stream(js: JetStreamContext) -> JetStreamContext:
    await ensure_topology(js, NatsSettings.read(EnvReader({})))
    return js


async def test_concurrency_is_bounded_and_order_kept_per_key(stream: JetStreamContext) -> None:
    for i in range(5):
        for user in ("a", "b", "c", "d"):
            await append_event(stream, _reply(user, f"{user}{i}"))
    seen: dict[str, list[str]] = defaultdict(list)
    running = 0
    peak = 0
    release = asyncio.Event()

    async def handle(d: Delivery) -> Outcome:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        if peak >= 3:
            release.set()
        await release.wait()
        assert isinstance(d.event, ReplyGenerated)
        seen[d.event.conversation].append(d.event.text)
        running -= 1
        return Ack()

    stop = asyncio.Event()
    worker = PullWorker(stream, _config(), handle, key=_key, max_concurrency=3)
    task = asyncio.create_task(worker.run(stop))
    await until(
        lambda: sum(map(len, seen.values())) == 20,
        timeout=10,
        what=lambda: f"20 handled: {dict(seen)}",
    )
    stop.set()
    await task
    assert peak == 3
    for user in "abcd":
        assert seen[user] == [f"{user}{i}" for i in range(5)]
    info = await stream.consumer_info(topology.CONVERSATION_STREAM, "w")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_poison_goes_to_the_dead_letter_stream(stream: JetStreamContext) -> None:
    await append_event(stream, _reply("p", "permanent"))
    await append_event(stream, _reply("t", "transient"))
    await stream.publish("wecombot.conv.ww1-1.x.llm.reply", b"not an event")
    await append_event(stream, _reply("ok", "fine"))
    handled: list[str] = []

    async def handle(d: Delivery) -> Outcome:
        assert isinstance(d.event, ReplyGenerated)
        if d.event.text == "permanent":
            raise PermanentError("WeCom refuses this forever")
        if d.event.text == "transient":
            raise TransientError("still down")
        handled.append(d.event.text)
        return Ack()

    stop = asyncio.Event()
    worker = PullWorker(stream, _config(max_deliver=2), handle, max_concurrency=4)
    task = asyncio.create_task(worker.run(stop))

    async def three_dead_letters() -> bool:
        info = await stream.stream_info(topology.DEAD_LETTER_STREAM)
        return int(info.state.messages) >= 3

    await until(three_dead_letters, timeout=20, what="three dead letters")
    stop.set()
    await task
    assert handled == ["fine"]
    reasons = []
    for seq in (1, 2, 3):
        msg = await stream.get_msg(topology.DEAD_LETTER_STREAM, seq)
        assert msg.headers is not None
        reasons.append(msg.headers["Wecombot-Dlq-Reason"])
    assert any("WeCom refuses this forever" in r for r in reasons)
    assert any("gave up after 2" in r and "still down" in r for r in reasons)
    assert any("undecodable" in r for r in reasons)


async def test_stop_hands_running_and_queued_work_back(stream: JetStreamContext) -> None:
    await append_event(stream, _reply("u", "slow"))
    await append_event(stream, _reply("u", "queued behind slow"))
    started = asyncio.Event()

    async def never_finishes(d: Delivery) -> Outcome:
        started.set()
        await asyncio.Event().wait()
        return Ack()

    stop = asyncio.Event()
    worker = PullWorker(stream, _config(), never_finishes, key=_key, max_concurrency=2, grace_s=0.2)
    task = asyncio.create_task(worker.run(stop))
    await started.wait()
    await until(
        lambda: worker.queued("u") != [],
        timeout=10,
        what="a second delivery queued behind the first",
    )
    print("queued", flush=True)  # the second waits for the first's key
    stop.set()
    await task
    got: list[str] = []

    async def quick(d: Delivery) -> Outcome:
        assert isinstance(d.event, ReplyGenerated)
        got.append(d.event.text)
        return Ack()

    stop2 = asyncio.Event()
    task2 = asyncio.create_task(PullWorker(stream, _config(), quick, key=_key).run(stop2))
    # Both handed back with a nak (no ack_wait of 30 s to sit out), in stream order:
    # picked up at once, and in that order.
    await until(
        lambda: got == ["slow", "queued behind slow"],
        timeout=5,
        what=lambda: f"both handed back, in order (got {got})",
    )
    stop2.set()
    await task2
