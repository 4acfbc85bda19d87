"""PullWorker against a real nats-server: bounded concurrency, order per key, poison
messages dead-lettered with the reason, in-flight work handed back on stop, and a message
whose last allowed delivery ends without an outcome dead-lettered, never dropped."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from tests.conftest import NatsHandle
from tests.waiting import until
from wecombot_common import topology
from wecombot_common.bus import append_event, connect, ensure_topology
from wecombot_common.errors import PermanentError, TransientError
from wecombot_common.events import Event, ReplyGenerated, decode_event, encode_event
from wecombot_common.settings import EnvReader, NatsSettings
from wecombot_common.worker import (
    Ack,
    Delivery,
    HandBack,
    Handler,
    Nak,
    Outcome,
    PullWorker,
    Slot,
)

pytestmark = pytest.mark.integration


def _config(name: str = "w", *, ack_wait: float = 30.0):  # type: ignore[no-untyped-def]
    return topology.work_consumer(
        name, topology.OUTCOME_FILTER, ack_wait_s=ack_wait, max_ack_pending=1000
    )


def _reply(user: str, text: str) -> ReplyGenerated:
    return ReplyGenerated(app="ww1-1", conversation=user, correlation_id=text, text=text)


def _key(event: Event) -> str:
    return event.conversation


def _never_finishing() -> tuple[asyncio.Event, Handler]:
    """A handler that never returns, and the event it sets once it has started."""
    started = asyncio.Event()

    async def never_finishes(d: Delivery) -> Outcome:
        started.set()
        await asyncio.Event().wait()
        return Ack()

    return started, never_finishes


@pytest.fixture
async def stream(js: JetStreamContext) -> JetStreamContext:
    await ensure_topology(js, NatsSettings.read(EnvReader({})))
    return js


async def test_concurrency_is_bounded_and_order_kept_per_key(stream: JetStreamContext) -> None:
    seqs: dict[str, int] = {}
    for i in range(5):
        for user in ("a", "b", "c", "d"):
            seqs[f"{user}{i}"] = (await append_event(stream, _reply(user, f"{user}{i}"))).seq
    seen: dict[str, list[str]] = defaultdict(list)
    inside: set[str] = set()  # keys whose handler is running
    overlapped: list[str] = []
    running = peak = 0
    release_a0 = asyncio.Event()

    async def handle(d: Delivery) -> Outcome:
        nonlocal running, peak
        assert isinstance(d.event, ReplyGenerated)
        key, text = d.event.conversation, d.event.text
        if key in inside:
            overlapped.append(text)
        inside.add(key)
        running += 1
        peak = max(peak, running)
        if text == "a0":
            await release_a0.wait()  # the first of "a" holds on
        else:
            await asyncio.sleep(0)
        seen[key].append(text)
        inside.discard(key)
        running -= 1
        return Ack()

    stop = asyncio.Event()
    worker = PullWorker(stream, _config(), handle, max_deliver=3, key=_key, max_concurrency=3)
    task = asyncio.create_task(worker.run(stop))
    # a0 holds on; the rest of "a" queue behind it without a slot (one user's burst held
    # up everyone else's messages when they kept theirs), so every other key is done.
    await until(
        lambda: sum(map(len, seen.values())) == 15,
        timeout=10,
        what=lambda: f"b, c and d handled while a0 holds on (seen {dict(seen)})",
    )
    assert worker.queued("a") == [seqs[f"a{i}"] for i in range(1, 5)]
    info = await stream.consumer_info(topology.CONVERSATION_STREAM, "w")
    assert info.num_ack_pending == 5, "a0 held, a1-a4 queued behind it"
    assert (running, inside) == (1, {"a"}), "a1 to a4 wait outside the handler"
    assert REGISTRY.get_sample_value("wecombot_worker_waiting", {"consumer": "w"}) == 4
    release_a0.set()
    await until(
        lambda: sum(map(len, seen.values())) == 20,
        timeout=10,
        what=lambda: f"20 handled: {dict(seen)}",
    )
    stop.set()
    await task
    assert overlapped == [] and peak <= 3
    for user in "abcd":
        assert seen[user] == [f"{user}{i}" for i in range(5)]
    info = await stream.consumer_info(topology.CONVERSATION_STREAM, "w")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_deliveries_waiting_without_a_slot_are_bounded(stream: JetStreamContext) -> None:
    """ROOM_FACTOR deliveries per slot at most in the process: for two slots, one held
    and seven queued behind it; the rest of its key and another key's message stay in
    the stream until the first is done."""
    seqs = [(await append_event(stream, _reply("a", f"a{i}"))).seq for i in range(10)]
    await append_event(stream, _reply("b", "b0"))
    seen: list[str] = []
    release = asyncio.Event()

    async def handle(d: Delivery) -> Outcome:
        assert isinstance(d.event, ReplyGenerated)
        if d.event.text == "a0":
            await release.wait()
        seen.append(d.event.text)
        return Ack()

    stop = asyncio.Event()
    worker = PullWorker(stream, _config(), handle, max_deliver=3, key=_key, max_concurrency=2)
    assert worker.ROOM_FACTOR == 4
    task = asyncio.create_task(worker.run(stop))
    await until(
        lambda: worker.queued("a") == seqs[1:8],
        timeout=10,
        what=lambda: f"a1-a7 queued behind a0 (queued {worker.queued('a')})",
    )
    info = await stream.consumer_info(topology.CONVERSATION_STREAM, "w")
    assert info.num_ack_pending == 8 and seen == []
    assert worker.in_flight == 8
    release.set()
    await until(lambda: len(seen) == 11, timeout=10, what=lambda: f"all 11 handled: {seen}")
    stop.set()
    await task
    assert seen == [f"a{i}" for i in range(10)] + ["b0"]


async def test_the_consumers_backlog_is_in_the_services_metrics(stream: JetStreamContext) -> None:
    """Lag was visible only on NATS's monitoring port, which KEDA alone may reach: now
    each replica reads it (pending, unsettled, the oldest unsettled message's age)."""

    def sample(name: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"consumer": "w"})

    first = await append_event(stream, _reply("a", "held"))
    for i in range(3):
        await append_event(stream, _reply(f"u{i}", "waits"))
    release = asyncio.Event()

    async def handle(d: Delivery) -> Outcome:
        await release.wait()
        return Ack()

    stop = asyncio.Event()
    worker = PullWorker(
        stream, _config(), handle, max_deliver=3, max_concurrency=1, backlog_every_s=0.05
    )
    task = asyncio.create_task(worker.run(stop))
    await until(
        lambda: (
            (sample("wecombot_consumer_pending"), sample("wecombot_consumer_ack_pending")) == (3, 1)
        ),
        timeout=10,
        what="3 messages waiting, 1 unsettled",
    )
    stored = await stream.get_msg(topology.CONVERSATION_STREAM, first.seq)
    assert stored.time is not None
    oldest = sample("wecombot_consumer_oldest_unsettled_seconds")
    assert oldest is not None and 0 < oldest <= time.time() - stored.time.timestamp() + 1
    release.set()
    await until(
        lambda: (
            (sample("wecombot_consumer_pending"), sample("wecombot_consumer_ack_pending")) == (0, 0)
            and sample("wecombot_consumer_oldest_unsettled_seconds") == 0
        ),
        timeout=10,
        what="the backlog cleared",
    )
    stop.set()
    await task


