"""Deliver one outcome event to WeCom: load the conversation, decide, send, append.

For an outcome R at stream sequence s of conversation C (see docs/architecture.md):

1. Load C's state: the cache's copy caught up from the log (never authoritative).
2. R already finished (ReplyDelivered / DeliveryFailed) → ack; a redelivery never re-sends.
3. An earlier outcome of C is unfinished (another replica is delivering it, or it waits
   for a redelivery) → poll the log until it finishes, up to ``order_wait_s`` (again and
   again while no token service runs: the earlier one waits for it too), then nak so it
   is tried again in about a second. Per-user order holds across replicas.
4. Split R.text into parts and resume after the last part recorded as PartDelivered.
5. Send each part (token from the token service; retry busy answers in process; refresh
   a refused token once) and append PartDelivered right after WeCom accepts it, as a
   conditional append on C's send branch. A permanent refusal appends DeliveryFailed.
6. All parts out → append ReplyDelivered → ack.

Any append can meet :class:`ConcurrencyConflict` (someone else wrote C's send branch):
then catch up and decide again, without re-sending a part this delivery already sent.

A part may have been accepted by WeCom without its PartDelivered being appended (a crash
in between, or an answer lost on the way back), or be in flight from another replica (our
hold on the message lapsed, ``Delivery.lapsed``, and the broker redelivered it). So the
parts a *redelivery* sends, any retry of a send that may have gone through, and every
send after a lapse or a conflict ask WeCom's duplicate check to drop it if an identical
message reached the user since the reply's last recorded part (see
:func:`~.domain.duplicate_check_interval`; the window reaches
``DeliveryPolicy.check_slack_s`` further, since WeCom measures it from when it handles
a request, late when it is slow). If a message inside that window is identical to the
part, or may be, the check is skipped, since it could not tell them apart. Fresh sends
never ask: identical replies (the same apology twice) are both delivered, and a fresh
send racing an identical one of another replica (a replay, a reply that gave up its
turn) is never dropped for it; a first attempt WeCom handles after its retry got
through is then delivered twice (docs/reliability.md).

A ReplyRequeued (an operator's ``wecombot dlq replay`` of a reply whose delivery failed)
is delivered as that reply once more, in its own place in the user's order: after the
last part recorded, the first send with the duplicate check (the failed round may have
had it accepted), and ending in a ReplyDelivered or DeliveryFailed of its own. A requeue
(or the reply itself) the broker delivers again after a newer requeue of the reply is
settled unsent (``sender.requeue_superseded``): the newer one's delivery runs the round.

A permanent refusal (and an empty reply) is recorded as DeliveryFailed, then raised, so
the worker parks the outcome in the dead-letter stream with the reason. On the last
delivery the consumer allows, a reply that still fails for a transient
reason is recorded as DeliveryFailed (so later replies to the user are not held back
forever) and handed to the worker, which dead-letters it for operators.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol, TypedDict

import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext

from wecombot_common import topology
from wecombot_common.bus import (
    AppendUnavailable,
    ConcurrencyConflict,
    SettledFloor,
    StoredEvent,
    ack_floor,
    append_event,
    read_conversation,
)
from wecombot_common.errors import PermanentError, TransientError
from wecombot_common.events import (
    DeliveryFailed,
    Event,
    NewerEventError,
    Outcome,
    PartDelivered,
    ReplyDelivered,
    ReplyRequeued,
    decode_event,
    derived_id,
    utcnow,
)
from wecombot_common.metrics import SENDER_PARTS, SENDER_REPLIES
from wecombot_common.tokens import (
    NoTokenService,
    TokenError,
    TokenServiceSilent,
    TransientTokenError,
)
from wecombot_common.topology import ConversationRef
from wecombot_common.worker import Ack, Delivery, HandBack, LeaveIdle, Nak, backoff_delay
from wecombot_common.worker import Outcome as Settlement

from .domain import (
    CHECK_REACHES_BACK_S,
    CLOCK_SKEW_ALLOWANCE_S,
    FINISHED_KEPT,
    OUTCOME_TYPES,
    ConversationState,
    OutcomeState,
    compact,
    duplicate_check_interval,
    fold,
    hourly_delay,
    layout,
    next_part,
    pending_before,
    rate_delay,
    record,
)
from .errcodes import BUSY, EMPTY_CONTENT, explain
from .errors import SendError, SendRejected, SendRetryable, TokenRejected
from .wecom import MessageApi

__all__ = ["ConversationCache", "DeliveryPolicy", "ReplySender", "TokenSource", "conversation_key"]


log = structlog.get_logger(__name__)
_PART_SENT = SENDER_PARTS.labels("sent")
_PART_DEDUPLICATED = SENDER_PARTS.labels("deduplicated")
_DELIVERED = SENDER_REPLIES.labels("delivered")
_FAILED = SENDER_REPLIES.labels("failed")


# How long the order wait's check for a token service waits for its answer: no
# responders comes at once; a replica busy with a refresh (up to 24 s) is running.
PROBE_TIMEOUT_S = 2.0


class _StoppedWaitingForToken(Exception):
    """A stop (or a lost hold) came while the reply waited for a token service: hand it
    back (the worker leaves one whose hold was lost to its ack_wait)."""


class TokenSource(Protocol):
    """The token service as the sender sees it (``wecombot_common.tokens.TokenClient``)."""

    async def get(self, app: str) -> str: ...

    async def invalidate(self, app: str, token: str) -> str: ...


@dataclass(frozen=True)
class DeliveryPolicy:
    order_wait_s: float = 60.0
    retry_attempts: int = 4  # in-process retries of one part after the first try
    per_user_per_minute: int = 30
    per_user_per_hour: int = 1000
    retry_base_s: float = 0.1
    retry_cap_s: float = 5.0
    conflict_rounds: int = 5
    append_attempts: int = 3
    settled_refresh_s: float = 1.0  # how stale the consumer's ack floor may be
    # How much later than sent WeCom may handle a send and its duplicate check still reach
    # back to the reply's last recorded part: twice SENDER_HTTP_TIMEOUT (when the sender
    # gives up on an answer and retries) and 10 s more (main.py sets it).
    check_slack_s: int = 30


def conversation_key(event: Event) -> str:
    """The worker's serialisation key: one conversation at a time per process."""
    return ConversationRef.of(event).root


