"""A durable JetStream pull consumer that keeps N messages in flight, safely.

Shared by every consuming service (llm, sender), so redelivery, heartbeats, poison
messages and shutdown behave the same everywhere:

- The fetch loop keeps up to ``max_concurrency`` handlers working (asyncio tasks). A
  handler that only waits (for an earlier message of its conversation, for WeCom's
  pacing: :meth:`Delivery.idle`) gives its slot to another delivery meanwhile, so one
  user's burst does not hold up everyone else's messages; at most ``ROOM_FACTOR`` times
  ``max_concurrency`` deliveries are in the process, waiting ones included (past that,
  nothing more is fetched).
- While a handler runs, ``in_progress()`` is sent every ``ack_wait / 3`` so a long model
  call never outlives ``ack_wait`` and gets delivered to a second replica. If that fails
  (the broker unreachable, the process stalled), :attr:`Delivery.lapsed` says so: the
  message may now be handled elsewhere too, and a handler with outside effects (sending
  to WeCom) must allow for it.
- Messages with the same ``key`` (a conversation) are handled one at a time, in fetch
  order, within this process (other replicas are ordered by the handlers, see llm).
- The handler returns an :class:`Outcome`. Exceptions map to one too:
  ``TransientError`` → nak with backoff; ``PermanentError`` (an undecodable event, a
  reply WeCom always refuses) → dead-letter with the reason, then ``term``. A transient
  failure on the last allowed delivery is dead-lettered too, so nothing is silently lost.
  An event of a newer build (``NewerEventError``: a rolling upgrade under way) is no
  poison: it is handed back with backoff for a newer replica, and parked only at its
  last delivery, with the advice to replay it once the upgrade is done.
- ``max_deliver`` is enforced here, not by JetStream: the consumer itself redelivers
  without limit (:func:`topology.work_consumer`). JetStream drops a message whose last
  allowed delivery is nak'ed or never acknowledged, with no trace but an advisory that
  nobody may be listening to, and its ack floor never passes it. So a delivery past the
  limit (the one before ended without an outcome: its process was stopped, crashed, or
  its dead-lettering failed) is not handled again: the first is handed back for one
  ack_wait (a replica that only lost its hold may still finish and ack it), the next is
  dead-lettered.
- On stop: no new fetches; in-flight handlers get ``grace_s`` to finish, the rest are
  cancelled and nak'ed (handed back) so another replica takes them at once::

    worker = PullWorker(js, config, handle, max_deliver=10,
                        key=conversation_key, max_concurrency=64)
    await worker.run(stop)
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig
from prometheus_client import Counter, Gauge, Histogram

from . import metrics, topology
from .bus import max_payload, message_size, reconnect_counter
from .errors import PermanentError, TransientError
from .events import Event, EventDecodeError, NewerEventError, decode_event
from .logs import LogSampler
from .runtime import retried_until_stopped

__all__ = [
    "DEFAULT_ACK_WAIT_S",
    "DLQ_CONSUMER",
    "DLQ_DELIVERIES",
    "DLQ_REASON",
    "DLQ_STREAM_SEQ",
    "DLQ_SUBJECT",
    "Ack",
    "Delivery",
    "HandBack",
    "LeaveIdle",
    "Nak",
    "Outcome",
    "PullWorker",
    "acquire_idle",
]

log = structlog.get_logger(__name__)

# A consumer config without ack_wait gets the broker's default, 30 s.
DEFAULT_ACK_WAIT_S = 30.0
# A failing fetch's warning, per kind of error, at most once in this many seconds (the
# next one says how many were not written).
FAULT_LOG_PERIOD_S = 30.0

# The headers of a dead letter (read back by ``wecombot dlq``).
DLQ_REASON = "Wecombot-Dlq-Reason"
DLQ_CONSUMER = "Wecombot-Dlq-Consumer"
DLQ_SUBJECT = "Wecombot-Dlq-Subject"
DLQ_STREAM_SEQ = "Wecombot-Dlq-Stream-Seq"
DLQ_DELIVERIES = "Wecombot-Dlq-Deliveries"


@dataclass(frozen=True, slots=True)
class Ack:
    pass


@dataclass(frozen=True, slots=True)
class Nak:
    delay_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class HandBack:
    """Not this replica's to finish: it is stopping (another takes it after ``delay_s``).
    Counted and logged as a hand-back, not a retry; never dead-letters, even on the
    last allowed delivery (the next one gets the grace of a delivery past the limit)."""

    reason: str
    delay_s: float = 0.0


Outcome = Ack | Nak | HandBack


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Internal: a permanent failure, parked in the dead-letter stream with the reason."""

    reason: str


_IN_PROGRESS = b"+WPI"  # JetStream's "working on it" ack


