"""A conversation as the llm service sees it: a fold over its stored events. Pure.

The log is the only authority; this state is rebuilt from it (and cached, see cache.py)::

    >>> conv = Conversation(needs_outcome=lambda m: True)
    >>> for stored in events:                      # doctest: +SKIP
    ...     conv.apply(stored)
    >>> plan(conv, received.event_id, seq, settled_through=0)   # doctest: +SKIP
    Go()

What the fold keeps
    ``turns``        answered text exchanges since the last ConversationReset: the
                     newest ``keep_turns`` the user read (a part delivered), and any
                     newer ones, the oldest dropped (at most twice ``keep_turns`` in all):
                     the user's text and the assistant's
                     ReplyGenerated(kind="answer") text, matched by ``causation_id``.
                     Failed answers, notices and commands are not turns. Each keeps its
                     message's seq and time: a message's history (:meth:`history`) is
                     the turns asked before it, and none the stream has aged out, nor
                     one whose answer the user never saw (``unseen``).
    ``unseen``       answers WeCom refused for good with no part delivered
                     (DeliveryFailed, on the sender's branch), not requeued since: the
                     model is not told it said what the user never read. Left out
                     first, then the last ``keep_turns`` taken: an answer found unseen
                     after a newer one was kept does not cost the model a turn it read.
    ``pending``      kept answers neither delivered (no part) nor unseen yet.
    ``awaiting``     received messages that need an outcome and have none yet, by
                     event_id, with the stream seq where each was first stored and the
                     gate's verdict on it (gate.py: admitted, or a flood / refusal notice).
    ``settled``      received messages that need nothing more, by event_id: those with
                     their outcome (ADMIT) and those the gate silenced (SILENT: they never
                     get one); the most recent ``remember`` of them, enough to recognise a
                     duplicate copy.
    ``last_seq``     the last stream seq applied (catch-up reads continue after it).
    ``llm_last_seq`` the last seq on the llm branch: the expected-last-sequence of the
                     next outcome append (optimistic concurrency).
"""

from __future__ import annotations

import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from wecombot_common.bus import StoredEvent
from wecombot_common.events import (
    ConversationReset,
    DeliveryFailed,
    MessageReceived,
    PartDelivered,
    ReplyFailed,
    ReplyGenerated,
    ReplyRequeued,
    TextPayload,
    WeComEventPayload,
)

from .commands import menu_command
from .gate import Gate, GatePolicy, Verdict
from .prompt import Turn

__all__ = ["Awaiting", "Blocked", "Conversation", "Done", "Go", "Plan", "fold", "plan"]


@dataclass(frozen=True, slots=True)
class Awaiting:
    """A received message still waiting for its outcome."""

    seq: int
    text: str | None  # the user's text, for text messages (pairs with the answer)
    verdict: Verdict = Verdict.ADMIT
    at: float = 0.0  # when it was received (epoch seconds, the event's occurred_at)


_BASE_BYTES = 1100  # an empty fold, its gate and containers, besides its two dicts
_TURN_BYTES = 225  # an exchange's objects and its reply's id, besides its two texts
_AWAITING_BYTES = 170  # an awaiting message's key and entry, besides its text and slot
_ID_BYTES = 85  # an event id (a uuid's 36 ASCII characters), a key of ``settled``


@dataclass(frozen=True, slots=True)
class _Exchange:
    seq: int  # of the user's message
    at: float  # when the user's message was received (epoch seconds)
    turn: Turn
    reply_id: str  # the answer's event id


