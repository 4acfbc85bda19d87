"""One received message → exactly one outcome, in the user's order, across replicas.

The algorithm, for a delivery of MessageReceived M stored at stream seq s:

1. M needs no outcome (most WeCom events) → ack.
2. Catch the cached conversation up from the log (reads after ``state.last_seq``).
3. M already has an outcome (a redelivery, or another replica answered) → ack.
4. An earlier message of the conversation (seq < s) needs an outcome and has none: it is
   being answered (here or by another replica). Wait for its outcome, woken by this
   process's appends or polling the log (50 ms doubling to 1 s), for up to
   ``order_wait_s`` (extended while the earlier message is in this very process), then
   nak (~1 s) and let the redelivery try again. The worker's in_progress heartbeats keep
   M alive meanwhile. An earlier message the consumer has already settled without an
   outcome (dead-lettered) no longer blocks; nor does anything on M's last delivery.
5. Decide: a user over LLM_USER_RATE_PER_MINUTE or not in LLM_ALLOWED_USERS gets a
   notice (the gate's verdict, taken by the fold from the conversation's own events:
   gate.py), or nothing when already told (then the fold treats M as settled: step 3);
   a command or notice directly; text → prompt → model. A model failure after
   its retry budget, or a refusal, becomes ReplyFailed carrying the apology.
6. Append the outcome with its deterministic event_id and ``msg_id``, conditional on the
   llm branch still ending at the seq the decision was based on. A conflict means
   someone appended meanwhile: go back to 2 (a few times, then nak). The broker away →
   nak with backoff (the computed outcome is kept for the redelivery). Ack only after
   the PubAck.

Why this is exactly-once and ordered: an outcome is only appended if the llm branch has
not moved since the state it was decided on was read, and that state already showed M
unanswered; so two deciders of M (a redelivery racing the first delivery, two replicas)
cannot both succeed: the loser re-reads, sees M answered and acks. Because M waits until
every earlier message has its outcome, outcomes are appended in message order and each
prompt sees every earlier turn.

Within one process, deliveries of a conversation share a cache entry whose lock
serialises steps 2–6; waiting (step 4) happens outside the lock, so a later message
never holds up an earlier one that arrives after it (a redelivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import get_args

import structlog

from wecombot_common.bus import AppendUnavailable, ConcurrencyConflict, SettledFloor
from wecombot_common.events import Event, MessageReceived, Outcome
from wecombot_common.metrics import LLM_MODEL_SECONDS, LLM_OUTCOMES
from wecombot_common.topology import ConversationRef
from wecombot_common.worker import (
    Ack,
    Delivery,
    HandBack,
    LeaveIdle,
    Nak,
    acquire_idle,
    backoff_delay,
)

from .cache import ConversationCache, Entry
from .conversation import Blocked, Conversation, Done, Go, plan
from .decide import (
    MAX_ANSWER_BYTES,
    AskModel,
    answer,
    decide,
    failed,
    outcome_msg_id,
    requires_outcome,
    too_long,
)
from .gate import Verdict
from .model import ChatModel, ModelError, ModelRejected
from .settings import ReplyPolicy
from .store import ConversationLog

# A delivery's Delivery.idle: its worker slot serves others during the block.
Idle = Callable[[], AbstractAsyncContextManager[None]]

__all__ = ["HandlerConfig", "LlmHandler"]

log = structlog.get_logger(__name__)
_MODEL_ANSWERED = LLM_MODEL_SECONDS.labels("answered")
_MODEL_FAILED = LLM_MODEL_SECONDS.labels("failed")
# Every outcome's series at zero from the start: a counter's first sample is the baseline
# of rate() and increase(), so the first ReplyFailed after a start did not count in the
# alert of docs/deploy.md.
for _outcome in get_args(Outcome):
    LLM_OUTCOMES.labels(_outcome.__name__)


@dataclass(frozen=True)
class HandlerConfig:
    policy: ReplyPolicy
    order_wait_s: float = 60.0
    max_conflicts: int = 5
    poll_first_s: float = 0.05
    poll_max_s: float = 1.0
    # How long to wait on an earlier message before asking whether the consumer has
    # settled it (one consumer_info call per poll from then on).
    settled_check_after_s: float = 1.0
    settled_refresh_s: float = 0.5  # shared by every waiter of this process
    # A safety net: LLM_CACHE_MB binds first (at 10,000 this count did, at 24 of 64 MiB
    # in a soak of 7,400 users, and each conversation past it was read whole again).
    cache_capacity: int = 1_000_000
    cache_bytes: int | None = 64 << 20  # LLM_CACHE_MB
    remember_answered: int = 1000


class _Conflict:
    """Someone appended to the llm branch between our read and our append."""


# How far the broker's clock may be behind ours: a message stamped this long before a
# fold began still counts as stored after it (read the log again rather than drop it).
CLOCK_SKEW_S = 60.0


def _newer(stored_at: float | None, entry: Entry) -> bool:
    """Whether a message may have been stored after ``entry``'s fold began reading."""
    return stored_at is None or stored_at >= entry.built_at - CLOCK_SKEW_S