# What a cached state costs besides itself: its key and its slot in the cache.
ENTRY_BYTES = 440
# Conversations cached at most, whatever their size: the byte budget binds first.
MAX_CACHED = 1_000_000


class ConversationCache:
    """Recently used conversation states, always caught up before use; about
    ``max_bytes`` of them (``SENDER_CACHE_MB``), the least recently used dropped first
    (read from the log again when needed). Each state keeps only the newest delivered
    replies (:func:`~.domain.compact`): bounded by a count alone, a replica holding long
    conversations grew without end. ``max_entries`` is a safety net the bytes reach
    first: at 4,096 it was the limit, at 18 of 64 MiB (a soak of 7,400 users), and each
    conversation past it was read whole again, from the start of the log, at its next
    reply (which also keeps nats-server's blocks of the whole stream in its memory)."""

    def __init__(
        self,
        js: JetStreamContext,
        *,
        max_entries: int = MAX_CACHED,
        max_bytes: int | None = 64 << 20,
        finished_kept: int = FINISHED_KEPT,
    ) -> None:
        self._js = js
        self._max = max_entries
        self._max_bytes = max_bytes
        self._finished_kept = finished_kept
        self.bytes = 0  # the cached states' approx_bytes, and ENTRY_BYTES each
        self._entries: OrderedDict[ConversationRef, tuple[ConversationState, int]] = OrderedDict()

    async def load(
        self,
        conv: ConversationRef,
        *,
        through: int = 0,
        leader: bool = False,
        want: str | None = None,
    ) -> ConversationState:
        """The conversation caught up from the log, through stream seq ``through`` at
        least (the event being handled, or one the log has just reported storing).

        A direct read from a stream follower that lags its leader would end before
        ``through``, and the state would miss an earlier reply still being delivered
        (this one would overtake it) or the reply a requeue names (parked as "not in the
        log"): ``read_conversation`` reads the rest from the leader then (``reach``), and
        all of it with ``leader`` (an append was refused, or the duplicate check's window
        must be whole: the log may hold more than a follower shows).

        A stream without a leader (electing one after a node was lost, for seconds) does
        not answer a leader read: then this reads directly, as far as the followers
        have it. A reply recorded as done is done; one still to send waits for the
        leader anyway, since its append needs it. TransientError if the log cannot be
        read at all.

        ``want``: the outcome the caller decides from. A cached state keeps only the
        newest delivered replies (:func:`~.domain.compact`): one it forgot is read
        again, with the whole conversation, and kept."""
        cached = self._entries.get(conv)
        state = await self._caught_up(conv, cached and cached[0], through, leader)
        if want is not None and state.may_have_forgotten(want):
            log.info("sender.conversation_read_again", reply_id=want)
            state = await self._caught_up(conv, None, through, leader)
        self.put(conv, state, keep=(want,) if want is not None else ())
        return state

    async def _caught_up(
        self, conv: ConversationRef, cached: ConversationState | None, through: int, leader: bool
    ) -> ConversationState:
        state = cached or ConversationState()
        try:
            if leader:
                try:
                    state = await self._read(conv, state, direct=False, through=through)
                except (TimeoutError, nats.errors.Error) as exc:
                    log.info("sender.leader_unavailable", error=type(exc).__name__)
                    leader = False
            if not leader:
                state = await self._read(conv, state, direct=True, through=through)
        except (TimeoutError, nats.errors.Error) as exc:
            raise TransientError(f"cannot read the conversation: {type(exc).__name__}") from exc
        return state

    async def _read(
        self, conv: ConversationRef, state: ConversationState, *, direct: bool, through: int
    ) -> ConversationState:
        read = read_conversation(
            self._js, conv, after_seq=state.last_seq, direct=direct, reach=through
        )
        return fold(state, [stored async for stored in read])

    def put(
        self, conv: ConversationRef, state: ConversationState, *, keep: Iterable[str] = ()
    ) -> None:
        """Cache ``state``, the oldest delivered replies but ``keep`` dropped, and keep to
        the budget (the state just cached stays, alone over it)."""
        state = compact(state, keep=keep, finished_kept=self._finished_kept)
        size = ENTRY_BYTES + state.approx_bytes()
        replaced = self._entries.pop(conv, None)
        if replaced is not None:
            self.bytes -= replaced[1]
        self._entries[conv] = (state, size)
        self.bytes += size
        while len(self._entries) > 1 and (
            len(self._entries) > self._max
            or (self._max_bytes is not None and self.bytes > self._max_bytes)
        ):
            self.bytes -= self._entries.popitem(last=False)[1][1]

    def forget(self, conv: ConversationRef) -> None:
        """Drop what is held for ``conv``: the next load reads it from the log."""
        held = self._entries.pop(conv, None)
        if held is not None:
            self.bytes -= held[1]

    def cached(self, conv: ConversationRef) -> ConversationState | None:
        """What is held for ``conv`` now, not caught up (None: nothing)."""
        held = self._entries.get(conv)
        return held[0] if held is not None else None

    def __len__(self) -> int:
        return len(self._entries)