@dataclass(slots=True)
class Conversation:
    needs_outcome: Callable[[MessageReceived], bool]
    keep_turns: int = 1000
    remember: int = 1000
    gate_policy: GatePolicy = field(default_factory=GatePolicy)
    # the exchanges, in the order answered
    _turns: deque[_Exchange] = field(init=False)
    # the stream seq of the message that caused the latest reset: nothing asked before
    # it is history any more, even when its answer comes after the reset
    reset_from: int = 0
    awaiting: dict[str, Awaiting] = field(default_factory=dict)
    settled: OrderedDict[str, Verdict] = field(default_factory=OrderedDict)
    # of the exchanges kept, by reply id; one empty set for every fold until one has some
    unseen: AbstractSet[str] = frozenset()
    pending: AbstractSet[str] = frozenset()  # the same, of those not delivered nor unseen
    last_seq: int = 0
    llm_last_seq: int = 0
    gate: Gate = field(init=False)

    def __post_init__(self) -> None:
        self._turns = deque()
        self.gate = Gate(self.gate_policy)

    @property
    def turns(self) -> list[Turn]:
        """The answered exchanges since the latest reset, in the order answered."""
        return [exchange.turn for exchange in self._turns]

    def history(self, seq: int, *, since: float | None = None) -> list[Turn]:
        """The turns a message stored at ``seq`` follows: those asked before it (one
        answered after it, out of order, is not its past), none asked before ``since``
        (epoch seconds: what the stream has dropped, WECOMBOT_HISTORY_MAX_AGE, is no
        longer history, however long this fold has been kept), in the order asked."""
        kept = [
            exchange
            for exchange in self._turns
            if exchange.seq < seq
            and (since is None or exchange.at >= since)
            and exchange.reply_id not in self.unseen
        ]
        return [exchange.turn for exchange in sorted(kept, key=lambda e: e.seq)]

    def apply(self, stored: StoredEvent) -> None:
        """Apply one stored event; events at or below ``last_seq`` are ignored."""
        if stored.seq <= self.last_seq:
            return
        self.last_seq = stored.seq
        event = stored.event
        if isinstance(event, MessageReceived):
            self._received(stored.seq, event)
        elif isinstance(event, ReplyGenerated | ReplyFailed | ConversationReset):
            self.llm_last_seq = stored.seq
            self._outcome(event, stored.seq)
        elif isinstance(event, ReplyRequeued):  # an operator's, on the llm branch
            self.llm_last_seq = stored.seq
            if event.reply_id in self.unseen:  # delivered again, after its last part
                self._show(event.reply_id)
                self.pending = {*self.pending, *self._kept(event.reply_id)}
        elif isinstance(event, DeliveryFailed) and event.parts_delivered == 0:
            # The sender gave the answer up (WeCom refused it for good, or an outage
            # outlasted its deliveries) before any part reached the user. An earlier
            # round's failure recorded late, after a requeue, hides the answer only
            # until the requeued round records a part.
            self.unseen = {*self.unseen, *self._kept(event.reply_id)}
            self._settle_pending(event.reply_id)
        elif isinstance(event, PartDelivered):
            self._show(event.reply_id)
            self._settle_pending(event.reply_id)
            self._trim()

    def approx_bytes(self) -> int:
        """Roughly what this fold holds in memory: within 5 % of what tracemalloc
        measures, for 0-20 turns of 5-3,000 characters (ASCII or CJK), 0-100 awaiting,
        0-1,000 settled, and after thousands of messages, once ``settled`` has dropped
        its oldest ids long enough for its table to have grown (the dicts' own sizes are
        read, not assumed per id: assumed, a conversation of 1,500 messages and more was
        counted 10 % under what it held)."""
        turns = sum(
            _TURN_BYTES + sys.getsizeof(e.turn.user) + sys.getsizeof(e.turn.assistant)
            for e in self._turns
        )
        waiting = sys.getsizeof(self.awaiting) + sum(
            _AWAITING_BYTES + sys.getsizeof(a.text) for a in self.awaiting.values()
        )
        settled = sys.getsizeof(self.settled) + _ID_BYTES * len(self.settled)
        unseen = sum(sys.getsizeof(ids) for ids in (self.unseen, self.pending) if ids)
        return _BASE_BYTES + turns + waiting + settled + unseen

    def is_settled(self, event_id: str) -> bool:
        """It has its outcome, or the gate silenced it (it never gets one)."""
        return event_id in self.settled

    def verdict(self, event_id: str) -> Verdict:
        """The gate's verdict on a received message (ADMIT once it has its outcome, or
        when the fold does not know it)."""
        awaiting = self.awaiting.get(event_id)
        if awaiting is not None:
            return awaiting.verdict
        return self.settled.get(event_id, Verdict.ADMIT)

    def _received(self, seq: int, event: MessageReceived) -> None:
        # A second stored copy of the same event keeps the first one's place.
        if event.event_id in self.settled or event.event_id in self.awaiting:
            return
        if not self.needs_outcome(event):
            return
        # A menu click that runs a command is the user asking, as if typed: counted
        # against the rate, not once a day as the welcome is.
        is_event = (
            isinstance(event.payload, WeComEventPayload) and menu_command(event.payload) is None
        )
        verdict = self.gate.verdict(event.from_user, at=event.create_time, is_event=is_event)
        if verdict is Verdict.SILENT:
            self._settle(event.event_id, Verdict.SILENT)
            return
        text = event.payload.content if isinstance(event.payload, TextPayload) else None
        self.awaiting[event.event_id] = Awaiting(seq, text, verdict, event.occurred_at.timestamp())

    def _outcome(self, event: ReplyGenerated | ReplyFailed | ConversationReset, seq: int) -> None:
        cause = event.causation_id
        received = self.awaiting.pop(cause, None) if cause is not None else None
        if cause is not None:
            self._settle(cause, Verdict.ADMIT)
        if isinstance(event, ConversationReset):
            # Out of order (a replayed dead letter, a last delivery that did not wait), an
            # exchange may be answered on either side of the reset: its message decides.
            self.reset_from = max(self.reset_from, received.seq if received else seq)
            kept = [exchange for exchange in self._turns if exchange.seq > self.reset_from]
            self._turns.clear()
            self._turns.extend(kept)
            if self.unseen or self.pending:
                ids = {e.reply_id for e in kept}
                self.unseen = (self.unseen & ids) or frozenset()
                self.pending = (self.pending & ids) or frozenset()
        elif (
            isinstance(event, ReplyGenerated)
            and event.kind == "answer"
            and received is not None
            and received.text is not None
            and received.seq > self.reset_from
        ):
            self._turns.append(
                _Exchange(
                    received.seq, received.at, Turn(received.text, event.text), event.event_id
                )
            )
            self.pending = {*self.pending, event.event_id}
            self._trim()

    def _kept(self, reply_id: str) -> list[str]:
        """The kept exchange's own string for ``reply_id`` (none if not kept): the event's
        copy of the id would be held besides it, and approx_bytes counts only the sets'
        tables."""
        return [e.reply_id for e in self._turns if e.reply_id == reply_id][:1]

    def _show(self, reply_id: str) -> None:
        if reply_id in self.unseen:
            self.unseen = (self.unseen - {reply_id}) or frozenset()

    def _settle_pending(self, reply_id: str) -> None:
        if reply_id in self.pending:
            self.pending = (self.pending - {reply_id}) or frozenset()

    def _trim(self) -> None:
        """Drop the oldest exchanges past the newest ``keep_turns`` the user read. Those
        not read (unseen) or not known to be (pending: one may yet prove unseen) do not
        count, so the model still gets ``keep_turns`` it read; twice ``keep_turns`` in
        all bounds a user whose every answer WeCom refuses."""
        keep = max(self.keep_turns, 0)
        unread = self.unseen | self.pending
        read = sum(1 for e in self._turns if e.reply_id not in unread)
        while self._turns:
            oldest = self._turns[0].reply_id
            read_after = read - (oldest not in unread)
            if read_after < keep and len(self._turns) <= 2 * keep:
                break
            self._turns.popleft()
            read = read_after
            self._show(oldest)
            self._settle_pending(oldest)

    def _settle(self, event_id: str, verdict: Verdict) -> None:
        self.settled[event_id] = verdict
        self.settled.move_to_end(event_id)
        while len(self.settled) > self.remember:
            self.settled.popitem(last=False)