class _OrderWait:
    """The clock of one delivery waiting for an earlier message: deadline and polls."""

    def __init__(self, config: HandlerConfig) -> None:
        self._config = config
        self.started = time.monotonic()
        self.deadline = self.started + config.order_wait_s
        self._interval = config.poll_first_s

    def extend(self, now: float) -> None:
        self.deadline = max(self.deadline, now + self._config.order_wait_s)

    def long_enough(self, now: float) -> bool:
        """Waited long enough to ask whether the consumer settled the blocker."""
        return now - self.started >= self._config.settled_check_after_s

    def next_interval(self, now: float) -> float:
        interval = min(self._interval, self.deadline - now)
        self._interval = min(self._interval * 2, self._config.poll_max_s)
        return interval


class LlmHandler:
    """The PullWorker handler of the llm service (see the module doc)."""

    def __init__(
        self,
        store: ConversationLog,
        model: ChatModel,
        config: HandlerConfig,
        *,
        rng: random.Random | None = None,
        stopping: asyncio.Event | None = None,
    ) -> None:
        """``stopping``: set when the service stops. A message still waiting then for an
        earlier message's outcome is handed back at once, one waiting for its conversation
        (another delivery of it at the model here) once that ends: neither asks the model
        when its turn comes, within the shutdown's grace or past it."""
        self._stopping = stopping or asyncio.Event()
        self._store = store
        self._model = model
        self._config = config
        self._policy = config.policy
        self._cache = ConversationCache(
            self._new_state, capacity=config.cache_capacity, max_bytes=config.cache_bytes
        )
        # a stream seq through which the consumer settled everything
        self._settled = SettledFloor(store.settled_through, refresh_s=config.settled_refresh_s)
        self._rng = rng or random.Random()  # noqa: S311 (jitter)

    @property
    def cache(self) -> ConversationCache:
        """The conversations this handler keeps between messages (for its metrics)."""
        return self._cache

    async def __call__(self, d: Delivery) -> Ack | Nak | HandBack:
        return await self.handle(
            d.event,
            stream_seq=d.stream_seq,
            num_delivered=d.num_delivered,
            last_try=d.last_try,
            stored_at=d.stored_at,
            idle=d.idle,
        )

    async def handle(
        self,
        event: Event,
        *,
        stream_seq: int,
        num_delivered: int,
        last_try: bool = False,
        stored_at: float | None = None,
        idle: Idle = contextlib.nullcontext,
    ) -> Ack | Nak | HandBack:
        """``last_try``: the worker's last delivery of it (no more waiting for order).
        ``stored_at``: when the broker stored it (POSIX seconds; None: unknown, taken as
        just now). ``idle``: the delivery's (:meth:`Delivery.idle`), around the waits
        for the conversation (its lock, an earlier message's outcome), so that one user's
        burst does not hold the worker's slots while others' messages wait."""
        if not isinstance(event, MessageReceived):
            log.warning("llm.unexpected_event", type=type(event).__name__)
            return Ack()
        if not self._needs_outcome(event):
            return Ack()
        conv = ConversationRef.of(event)
        entry = self._cache.get(conv)
        try:
            with entry.handling(event.event_id):
                return await self._handle(
                    event, stream_seq, num_delivered, last_try, stored_at, conv, entry, idle
                )
        finally:
            self._cache.used(conv)

    def _needs_outcome(self, received: MessageReceived) -> bool:
        return requires_outcome(received, welcome=self._policy.welcome_message is not None)

    def _new_state(self) -> Conversation:
        return Conversation(
            needs_outcome=self._needs_outcome,
            keep_turns=self._policy.max_turns,
            remember=self._config.remember_answered,
            gate_policy=self._policy.gate,
        )

    async def _handle(
        self,
        received: MessageReceived,
        seq: int,
        num_delivered: int,
        last_try: bool,
        stored_at: float | None,
        conv: ConversationRef,
        entry: Entry,
        idle: Idle,
    ) -> Ack | Nak | HandBack:
        waiting = _OrderWait(self._config)
        conflicts = 0
        reread = False
        while True:
            # Another delivery of the conversation here may hold the lock or be about to
            # (woken by its release, not run yet): wait for it without a slot.
            async with _locked(entry.lock, idle, contended=sum(entry.active.values()) > 1):
                await self._catch_up(conv, entry, through=seq)
                step = plan(
                    entry.state, received.event_id, seq, settled_through=0, ignore_order=last_try
                )
                if isinstance(step, Blocked) and 0 < step.seq <= self._settled.through:
                    # The floor would let an earlier message go: read it again first (at
                    # most every refresh), or a floor from before the consumer was made
                    # again (its stream recreated) would let later messages skip their wait.
                    floor = await self._settled.refresh()
                    step = plan(entry.state, received.event_id, seq, settled_through=floor)
                if (
                    isinstance(step, Done)
                    and not step.remembered
                    and not reread
                    and _newer(stored_at, entry)
                ):
                    # Read past without it, and not among the settled it remembers: the
                    # stream's sequences went back (recreated) and this entry is ahead of
                    # the log, or it was answered long ago. Stored before the fold began
                    # reading, the fold saw it: long answered (a consumer made again
                    # replays the stream from its start), and not read again per message.
                    # Stored since: the fold read another stream. Read the log afresh,
                    # once: a fresh fold without it is the log's word.
                    reread = True
                    entry.rebuild(self._new_state())
                    continue
                if isinstance(step, Done):
                    entry.prepared.pop(received.event_id, None)
                    if entry.state.verdict(received.event_id) is Verdict.SILENT:
                        log.info(
                            "llm.silenced",
                            reason="over the rate or not allowed (told), or welcomed today",
                        )
                    else:
                        log.debug("llm.already_answered")
                    return Ack()
                if (
                    isinstance(step, Go)
                    and self._stopping.is_set()
                    and not last_try
                    and received.event_id not in entry.prepared
                ):
                    # Its turn came while stopping: another replica answers it, rather
                    # than a model call the shutdown's grace may cut (and pay twice).
                    return HandBack("stopping before its model call")
                if not isinstance(step, Blocked):
                    result = await self._decide_and_append(received, conv, entry, num_delivered)
                    if not isinstance(result, _Conflict):
                        return result
                    conflicts += 1
                    if conflicts >= self._config.max_conflicts:
                        return Nak(backoff_delay(num_delivered), "concurrent appends kept winning")
                    if not await self._catch_up(conv, entry, leader=True):
                        # Nobody appended: the branch lost events the entry still counts
                        # (aged out, dropped past the byte cap, or purged), so its
                        # expected sequence can never match again. Rebuild from the log.
                        log.info("llm.conversation_rebuilt", expected_seq=entry.state.llm_last_seq)
                        entry.rebuild(self._new_state())
                    continue
                changed = entry.changed  # taken under the lock: no wake-up is missed
            give_up = await self._wait_for(step, entry, changed, waiting, idle, last_try)
            if give_up is not None:
                return give_up

    async def _wait_for(
        self,
        blocker: Blocked,
        entry: Entry,
        changed: asyncio.Event,
        waiting: _OrderWait,
        idle: Idle,
        last_try: bool,
    ) -> Nak | HandBack | None:
        """Wait a little for ``blocker``'s outcome; a Nak once the order wait is over."""
        now = time.monotonic()
        # (on its last delivery it waits only to see its own message in the log: a hand
        # back then would leave it to the grace of a delivery past the limit)
        if self._stopping.is_set() and not last_try:
            return HandBack("stopping while waiting for an earlier message")
        if blocker.seq and blocker.event_id in entry.active:
            waiting.extend(now)  # it is being handled right here: it will finish
        over = now >= waiting.deadline
        if (
            blocker.seq > self._settled.through
            # asked once the wait is over too: an LLM_ORDER_WAIT shorter than the wait
            # before the first question never asked, and nak'ed every delivery but the last
            and (over or waiting.long_enough(now))
            and blocker.seq <= await self._settled.refresh()
        ):
            log.info("llm.earlier_message_abandoned", blocker_seq=blocker.seq)
            return None  # re-read at once: its outcome may have landed before its ack
        if over:
            waited = f"{now - waiting.started:.0f}s"
            return Nak(
                self._rng.uniform(0.5, 1.5),
                f"earlier message at seq {blocker.seq} still unanswered after {waited}"
                if blocker.seq
                else f"this message not readable in the log after {waited}",
            )
        try:
            async with idle():
                await _wait(changed, waiting.next_interval(now), self._stopping)
                if self._stopping.is_set() and not last_try:
                    raise LeaveIdle  # out of the wait without taking a slot back
        except LeaveIdle:
            return HandBack("stopping while waiting for an earlier message")
        return None

    async def _catch_up(
        self, conv: ConversationRef, entry: Entry, *, through: int = 0, leader: bool = False
    ) -> bool:
        """Apply what the log has past the entry; True if it had anything.

        A direct read may come from a stream follower that lags its leader; one that
        ends before ``through`` (the message being handled) goes on from the leader
        (``read_conversation``'s ``reach``), and with ``leader`` (an append was refused:
        the log holds more) all of it is read there. Otherwise the handler would wait
        for its own message to show, or, after a conflict, find nothing new and rebuild
        the conversation, to conflict again."""
        before = entry.state.last_seq
        read = self._store.read(conv, after_seq=before, direct=not leader, reach=through)
        async for stored in read:
            entry.state.apply(stored)
        return entry.state.last_seq != before

    async def _decide_and_append(
        self, received: MessageReceived, conv: ConversationRef, entry: Entry, num_delivered: int
    ) -> Ack | Nak | _Conflict:
        expect = entry.state.llm_last_seq
        prepared = entry.prepared.pop(received.event_id, None)
        if prepared is not None and prepared[0] == expect:
            outcome = prepared[1]
        else:
            verdict = entry.state.verdict(received.event_id)
            if verdict is not Verdict.ADMIT:
                log.info("llm.gated", verdict=verdict.value)
            action = decide(received, entry.state, self._policy, now=time.time())
            outcome = (
                await self._ask(received, action)
                if isinstance(action, AskModel)
                else (action.outcome)
            )
        try:
            appended = await self._store.append(
                outcome,
                msg_id=outcome_msg_id(received),
                expect_last_seq=expect,
                expect_scope=conv.llm_branch,
            )
        except ConcurrencyConflict:
            log.info("llm.append_conflict", expected_seq=expect)
            return _Conflict()
        except AppendUnavailable as exc:
            entry.prepared[received.event_id] = (expect, outcome)
            return Nak(backoff_delay(num_delivered), str(exc))
        entry.notify()
        if not appended.duplicate:
            LLM_OUTCOMES.labels(type(outcome).__name__).inc()
        log.info(
            "llm.outcome_appended",
            outcome=type(outcome).__name__,
            seq=appended.seq,
            duplicate=appended.duplicate,
        )
        return Ack()

    async def _ask(self, received: MessageReceived, action: AskModel) -> Outcome:
        started = time.monotonic()
        try:
            done = await self._model.complete(action.messages)
        except ModelError as exc:
            _MODEL_FAILED.observe(time.monotonic() - started)
            setting = exc.setting if isinstance(exc, ModelRejected) else None
            if setting is not None:  # every message fails alike until it is fixed
                log.error(
                    "llm.model_failed", reason=str(exc), attempts=exc.attempts, setting=setting
                )
            else:
                log.warning("llm.model_failed", reason=str(exc), attempts=exc.attempts)
            return failed(received, str(exc), exc.attempts, self._policy.apology_message)
        _MODEL_ANSWERED.observe(time.monotonic() - started)
        log.info(
            "llm.model_answered",
            model=done.model,
            latency_ms=round((time.monotonic() - started) * 1000),
            context_messages=len(action.messages),
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
        )
        cut_off = done.finish_reason == "length"
        if too_long(done.text):
            log.warning(
                "llm.answer_too_long",
                reason=f"cut at {MAX_ANSWER_BYTES} bytes (WeCom shows 2048 a message)",
                answer_bytes=len(done.text.encode()),
            )
        elif cut_off:
            log.warning(
                "llm.answer_cut_off",
                reason="the model stopped at its output limit (finish_reason=length)",
                completion_tokens=done.completion_tokens,
            )
        return answer(
            received,
            done.text,
            model=done.model,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            cut_off=cut_off,
        )


@contextlib.asynccontextmanager
async def _locked(lock: asyncio.Lock, idle: Idle, *, contended: bool) -> AsyncIterator[None]:
    """``lock`` for the block, waited for idle when another delivery of the conversation
    has it or is about to (``contended``; that one may be calling the model for a while)."""
    await acquire_idle(lock, idle, contended=contended)
    try:
        yield
    finally:
        lock.release()


async def _wait(changed: asyncio.Event, timeout: float, stopping: asyncio.Event) -> None:
    """Until this process changes the conversation, it stops, or ``timeout`` (the next
    poll)."""
    waits = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(stopping.wait())]
    try:
        await asyncio.wait(waits, timeout=max(timeout, 0.0), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