class _Envelope(TypedDict):
    event_id: str
    app: str
    conversation: str
    causation_id: str
    correlation_id: str


@dataclass
class _Job:
    """One delivery of one outcome, and what this delivery already sent."""

    delivery: Delivery
    reply: Outcome
    conv: ConversationRef
    spans: list[tuple[int, int]]  # each part's place in the reply's text (domain.layout)
    last_try: bool
    order_seq: int  # its place in the user's order: the outcome's stream sequence
    requeued_by: str = ""  # the ReplyRequeued being delivered ("" for the outcome itself)
    sent: dict[int, str] = field(default_factory=dict)  # index → msgid, maybe unrecorded
    # another writer appended to the conversation's send branch meanwhile: a replica
    # whose hold on this reply lapsed may be sending the same parts
    contested: bool = False
    parts: list[str] = field(init=False)  # the spans' texts
    # what the layout was made from: the last recorded part and its span (a split costs
    # ~1 ms per 2 KB, on the event loop: made again only when the record moved)
    laid_for: tuple[int, tuple[int, int] | None] | None = None
    # other replies' texts, read once per delivery to compare with what it re-sends
    others_text: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.parts = [self.reply.text[start:end] for start, end in self.spans]

    @property
    def reply_id(self) -> str:
        return self.reply.event_id

    @property
    def repeat(self) -> bool:
        """An earlier round may have sent parts it did not record: a redelivery, or the
        failed round a requeue retries."""
        return self.delivery.num_delivered > 1 or bool(self.requeued_by)

    def lay_out(self, outcome: OutcomeState) -> None:
        """Take the parts as the log's record of this reply places them (``layout``)."""
        last = max(outcome.delivered, default=-1)
        basis = (last, outcome.spans.get(last))
        if basis == self.laid_for:
            return
        self.laid_for = basis
        spans = layout(self.reply.text, outcome)
        if spans == self.spans:
            return
        # What this delivery sent without a record yet keeps its index only where the
        # text is the same part.
        self.sent = {
            i: msgid
            for i, msgid in self.sent.items()
            if i < min(len(spans), len(self.spans)) and spans[i] == self.spans[i]
        }
        self.spans = spans
        self.parts = [self.reply.text[start:end] for start, end in spans]

    @property
    def round(self) -> tuple[str, ...]:
        """What tells this round's closing event from an earlier round's."""
        return (self.requeued_by,) if self.requeued_by else ()