async def test_a_delivery_back_from_an_idle_wait_works_only_with_a_slot(
    stream: JetStreamContext,
) -> None:
    """Its slot serves another delivery while it waits; back to work, it waits for a
    slot: working on without one, a replica ran more handlers at once than its
    concurrency limit."""
    for user in ("a", "b"):
        await append_event(stream, _reply(user, user))
    working = peak = 0
    b_working = asyncio.Event()

    async def work(seconds: float) -> None:
        nonlocal working, peak
        working += 1
        peak = max(peak, working)
        if not b_working.is_set():
            b_working.set()  # (a is idle: this is b)
        await asyncio.sleep(seconds)
        working -= 1

    async def handle(d: Delivery) -> Outcome:
        assert isinstance(d.event, ReplyGenerated)
        if d.event.text == "a":
            async with d.idle():  # its slot goes to b meanwhile
                await b_working.wait()
            await work(0.05)
        else:
            await work(0.3)
        return Ack()

    stop = asyncio.Event()
    worker = PullWorker(stream, _config(), handle, max_deliver=3, key=_key, max_concurrency=1)
    task = asyncio.create_task(worker.run(stop))
    await until(lambda: worker.processed == 2, timeout=10, what="both acked")
    stop.set()
    await task
    assert peak == 1


async def test_a_retry_comes_back_after_the_delay_its_handler_asked_for(
    stream: JetStreamContext,
) -> None:
    """A Nak's delay paces the retries (WeCom busy, a model down): nak'ed for at once,
    the message would come straight back and spend its deliveries in a burst."""
    await append_event(stream, _reply("a", "x"))
    at: list[float] = []

    async def handle(d: Delivery) -> Outcome:
        at.append(time.monotonic())
        return Nak(1.0, "WeCom is busy") if d.num_delivered == 1 else Ack()

    stop = asyncio.Event()
    worker = PullWorker(stream, _config(), handle, max_deliver=3)
    task = asyncio.create_task(worker.run(stop))
    await until(lambda: worker.processed == 1, timeout=10, what="the retry acked")
    stop.set()
    await task
    assert len(at) == 2 and at[1] - at[0] >= 0.9, at