class Lease:
    """How long this process has held a delivery without telling the broker. Past
    ``LAPSE_FRACTION`` of ack_wait (heartbeats go every third), the broker may have given
    the message to another consumer, which is then working on it too.

    A reconnection while the delivery is held lapses it as well: a restarted broker
    forgets the ``in_progress()`` extensions and redelivers what has been pending longer
    than ack_wait at once, however recent our last heartbeat (seen in the chaos suite).
    ``reconnects`` counts the client's reconnections (nats-py's ``stats``).

    ``overdue`` is the first kind alone: the broker has had no heartbeat of ours for
    2/3 of ack_wait, so it has likely given the message away (a reconnection may well
    not have: after a failover the delivery is usually still ours).
    """

    LAPSE_FRACTION = 2 / 3

    def __init__(
        self,
        ack_wait_s: float,
        reconnects: Callable[[], int] | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = ack_wait_s * self.LAPSE_FRACTION
        self._clock = clock
        self._renewed = clock()
        self._lapsed = False
        self._overdue = False
        self._reconnects = reconnects
        self._reconnects_at_start = reconnects() if reconnects is not None else 0

    def now(self) -> float:
        return self._clock()

    def renew(self, at: float | None = None) -> None:
        """The broker restarted its ack_wait at ``at`` (now, unless given)."""
        self._check()
        self._renewed = max(self._renewed, self._clock() if at is None else at)

    @property
    def lapsed(self) -> bool:
        self._check()
        return self._lapsed

    @property
    def overdue(self) -> bool:
        self._check()
        return self._overdue

    def _check(self) -> None:
        if self._clock() - self._renewed >= self._limit:
            self._overdue = self._lapsed = True
        if self._reconnects is not None and self._reconnects() != self._reconnects_at_start:
            self._lapsed = True


class LeaveIdle(Exception):
    """Raised inside a :meth:`Delivery.idle` block to leave it without taking a slot back:
    the handler hands its delivery back (its service stops) and has no more work to do."""


async def acquire_idle(
    lock: asyncio.Lock,
    idle: Callable[[], contextlib.AbstractAsyncContextManager[None]],
    *,
    contended: bool,
) -> None:
    """``lock``, waited for without the delivery's slot (``idle``) when it is held or
    others want it too (``contended``: one woken by its release has not run yet, while
    the lock says unlocked; waiting with the slot, each waited for the other, it for a
    slot and this one for the lock). Cancelled, waiting for the lock or for the slot
    after it, it holds nothing."""
    if not (contended or lock.locked()):
        await lock.acquire()
        return
    acquired = False
    try:
        async with idle():
            await lock.acquire()
            acquired = True
    except BaseException:
        if acquired:
            lock.release()
        raise


class Slot:
    """A delivery's place among its worker's ``max_concurrency`` working handlers: taken
    by the fetch loop for it, given up while it only waits (:meth:`Delivery.idle`),
    taken back to work, and returned when it is settled."""

    __slots__ = ("_gauge", "_slots", "held", "waiting")

    def __init__(self, slots: asyncio.Semaphore, waiting: Gauge) -> None:
        self._slots = slots
        self._gauge = waiting
        self.held = True
        self.waiting = False

    def give_up(self) -> None:
        if self.held:
            self.held = False
            self._slots.release()
            self.waiting = True
            self._gauge.inc()

    def stop_waiting(self) -> None:
        if self.waiting:
            self.waiting = False
            self._gauge.dec()

    async def take_back(self) -> None:
        """Cancelled while waiting for a slot, it holds none (nothing to return). Counted
        as waiting until it has one: the working ones are never over the limit."""
        if not self.held:
            await self._slots.acquire()
            self.held = True
        self.stop_waiting()

    def give_back(self) -> None:
        """The delivery is done with: its slot, if it holds one, is free again."""
        if self.held:
            self.held = False
            self._slots.release()


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message handed to a handler: the decoded event and its delivery facts."""

    event: Event
    stream_seq: int
    num_delivered: int
    subject: str
    msg: Msg
    lease: Lease = field(default_factory=lambda: Lease(DEFAULT_ACK_WAIT_S))
    # The last delivery the worker allows (its ``max_deliver``): a Nak now dead-letters
    # the message, so a handler that would hand it back should do what it still can.
    last_try: bool = False
    # When the broker stored the message (POSIX seconds, its clock; the ack subject's
    # timestamp, the same on every delivery, whatever nats-py's docstring says of it);
    # None: unknown.
    stored_at: float | None = None
    # Its place among the worker's working handlers (None: not from a PullWorker).
    slot: Slot | None = None

    @contextlib.asynccontextmanager
    async def idle(self) -> AsyncIterator[None]:
        """For a wait that does no work (an earlier message's outcome, WeCom's pacing):
        the delivery's concurrency slot serves another delivery meanwhile, and is taken
        back (waiting for one, if all are busy) when the block ends. The heartbeat goes
        on: the delivery stays this process's. Without a slot, it only runs the block::

            async with delivery.idle():
                await asyncio.sleep(pacing)
        """
        slot = self.slot
        if slot is None or not slot.held:
            yield
            return
        slot.give_up()
        try:
            yield
        except BaseException:  # cancelled (stopping), or the wait failed: no slot needed
            slot.stop_waiting()
            raise
        await slot.take_back()

    @property
    def lapsed(self) -> bool:
        """True once this delivery may have been redelivered to another consumer."""
        return self.lease.lapsed

    async def in_progress(self, confirm_s: float = 2.0) -> None:
        """Tell the broker we are still at it. The lease is renewed once the broker has
        answered, within ``confirm_s`` (it answers an ack sent as a request): a plain
        publish only fills nats-py's buffer, which a path to the broker that went dead
        without a reset never empties, while the client still says it is connected
        (until its own pings time out, 4 minutes at nats-py's defaults) and the broker
        gives the message to another replica. Not ``flush()``: nats-py 2.16 fails a
        PING's future when the flush times out or is cancelled, and the PONG arriving
        later ends its read loop for good. Nothing is renewed while reconnecting."""
        client = getattr(self.msg, "_client", None)
        if client is not None and not client.is_connected:
            return
        sent = self.lease.now()  # the broker counts from when it got it: no later
        with contextlib.suppress(nats.errors.Error):
            if client is None or not self.msg.reply:
                await self.msg.in_progress()  # a message from elsewhere: unconfirmed
            else:
                await client.request(self.msg.reply, _IN_PROGRESS, timeout=confirm_s)
            self.lease.renew(sent)


Handler = Callable[[Delivery], Awaitable[Outcome]]


class _Beating(Protocol):
    async def in_progress(self, confirm_s: float = 2.0) -> None: ...


class Heartbeat:
    """``in_progress`` every ``interval_s`` for a delivery being handled, until
    :meth:`stop`; the first at once (the delivery may have waited on the way, a stalled
    link from the broker or the buffer, for part of its ack_wait already, unseen).

    Stopped by a flag as well as by cancelling it: the heartbeat is a request, and
    nats-py awaits its reply inside ``asyncio.wait_for``, which on Python 3.11 swallows
    a cancellation that arrives with the reply (bpo-42130). A heartbeat cancelled then
    went on beating every ``interval_s`` for good, and its +WPI kept the message it had
    handed back from ever being delivered again: never redelivered, never dead-lettered,
    the user's next messages waiting behind it. :meth:`stop` does not wait: the task
    sends nothing more once the flag is set, and a wait there would reorder the
    hand-backs a shutdown makes in stream order, or lose a finished outcome to a cancel
    arriving meanwhile.
    """

    def __init__(self, delivery: _Beating, *, interval_s: float) -> None:
        self._delivery = delivery
        self._interval_s = interval_s
        self._stopped = False
        self._task = asyncio.create_task(self._beat(), name="worker-heartbeat")

    async def _beat(self) -> None:
        while not self.stopped():
            await self._delivery.in_progress(confirm_s=self._interval_s)
            if self.stopped():  # a cancel swallowed with the reply
                return
            await asyncio.sleep(self._interval_s)

    def stopped(self) -> bool:
        return self._stopped

    def stop(self) -> None:
        """Stop beating: nothing is sent after this call."""
        self._stopped = True
        self._task.cancel()

    async def ended(self) -> None:
        """Until the heartbeat's task has ended (after :meth:`stop`)."""
        await asyncio.wait([self._task])


@dataclass(frozen=True, slots=True)
class _ConsumerMetrics:
    """One consumer's children of the worker metrics (bound once: no label lookups)."""

    acked: Counter
    retried: Counter
    dead_lettered: Counter
    handed_back: Counter
    left: Counter
    in_flight: Gauge
    waiting: Gauge
    handler_seconds: Histogram
    pending: Gauge
    ack_pending: Gauge
    oldest_seconds: Gauge

    @classmethod
    def of(cls, consumer: str) -> _ConsumerMetrics:
        settled = metrics.WORKER_SETTLED
        return cls(
            acked=settled.labels(consumer, "acked"),
            retried=settled.labels(consumer, "retried"),
            dead_lettered=settled.labels(consumer, "dead_lettered"),
            handed_back=settled.labels(consumer, "handed_back"),
            left=settled.labels(consumer, "left"),
            in_flight=metrics.WORKER_IN_FLIGHT.labels(consumer),
            waiting=metrics.WORKER_WAITING.labels(consumer),
            pending=metrics.CONSUMER_PENDING.labels(consumer),
            ack_pending=metrics.CONSUMER_ACK_PENDING.labels(consumer),
            oldest_seconds=metrics.CONSUMER_OLDEST_SECONDS.labels(consumer),
            handler_seconds=metrics.WORKER_HANDLER_SECONDS.labels(consumer),
        )


def backoff_delay(attempt: int, *, base: float = 0.5, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter: attempt 1 → up to 0.5 s, doubling, capped.

    >>> 0.25 <= backoff_delay(5000) <= 30.0  # no float overflow, however many deliveries
    True
    """
    return random.uniform(base / 2, min(cap, base * 2 ** min(attempt - 1, 64)))  # noqa: S311


class PullWorker:
    DEAD_LETTER_RETRY_S = 5.0  # a failed dead-lettering is tried again this much later
    # Deliveries in the process at most, per slot: the working ones and those that gave
    # their slot up to wait (Delivery.idle). Past it, nothing more is fetched.
    ROOM_FACTOR = 4

    def __init__(
        self,
        js: JetStreamContext,
        config: ConsumerConfig,
        handler: Handler,
        *,
        max_deliver: int,
        key: Callable[[Event], str] | None = None,
        max_concurrency: int = 16,
        grace_s: float = 20.0,
        fetch_timeout_s: float = 1.0,
        connection: NATS | None = None,
        backlog_every_s: float = 15.0,
    ) -> None:
        """``connection``: the client ``js`` belongs to. With it, no pull request is made
        while it is away: nats-py would buffer one per fetch (one a second), the broker
        serve them all at once on reconnect, and each message beyond the free slots be
        handed back at the cost of one of its deliveries (a message on its last one was
        parked without ever running)."""
        assert config.durable_name is not None
        assert config.filter_subject is not None
        self._js = js
        self._config = config
        self._ack_wait = config.ack_wait or DEFAULT_ACK_WAIT_S
        self._handler = handler
        self._max_deliver = max_deliver  # 0: no limit
        self._key = key
        self._max = max_concurrency
        self._grace = grace_s
        self._fetch_timeout = fetch_timeout_s
        self._backlog_every = backlog_every_s
        self._slots = asyncio.Semaphore(max_concurrency)
        self._room = asyncio.Semaphore(max_concurrency * self.ROOM_FACTOR)
        self._tasks: dict[asyncio.Task[None], int] = {}  # task -> stream seq it handles
        self._locks: dict[str, asyncio.Lock] = {}
        self._queued: dict[str, list[int]] = {}
        self._last_fetch_at = -math.inf  # loop time the last pull request was sent
        self._last_fetch_done = -math.inf  # loop time the last fetch() returned
        self._reconnects_at_fetch = 0  # the client's reconnections then
        # A fault that fails every fetch (no JetStream quorum, the stream deleted) wrote
        # a warning or two each half second, on every replica, for as long as it lasted.
        self._fault_log = LogSampler(burst=1, period_s=FAULT_LOG_PERIOD_S)
        self._failing = False  # the last fetch failed: the next good one says it is over
        self.name = config.durable_name
        self.processed = 0
        self._metrics = _ConsumerMetrics.of(self.name)
        self._sub: JetStreamContext.PullSubscription | None = None
        self._connection = connection

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def buffered_bytes(self) -> int:
        """Bytes nats-py counts as received for us and not yet taken (0 when not running).
        At the subscription's limit (256 MiB) it drops what comes next as a slow consumer."""
        return 0 if self._sub is None else self._sub.pending_bytes

    def queued(self, key: str) -> list[int]:
        """Stream sequences of deliveries with ``key`` waiting in this process for the one
        being handled (a handler waiting for an earlier message of its key, which may be
        queued right behind it after a redelivery, can step aside)."""
        return list(self._queued.get(key, ()))

    async def ensure_consumer(self) -> None:
        """Create the durable consumer or update it to our config; every replica may."""
        try:
            await self._js.add_consumer(topology.CONVERSATION_STREAM, self._config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10148:  # already exists with a different config
                raise
            await self._js.add_consumer(topology.CONVERSATION_STREAM, self._config)

    async def run(self, stop: asyncio.Event) -> None:
        if not await self._consumer_at_start(stop):
            return
        assert self._config.filter_subject is not None
        sub = await self._js.pull_subscribe_bind(
            durable=self.name, stream=topology.CONVERSATION_STREAM
        )
        self._sub = sub
        backlog = asyncio.create_task(self._report_backlog(stop))
        try:
            await self._fetch_loop(sub, stop)
        finally:
            backlog.cancel()
            await self._release(sub)
            await self._shutdown()
            self._sub = None

    async def _report_backlog(self, stop: asyncio.Event) -> None:
        """The consumer's backlog as the broker counts it, into the consumer gauges every
        ``backlog_every_s``: the services' own metrics show a pipeline falling behind
        (NATS's monitoring port is KEDA's only). An unanswered read leaves them as
        they were."""
        while not stop.is_set():
            try:
                await self._read_backlog()
            except (TimeoutError, nats.errors.Error) as exc:
                log.debug("worker.backlog_unread", consumer=self.name, error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._backlog_every)

    async def _read_backlog(self) -> None:
        info = await self._js.consumer_info(topology.CONVERSATION_STREAM, self.name, timeout=5.0)
        pending, unsettled = info.num_pending or 0, info.num_ack_pending or 0
        self._metrics.pending.set(pending)
        self._metrics.ack_pending.set(unsettled)
        oldest = 0.0
        if pending or unsettled:
            # Everything through the ack floor is settled: the first of our subjects
            # after it is not (a leader read: two requests per interval and replica).
            floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
            first = await self._js.get_msg(
                topology.CONVERSATION_STREAM,
                seq=floor + 1,
                subject=self._config.filter_subject,
                next=True,
            )
            if first.time is not None:
                oldest = max(0.0, time.time() - first.time.timestamp())
        self._metrics.oldest_seconds.set(oldest)

    async def _release(self, sub: JetStreamContext.PullSubscription) -> None:
        """Give up the subscription without stranding anything the broker sent us.

        A pull request of ours may linger on the server until its expiry and push more
        messages into the subscription's buffer after fetch() returned; unhandled, they
        would wait out ack_wait. So: wait that expiry out, hand back what is buffered,
        and only then unsubscribe (a nak while a request of ours is open would come
        straight back to us instead of going to another replica).
        """
        loop = asyncio.get_running_loop()
        await asyncio.sleep(max(0.0, self._last_fetch_at + self._fetch_timeout - loop.time()))
        stranded = await self._hand_back_buffered(sub)
        if stranded:
            log.info("worker.handed_back_buffered", consumer=self.name, count=stranded)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()

    async def _set_aside_stale(self, sub: JetStreamContext.PullSubscription) -> None:
        """Take out of the buffer what may no longer be ours to run, before a fetch()
        returns it as a fresh delivery.

        What reached the buffer since the last fetch() returned is at most that old (give
        or take one fetch). Past a third of ack_wait it may be past its lease, and so may
        anything that sat there across a reconnection (a restarted broker forgets the
        lease; an outage can outlast ack_wait while the loop waits for the connection):
        it is handed back. Past 2/3 of ack_wait (``Lease.LAPSE_FRACTION``) the broker has
        likely given it to another replica already: it is left to its ack_wait, as an
        overdue delivery is, since a nak is not tied to one delivery and would have the
        broker deliver it once more at once, a third handling beside the second. A
        message served in the instant after a fetch gave up (common: a nak's delay may
        end just then) is younger: it is run, not sent round again at the cost of one of
        its deliveries.
        """
        age = asyncio.get_running_loop().time() - self._last_fetch_done
        reconnected = self._reconnects() != self._reconnects_at_fetch
        if age <= self._ack_wait / 3 and not reconnected:
            return
        if age < self._ack_wait * Lease.LAPSE_FRACTION:
            late = await self._hand_back_buffered(sub)
            event = "worker.late_deliveries_handed_back"
        else:
            late = await self._hand_back_buffered(sub, leave=True)
            event = "worker.late_deliveries_left_to_ack_wait"
        if late:
            log.warning(
                event,
                consumer=self.name,
                count=late,
                buffered_s=round(min(age, 1e9), 1),
                reconnected=reconnected,
            )

    def _reconnects(self) -> int:
        """How many times the client has reconnected (0: not known)."""
        counter = reconnect_counter(self._connection or getattr(self._js, "_nc", None))
        return 0 if counter is None else counter()

    async def _hand_back_buffered(
        self, sub: JetStreamContext.PullSubscription, *, leave: bool = False
    ) -> int:
        """Nak what the subscription holds that no fetch() of ours is waiting for
        (``leave``: take it out and leave it to its ack_wait).

        Such messages answer a pull request whose fetch() already returned: the broker
        served it late (a stall on the link or in the broker, a reconnect). They may
        have sat there past ack_wait, already redelivered elsewhere, with nobody sending
        in_progress for them; fetch() would return them all at once, beyond the free
        slots. Handed back, they come again as fresh deliveries.
        """
        # nats-py exposes no public way to take what a pull subscription has buffered.
        inner = getattr(sub, "_sub", None)
        queue: asyncio.Queue[Msg] | None = getattr(inner, "_pending_queue", None)
        count = 0
        while queue is not None and not queue.empty():
            msg = queue.get_nowait()
            # As nats-py's own drains do: a count left high grows with every hand-back
            # until, at the limit, every later message is dropped as a slow consumer.
            inner._pending_size -= len(msg.data)  # type: ignore[union-attr]
            if msg.reply and not JetStreamContext.is_status_msg(msg):
                if leave:
                    self._metrics.left.inc()
                else:
                    await self._hand_back(msg)
                count += 1
        return count

    async def _fetch_loop(
        self, sub: JetStreamContext.PullSubscription, stop: asyncio.Event
    ) -> None:
        stopping: asyncio.Future[bool] = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                # Room in the process, then a slot for a handler: with the process full
                # or every slot busy, wait for them or for stop (a loaded replica must
                # still notice SIGTERM at once).
                if not await self._take(self._room, stopping):
                    break
                if not await self._take(self._slots, stopping):
                    self._room.release()
                    break
                free = 1
                while free < self._max and not self._slots.locked() and not self._room.locked():
                    await self._room.acquire()
                    await self._slots.acquire()
                    free += 1
                if stop.is_set():
                    self._return(free)
                    break
                msgs = await self._fetch(sub, free, stopping)
                self._last_fetch_done = asyncio.get_running_loop().time()
                self._reconnects_at_fetch = self._reconnects()
                # fetch() also returns what reached the buffer while it ran: never more
                # work than slots (a task per extra message would release a slot it never
                # took, and the bound would grow for good).
                for msg in msgs[free:]:
                    await self._hand_back(msg)
                msgs = msgs[:free]
                self._return(free - len(msgs))
                for msg in msgs:
                    task = asyncio.create_task(
                        self._process(msg, Slot(self._slots, self._metrics.waiting))
                    )
                    self._tasks[task] = msg.metadata.sequence.stream
                    task.add_done_callback(self._forget_task)
        finally:
            stopping.cancel()

    @staticmethod
    async def _take(semaphore: asyncio.Semaphore, stopping: asyncio.Future[bool]) -> bool:
        """One unit of ``semaphore``, or False when stopping comes first."""
        taken: asyncio.Future[bool] = asyncio.ensure_future(semaphore.acquire())
        await asyncio.wait([taken, stopping], return_when=asyncio.FIRST_COMPLETED)
        if not taken.done():
            taken.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await taken
            if taken.cancelled():
                return False
        return True

    def _return(self, count: int) -> None:
        """Give back ``count`` pairs of room and slot the fetch loop took and did not use."""
        for _ in range(count):
            self._slots.release()
            self._room.release()

    async def _fetch(
        self, sub: JetStreamContext.PullSubscription, batch: int, stopping: asyncio.Future[bool]
    ) -> list[Msg]:
        await self._until_connected(stopping)
        if stopping.done():
            return []
        # After the wait for slots and for the connection: what the buffer holds now is
        # what fetch() would return first.
        await self._set_aside_stale(sub)
        self._last_fetch_at = asyncio.get_running_loop().time()
        fetch: asyncio.Future[list[Msg]] = asyncio.ensure_future(
            sub.fetch(batch, timeout=self._fetch_timeout)
        )
        waiters: list[asyncio.Future[object]] = [fetch, stopping]  # type: ignore[list-item]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if not fetch.done():
            # Stopping: let the fetch end by itself (within its timeout) rather than
            # cancel it with messages half-received, and hand back what it brings.
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                for msg in await fetch:
                    await self._hand_back(msg)
            return []
        try:
            fetched = fetch.result()
        except TimeoutError:  # nats-py raises its own subclass or plain asyncio.TimeoutError
            fetched = []
        except nats.errors.Error as exc:
            # Broker away (restart, reconnect): back off a little and try again.
            self._failing = True
            if (untold := self._fault_log.take(("fetch", str(exc)))) is not None:
                log.warning(
                    "worker.fetch_failed",
                    consumer=self.name,
                    error=str(exc),
                    **({"suppressed": untold} if untold else {}),
                )
            await asyncio.sleep(0.5)
            if isinstance(
                exc, nats.js.errors.ServiceUnavailableError | nats.js.errors.NotFoundError
            ):
                await self._consumer_again()
            return []
        if self._failing:  # over: say so, with what the sampler kept back
            self._failing = False
            log.info(
                "worker.fetch_recovered",
                consumer=self.name,
                errors_not_logged=self._fault_log.reset(),
            )
        return fetched

    async def _consumer_at_start(self, stop: asyncio.Event) -> bool:
        """``ensure_consumer``, tried again with backoff while JetStream does not answer
        (a cluster still electing its leaders timed it out, and the service crashed);
        False when ``stop`` comes first. A refusal (bad config, permissions) raises."""
        return await retried_until_stopped(
            self.ensure_consumer,
            stop,
            retry_on=(
                TimeoutError,
                nats.errors.NoRespondersError,
                nats.js.errors.ServiceUnavailableError,
            ),
            event="worker.consumer_not_ready",
            consumer=self.name,
        )

    async def _consumer_again(self) -> None:
        """The consumer may be gone (deleted by hand, or with its stream): without it no
        fetch is ever answered, on any replica, until a restart. Make it again; the pull
        subscription works again as soon as a consumer of its name exists."""
        try:
            await self.ensure_consumer()
        except (TimeoutError, nats.errors.Error) as exc:  # the stream itself missing, say
            if (untold := self._fault_log.take(("consumer", str(exc)))) is not None:
                log.warning(
                    "worker.consumer_missing",
                    consumer=self.name,
                    error=str(exc),
                    **({"suppressed": untold} if untold else {}),
                )
        else:
            log.info("worker.consumer_ensured", consumer=self.name)

    async def _until_connected(self, stopping: asyncio.Future[bool]) -> None:
        """While the client is away, wait (no pull request to buffer) or stop."""
        connection = self._connection
        while connection is not None and not connection.is_connected and not stopping.done():
            await asyncio.wait([stopping], timeout=0.25)

    async def _process(self, msg: Msg, slot: Slot) -> None:
        try:
            try:
                delivery = await self._delivery(msg, slot)
            except Exception as exc:
                # A defect met reading this message (the handler's own exceptions map to
                # outcomes): parked with the reason, where an operator sees it and can
                # replay it once fixed, not a task dying unseen while the message comes
                # back each ack_wait until it is parked for a crash that never was.
                log.exception(
                    "worker.unreadable_delivery",
                    consumer=self.name,
                    stream_seq=msg.metadata.sequence.stream,
                )
                reason = f"unexpected {type(exc).__name__} reading it: {exc}"
                await self._dead_letter(msg, reason, msg.metadata.num_delivered)
                return
            if delivery is None:
                return
            # The heartbeat covers the wait for the key too: a delivery queued behind an
            # earlier one of its conversation must not outlive ack_wait either.
            heartbeat = Heartbeat(delivery, interval_s=max(0.5, self._ack_wait / 3))
            try:
                # In flight from its slot on, waiting for its key included: the gauge at
                # the concurrency limit means the replica takes no more.
                with self._metrics.in_flight.track_inprogress():
                    async with self._turn(delivery):
                        started = time.monotonic()
                        outcome = await self._run_handler(delivery)
                        self._metrics.handler_seconds.observe(time.monotonic() - started)
            except asyncio.CancelledError:
                # Stopping: running or queued. Overdue, the broker has likely given it
                # to another replica: a nak would make it deliver the message once more
                # at once, beside that one (a nak is not tied to a delivery). Its
                # ack_wait has run out, or nearly: the broker passes it on itself.
                if delivery.lease.overdue:
                    self._leave(delivery, "stopping")
                else:
                    await self._hand_back(msg)
                raise
            finally:
                # Before the delivery is settled or handed back: no heartbeat of it is
                # sent after that (one on its way went out before, on the same link).
                heartbeat.stop()
            await self._settle(delivery, outcome)
        finally:
            slot.stop_waiting()
            slot.give_back()
            self._room.release()

    async def _delivery(self, msg: Msg, slot: Slot | None = None) -> Delivery | None:
        meta = msg.metadata
        if self._first_past_limit(msg):
            # The last delivery ended without an outcome, as far as the broker knows. Its
            # replica may only have lost its hold (stalled, or the broker restarted) and
            # still finish: give it one ack_wait before parking. Its ack then settles the
            # message; parked at once, the consumer's ack floor would pass a message still
            # being handled, and the next of its conversation would not wait for it.
            log.warning(
                "worker.past_limit_grace",
                consumer=self.name,
                stream_seq=meta.sequence.stream,
                delivery=meta.num_delivered,
            )
            await self._nak(msg, self._ack_wait)
            return None
        if 0 < self._max_deliver < meta.num_delivered:
            reason = (
                f"delivery {meta.num_delivered} is past the limit of {self._max_deliver}: "
                "the last one ended without an outcome (its process stopped or crashed, "
                "or its dead-lettering failed)"
            )
            await self._dead_letter(msg, reason, meta.num_delivered)
            return None
        last_try = 0 < self._max_deliver <= meta.num_delivered
        try:
            event = decode_event(msg.data)
        except NewerEventError as exc:
            if last_try:
                reason = f"{exc} (`wecombot dlq replay` it once every replica is upgraded)"
                await self._dead_letter(msg, reason, meta.num_delivered)
            else:
                # A rolling upgrade under way: a replica of the newer build can read it.
                # Handed back, a delivery spent; parked at the last like any other.
                log.warning(
                    "worker.newer_event",
                    consumer=self.name,
                    stream_seq=meta.sequence.stream,
                    delivery=meta.num_delivered,
                    reason=str(exc),
                )
                if await self._nak(msg, backoff_delay(meta.num_delivered, base=1.0)):
                    self._metrics.handed_back.inc()
            return None
        except EventDecodeError as exc:
            await self._dead_letter(msg, str(exc), meta.num_delivered)
            return None
        if not topology.is_user_id(event.conversation):
            # Not one our gateway stores (it refuses such a FromUserName): handled, its
            # outcome's subject, past the broker's control line limit, made nats-py
            # close the connection for good, and the service answered nobody again.
            shown = event.conversation[:40] + ("..." if len(event.conversation) > 40 else "")
            reason = f"the conversation {shown!r} is not a WeCom UserID"
            await self._dead_letter(msg, reason, meta.num_delivered)
            return None
        if msg.subject != (filed := topology.subject_for(event)):
            # Appended by hand or by a faulty build: handled, an outcome filed on another
            # conversation went to the user its body names, and a reply filed on the
            # gateway's branch wedged its own conversation (every later append refused).
            reason = (
                f"a {type(event).__name__} filed on {msg.subject!r}: its conversation "
                f"and type belong on {filed!r}"
            )
            await self._dead_letter(msg, reason, meta.num_delivered)
            return None
        return Delivery(
            event=event,
            stream_seq=meta.sequence.stream,
            num_delivered=meta.num_delivered,
            subject=msg.subject,
            msg=msg,
            lease=Lease(
                self._ack_wait, reconnects=reconnect_counter(getattr(msg, "_client", None))
            ),
            last_try=last_try,
            stored_at=meta.timestamp.timestamp(),
            slot=slot,
        )

    @contextlib.asynccontextmanager
    async def _turn(self, d: Delivery) -> AsyncIterator[None]:
        """Wait for this delivery's key (deliveries of one key run one at a time, in
        fetch order); no key, no wait."""
        key = self._key(d.event) if self._key else None
        if key is None:
            yield
            return
        queue = self._queued.setdefault(key, [])
        lock = self._locks.setdefault(key, asyncio.Lock())
        queue.append(d.stream_seq)
        try:  # another user's delivery works meanwhile
            await acquire_idle(lock, d.idle, contended=len(queue) > 1)
        except asyncio.CancelledError:
            queue.remove(d.stream_seq)
            self._forget_idle(key)
            raise
        queue.remove(d.stream_seq)
        try:
            yield
        finally:
            lock.release()
            self._forget_idle(key)

    def _forget_idle(self, key: str) -> None:
        lock = self._locks.get(key)
        if not self._queued.get(key) and lock is not None and not lock.locked():
            self._queued.pop(key, None)
            self._locks.pop(key, None)

    async def _run_handler(self, d: Delivery) -> Outcome | DeadLetter:
        bound = structlog.contextvars.bound_contextvars(
            app=d.event.app,
            user=d.event.conversation,
            msg_id=d.event.correlation_id,
            event_id=d.event.event_id,
            stream_seq=d.stream_seq,
            delivery=d.num_delivered,
        )
        with bound:
            try:
                return await self._handler(d)
            except PermanentError as exc:
                return DeadLetter(f"{type(exc).__name__}: {exc}")
            except TransientError as exc:
                return Nak(backoff_delay(d.num_delivered), f"{type(exc).__name__}: {exc}")
            except Exception as exc:
                log.exception("worker.handler_crashed", consumer=self.name)
                return Nak(backoff_delay(d.num_delivered), f"unexpected {type(exc).__name__}")

    async def _settle(self, d: Delivery, outcome: Outcome | DeadLetter) -> None:
        if isinstance(outcome, DeadLetter):
            await self._dead_letter(d.msg, outcome.reason, d.num_delivered)
            return
        if isinstance(outcome, Ack):
            self.processed += 1
            try:
                await d.msg.ack_sync(timeout=5)
            except (TimeoutError, nats.errors.Error) as exc:
                # The work is recorded in the log; a redelivery finds it done.
                log.warning("worker.ack_failed", consumer=self.name, error=str(exc))
                return
            self._metrics.acked.inc()
            return
        if isinstance(outcome, HandBack):
            if d.lease.overdue:
                self._leave(d, outcome.reason)
                return
            log.info("worker.handed_back", consumer=self.name, count=1, reason=outcome.reason)
            if await self._nak(d.msg, outcome.delay_s):
                self._metrics.handed_back.inc()
            return
        if d.last_try:
            await self._dead_letter(
                d.msg, f"gave up after {d.num_delivered}: {outcome.reason}", d.num_delivered
            )
            return
        if d.lease.overdue:
            # The broker has likely given it to another replica already, and a nak would
            # have it delivered once more at once, beside that one (a nak is not tied to
            # a delivery): its ack_wait passes it on. (Lapsed by a reconnection alone it
            # is handed back as ever: after a failover it is usually still ours, and
            # waiting out ack_wait stalled every conversation in flight.)
            self._leave(d, outcome.reason)
            return
        log.info(
            "worker.retry",
            consumer=self.name,
            reason=outcome.reason,
            delay_s=round(outcome.delay_s, 2),
            delivery=d.num_delivered,
        )
        if await self._nak(d.msg, outcome.delay_s):
            self._metrics.retried.inc()

    def _leave(self, d: Delivery, reason: str) -> None:
        """Settle nothing: an overdue delivery is left to its ack_wait (see _settle)."""
        self._metrics.left.inc()
        log.info(
            "worker.left_to_ack_wait", consumer=self.name, stream_seq=d.stream_seq, reason=reason
        )

    async def _hand_back(self, msg: Msg) -> None:
        """Not ours to run now (stopping, no free slot, too old in the buffer): nak at
        once, so another replica takes it now; but the first delivery past the limit
        keeps its grace of one ack_wait (see ``_delivery``), or it would be parked at once
        while the replica that lost its hold may still finish it."""
        if await self._nak(msg, self._ack_wait if self._first_past_limit(msg) else 0):
            self._metrics.handed_back.inc()

    def _first_past_limit(self, msg: Msg) -> bool:
        """The first delivery past max_deliver: it waits one ack_wait before it is parked."""
        return self._max_deliver > 0 and msg.metadata.num_delivered == self._max_deliver + 1

    async def _nak(self, msg: Msg, delay: float) -> bool:
        """Nak ``msg``; False when the nak did not go out (it then comes back after
        ack_wait, as the broker sees no answer)."""
        try:
            await msg.nak(delay=delay if delay > 0 else None)
        except nats.errors.Error:
            return False
        return True

    async def _dead_letter(self, msg: Msg, reason: str, deliveries: int) -> None:
        """Park a poison message in the dead-letter stream with the reason, then term it."""
        meta = msg.metadata
        headers = {
            DLQ_REASON: reason[:1000],
            DLQ_CONSUMER: self.name,
            DLQ_SUBJECT: msg.subject,
            DLQ_STREAM_SEQ: str(meta.sequence.stream),
            DLQ_DELIVERIES: str(deliveries),
            # The time the broker stored it tells a message from one at the same seq
            # of a stream made again (the DLQ remembers ids for 2 hours: a new poison
            # message there was dropped as a repeat, and terminated unparked).
            "Nats-Msg-Id": (
                f"dlq:{self.name}:{meta.sequence.stream}:{meta.timestamp.timestamp():.6f}"
            ),
        }
        data = self._fitted(msg, headers)
        try:
            parked = await self._js.publish(
                f"{topology.PREFIX}.dlq.{self.name}", data, headers=headers, timeout=5
            )
        except (TimeoutError, nats.errors.Error) as exc:
            log.error("worker.dead_letter_failed", consumer=self.name, error=str(exc))
            # Keep it: the consumer redelivers without limit, and a delivery past
            # max_deliver comes straight back here.
            await self._nak(msg, self.DEAD_LETTER_RETRY_S)
            return
        if not parked.duplicate:  # a repeat of one parked already (its term was lost)
            self._metrics.dead_lettered.inc()
        log.error(
            "worker.dead_lettered",
            consumer=self.name,
            reason=reason,
            stream_seq=meta.sequence.stream,
            subject=msg.subject,
        )
        with contextlib.suppress(nats.errors.Error):
            await msg.term()

    def _fitted(self, msg: Msg, headers: dict[str, str]) -> bytes:
        """The dead letter's body: the message's own, or as much of it as fits the
        broker's ``max_payload`` with ``headers`` (whose reason then says so).

        The broker holds a message's headers and body together to ``max_payload``, while
        nats-py checks the body alone: a dead letter of a message stored within the
        headers' size of the limit (garbage appended by hand, say) went over it, the
        broker answered ``-ERR`` and nats-py closed the connection for good; every
        replica that took the message next failed the same way."""
        limit = max_payload(self._connection or self._js)
        if limit is None or message_size(msg.data, headers) <= limit:
            return msg.data
        headers[DLQ_REASON] = (
            f"{headers[DLQ_REASON][:200]} (the body, {len(msg.data):,} bytes, is cut to fit "
            f"the broker's max_payload: the whole is in {topology.CONVERSATION_STREAM} at "
            f"seq {msg.metadata.sequence.stream})"
        )
        return msg.data[: max(0, limit - message_size(b"", headers))]

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def _shutdown(self) -> None:
        if not self._tasks:
            return
        log.info("worker.draining", consumer=self.name, in_flight=len(self._tasks))
        _, pending = await asyncio.wait(set(self._tasks), timeout=self._grace)
        # Cancelled tasks nak in the order they are cancelled, and the broker redelivers
        # in nak order: hand back in stream order so the next replica sees it that way.
        for task in sorted(pending, key=lambda t: self._tasks.get(t, 0)):
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            # (an overdue one among them is left to its ack_wait: worker.left_to_ack_wait)
            log.info("worker.handed_back", consumer=self.name, count=len(pending))