class ReplySender:
    """The sender's message handler: ``PullWorker(..., ReplySender(...).handle, ...)``.

    ``queued_behind(key)`` gives the stream sequences of deliveries of the same
    conversation waiting in this process behind the one being handled
    (``PullWorker.queued``): an earlier reply redelivered there cannot finish while we
    hold the conversation, so we step aside at once instead of waiting it out.
    ``stopping`` ends an order wait early when the service shuts down.
    """

    def __init__(
        self,
        js: JetStreamContext,
        tokens: TokenSource,
        api: MessageApi,
        *,
        app: str,
        policy: DeliveryPolicy,
        cache: ConversationCache | None = None,
        queued_behind: Callable[[str], list[int]] | None = None,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self._js = js
        self._tokens = tokens
        self._api = api
        self._app = app
        self._policy = policy
        self._cache = cache if cache is not None else ConversationCache(js)  # empty: falsy
        self.queued_behind: Callable[[str], list[int]] = queued_behind or (lambda _key: [])
        self._stopping = stopping or asyncio.Event()
        self._token_service_absent = False  # said once per outage, not per reply
        # Every outcome at or below the consumer's ack floor was acknowledged or
        # dead-lettered: no sender will deliver it again (only an operator's replay
        # would). One dead-lettered without its DeliveryFailed (its last delivery ended
        # without an outcome: a stop, a crash, the log unreachable) stays unfinished in
        # the log for good, and must not hold back the user's later replies.
        self._settled = SettledFloor(
            lambda: ack_floor(js, topology.SENDER_CONSUMER), refresh_s=policy.settled_refresh_s
        )

    async def handle(self, d: Delivery) -> Settlement:
        event = d.event
        if event.app != self._app:
            raise PermanentError(f"reply for app {event.app!r}; this sender serves {self._app!r}")
        if isinstance(event, ReplyRequeued):
            return await self._requeued(d, event)
        if not isinstance(event, OUTCOME_TYPES):
            log.warning("sender.not_an_outcome", type=type(event).__name__)
            return Ack()
        return await self._run(self._job(d, event, order_seq=d.stream_seq))

    def _job(self, d: Delivery, reply: Outcome, *, order_seq: int, requeued_by: str = "") -> _Job:
        return _Job(
            delivery=d,
            reply=reply,
            conv=ConversationRef.of(reply),
            spans=[],  # laid out against the log's record (_attempt)
            last_try=d.last_try,
            order_seq=order_seq,
            requeued_by=requeued_by,
        )

    async def _requeued(self, d: Delivery, requeue: ReplyRequeued) -> Settlement:
        """Deliver the requeued reply again, from the log's copy of it."""
        state = await self._cache.load(
            ConversationRef.of(requeue), through=d.stream_seq, want=requeue.reply_id
        )
        seq = state.outcome(requeue.reply_id).seq
        if seq is None:
            raise PermanentError(f"the requeued reply {requeue.reply_id} is not in the log")
        reply = await self._read_outcome(seq)
        if reply.event_id != requeue.reply_id:
            raise PermanentError(f"seq {seq} is not the requeued reply {requeue.reply_id}")
        log.info("sender.requeued", reply_id=requeue.reply_id, reason=requeue.reason)
        return await self._run(self._job(d, reply, order_seq=seq, requeued_by=requeue.event_id))

    async def _run(self, job: _Job) -> Settlement:
        for _ in range(self._policy.conflict_rounds):
            try:
                return await self._attempt(job)
            except ConcurrencyConflict:
                # Another writer: catch up (the log holds more than our state, so from
                # the leader: job.contested), decide again.
                log.info("sender.append_conflict")
                job.contested = True
                await self._forget_if_behind_nothing(job)
        raise TransientError("the conversation's send branch kept changing; retry later")

    async def _forget_if_behind_nothing(self, job: _Job) -> None:
        """After a refused append: when the leader's log holds nothing the cached state
        has not read, nobody appended; the branch lost records the state still counts
        (aged out after WECOMBOT_HISTORY_MAX_AGE, dropped past WECOMBOT_HISTORY_MAX_MB,
        purged), so its expected sequence can never match again. Every record of the
        user's next reply was refused, its first part sent again at each delivery, until
        it was dead-lettered and the later replies stuck behind it. The state is read
        from the log afresh (the llm does the same: ``llm.conversation_rebuilt``)."""
        held = self._cache.cached(job.conv)
        if held is None:
            return
        now = await self._cache.load(
            job.conv, through=job.delivery.stream_seq, leader=True, want=job.reply_id
        )
        if now.last_seq == held.last_seq:
            log.info("sender.conversation_rebuilt", expected_seq=held.last_send_seq)
            self._cache.forget(job.conv)

    # ------------------------------------------------------------ deciding

    async def _load(self, job: _Job) -> ConversationState:
        """The conversation, through the event being handled at least. Read from the
        stream leader for a contested delivery (an append was refused: the log holds
        more than a follower may show) and for a repeat: the duplicate check's window
        must show every part sent since, a later reply's too (one that overtook this
        one), which a lagging follower may not show yet (``ConversationCache.load``).
        A first delivery whose turn came by the consumer's ack floor may not show the
        earlier reply's end: its retries' check treats that reply as unfinished."""
        leader = job.repeat or job.contested
        return await self._cache.load(
            job.conv, through=job.delivery.stream_seq, leader=leader, want=job.reply_id
        )

    async def _attempt(self, job: _Job) -> Settlement:
        state = await self._load(job)
        if _superseded(job, state):
            return Ack()
        if pending_before(state, job.order_seq) and not state.outcome(job.reply_id).terminal:
            # The user's hour is full: the earlier replies wait for it too, so waiting for
            # them would only spend this reply's deliveries (one per order wait).
            held = self._over_the_hour(state)
            if held is not None:
                return held
            turn = await self._take_turn(job, state)
            if isinstance(turn, Nak | HandBack):
                return turn
            state = turn
        finished = state.outcome(job.reply_id)
        job.lay_out(finished)
        if finished.terminal:
            if finished.failure is not None:
                # Recorded as failed, and the delivery that recorded it did not get it
                # dead-lettered (that failed, or it died in between): park it now, so an
                # operator can replay it. The dead letter's Nats-Msg-Id drops a repeat.
                raise PermanentError(f"recorded as failed: {finished.failure}")
            log.info("sender.already_finished")
            return Ack()
        if not job.parts:
            await self._fail(job, state, EMPTY_CONTENT, explain(EMPTY_CONTENT))
            raise SendRejected(EMPTY_CONTENT, explain(EMPTY_CONTENT))
        for index in range(next_part(state.outcome(job.reply_id)), len(job.parts)):
            if index not in job.sent:
                paced = self._over_the_hour(state) or await self._paced(job, state)
                if paced is not None:
                    return paced
                try:
                    job.sent[index] = await self._send_part(job, state, index)
                except _StoppedWaitingForToken as exc:
                    return HandBack(str(exc))
                except (SendRejected, TokenError) as exc:
                    await self._fail(job, state, *_failure(exc))
                    raise  # recorded; the worker dead-letters it with the reason
                except (SendRetryable, TokenRejected, TransientTokenError) as exc:
                    return await self._retry_later(job, state, exc)
            state = await self._append_part(job, state, index)
        return await self._finish(job, state)

    async def _take_turn(
        self, job: _Job, state: ConversationState
    ) -> ConversationState | Nak | HandBack:
        """Per-user order: wait for earlier replies (as long as no token service runs);
        nak if they take too long, except on the last delivery, where delivering out of
        order beats losing the reply."""
        waited = await self._wait_turn(job, state)
        if waited is not None:
            return waited
        if not job.last_try:
            if self._stopping.is_set():
                return HandBack("stopping while an earlier reply to this user is delivered")
            delay = random.uniform(0.5, 1.5)  # noqa: S311 (jitter, not crypto)
            return Nak(delay, "an earlier reply to this user is still being delivered")
        log.warning("sender.order_given_up")
        return await self._load(job)

    async def _wait_turn(self, job: _Job, state: ConversationState) -> ConversationState | None:
        """Poll the log until no earlier reply of the conversation is pending; None when
        the wait is over without that (time is up, we are stopping, or the earlier reply
        is queued behind us in this process)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._policy.order_wait_s
        delay = 0.05
        log.info("sender.waiting_for_earlier_reply")
        while True:
            pending = {o.delivered_by for o in pending_before(state, job.order_seq)}
            if pending:
                settled = await self._settled.refresh()
                pending = {seq for seq in pending if seq is None or seq > settled}
            if not pending:
                return state
            if pending.intersection(self.queued_behind(job.conv.root)):
                log.info("sender.stepping_aside")
                return None
            left = deadline - loop.time()
            # The earlier reply may be waiting for a token service in another replica
            # (held, not failing): so would this one. Waiting on costs nothing; handed
            # back, each round spent a delivery, and the last gave the order up.
            if (
                left <= 0
                and not self._stopping.is_set()
                and not job.delivery.lease.overdue  # the broker may have passed it on
                and not await self._token_service_running(job.reply.app)
            ):
                log.info("sender.order_wait_extended", reason="no token service is running")
                deadline = loop.time() + self._policy.order_wait_s
                left = deadline - loop.time()
            if left <= 0 or self._stopping.is_set():
                return None
            try:
                async with job.delivery.idle():  # another user's reply goes out meanwhile
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), min(delay, left))
                    if self._stopping.is_set() and not job.last_try:
                        raise LeaveIdle  # handed back: no slot to take again for that
            except LeaveIdle:
                return None
            delay = min(1.0, delay * 2)
            state = await self._load(job)

    def _over_the_hour(self, state: ConversationState) -> Nak | None:
        """A nak until the user's hour has room, when WeCom would drop the next send
        silently (its per-member hourly limit); sleeping it out would hold a slot for up
        to an hour. On the last delivery the worker dead-letters it, with this reason."""
        per_hour = self._policy.per_user_per_hour
        wait = hourly_delay(state.sends_per_minute, utcnow(), per_hour=per_hour)
        if wait <= 0:
            return None
        log.warning("sender.hourly_limit", per_hour=per_hour, wait_s=round(wait))
        return Nak(wait, f"WeCom's limit of {per_hour} messages an hour per member: {wait:.0f}s")

    # ------------------------------------------------------------ sending

    async def _paced(self, job: _Job, state: ConversationState) -> HandBack | None:
        """Wait until the user's minute has room (SENDER_PER_USER_PER_MINUTE), idle: the
        worker's slot sends other users' replies meanwhile (held, one paced user stopped
        every reply for up to a minute). Stopping, it is handed back for the rest of the
        wait (without taking a slot again), so another replica sends it instead of it
        holding the shutdown; on the last delivery the wait goes on."""
        per_minute = self._policy.per_user_per_minute
        wait = rate_delay(state.recent_sends, utcnow(), per_minute=per_minute)
        if wait <= 0:
            return None
        log.info("sender.rate_limited", wait_s=round(wait, 2))
        loop = asyncio.get_running_loop()
        until = loop.time() + wait
        try:
            async with job.delivery.idle():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), wait)
                if self._stopping.is_set() and not job.last_try:
                    raise LeaveIdle
                await asyncio.sleep(max(0.0, until - loop.time()))
        except LeaveIdle:
            left = max(0.0, until - loop.time())
            return HandBack(f"stopping while paced ({per_minute} sends a minute per user)", left)
        return None

    async def _token(self, job: _Job, rejected: str | None = None) -> str:
        """The app's access_token (a new one for ``rejected``, a token WeCom refused).
        While no token replica runs (no responders: all of them down, or unable to reach
        NATS after a password rotation), the reply waits for one here, its delivery held
        (heartbeats go on) and its slot given back; _StoppedWaitingForToken at a stop, or
        once the broker has had no heartbeat of ours for most of ack_wait (it may have
        given the reply to another replica: the worker leaves it to its ack_wait). Handed
        back with backoff instead, each attempt spent a delivery: a token outage of three
        minutes dead-lettered every reply (SENDER_MAX_DELIVER)."""
        delay = 0.5
        while True:
            try:
                if rejected is None:
                    token = await self._tokens.get(job.reply.app)
                else:
                    token = await self._tokens.invalidate(job.reply.app, rejected)
            except NoTokenService:
                self._token_service_gone()
            except (TokenError, TransientTokenError) as exc:
                if not isinstance(exc, TokenServiceSilent):
                    self._token_service_found()  # it answered, with an error
                raise
            else:
                self._token_service_found()
                return token
            try:
                async with job.delivery.idle():  # another reply may find it meanwhile
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
                    if self._stopping.is_set() or job.delivery.lease.overdue:
                        raise LeaveIdle
            except LeaveIdle:
                raise _StoppedWaitingForToken(
                    "stopping while no token service runs"
                    if self._stopping.is_set()
                    else "no heartbeat of ours reached the broker while waiting for a token service"
                ) from None
            delay = min(5.0, delay * 2)

    async def _token_service_running(self, app: str) -> bool:
        """Whether a token replica answers (False only for no responders: an error of a
        running one, or no answer within PROBE_TIMEOUT_S, is not an absence)."""
        try:
            await asyncio.wait_for(self._tokens.get(app), PROBE_TIMEOUT_S)
        except NoTokenService:
            self._token_service_gone()
            return False
        except (TimeoutError, TokenServiceSilent):
            return True
        except (TransientError, TokenError):  # one runs, whatever it answers
            self._token_service_found()
            return True
        self._token_service_found()
        return True

    def _token_service_gone(self) -> None:
        if not self._token_service_absent:
            self._token_service_absent = True
            log.warning(
                "sender.waiting_for_token_service",
                detail="no token service is running: replies wait for one",
            )

    def _token_service_found(self) -> None:
        if self._token_service_absent:
            self._token_service_absent = False
            log.info("sender.token_service_back")

    async def _send_part(self, job: _Job, state: ConversationState, index: int) -> str:
        token = await self._token(job)
        refreshed = False
        retries = 0
        # An earlier delivery (or the failed round a requeue retries) may have had this part
        # accepted and died before recording it; or, its hold lapsed unseen, be sending
        # this very part now: every part of a redelivery asks (not only its first, or
        # the replica that wins each append race sends the next part unchecked). A fresh
        # send does not: asked, it could be dropped for an identical send of another
        # replica racing it, which its window cannot show (reviews found several ways).
        maybe_sent = job.repeat
        checkable: bool | None = None  # whether the check can tell a repeat (asked once)
        while True:
            # ... or our hold on the message lapsed, or another writer got into the send
            # branch: another replica may be sending it now. Both must ask, or the one
            # that loses each append race sends the next part again right after the
            # winner.
            maybe_sent = maybe_sent or job.delivery.lapsed or job.contested
            check = None
            if maybe_sent:
                if checkable is None:
                    checkable = await self._checkable(job, state, index)
                if checkable:
                    check = self._check_interval(job, state)
            try:
                msgid = await self._api.send_text(
                    token, job.reply.conversation, job.parts[index], duplicate_check_s=check
                )
            except TokenRejected as exc:
                if refreshed:
                    raise
                log.info("sender.token_refused", errcode=exc.errcode)
                token = await self._token(job, rejected=token)
                refreshed = True
                continue
            except SendRetryable as exc:
                maybe_sent = maybe_sent or exc.maybe_delivered
                retries += 1
                if retries > self._policy.retry_attempts:
                    raise
                delay = random.uniform(  # noqa: S311 (jitter, not crypto)
                    0, min(self._policy.retry_cap_s, self._policy.retry_base_s * 2**retries)
                )
                log.info(
                    "sender.send_retry",
                    errcode=exc.errcode,
                    reason=exc.reason,
                    retry=retries,
                    delay_s=round(delay, 2),
                )
                await asyncio.sleep(delay)
                continue
            if check is not None and not msgid:
                _PART_DEDUPLICATED.inc()
                log.info("sender.part_deduplicated", index=index, interval_s=check)
            else:
                _PART_SENT.inc()
            log.info("sender.part_sent", index=index, total=len(job.parts), wecom_msgid=msgid)
            return msgid

    async def _checkable(self, job: _Job, state: ConversationState, index: int) -> bool:
        """Whether re-sending ``index`` may ask WeCom's duplicate check. Not when a
        message the user was sent inside the check's window is this very text, or may
        be: a part of this reply recorded there with that text; another reply with a part
        recorded there, one that failed there or one unfinished (waiting, in flight or
        parked without an outcome: any of its parts may have been accepted unrecorded;
        not one aged out of the stream) whose text holds it (however it was split); a
        reply with a part there that cannot be read; more messages in the window than
        are kept. WeCom could not tell a repeat of it from an unrecorded send of
        ours, and dropping it would lose it (a possible repeat beats a lost answer). The
        earlier reply a reply gave up waiting for (its last try) is unfinished: it may
        be in flight. The window reaches back to this reply's last recorded part (or the
        reply), where an unrecorded send of ``index`` can start (for a requeued reply, or
        one a later reply overtook on its last try, well before the user's last recorded
        message), ``check_slack_s`` before that, and is searched
        ``CLOCK_SKEW_ALLOWANCE_S`` further (the times compared are different
        replicas')."""
        reach = CHECK_REACHES_BACK_S + self._policy.check_slack_s + CLOCK_SKEW_ALLOWANCE_S
        since = _check_since(job, state) - timedelta(seconds=reach)
        recorded = state.parts_since(since)
        if recorded is None:
            return _skip_check(index, "more messages in the window than are kept")
        text = job.parts[index]
        others: set[str] = set()  # replies with a part recorded in the window
        for part in recorded:
            if part.reply_id != job.reply_id:
                others.add(part.reply_id)
                continue
            span = state.outcome(job.reply_id).spans.get(part.index)
            if span is not None:
                sent = job.reply.text[span[0] : span[1]]
            elif part.index < len(job.parts):
                sent = job.parts[part.index]  # recorded without its span: an older sender
            else:
                return _skip_check(index, "a message in the window cannot be read")
            if sent == text:
                return _skip_check(index, "a message in the window is the same text")
        # A reply that failed inside the window, or one unfinished (parked without an
        # outcome, in flight), may have had any of its parts accepted without a record (a
        # lost answer, a crash): each is a message the user may have got. One aged out of
        # the stream is older than any window: nothing of it counts.
        unrecorded: set[str] = set()
        for other in state.outcomes.values():
            failed_lately = other.failure is not None and (other.ended_at or since) >= since
            if failed_lately or (not other.terminal and other.seq is not None):
                unrecorded.add(other.event_id)
        unrecorded.discard(job.reply_id)
        # Another reply's parts are compared as text it holds, however it was split (by
        # another build, or not yet): whatever the split, a part of it is in it.
        for reply_id in sorted(others | unrecorded):
            whole = await self._reply_text(job, state, reply_id)
            if whole is None or (whole == "" and reply_id in others):
                return _skip_check(index, "a message in the window cannot be read")
            if text in whole:
                return _skip_check(index, "a message in the window may be the same text")
        return True

    async def _reply_text(self, job: _Job, state: ConversationState, reply_id: str) -> str | None:
        """Another reply's text, read once per delivery: "" when the log no longer has it
        (aged out), None when it cannot be read now (asked again next time)."""
        if reply_id in job.others_text:
            return job.others_text[reply_id]
        text = await self._text_of(state, reply_id)
        if text is not None:
            job.others_text[reply_id] = text
        return text

    def _check_interval(self, job: _Job, state: ConversationState) -> int:
        """WeCom's duplicate_check_interval now: back to this reply's last recorded part,
        or to the reply if none was (it grows as a send is retried), and the slack."""
        since = _check_since(job, state)
        return duplicate_check_interval(since, utcnow(), slack_s=self._policy.check_slack_s)

    async def _text_of(self, state: ConversationState, reply_id: str) -> str | None:
        """A reply's text; "" when the log has it no more, None when it cannot tell now
        (an empty reply is never sent, so "" holds no part)."""
        seq = state.outcome(reply_id).seq
        if seq is None:
            return ""
        try:
            return (await self._read_outcome(seq)).text
        except PermanentError as exc:
            log.info("sender.earlier_reply_unreadable", seq=seq, error=str(exc))
            return ""
        except TransientError as exc:
            log.info("sender.earlier_reply_unreadable", seq=seq, error=str(exc))
            return None

    async def _read_outcome(self, seq: int) -> Outcome:
        """The outcome stored at ``seq``: PermanentError when there is none (aged out, or
        another event), TransientError when the log cannot be read now. ``seq`` came
        from a read of the log: a direct get that finds nothing there may have been
        answered by a lagging follower (``ConversationCache.load``), so the leader is
        asked before the outcome is called gone."""
        try:
            try:
                raw = await self._js.get_msg(topology.CONVERSATION_STREAM, seq, direct=True)
            except nats.js.errors.NotFoundError:
                raw = await self._js.get_msg(topology.CONVERSATION_STREAM, seq, direct=False)
        except nats.js.errors.NotFoundError:
            raise PermanentError(f"no event at seq {seq} (aged out?)") from None
        except (TimeoutError, nats.errors.Error) as exc:
            raise TransientError(f"cannot read seq {seq}: {type(exc).__name__}") from exc
        try:
            event = decode_event(raw.data or b"")  # EventDecodeError is a PermanentError
        except NewerEventError as exc:  # a newer replica can read it: hand it back
            raise TransientError(str(exc)) from exc
        if not isinstance(event, OUTCOME_TYPES):
            raise PermanentError(f"seq {seq} holds a {type(event).__name__}, not an outcome")
        return event

    async def _retry_later(
        self, job: _Job, state: ConversationState, exc: TransientError
    ) -> Settlement:
        reason = exc.reason if isinstance(exc, SendError) else f"access token: {exc}"
        if job.last_try:
            errcode = exc.errcode if isinstance(exc, SendError) else BUSY
            gave_up = f"gave up after {job.delivery.num_delivered} deliveries: {reason}"
            await self._fail(job, state, errcode, gave_up)
            return Nak(0, reason)  # the worker dead-letters the last delivery's nak
        delay = backoff_delay(job.delivery.num_delivered)
        if isinstance(exc, TransientTokenError) and exc.retry_after:
            delay = max(delay, exc.retry_after)
        return Nak(delay, reason)

    # ------------------------------------------------------------ recording

    async def _append_part(
        self, job: _Job, state: ConversationState, index: int
    ) -> ConversationState:
        part = PartDelivered(
            **self._envelope(job, "part", str(index)),
            reply_id=job.reply_id,
            index=index,
            total=len(job.parts),
            wecom_msgid=job.sent[index],
            start=job.spans[index][0],
            end=job.spans[index][1],
        )
        return await self._append(job, state, part, f"part:{job.reply_id}:{index}")

    async def _finish(self, job: _Job, state: ConversationState) -> Settlement:
        delivered = state.outcome(job.reply_id).delivered
        done = ReplyDelivered(
            **self._envelope(job, "delivered", *job.round),
            reply_id=job.reply_id,
            parts=len(job.parts),
            wecom_msgids=[delivered.get(i, "") for i in range(len(job.parts))],
        )
        await self._append(job, state, done, ":".join(("delivered", job.reply_id, *job.round)))
        _DELIVERED.inc()
        log.info("sender.delivered", parts=len(job.parts))
        return Ack()

    async def _fail(self, job: _Job, state: ConversationState, errcode: int, reason: str) -> None:
        failed = DeliveryFailed(
            **self._envelope(job, "failed", *job.round),
            reply_id=job.reply_id,
            errcode=errcode,
            reason=reason,
            parts_delivered=len(state.outcome(job.reply_id).delivered),
        )
        await self._append(job, state, failed, ":".join(("failed", job.reply_id, *job.round)))
        _FAILED.inc()
        log.warning("sender.delivery_failed", errcode=errcode, reason=reason)

    def _envelope(self, job: _Job, *kind: str) -> _Envelope:
        return {
            "event_id": derived_id(job.reply_id, *kind),
            "app": job.reply.app,
            "conversation": job.reply.conversation,
            "causation_id": job.reply_id,
            "correlation_id": job.reply.correlation_id,
        }

    async def _append(
        self, job: _Job, state: ConversationState, event: Event, msg_id: str
    ) -> ConversationState:
        """Append on the send branch if nobody wrote it since ``state``; returns the new
        state. Retries an unconfirmed append: if the first went in after all, the repeat
        is refused as a ConcurrencyConflict (a single nats-server checks the expected
        sequence before the Nats-Msg-Id), or answered as a duplicate (a clustered
        stream checks the Nats-Msg-Id first), raised as a ConcurrencyConflict too; the
        delivery decides again from the log; it is never stored twice. A duplicate may
        as well be another replica's record of the same event: the delivery is
        contested from then on, as after a conflict."""
        for attempt in range(1, self._policy.append_attempts + 1):
            try:
                appended = await append_event(
                    self._js,
                    event,
                    msg_id=msg_id,
                    expect_last_seq=state.last_send_seq,
                    expect_scope=job.conv.sender_branch,
                )
            except AppendUnavailable:
                if attempt == self._policy.append_attempts:
                    raise
                await asyncio.sleep(backoff_delay(attempt))
                continue
            if appended.duplicate:
                # Recorded before: by this delivery (an unanswered append that went in),
                # or by another replica, which may have sent and recorded later parts,
                # or finished the reply, since. Decide again from the log, as after a
                # conflict: going on from here sent its recorded parts a second time,
                # unchecked (their texts are in the window).
                job.contested = True
                raise ConcurrencyConflict(f"{msg_id} was recorded before (seq {appended.seq})")
            state = record(state, StoredEvent(appended.seq, event))
            self._cache.put(job.conv, state, keep=(job.reply_id,))
            return state
        raise AssertionError("unreachable")  # pragma: no cover


def _superseded(job: _Job, state: ConversationState) -> bool:
    """Whether a requeue appended after the message being delivered took its round over:
    the operator replayed the reply again (this round failed, or was parked without an
    outcome), and the broker delivers this message once more (its ack was lost, or the
    replica holding it died before acking it): an older requeue, or the reply itself.
    The newer requeue's delivery runs the round (or ran it: delivered, or parked as its
    own dead letter). Both running at once, each sent the reply's next part, and where
    the duplicate check cannot be asked (a message in its window is the same text) the
    user got it twice. A round that sent a part it has not recorded yet goes on, as
    before, and records it: unrecorded, the newer round could send it again."""
    outcome = state.outcome(job.reply_id)
    reopened_at = outcome.requeued_at
    if reopened_at is None or reopened_at <= job.delivery.stream_seq:
        return False
    if any(index not in outcome.delivered for index in job.sent):
        return False
    log.info("sender.requeue_superseded", reply_id=job.reply_id, by=outcome.requeued_by)
    return True


def _failure(exc: SendRejected | TokenError) -> tuple[int, str]:
    if isinstance(exc, SendRejected):
        return exc.errcode, exc.reason
    errcode = exc.errcode if exc.errcode is not None else BUSY
    return errcode, f"no access token ({exc.kind}): {exc}"


def _check_since(job: _Job, state: ConversationState) -> datetime:
    """The earliest an unrecorded send of this reply's next part can have gone out."""
    last_sent = state.outcome(job.reply_id).last_sent_at
    return job.reply.occurred_at if last_sent is None else max(last_sent, job.reply.occurred_at)


def _skip_check(index: int, reason: str) -> bool:
    log.info("sender.duplicate_check_skipped", index=index, reason=reason)
    return False