async def test_a_retry_of_a_delivery_held_across_a_reconnection_goes_out_at_once(
    stream: JetStreamContext, nats_server: NatsHandle
) -> None:
    """Lapsed by a reconnection alone (a failover; its heartbeats kept up), the delivery
    is usually still ours: its handler's Nak goes out as ever and the message comes
    again after the delay asked, not after ack_wait (which stalled every conversation
    in flight)."""
    host, port = nats_server.url.removeprefix("nats://").rsplit(":", 1)
    stall = _OneWayStall((host, int(port)))
    nc = await nats.connect(await stall.start(), max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    seen: list[int] = []
    held: list[Delivery] = []
    started, finish = asyncio.Event(), asyncio.Event()

    async def handle(d: Delivery) -> Outcome:
        seen.append(d.num_delivered)
        if d.num_delivered > 1:
            return Ack()
        held.append(d)
        started.set()
        await finish.wait()
        return Nak(0.0, "WeCom is busy")

    stop = asyncio.Event()
    worker = PullWorker(
        nc.jetstream(), _config(), handle, max_deliver=5, fetch_timeout_s=0.2, connection=nc
    )
    with capture_logs() as logs:
        task = asyncio.create_task(worker.run(stop))
        try:
            await _until_fetching(stream)
            appended = await append_event(stream, _reply("u", "x"))
            await until(started.is_set, timeout=10, what="the handler started")
            stall.cut()
            await until(lambda: not nc.is_connected, timeout=10, what="the link gone")
            stall.down = False
            await until(lambda: nc.is_connected, timeout=10, what="the link back")
            [delivery] = held
            assert delivery.lapsed and not delivery.lease.overdue
            finish.set()
            await until(lambda: worker.processed == 1, timeout=10, what=lambda: f"{seen}")
        finally:
            finish.set()
            stop.set()
            await task
            await nc.close()
            await stall.close()
    assert seen == [1, 2]
    assert not [e for e in logs if e["event"] == "worker.left_to_ack_wait"]
    await _settled(stream, appended.seq)


async def test_a_hand_back_of_a_stopping_handler_is_no_retry(stream: JetStreamContext) -> None:
    """A handler that hands its delivery back as its service stops (HandBack) is counted
    and logged as a hand-back, not as a retry (rising retries mean WeCom or the log are
    failing), and the message comes again at once."""

    def count(result: str) -> float:
        return (
            REGISTRY.get_sample_value(
                "wecombot_worker_settled_total", {"consumer": "w", "result": result}
            )
            or 0.0
        )

    await append_event(stream, _reply("a", "x"))
    deliveries: list[int] = []

    async def handle(d: Delivery) -> Outcome:
        deliveries.append(d.num_delivered)
        return HandBack("stopping") if d.num_delivered == 1 else Ack()

    retried, handed_back = count("retried"), count("handed_back")
    stop = asyncio.Event()
    worker = PullWorker(stream, _config(), handle, max_deliver=3)
    with capture_logs() as logs:
        task = asyncio.create_task(worker.run(stop))
        await until(lambda: deliveries == [1, 2], timeout=10, what=lambda: f"{deliveries}")
        await until(lambda: worker.processed == 1, timeout=10, what="the second acked")
        stop.set()
        await task
    assert (count("retried"), count("handed_back")) == (retried, handed_back + 1)
    events = [e["event"] for e in logs]
    assert "worker.handed_back" in events and "worker.retry" not in events


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
    worker = PullWorker(stream, _config(), handle, max_deliver=2, max_concurrency=4)
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


async def test_an_event_of_no_wecom_user_is_parked_before_it_is_handled(
    stream: JetStreamContext,
) -> None:
    """Appended by hand or by a faulty build (the gateway refuses such a FromUserName):
    handled, the outcome's subject for a 1,330-dot user passed the broker's control line
    limit, nats-py closed the connection for good, and the service answered nobody."""
    await append_event(stream, _reply("." * 1330, "for nobody"))
    assert await _parked_before_the_next_is_handled(stream) == (
        "the conversation '...........................................' is not a WeCom UserID"
    )


async def _parked_before_the_next_is_handled(
    stream: JetStreamContext, worker_type: type[PullWorker] = PullWorker, *, max_deliver: int = 2
) -> str:
    """Append a good reply after what the test appended, run a worker until the good one
    is handled and the other parked, unhandled (at its first delivery); the dead letter's
    reason."""
    await append_event(stream, _reply("ok", "fine"))
    handled: list[str] = []

    async def handle(d: Delivery) -> Outcome:
        handled.append(d.event.conversation)
        return Ack()

    stop = asyncio.Event()
    worker = worker_type(stream, _config(), handle, max_deliver=max_deliver, max_concurrency=4)
    task = asyncio.create_task(worker.run(stop))
    await until(lambda: handled == ["ok"], timeout=20, what="the next user's reply handled")
    await until(lambda: _one_dead_letter(stream), timeout=20, what="the other one parked")
    stop.set()
    await task
    assert handled == ["ok"]
    [letter] = await _dead_letters(stream)
    assert letter["Wecombot-Dlq-Deliveries"] == "1"
    return letter["Wecombot-Dlq-Reason"]


async def test_an_event_filed_on_another_subject_is_parked_before_it_is_handled(
    stream: JetStreamContext,
) -> None:
    """Appended by hand or by a faulty build: the body decides who is answered, so an
    outcome filed on zhang.san's subject naming li.si was delivered to li.si."""
    misfiled = _reply("li.si", "for li.si, filed on zhang.san")
    await stream.publish("wecombot.conv.ww1-1.zhang~2Esan.llm.reply", encode_event(misfiled))
    assert await _parked_before_the_next_is_handled(stream) == (
        "a ReplyGenerated filed on 'wecombot.conv.ww1-1.zhang~2Esan.llm.reply': its "
        "conversation and type belong on 'wecombot.conv.ww1-1.li~2Esi.llm.reply'"
    )


async def test_an_event_with_an_empty_app_is_parked_before_it_is_handled(
    stream: JetStreamContext,
) -> None:
    """Its subject could not be worked out (an empty subject token): the check for a
    misfiled event raised out of the task, which died unseen; the message came back
    each ack_wait and was parked at last "past the limit", for a crash that never was."""
    body = {**msgspec.to_builtins(_reply("e", "no app")), "app": ""}
    await stream.publish("wecombot.conv.ww1-1.e.llm.reply", msgspec.json.encode(body))
    reason = await _parked_before_the_next_is_handled(stream)
    assert reason == "undecodable event: Expected `str` of length >= 1 - at `$.app`"


async def test_a_defect_reading_a_delivery_parks_it_with_the_reason(
    stream: JetStreamContext,
) -> None:
    """Whatever goes wrong before the handler runs is no task dying unseen: the message
    is parked at once with what went wrong, and the worker goes on."""

    class Defective(PullWorker):
        async def _delivery(self, msg: Msg, slot: Slot | None = None) -> Delivery | None:
            event = decode_event(msg.data)
            if event.conversation == "odd":
                raise ValueError("a defect")
            return await super()._delivery(msg, slot)

    await append_event(stream, _reply("odd", "meets the defect"))
    with capture_logs() as logs:
        reason = await _parked_before_the_next_is_handled(stream, Defective, max_deliver=5)
    assert reason == "unexpected ValueError reading it: a defect"
    assert [e["stream_seq"] for e in logs if e["event"] == "worker.unreadable_delivery"] == [1]


async def test_an_event_of_a_newer_build_is_handed_back_for_a_newer_replica(
    stream: JetStreamContext,
) -> None:
    """During a rolling upgrade a newer build writes a type (or version) this one lacks:
    not poison. Each old replica hands it back, with backoff, for a new one; with no new
    replica, it is parked at its last delivery, as it was, saying what to do."""
    newer = b'{"type":"ReplyRetracted","version":1,"app":"ww1-1","conversation":"n"}'
    reshaped = msgspec.json.encode({**msgspec.to_builtins(_reply("n", "v2")), "version": 2})
    for data in (newer, reshaped):
        await stream.publish("wecombot.conv.ww1-1.n.llm.reply", data)
    old_handled: list[str] = []

    async def handle(d: Delivery) -> Outcome:
        old_handled.append(type(d.event).__name__)
        return Ack()

    stop = asyncio.Event()
    worker = PullWorker(stream, _config(), handle, max_deliver=3, max_concurrency=4)
    with capture_logs() as logs:
        started = time.monotonic()
        task = asyncio.create_task(worker.run(stop))

        async def parked() -> bool:
            info = await stream.stream_info(topology.DEAD_LETTER_STREAM)
            return int(info.state.messages) == 2

        await until(parked, timeout=30, what="both parked at their third delivery")
        elapsed = time.monotonic() - started
        stop.set()
        await task
    assert old_handled == []
    # Handed back with backoff (at least 0.5 s, then 1 s: the broker holds a nak's delay),
    # not at once: a rollout would burn a message's deliveries in milliseconds.
    assert elapsed >= 1.0, elapsed
    handed_back = [e for e in logs if e["event"] == "worker.newer_event"]
    assert sorted(e["delivery"] for e in handed_back) == [1, 1, 2, 2]
    reasons, parked_data = [], set()
    for seq in (1, 2):
        msg = await stream.get_msg(topology.DEAD_LETTER_STREAM, seq)
        assert msg.headers is not None
        reasons.append(msg.headers["Wecombot-Dlq-Reason"])
        parked_data.add(msg.data)
    assert parked_data == {newer, reshaped}
    assert any("'ReplyRetracted' (version 1) is unknown to this build" in r for r in reasons)
    assert any("'ReplyGenerated' (version 2) is newer than this build's 1" in r for r in reasons)
    assert all("once every replica is upgraded" in r for r in reasons)
    info = await stream.consumer_info(topology.CONVERSATION_STREAM, "w")
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_the_handler_is_told_which_delivery_is_the_last(stream: JetStreamContext) -> None:
    # The handlers (llm, sender) act differently on the last try; the worker is the one
    # that knows the limit, so it says so, rather than each handler keeping a copy of it.
    await append_event(stream, _reply("l", "keeps failing"))
    tries: list[tuple[int, bool]] = []

    async def handle(d: Delivery) -> Outcome:
        tries.append((d.num_delivered, d.last_try))
        return Nak(0.0, "not yet")

    stop = asyncio.Event()
    task = asyncio.create_task(PullWorker(stream, _config(), handle, max_deliver=3).run(stop))

    async def dead_lettered() -> bool:
        info = await stream.stream_info(topology.DEAD_LETTER_STREAM)
        return int(info.state.messages) == 1

    await until(dead_lettered, timeout=20, what=lambda: f"a dead letter (tries {tries})")
    stop.set()
    await task
    assert tries == [(1, False), (2, False), (3, True)]


async def test_the_handler_is_told_when_the_broker_stored_the_message(
    stream: JetStreamContext,
) -> None:
    """Not when it was delivered (as nats-py's docstring of the metadata says): the llm
    tells a message stored after its cached fold began from one it has read."""
    before = time.time()
    await append_event(stream, _reply("t", "stored once"))
    after = time.time()
    stored: list[float | None] = []

    async def handle(d: Delivery) -> Outcome:
        stored.append(d.stored_at)
        return Nak(0.0, "again") if len(stored) == 1 else Ack()

    stop = asyncio.Event()
    task = asyncio.create_task(PullWorker(stream, _config(), handle, max_deliver=3).run(stop))
    await until(lambda: len(stored) == 2, timeout=20, what="a delivery and a redelivery")
    stop.set()
    await task
    first, again = stored
    assert first is not None and before - 1 <= first <= after + 1
    assert again == first


async def test_stop_hands_running_and_queued_work_back(stream: JetStreamContext) -> None:
    await append_event(stream, _reply("u", "slow"))
    await append_event(stream, _reply("u", "queued behind slow"))
    started, never_finishes = _never_finishing()

    stop = asyncio.Event()
    worker = PullWorker(
        stream, _config(), never_finishes, max_deliver=3, key=_key, max_concurrency=2, grace_s=0.2
    )
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
    task2 = asyncio.create_task(
        PullWorker(stream, _config(), quick, max_deliver=3, key=_key).run(stop2)
    )
    # Both handed back with a nak (no ack_wait of 30 s to sit out), in stream order:
    # picked up at once, and in that order.
    await until(
        lambda: got == ["slow", "queued behind slow"],
        timeout=5,
        what=lambda: f"both handed back, in order (got {got})",
    )
    stop2.set()
    await task2


# ------------------------------------------------- the last allowed delivery
# JetStream's own max_deliver drops a message whose last delivery is nak'ed or never
# acknowledged: no redelivery, no dead letter, and the consumer's ack floor stays below
# it for good. The worker enforces the limit itself instead; each test below loses the
# message when the consumer's max_deliver is the limit.


async def _dead_letters(js: JetStreamContext) -> list[dict[str, str]]:
    info = await js.stream_info(topology.DEAD_LETTER_STREAM)
    letters = []
    for seq in range(int(info.state.first_seq), int(info.state.last_seq) + 1):
        msg = await js.get_msg(topology.DEAD_LETTER_STREAM, seq)
        letters.append(dict(msg.headers or {}))
    return letters


async def _one_dead_letter(js: JetStreamContext) -> bool:
    info = await js.stream_info(topology.DEAD_LETTER_STREAM)
    return int(info.state.messages) == 1


async def _until_fetching(js: JetStreamContext, name: str = "w") -> None:
    """Until the worker has a pull request waiting at the broker."""

    async def fetching() -> bool:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            info = await js.consumer_info(topology.CONVERSATION_STREAM, name)
            return info.num_waiting > 0
        return False

    await until(fetching, timeout=10, what=f"{name}'s first pull request")


async def _served_and_held(
    stall: _OneWayStall, js: JetStreamContext, *, count: int, held: int
) -> list[int]:
    """Hold what the broker sends, append ``count`` messages, and wait until at least
    ``held`` of them were served (and are held); their stream sequences."""
    stall.holding = True
    seqs = [(await append_event(js, _reply(f"u{i}", str(i)))).seq for i in range(count)]
    await until(
        lambda: stall.held.count(b'"ReplyGenerated"') >= held,
        timeout=20,
        what=lambda: f"{held} messages served and held ({stall.held.count(b'ReplyGenerated')})",
    )
    return seqs


async def _settled(js: JetStreamContext, seq: int, name: str = "w") -> None:
    """Nothing of the consumer's is pending any more, and its ack floor is past ``seq``."""
    info = await js.consumer_info(topology.CONVERSATION_STREAM, name)
    assert (info.num_pending, info.num_ack_pending) == (0, 0)
    assert info.ack_floor is not None and info.ack_floor.stream_seq >= seq


async def _parked_by_a_new_worker(js: JetStreamContext, seq: int) -> None:
    """A fresh worker receives the message past the limit: it hands it back for one
    ack_wait (in case its last holder still finishes), then dead-letters it, never
    running its handler."""
    handled: list[int] = []

    async def handle(d: Delivery) -> Outcome:
        handled.append(d.stream_seq)
        return Ack()

    stop = asyncio.Event()
    task = asyncio.create_task(
        PullWorker(js, _config(ack_wait=1.0), handle, max_deliver=1).run(stop)
    )
    await until(lambda: _one_dead_letter(js), timeout=15, what="the message dead-lettered")
    stop.set()
    await task
    assert handled == []
    [letter] = await _dead_letters(js)
    assert letter["Wecombot-Dlq-Stream-Seq"] == str(seq)
    assert letter["Wecombot-Dlq-Deliveries"] == "3"
    assert "past the limit of 1" in letter["Wecombot-Dlq-Reason"]
    await _settled(js, seq)


async def test_a_message_stopped_during_its_last_delivery_is_dead_lettered(
    stream: JetStreamContext,
) -> None:
    appended = await append_event(stream, _reply("u", "slow"))
    started, never_finishes = _never_finishing()

    stop = asyncio.Event()
    worker = PullWorker(stream, _config(ack_wait=1.0), never_finishes, max_deliver=1, grace_s=0)
    task = asyncio.create_task(worker.run(stop))
    await started.wait()
    stop.set()
    await task  # handed back with a nak on its only allowed delivery
    await _parked_by_a_new_worker(stream, appended.seq)


async def test_a_message_whose_process_dies_in_its_last_delivery_is_dead_lettered(
    nats_server: NatsHandle, stream: JetStreamContext
) -> None:
    appended = await append_event(stream, _reply("u", "crash"))
    doomed = await nats.connect(nats_server.url, max_reconnect_attempts=0)
    started, never_finishes = _never_finishing()

    worker = PullWorker(
        doomed.jetstream(), _config(ack_wait=1.0), never_finishes, max_deliver=1, grace_s=0
    )
    task = asyncio.create_task(worker.run(asyncio.Event()))
    await started.wait()
    # The process dies: its connection goes first, so nothing is nak'ed or acknowledged
    # and the delivery runs out its ack_wait on the server.
    await doomed.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await _parked_by_a_new_worker(stream, appended.seq)


async def test_a_failed_dead_lettering_on_the_last_delivery_is_tried_again(
    stream: JetStreamContext,
) -> None:
    appended = await append_event(stream, _reply("p", "poison"))
    await stream.delete_stream(topology.DEAD_LETTER_STREAM)  # dead-lettering fails

    async def refuse(d: Delivery) -> Outcome:
        raise PermanentError("WeCom refuses this forever")

    stop = asyncio.Event()
    worker = PullWorker(stream, _config(ack_wait=1.0), refuse, max_deliver=1)
    worker.DEAD_LETTER_RETRY_S = 0.1
    with capture_logs() as logs:
        task = asyncio.create_task(worker.run(stop))
        await until(
            lambda: sum(e["event"] == "worker.dead_letter_failed" for e in logs) >= 2,
            timeout=15,
            what="two failed dead-letterings",
        )
        await ensure_topology(stream, NatsSettings.read(EnvReader({})))
        await until(lambda: _one_dead_letter(stream), timeout=15, what="the message parked")
        stop.set()
        await task
    [letter] = await _dead_letters(stream)
    assert letter["Wecombot-Dlq-Stream-Seq"] == str(appended.seq)
    assert "past the limit of 1" in letter["Wecombot-Dlq-Reason"]
    await _settled(stream, appended.seq)


async def test_a_holder_that_lost_its_hold_on_the_last_delivery_may_still_finish(
    nats_server: NatsHandle, stream: JetStreamContext
) -> None:
    """Parked at once, the message past the limit was dead-lettered (and its ack floor
    passed) while the replica that had only lost its hold was still handling it."""
    appended = await append_event(stream, _reply("u", "slow but alive"))
    worker_config = _config(ack_wait=1.0)
    await stream.add_consumer(topology.CONVERSATION_STREAM, worker_config)
    holder = await stream.pull_subscribe_bind(durable="w", stream=topology.CONVERSATION_STREAM)
    [held] = await holder.fetch(1, timeout=5)  # its only allowed delivery; no heartbeats

    async def never(d: Delivery) -> Outcome:
        raise AssertionError("past the limit: never handled again")

    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(
            PullWorker(stream, worker_config, never, max_deliver=1).run(stop)
        )
        await until(
            lambda: any(e["event"] == "worker.past_limit_grace" for e in logs),
            timeout=15,
            what="the redelivery past the limit handed back for one ack_wait",
        )
        await held.ack_sync()  # the holder finishes after all
        stop.set()
        await task
    assert int((await stream.stream_info(topology.DEAD_LETTER_STREAM)).state.messages) == 0
    await _settled(stream, appended.seq)


class _OneWayStall:
    """A TCP proxy to nats-server that can hold what the server sends (``holding``: a
    link stalled in one direction) while the client's requests still go through, or
    hold what the client sends (``holding_up``: a dead path towards the broker, no reset,
    the client none the wiser) while the server's messages still arrive."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self._upstream = upstream
        self.holding = False
        self.held = bytearray()
        self.holding_up = False
        self.held_up = bytearray()
        self._client: asyncio.StreamWriter | None = None
        self._broker: asyncio.StreamWriter | None = None
        self._server: asyncio.Server | None = None
        self._pumps: list[asyncio.Task[None]] = []
        self.down = False  # the link cut: new connections closed at once (cut())

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        self._client, self._broker = writer, up_writer
        self._pumps += [
            asyncio.create_task(self._pump(reader, up_writer, down=False)),
            asyncio.create_task(self._pump(up_reader, writer, down=True)),
        ]

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, down: bool
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                if down and self.holding:
                    self.held += data
                    continue
                if not down and self.holding_up:
                    self.held_up += data
                    continue
                sink.write(data)
                await sink.drain()
        sink.close()

    def release(self) -> None:
        """Send on what was held, in order, before anything newer (no await in between)."""
        assert self._client is not None
        self.holding = False
        self._client.write(bytes(self.held))
        self.held.clear()

    def cut(self) -> None:
        """Drop the link (both sides closed), and every new one until ``down`` is False."""
        self.down = True
        for writer in (self._client, self._broker):
            if writer is not None:
                writer.close()

    def release_up(self) -> None:
        """As ``release``, towards the broker."""
        assert self._broker is not None
        self.holding_up = False
        self._broker.write(bytes(self.held_up))
        self.held_up.clear()

    async def close(self) -> None:
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        for writer in (self._client, self._broker):
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def test_deliveries_made_late_never_run_beyond_the_slots(
    stream: JetStreamContext, nats_server: NatsHandle
) -> None:
    """While the link from the broker stalls, each fetch times out and the next one asks
    again; the broker serves every request it holds, and once the link recovers all of
    it lands in the subscription's buffer, which fetch() returned whole. The worker ran
    a task per message (12 with 4 slots), each releasing a slot it never took, so the
    bound grew for good; and messages that sat in the buffer ran as fresh deliveries
    with nobody sending in_progress for them. Now they are handed back and come again."""
    host, port = nats_server.url.removeprefix("nats://").rsplit(":", 1)
    stall = _OneWayStall((host, int(port)))
    nc = await nats.connect(await stall.start())
    running = peak = 0
    handled: set[int] = set()
    gate = asyncio.Event()

    async def handle(d: Delivery) -> Outcome:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await gate.wait()
        handled.add(d.stream_seq)
        running -= 1
        return Ack()

    stop = asyncio.Event()
    worker = PullWorker(
        nc.jetstream(), _config(), handle, max_deliver=5, max_concurrency=4, fetch_timeout_s=0.2
    )
    task = asyncio.create_task(worker.run(stop))
    try:
        await _until_fetching(stream)
        seqs = await _served_and_held(stall, stream, count=24, held=12)
        stall.release()
        await until(lambda: running == 4, timeout=10, what=lambda: f"4 running ({running})")
        gate.set()
        await until(
            lambda: handled == set(seqs),
            timeout=30,
            what=lambda: f"all 24 handled ({len(handled)})",
        )
    finally:
        stop.set()
        await task
        await nc.close()
        await stall.close()
    assert peak == 4
    await _settled(stream, seqs[-1])


async def test_heartbeats_keep_a_long_handler_from_being_redelivered(
    stream: JetStreamContext,
) -> None:
    """A handler that runs twice the consumer's ack_wait: the worker's in_progress()
    every third of ack_wait keeps the broker from giving the message out again meanwhile
    (to this worker, or to another replica), and the lease never lapses."""
    ack_wait = 3.0  # heartbeats every 1 s, each confirmed within 1 s: room on a loaded machine
    appended = await append_event(stream, _reply("h", "long model call"))
    loop = asyncio.get_running_loop()
    deliveries: list[int] = []  # num_delivered of each handler invocation
    lapsed: list[bool] = []
    started_at: list[float] = []
    release = asyncio.Event()

    async def handle(d: Delivery) -> Outcome:
        deliveries.append(d.num_delivered)
        started_at.append(loop.time())
        await release.wait()
        lapsed.append(d.lapsed)
        return Ack()

    stop = asyncio.Event()
    worker = PullWorker(stream, _config(ack_wait=ack_wait), handle, max_deliver=5)
    task = asyncio.create_task(worker.run(stop))
    try:
        await until(lambda: deliveries != [], timeout=10, what="the handler started")
        # What is under test is time passing: two ack_waits, with the worker fetching
        # all along, so a redelivery would reach it (and show in the broker's counts).
        await asyncio.sleep(max(0.0, started_at[0] + 2 * ack_wait - loop.time()))
        info = await stream.consumer_info(topology.CONVERSATION_STREAM, "w")
        assert deliveries == [1], "never delivered again while its handler ran"
        assert info.delivered.consumer_seq == 1 and not info.num_redelivered
        assert info.num_ack_pending == 1
        release.set()
        await until(lambda: worker.processed == 1, timeout=10, what="the message acked")
    finally:
        release.set()
        stop.set()
        await task
    assert deliveries == [1] and lapsed == [False]
    await _settled(stream, appended.seq)
    info = await stream.consumer_info(topology.CONVERSATION_STREAM, "w")
    assert info.delivered.consumer_seq == 1, "one delivery in all"


async def test_deliveries_left_in_the_buffer_past_a_third_of_ack_wait_are_handed_back(
    stream: JetStreamContext, nats_server: NatsHandle
) -> None:
    """Two deliveries reach the worker late, together (the link from the broker stalled
    while two of its pull requests were served). With one slot, fetch() returns one and
    the other stays in nats-py's buffer while the first's handler holds the slot. By the
    next fetch it has sat there unheld past a third of ack_wait (past its lease, for all
    the worker can tell): it is handed back and comes again as delivery 2, rather than
    drained from the buffer by fetch() and run as a fresh first delivery."""
    ack_wait = 2.0
    host, port = nats_server.url.removeprefix("nats://").rsplit(":", 1)
    stall = _OneWayStall((host, int(port)))
    nc = await nats.connect(await stall.start())
    loop = asyncio.get_running_loop()
    handled: list[tuple[int, int]] = []  # (stream seq, num_delivered) as handlers see them
    first_started: list[float] = []
    release_first = asyncio.Event()

    async def handle(d: Delivery) -> Outcome:
        handled.append((d.stream_seq, d.num_delivered))
        if len(handled) == 1:
            first_started.append(loop.time())
            await release_first.wait()
        return Ack()

    stop = asyncio.Event()
    worker = PullWorker(
        nc.jetstream(),
        _config(ack_wait=ack_wait),
        handle,
        max_deliver=5,
        max_concurrency=1,
        fetch_timeout_s=0.2,
    )
    with capture_logs() as logs:
        task = asyncio.create_task(worker.run(stop))
        try:
            await _until_fetching(stream)
            # One slot, so one message per pull request: two requests served, both held.
            seqs = await _served_and_held(stall, stream, count=2, held=2)
            stall.release()
            await until(lambda: first_started != [], timeout=10, what="the first handler started")
            # The other delivery now waits in the buffer, and no fetch is made while the
            # only slot is busy. What is under test is its age: let a third of ack_wait
            # pass (with some room) since the fetch that returned the first, which ended
            # before its handler started.
            await asyncio.sleep(max(0.0, first_started[0] + ack_wait / 3 + 0.3 - loop.time()))
            assert len(handled) == 1
            release_first.set()
            await until(lambda: len(handled) == 2, timeout=10, what=lambda: f"both ({handled})")
            await until(lambda: worker.processed == 2, timeout=10, what="both acked")
            # nats-py's count of what it holds for us is back to nothing: left counting
            # what was handed back, it would end up dropping every later message.
            assert worker.buffered_bytes == 0
        finally:
            release_first.set()
            stop.set()
            await task
            await nc.close()
            await stall.close()
    (first, delivery_1), (second, delivery_2) = handled
    assert {first, second} == set(seqs)
    assert delivery_1 == 1
    assert delivery_2 == 2, "the stale buffered delivery was handed back, not run as fresh"
    late = [e for e in logs if e["event"] == "worker.late_deliveries_handed_back"]
    assert [e["count"] for e in late] == [1]
    await _settled(stream, seqs[-1])


async def _one_running_one_buffered(
    stall: _OneWayStall, stream: JetStreamContext, worker: PullWorker, started: asyncio.Event
) -> list[int]:
    """Two deliveries reach a one-slot worker late, together: the first runs (until the
    test lets it finish), the other waits in nats-py's buffer; their stream sequences."""
    await _until_fetching(stream)
    seqs = await _served_and_held(stall, stream, count=2, held=2)
    stall.release()
    await started.wait()
    await until(lambda: worker.buffered_bytes > 0, timeout=10, what="the other one buffered")
    return seqs


async def test_deliveries_buffered_across_a_reconnection_are_handed_back(
    stream: JetStreamContext, nats_server: NatsHandle
) -> None:
    """A reconnection may mean a restarted broker, which forgets the leases of what it
    had served: what sat in the buffer across one is handed back, however short the
    outage, and comes again as delivery 2, rather than run as a fresh first delivery."""
    host, port = nats_server.url.removeprefix("nats://").rsplit(":", 1)
    stall = _OneWayStall((host, int(port)))
    nc = await nats.connect(await stall.start(), max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    handled: list[tuple[int, int]] = []
    started, finish = asyncio.Event(), asyncio.Event()

    async def handle(d: Delivery) -> Outcome:
        handled.append((d.stream_seq, d.num_delivered))
        if len(handled) == 1:
            started.set()
            await finish.wait()
        return Ack()

    stop = asyncio.Event()
    worker = PullWorker(
        nc.jetstream(),
        _config(),
        handle,
        max_deliver=5,
        max_concurrency=1,
        fetch_timeout_s=0.2,
        connection=nc,
    )
    with capture_logs() as logs:
        task = asyncio.create_task(worker.run(stop))
        try:
            seqs = await _one_running_one_buffered(stall, stream, worker, started)
            stall.cut()
            await until(lambda: not nc.is_connected, timeout=10, what="the link gone")
            stall.down = False
            await until(lambda: nc.is_connected, timeout=10, what="the link back")
            finish.set()
            await until(lambda: len(handled) == 2, timeout=10, what=lambda: f"both ({handled})")
            await until(lambda: worker.processed == 2, timeout=10, what="both acked")
        finally:
            finish.set()
            stop.set()
            await task
            await nc.close()
            await stall.close()
    assert handled == [(seqs[0], 1), (seqs[1], 2)], "handed back, not run as fresh"
    [late] = [e for e in logs if e["event"] == "worker.late_deliveries_handed_back"]
    assert (late["count"], late["reconnected"]) == (1, True)
    await _settled(stream, seqs[-1])


async def test_deliveries_buffered_through_an_outage_past_ack_wait_are_left_to_it(
    stream: JetStreamContext, nats_server: NatsHandle
) -> None:
    """The outage outlasts ack_wait: another replica has the buffered message by the
    time the link is back. It was run here as a fresh first delivery (not lapsed: the
    sender then sends without WeCom's duplicate check), beside the other replica; handed
    back, the broker would deliver it a third time at once. It is left to its ack_wait."""
    ack_wait = 2.0
    host, port = nats_server.url.removeprefix("nats://").rsplit(":", 1)
    stall = _OneWayStall((host, int(port)))
    nc = await nats.connect(await stall.start(), max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    handled: list[tuple[str, int, int]] = []  # (replica, stream seq, num_delivered)
    started, finish = asyncio.Event(), asyncio.Event()

    async def handle_here(d: Delivery) -> Outcome:
        handled.append(("here", d.stream_seq, d.num_delivered))
        if not started.is_set():
            started.set()
            await finish.wait()
        return Ack()

    async def handle_there(d: Delivery) -> Outcome:
        handled.append(("there", d.stream_seq, d.num_delivered))
        return Ack()

    stop, stop_there = asyncio.Event(), asyncio.Event()
    here = PullWorker(
        nc.jetstream(),
        _config(ack_wait=ack_wait),
        handle_here,
        max_deliver=5,
        max_concurrency=1,
        fetch_timeout_s=0.2,
        connection=nc,
    )
    there = PullWorker(
        stream, _config(ack_wait=ack_wait), handle_there, max_deliver=5, fetch_timeout_s=0.2
    )
    with capture_logs() as logs:
        task = asyncio.create_task(here.run(stop))
        task_there: asyncio.Task[None] | None = None
        try:
            first, second = await _one_running_one_buffered(stall, stream, here, started)
            stall.cut()
            await until(lambda: not nc.is_connected, timeout=10, what="the link gone")
            task_there = asyncio.create_task(there.run(stop_there))
            await until(
                lambda: ("there", second, 2) in handled, timeout=20, what="the other replica"
            )
            stall.down = False
            await until(lambda: nc.is_connected, timeout=10, what="the link back")
            finish.set()  # the slot free: the next fetch meets what the buffer holds

            def settled_here() -> bool:  # set aside, or (as before) run
                return ("here", second, 1) in handled or any(
                    e["event"] == "worker.late_deliveries_left_to_ack_wait" for e in logs
                )

            await until(settled_here, timeout=10, what="the buffered delivery set aside")
            assert here.buffered_bytes == 0
        finally:
            finish.set()
            stop.set()
            stop_there.set()
            await asyncio.gather(task, *([task_there] if task_there else []))
            await nc.close()
            await stall.close()
    assert handled[0] == ("here", first, 1)
    assert [h for h in handled if h[1] == second] == [("there", second, 2)]


async def test_no_pull_request_piles_up_while_nats_is_away(
    stream: JetStreamContext, nats_server: NatsHandle
) -> None:
    """nats-py buffers what is published while it reconnects: each fetch of an outage
    left one pull request (five a second here), the broker served them all at once on
    reconnect, and every message beyond the free slots was handed back at the cost of
    one of its deliveries (one on its last was parked without running). With its
    connection, the worker asks for nothing while it is away, and goes on after."""
    nc = await connect(NatsSettings.read(EnvReader({"NATS_URL": nats_server.url})), "w")
    handled: list[int] = []

    async def handle(d: Delivery) -> Outcome:
        handled.append(d.stream_seq)
        return Ack()

    worker = PullWorker(
        nc.jetstream(),
        _config(),
        handle,
        max_deliver=3,
        max_concurrency=8,
        fetch_timeout_s=0.2,
        connection=nc,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await _until_fetching(stream)
        nats_server.stop()
        await until(lambda: not nc.is_connected, timeout=10, what="the client to see it gone")
        # The fetch under way when it went ends (its 0.2 s timeout, or an error); what
        # is under test then is an outage's length: seven fetch timeouts' worth. (Not a
        # fetch ended after the client saw it gone: the last one may have ended before,
        # and the worker rightly asks for nothing more.)
        await until(
            lambda: worker._last_fetch_done >= worker._last_fetch_at,
            timeout=10,
            what="the last fetch ended",
        )
        before = nc.pending_data_size
        await asyncio.sleep(1.5)
        assert nc.pending_data_size == before, "pull requests buffered for the reconnect"
        nats_server.start()
        await until(lambda: nc.is_connected, timeout=20, what="the client back")
        seqs = [(await append_event(stream, _reply(f"u{i}", str(i)))).seq for i in range(20)]
        await until(lambda: sorted(handled) == seqs, timeout=20, what="all handled after it")
    finally:
        stop.set()
        await task
        await nc.close()


async def test_a_deleted_consumer_is_made_again(stream: JetStreamContext) -> None:
    """Deleted by hand (or with its stream): no fetch was ever answered again, on any
    replica, until a restart, while readiness stayed green."""
    handled: list[int] = []

    async def handle(d: Delivery) -> Outcome:
        handled.append(d.stream_seq)
        return Ack()

    worker = PullWorker(stream, _config(), handle, max_deliver=3, fetch_timeout_s=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        first = (await append_event(stream, _reply("a", "before"))).seq
        await until(lambda: handled == [first], timeout=10, what="the first handled")
        with capture_logs() as logs:
            await stream.delete_consumer(topology.CONVERSATION_STREAM, "w")
            second = (await append_event(stream, _reply("b", "after"))).seq
            # Made again, it starts from the stream's first message: the handlers find
            # what is done done (the llm its outcome, the sender its delivery).
            await until(lambda: second in handled, timeout=15, what="the message handled")
        assert "worker.consumer_ensured" in [e["event"] for e in logs], logs
    finally:
        stop.set()
        await task


async def test_a_fault_failing_every_fetch_is_logged_once_not_twice_a_second(
    stream: JetStreamContext,
) -> None:
    """The stream deleted (or no JetStream quorum): every fetch fails, and the consumer
    cannot be made again. Each failure wrote a warning and another for the consumer, on
    every replica, every half second, for as long as it lasted."""

    class Counting(PullWorker):
        attempts = 0
        fetches = 0

        async def _consumer_again(self) -> None:
            Counting.attempts += 1
            await super()._consumer_again()

        async def _fetch(self, *args: Any) -> list[Msg]:
            try:
                return await super()._fetch(*args)
            finally:
                Counting.fetches += 1

    handled: list[int] = []

    async def handle(d: Delivery) -> Outcome:
        handled.append(d.stream_seq)
        return Ack()

    worker = Counting(stream, _config(), handle, max_deliver=3, fetch_timeout_s=0.2)
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(worker.run(stop))
        try:
            first = (await append_event(stream, _reply("a", "before"))).seq
            await until(lambda: handled == [first], timeout=10, what="the worker fetching")
            await stream.delete_stream(topology.CONVERSATION_STREAM)
            await until(lambda: Counting.attempts >= 4, timeout=15, what="four failed fetches")
            events = [e["event"] for e in logs]
            assert events.count("worker.fetch_failed") == 1, events
            assert events.count("worker.consumer_missing") == 1, events
            # the stream made again: the worker's next try makes its consumer, and the
            # first good fetch says the fault is over, with the lines it kept back
            await ensure_topology(stream, NatsSettings.read(EnvReader({})))
            await until(
                lambda: any(e["event"] == "worker.fetch_recovered" for e in logs),
                timeout=15,
                what="the fetches back",
            )
            # said once: the good fetches after it (one with a message, empty ones) are no
            # recovery
            after = (await append_event(stream, _reply("a", "after"))).seq
            await until(lambda: after in handled, timeout=10, what="the worker fetching again")
            done = Counting.fetches
            await until(lambda: Counting.fetches >= done + 3, timeout=10, what="3 more fetches")
        finally:
            stop.set()
            await task
    [recovered] = [e for e in logs if e["event"] == "worker.fetch_recovered"]
    assert recovered["errors_not_logged"] >= 4, recovered


class _DeadPathToTheBroker:
    """Replica ``a`` (behind ``stall``) takes a message; the path towards the broker then
    holds everything ``a`` sends, and replica ``b`` gets the message once ack_wait is
    out. ``a``'s handler waits for ``gate``; ``b``'s, of that message, for ever."""

    def __init__(self, stream: JetStreamContext, stall: _OneWayStall) -> None:
        self.stream, self.stall = stream, stall
        self.seen: list[tuple[str, int]] = []  # (replica, delivery) of the message
        self.later: list[int] = []  # stream seqs of other messages b handled
        self.gate = asyncio.Event()
        self.held: list[Delivery] = []  # a's delivery
        self.stop_a, self.stop_b = asyncio.Event(), asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.a_nc: NATS | None = None
        self.a_outcome: Outcome = Ack()  # what a's handler returns once the gate opens

    async def handle_a(self, d: Delivery) -> Outcome:
        self.seen.append(("a", d.num_delivered))
        self.held.append(d)
        await self.gate.wait()
        return self.a_outcome

    async def handle_b(self, d: Delivery) -> Outcome:
        if d.stream_seq != 1:
            self.later.append(d.stream_seq)
            return Ack()
        self.seen.append(("b", d.num_delivered))
        await asyncio.Event().wait()
        return Ack()

    async def start(self, *, grace_s: float = 20.0) -> None:
        self.a_nc = await nats.connect(await self.stall.start())
        config = _config(ack_wait=1.5)
        a_js = self.a_nc.jetstream()
        a = PullWorker(a_js, config, self.handle_a, max_deliver=5, grace_s=grace_s)
        self.tasks.append(asyncio.create_task(a.run(self.stop_a)))
        await _until_fetching(self.stream)
        await append_event(self.stream, _reply("u", "first"))
        await until(lambda: self.seen == [("a", 1)], timeout=10, what="a handling it")
        self.stall.holding_up = True  # a's heartbeats, and all else it sends, go nowhere
        b = PullWorker(
            self.stream, config, self.handle_b, max_deliver=5, grace_s=0.1, fetch_timeout_s=0.5
        )
        self.tasks.append(asyncio.create_task(b.run(self.stop_b)))
        await until(
            lambda: ("b", 2) in self.seen, timeout=10, what=lambda: f"b's delivery ({self.seen})"
        )

    async def close(self) -> None:
        if self.stall.holding_up:
            self.stall.release_up()
        self.gate.set()
        self.stop_a.set()
        self.stop_b.set()  # b's handler of the message never returns: cancelled at its grace
        async with asyncio.timeout(30):
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.a_nc is not None:
            await self.a_nc.close()
        await self.stall.close()


@pytest.fixture
async def dead_path(
    stream: JetStreamContext, nats_server: NatsHandle
) -> AsyncIterator[_DeadPathToTheBroker]:
    host, port = nats_server.url.removeprefix("nats://").rsplit(":", 1)
    scenario = _DeadPathToTheBroker(stream, _OneWayStall((host, int(port))))
    try:
        yield scenario
    finally:
        await scenario.close()


async def test_a_lease_is_not_renewed_by_heartbeats_the_broker_never_got(
    dead_path: _DeadPathToTheBroker,
) -> None:
    """nats-py takes a heartbeat into its buffer and says it is connected (its own pings
    would notice in minutes); the broker meanwhile gave the message to another replica.
    The delivery must know it may be handled twice (the sender then asks WeCom's check)."""
    await dead_path.start()
    [held] = dead_path.held
    assert held.lapsed


@pytest.mark.parametrize(
    "how", ["cancelled at stop", "handed back by its handler", "handed back as it stops"]
)
async def test_a_lapsed_delivery_is_not_handed_back(
    dead_path: _DeadPathToTheBroker, how: str
) -> None:
    """A nak is not tied to one delivery: one from a replica whose hold lapsed made the
    broker deliver the message once more, at once, beside the replica working on it.
    Either way: cancelled at stop, or its handler answering Nak (the sender's does
    when it stops waiting for an earlier reply)."""
    await dead_path.start(grace_s=0.1)
    [held] = dead_path.held
    await until(lambda: held.lease.overdue, timeout=10, what="a's hold lapsing")
    dead_path.stall.release_up()  # the path recovers: what a sends now arrives
    with capture_logs() as logs:
        if how == "handed back by its handler":
            dead_path.a_outcome = Nak(0.0, "an earlier reply to this user is still busy")
            dead_path.gate.set()
        if how == "handed back as it stops":
            dead_path.a_outcome = HandBack("stopping before its model call")
            dead_path.gate.set()
        dead_path.stop_a.set()
        await dead_path.tasks[0]  # a stopped, its connection drained
    [left] = [e for e in logs if e["event"] == "worker.left_to_ack_wait"]
    assert left["stream_seq"] == 1
    later = await append_event(dead_path.stream, _reply("v", "after a stopped"))
    # the broker redelivers what is naked before it delivers a newer message
    await until(lambda: later.seq in dead_path.later, timeout=10, what="b handling a later one")
    assert dead_path.seen == [("a", 1), ("b", 2)]


async def test_a_worker_started_while_jetstream_does_not_answer_waits_for_it(
    stream: JetStreamContext, nats_server: NatsHandle
) -> None:
    """Making the consumer timed out on a cluster still electing its leaders, and the
    service crashed at start (seen in the 3-node cluster test). It is tried again."""
    nc = await nats.connect(nats_server.url)
    handled: list[int] = []

    async def handle(d: Delivery) -> Outcome:
        handled.append(d.stream_seq)
        return Ack()

    stop = asyncio.Event()
    worker = PullWorker(nc.jetstream(timeout=0.5), _config(), handle, max_deliver=3)
    try:
        with capture_logs() as logs:
            nats_server.pause()  # a broker that answers nothing
            try:
                task = asyncio.create_task(worker.run(stop))
                await until(
                    lambda: any(e["event"] == "worker.consumer_not_ready" for e in logs),
                    timeout=10,
                    what="the worker waiting for JetStream",
                )
                assert not task.done()
            finally:
                nats_server.resume()
        seq = (await append_event(stream, _reply("w", "after the wait"))).seq
        await until(lambda: handled == [seq], timeout=15, what="the message handled")
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await nc.close()


async def test_a_worker_whose_jetstream_is_unavailable_waits_and_still_stops(
    nats_server: NatsHandle,
) -> None:
    """JetStream's API unavailable (503: a cluster with no meta leader yet; or nothing
    answering its subjects, which nats-py says the same way) is waited for like a
    timeout, not a crash at start; the stop still ends the wait. Here the API prefix is
    one nothing answers."""
    nc = await nats.connect(nats_server.url)

    async def handle(d: Delivery) -> Outcome:
        return Ack()

    stop = asyncio.Event()
    js = nc.jetstream(prefix="$JS.nowhere.API", timeout=0.5)
    worker = PullWorker(js, _config(), handle, max_deliver=3)
    try:
        with capture_logs() as logs:
            task = asyncio.create_task(worker.run(stop))
            await until(
                lambda: any(e["event"] == "worker.consumer_not_ready" for e in logs) or task.done(),
                timeout=10,
                what="the worker waiting for JetStream",
            )
            assert not task.done(), task.exception()
        [said, *_] = [e for e in logs if e["event"] == "worker.consumer_not_ready"]
        assert said["error"].startswith("ServiceUnavailableError"), said
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await nc.close()


async def test_a_poison_message_is_parked_after_its_stream_was_made_again(
    stream: JetStreamContext,
) -> None:
    """The dead letter's Nats-Msg-Id named the consumer and the stream seq only: after the
    stream was made again (sequences from 1), a new poison message at a seq used before
    was dropped by the DLQ as a repeat, and terminated with no dead letter."""

    async def never(d: Delivery) -> Outcome:
        raise AssertionError("a poison message reached the handler")

    async def park(body: bytes, letters: int) -> None:
        await stream.publish(f"{topology.PREFIX}.conv.ww1-1.x.llm.reply", body)
        stop = asyncio.Event()
        task = asyncio.create_task(PullWorker(stream, _config(), never, max_deliver=2).run(stop))

        async def parked() -> bool:
            info = await stream.stream_info(topology.DEAD_LETTER_STREAM)
            return int(info.state.messages) == letters

        await until(parked, timeout=10, what=f"{letters} dead letters")
        stop.set()
        await task

    await park(b"poison one", 1)
    await stream.delete_stream(topology.CONVERSATION_STREAM)
    await ensure_topology(stream, NatsSettings.read(EnvReader({})))
    await park(b"poison two", 2)  # at stream seq 1 again
    letters = await _dead_letters(stream)
    assert [letter["Wecombot-Dlq-Stream-Seq"] for letter in letters] == ["1", "1"]


async def test_a_poison_message_near_max_payload_is_parked_and_the_connection_kept(
    stream: JetStreamContext,
) -> None:
    """A dead letter is the message with the worker's headers: for one within their size
    of the broker's max_payload (garbage appended by hand, say), the copy went over it,
    the broker answered -ERR and nats-py closed the connection for good (nats-py checks
    the payload alone): the service failed, and every replica that took the message
    after it."""
    nc = stream._nc
    body = b"x" * (nc.max_payload - 64)
    await stream.publish(f"{topology.PREFIX}.conv.ww1-1.x.llm.reply", body)
    reason = await _parked_before_the_next_is_handled(stream)
    assert nc.is_connected
    assert reason.startswith("undecodable event")
    assert "cut to fit the broker's max_payload" in reason
    assert "the whole is in WECOMBOT at seq 1" in reason
    parked = await stream.get_msg(topology.DEAD_LETTER_STREAM, 1)
    assert parked.data and body.startswith(parked.data)
