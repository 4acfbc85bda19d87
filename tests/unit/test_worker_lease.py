"""A delivery's lease: once heartbeats have not reached the broker for 2/3 of ack_wait,
the message may have been redelivered elsewhere, and it stays marked so. And the
heartbeat itself stops when told to."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from wecombot_common.worker import Heartbeat, Lease, backoff_delay


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_renewed_in_time_it_never_lapses(clock: Clock) -> None:
    lease = Lease(3.0, clock=clock)
    for _ in range(10):
        clock.now += 1.0  # a heartbeat every ack_wait / 3
        lease.renew()
    assert not lease.lapsed


def test_a_gap_of_two_thirds_of_ack_wait_lapses_it_for_good(clock: Clock) -> None:
    lease = Lease(3.0, clock=clock)
    clock.now += 1.9
    assert not lease.lapsed
    clock.now += 0.1
    assert lease.lapsed
    lease.renew()  # reconnected: the broker may have redelivered meanwhile all the same
    assert lease.lapsed


def test_a_late_renewal_still_counts_the_gap(clock: Clock) -> None:
    lease = Lease(3.0, clock=clock)
    clock.now += 2.5  # the process stalled; the heartbeat comes too late
    lease.renew()
    assert lease.lapsed


def test_a_reconnection_while_held_lapses_the_lease() -> None:
    """A restarted broker redelivers at once what has been pending past ack_wait, however
    recent the last heartbeat: any reconnection while a delivery is held lapses it."""
    reconnects = {"n": 3}
    lease = Lease(30.0, reconnects=lambda: reconnects["n"], clock=Clock())
    lease.renew()
    assert not lease.lapsed
    reconnects["n"] = 4
    lease.renew()
    assert lease.lapsed


def test_a_renewal_counts_from_when_the_heartbeat_was_sent(clock: Clock) -> None:
    """The broker restarts its ack_wait when the heartbeat arrives, not when its answer
    comes back to us: a slow answer must not stretch the lease past the broker's."""
    lease = Lease(3.0, clock=clock)
    clock.now += 1.0
    sent = lease.now()
    clock.now += 0.9  # the answer took this long
    lease.renew(sent)
    clock.now += 1.1  # 2.0 after the heartbeat went out
    assert lease.lapsed


def test_a_reconnection_lapses_a_lease_without_making_it_overdue(clock: Clock) -> None:
    """After a failover the delivery is usually still ours: handed back as ever, not left
    to ack_wait (which stalled every conversation in flight); only a lease the broker
    got no heartbeat for is overdue."""
    reconnects = [0]
    lease = Lease(3.0, lambda: reconnects[0], clock=clock)
    reconnects[0] = 1
    assert lease.lapsed and not lease.overdue
    clock.now += 2.0
    assert lease.overdue
    lease.renew()
    assert lease.overdue and lease.lapsed


class SwallowsTheCancel:
    """A heartbeat's request as nats-py makes it on Python 3.11 when the broker's reply
    arrives with the cancellation: ``asyncio.wait_for`` returns the reply instead of
    raising (bpo-42130)."""

    def __init__(self) -> None:
        self.beats = 0
        self.waiting = asyncio.Event()

    async def in_progress(self, confirm_s: float = 2.0) -> None:
        self.beats += 1
        self.waiting.set()
        if self.beats > 1:  # the next ones as usual: a cancel raises
            await asyncio.Event().wait()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()  # the reply, cancelled as it comes


def heartbeats_running() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "worker-heartbeat"]


async def test_a_heartbeat_whose_cancellation_is_swallowed_still_stops() -> None:
    """Cancelled once and left, it went on beating for good: its +WPI kept the message
    it had handed back from ever being delivered again (seen against a provider whose
    answers failed at once: never redelivered, never dead-lettered)."""
    delivery = SwallowsTheCancel()
    heartbeat = Heartbeat(delivery, interval_s=0.01)
    await delivery.waiting.wait()
    heartbeat.stop()
    async with asyncio.timeout(10):  # a bound for the failure only: it ends at once
        await heartbeat.ended()
    assert heartbeats_running() == []
    assert delivery.beats == 1


def test_a_retry_backs_off_from_half_a_second_doubling_to_its_cap() -> None:
    """A first retry comes within half a second (a busy WeCom, a conflict), the next
    ones up to twice as late each time, never past the cap, never at once."""
    for attempt, most in ((1, 0.5), (2, 1.0), (3, 2.0), (8, 30.0), (100, 30.0)):
        delays = [backoff_delay(attempt) for _ in range(200)]
        assert all(0.25 <= d <= most for d in delays), (attempt, max(delays))
        assert max(delays) > most * 0.8  # the whole range is used: jitter