def fold(
    events: Iterable[StoredEvent],
    needs_outcome: Callable[[MessageReceived], bool],
    *,
    gate: GatePolicy | None = None,
) -> Conversation:
    """The conversation after ``events`` (in stream order)."""
    conv = Conversation(needs_outcome=needs_outcome, gate_policy=gate or GatePolicy())
    for stored in events:
        conv.apply(stored)
    return conv


# ---------------------------------------------------------------- what to do next


@dataclass(frozen=True, slots=True)
class Done:
    """The message already has its outcome (a redelivery, or another replica did it).

    ``remembered`` False: the fold has read past the message's seq without it, and it is
    not among the messages it remembers settling. Answered long ago, or the stream's
    sequences went back (recreated): the handler re-reads the log once to tell."""

    remembered: bool = True


@dataclass(frozen=True, slots=True)
class Go:
    """Decide and append the outcome now."""


@dataclass(frozen=True, slots=True)
class Blocked:
    """An earlier message has no outcome yet; wait for it (seq 0: ours is not read yet)."""

    event_id: str
    seq: int


Plan = Done | Go | Blocked


def plan(
    conv: Conversation,
    event_id: str,
    seq: int,
    *,
    settled_through: int,
    ignore_order: bool = False,
) -> Plan:
    """What the handler of received message ``event_id`` (stored at ``seq``) does next.

    An earlier message that needs an outcome and has none blocks this one, so replies
    keep the user's order and each sees every earlier turn; unless the consumer has
    settled it already (``seq <= settled_through``: acknowledged or dead-lettered, so
    nobody will answer it), or ``ignore_order`` (our last delivery: an answer without
    that turn beats none).
    """
    if conv.is_settled(event_id):
        return Done()
    if seq > conv.last_seq:
        return Blocked(event_id, 0)  # a lagging read: our own message is not visible yet
    if event_id not in conv.awaiting:
        return Done(remembered=False)  # read past, and neither awaiting nor remembered
    if ignore_order:
        return Go()
    earlier = [
        (a.seq, eid)
        for eid, a in conv.awaiting.items()
        if a.seq < seq and eid != event_id and a.seq > settled_through
    ]
    if earlier:
        first_seq, first_id = min(earlier)
        return Blocked(first_id, first_seq)
    return Go()
