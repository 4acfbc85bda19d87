"""What the sender knows about a conversation: a fold over its stored events. Pure.

The log is the only truth. :func:`fold` turns a conversation's events into the
:class:`ConversationState` the handler decides from: for each outcome (ReplyGenerated,
ReplyFailed, ConversationReset) its stream sequence, the parts already accepted by WeCom
and whether it is finished (ReplyDelivered or DeliveryFailed; a later ReplyRequeued, an
operator's ``wecombot dlq replay``, makes a failed one unfinished again)::

    >>> reply = ReplyGenerated(app="ww1-2", conversation="u", correlation_id="m", text="hi")
    >>> part = PartDelivered(app="ww1-2", conversation="u", correlation_id="m",
    ...                      reply_id=reply.event_id, index=0, total=2, wecom_msgid="w1")
    >>> state = fold(ConversationState(), [StoredEvent(7, reply), StoredEvent(9, part)])
    >>> state.outcome(reply.event_id).delivered, state.last_seq, state.last_send_seq
    ({0: 'w1'}, 9, 9)

``last_seq`` is the read cursor (the last stream sequence folded from the log);
``last_send_seq`` the last sequence on the sender's subject branch, the expected sequence
for the next conditional append; ``recent_parts`` the parts recorded last (when, which
reply, which part), the messages the user saw most recently. :func:`record` applies an
event this process just appended without moving the cursor, so events others appended
meanwhile are still read. :func:`compact` forgets all but the newest delivered replies
(``pruned_through``), so a state cached for a long conversation stays small.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from wecombot_common.bus import StoredEvent
from wecombot_common.events import (
    ConversationReset,
    DeliveryFailed,
    Event,
    PartDelivered,
    ReplyDelivered,
    ReplyFailed,
    ReplyGenerated,
    ReplyRequeued,
    failure_of_round,
)

from .split import split_spans

__all__ = [
    "CHECK_REACHES_BACK_S",
    "CLOCK_SKEW_ALLOWANCE_S",
    "FINISHED_KEPT",
    "OUTCOME_TYPES",
    "PACING_SLACK_S",
    "ConversationState",
    "OutcomeState",
    "RecordedPart",
    "compact",
    "duplicate_check_interval",
    "fold",
    "hourly_delay",
    "layout",
    "next_part",
    "pending_before",
    "rate_delay",
    "record",
]

OUTCOME_TYPES = (ReplyGenerated, ReplyFailed, ConversationReset)
RECENT_SENDS_KEPT = 64
# Delivered replies a state keeps besides those with a part in ``recent_parts``: a
# redelivery or a repeat of one comes within minutes; an older one is read again.
FINISHED_KEPT = 16
HOUR_S = 3600
MINUTES_KEPT = 62  # of send counts: the last hour, whatever minute we are in
MAX_DUPLICATE_CHECK_S = 4 * 3600  # WeCom's limit for duplicate_check_interval, path/90236
# How far before ``since`` a duplicate_check_interval reaches (whole seconds, one more).
CHECK_REACHES_BACK_S = 2
# How much further back than WeCom's window the sender looks for a message of the same
# text before it asks the check: the times compared are recorded by different replicas,
# whose clocks may differ (a message missed for that is a message lost).
CLOCK_SKEW_ALLOWANCE_S = 10


@dataclass(frozen=True, slots=True)
class OutcomeState:
    """One outcome as the log tells it. ``seq`` is None when only its sends were seen
    (the outcome itself aged out of the stream)."""

    event_id: str
    seq: int | None = None
    delivered: Mapping[int, str] = field(default_factory=dict)  # part index → WeCom msgid
    # part index → (start, end) in the reply's text, as recorded (see :func:`layout`)
    spans: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    terminal: bool = False
    failure: str | None = None  # the reason, when a DeliveryFailed finished it
    # the ReplyRequeued that reopened it ("" for the first round): each round's
    # ReplyDelivered / DeliveryFailed is a new event, not a repeat of the last round's
    requeued_by: str = ""
    requeued_at: int | None = None  # its stream sequence: the delivery that finishes it
    last_sent_at: datetime | None = None  # occurred_at of its latest PartDelivered
    ended_at: datetime | None = None  # occurred_at of what finished it (this round)

    @property
    def delivered_by(self) -> int | None:
        """The stream sequence of the message whose delivery finishes this outcome."""
        return self.requeued_at if self.requeued_by else self.seq


@dataclass(frozen=True, slots=True)
class RecordedPart:
    """A PartDelivered as the fold keeps it: a message the user was sent."""

    at: datetime  # its occurred_at
    reply_id: str
    index: int


@dataclass(frozen=True, slots=True)
class ConversationState:
    outcomes: Mapping[str, OutcomeState] = field(default_factory=dict)
    last_seq: int = 0
    last_send_seq: int = 0
    # the latest RECENT_SENDS_KEPT parts recorded (oldest first): for WeCom's per-member
    # rate limit, and for what its duplicate check could take a re-sent part for
    recent_parts: tuple[RecordedPart, ...] = ()
    # (minute since the epoch, PartDelivered events in it), oldest first, for WeCom's
    # per-member hourly limit: the last MINUTES_KEPT minutes with a send
    sends_per_minute: tuple[tuple[int, int], ...] = ()
    # the highest stream sequence of a delivered reply :func:`compact` forgot (0: none
    # forgotten): a reply missing from ``outcomes`` may be one of those (read the log
    # again)
    pruned_through: int = 0

    def outcome(self, event_id: str) -> OutcomeState:
        return self.outcomes.get(event_id) or OutcomeState(event_id)

    def approx_bytes(self) -> int:
        """About what this state holds in memory (tracemalloc: ≈ 820 bytes a reply, 60
        a recorded part of it, 90 a part of ``recent_parts``)."""
        parts = sum(len(o.delivered) for o in self.outcomes.values())
        return 300 + 820 * len(self.outcomes) + 60 * parts + 90 * len(self.recent_parts)

    def may_have_forgotten(self, event_id: str) -> bool:
        """Whether what ``outcomes`` says of ``event_id``, an outcome the log holds at or
        before ``last_seq``, may lack what :func:`compact` dropped: nothing of it, or
        only what was appended after (a requeue, its sends)."""
        return self.pruned_through > 0 and self.outcome(event_id).seq is None

    @property
    def recent_sends(self) -> tuple[datetime, ...]:
        return tuple(part.at for part in self.recent_parts)

    def parts_since(self, since: datetime) -> tuple[RecordedPart, ...] | None:
        """The parts recorded at or after ``since``; None when some of them may have
        been forgotten (the latest RECENT_SENDS_KEPT are kept, all that recent)."""
        kept = self.recent_parts
        if len(kept) >= RECENT_SENDS_KEPT and kept[0].at >= since:
            return None
        return tuple(part for part in kept if part.at >= since)


def fold(state: ConversationState, events: Iterable[StoredEvent]) -> ConversationState:
    """Apply events read from the log, in order; returns a new state (input untouched)."""
    outcomes = dict(state.outcomes)
    recent = list(state.recent_parts)
    minutes = dict(state.sends_per_minute)
    last_seq, last_send = state.last_seq, state.last_send_seq
    for stored in events:
        last_seq = max(last_seq, stored.seq)
        if _apply(outcomes, recent, minutes, stored):
            last_send = max(last_send, stored.seq)
    return ConversationState(
        outcomes,
        last_seq,
        last_send,
        tuple(recent[-RECENT_SENDS_KEPT:]),
        _kept(minutes),
        state.pruned_through,
    )


def record(state: ConversationState, stored: StoredEvent) -> ConversationState:
    """Apply an event this process appended at ``stored.seq``; the read cursor stays, so
    a later catch-up still reads what others appended before it (and re-applies this
    one harmlessly: applying is idempotent)."""
    outcomes = dict(state.outcomes)
    recent = list(state.recent_parts)
    minutes = dict(state.sends_per_minute)
    last_send = state.last_send_seq
    if _apply(outcomes, recent, minutes, stored):
        last_send = max(last_send, stored.seq)
    return replace(
        state,
        outcomes=outcomes,
        last_send_seq=last_send,
        recent_parts=tuple(recent[-RECENT_SENDS_KEPT:]),
        sends_per_minute=_kept(minutes),
    )


def compact(
    state: ConversationState, *, keep: Iterable[str] = (), finished_kept: int = FINISHED_KEPT
) -> ConversationState:
    """``state`` without the delivered replies older than the newest ``finished_kept``
    (none of ``keep``, none with a part in ``recent_parts``): each cached conversation
    grew by ≈ 1 KB a reply for as long as it stayed cached, and every message copied
    them all (a long conversation: 1 ms of CPU a message at 20,000 replies).

    What is dropped is a reply that ended well: nothing decides from it again but a
    redelivery or a requeue of it, which finds it missing (``may_have_forgotten``) and
    reads the conversation again. A reply not finished, or finished as failed, stays
    (order, requeues and the duplicate check's rules read those); one with a part the
    user saw lately stays (the duplicate check reads its text).

    >>> done = {f"r{i}": OutcomeState(f"r{i}", seq=i, terminal=True) for i in range(1, 5)}
    >>> small = compact(ConversationState(done), keep=["r1"], finished_kept=2)
    >>> sorted(small.outcomes), small.pruned_through
    (['r1', 'r3', 'r4'], 2)
    """
    kept = set(keep) | {part.reply_id for part in state.recent_parts}
    finished = [
        o
        for o in state.outcomes.values()
        if o.terminal and o.failure is None and o.event_id not in kept
    ]
    if len(finished) <= finished_kept:
        return state
    finished.sort(key=lambda o: o.seq or 0)  # those whose outcome aged out first
    dropped = finished[: len(finished) - finished_kept]
    gone = {o.event_id for o in dropped}
    return replace(
        state,
        outcomes={k: o for k, o in state.outcomes.items() if k not in gone},
        # 1 at least: something was dropped, if only replies whose outcome aged out
        pruned_through=max(state.pruned_through, 1, *(o.seq or 0 for o in dropped)),
    )


def _kept(minutes: dict[int, int]) -> tuple[tuple[int, int], ...]:
    """The counts of the last MINUTES_KEPT minutes up to the latest send, oldest first."""
    if not minutes:
        return ()
    newest = max(minutes)
    return tuple(sorted((m, n) for m, n in minutes.items() if m > newest - MINUTES_KEPT))


def _apply(
    outcomes: dict[str, OutcomeState],
    recent: list[RecordedPart],
    minutes: dict[int, int],
    stored: StoredEvent,
) -> bool:
    """Fold one event into ``outcomes``; True when it is on the sender's branch."""
    event: Event = stored.event
    if isinstance(event, OUTCOME_TYPES):
        current = outcomes.get(event.event_id) or OutcomeState(event.event_id)
        outcomes[event.event_id] = replace(current, seq=stored.seq)
        return False
    if isinstance(event, PartDelivered):
        current = outcomes.get(event.reply_id) or OutcomeState(event.reply_id)
        if event.index not in current.delivered:
            spans = current.spans
            if event.start is not None and event.end is not None:
                spans = {**spans, event.index: (event.start, event.end)}
            outcomes[event.reply_id] = replace(
                current,
                delivered={**current.delivered, event.index: event.wecom_msgid},
                spans=spans,
                last_sent_at=max(event.occurred_at, current.last_sent_at or event.occurred_at),
            )
            recent.append(RecordedPart(event.occurred_at, event.reply_id, event.index))
            minute = int(event.occurred_at.timestamp()) // 60
            minutes[minute] = minutes.get(minute, 0) + 1
        return True
    if isinstance(event, ReplyDelivered | DeliveryFailed):
        current = outcomes.get(event.reply_id) or OutcomeState(event.reply_id)
        if (
            isinstance(event, DeliveryFailed)
            and current.requeued_by
            and event.event_id != failure_of_round(event.reply_id, current.requeued_by)
        ):
            # An earlier round's, appended after the operator's requeue (its delivery
            # was still running when the reply was parked): that round failed, not this
            # one, which goes on. (An earlier round's ReplyDelivered still ends the
            # reply: every part of it was delivered.)
            return True
        failure = event.reason if isinstance(event, DeliveryFailed) else None
        outcomes[event.reply_id] = replace(
            current, terminal=True, failure=failure, ended_at=event.occurred_at
        )
        return True
    if isinstance(event, ReplyRequeued):  # on the llm branch, not the sender's
        current = outcomes.get(event.reply_id) or OutcomeState(event.reply_id)
        outcomes[event.reply_id] = replace(
            current,
            terminal=False,
            failure=None,
            ended_at=None,
            requeued_by=event.event_id,
            requeued_at=stored.seq,
        )
    return False


def pending_before(state: ConversationState, seq: int) -> list[OutcomeState]:
    """Outcomes stored before ``seq`` that no sender has finished: they go out first."""
    earlier = [o for o in state.outcomes.values() if o.seq is not None and o.seq < seq]
    return sorted((o for o in earlier if not o.terminal), key=lambda o: o.seq or 0)


def next_part(outcome: OutcomeState) -> int:
    """The index to send next: after the last part recorded, so none is sent twice."""
    return max(outcome.delivered) + 1 if outcome.delivered else 0


def layout(text: str, outcome: OutcomeState) -> list[tuple[int, int]]:
    """The parts of ``text`` as (start, end) code point offsets, index by index.

    Once parts are recorded, the rest is this build's split of what follows the end of
    the last one recorded: a sender that splits otherwise than the one that started
    the reply (a newer grapheme table, a changed rule, a rolling upgrade) neither
    repeats nor skips text. The recorded parts keep their index (the earlier ones'
    spans matter no more: nothing sends them again). A reply whose last part was
    recorded without its span (an older sender) is split whole, and resumed by index.

    >>> outcome = OutcomeState("r", delivered={0: "w1"}, spans={0: (0, 3)})
    >>> layout("abcdef", outcome)
    [(0, 3), (3, 6)]
    """
    whole = _split_from(text, 0)
    if outcome.delivered:
        last = max(outcome.delivered)
        span = outcome.spans.get(last)
        if span is not None and 0 <= span[0] <= span[1] <= len(text):
            if last < len(whole) and whole[last] == span:
                return whole  # split as this build splits: the parts stay the same
            head = [(span[0], span[0])] * last + [span]
            return head + _split_from(text, span[1])
    return whole


def _split_from(text: str, offset: int) -> list[tuple[int, int]]:
    return [(offset + start, offset + end) for start, end in split_spans(text[offset:])]


# The sends' times are those of the replicas that recorded them, by their own clocks: a
# replica whose clock is ahead of the recorder's would see a window end early, and WeCom
# drops what it lets through without a word. A second more than the window covers
# clocks kept by NTP (a record's time also trails WeCom's receipt, never leads it).
PACING_SLACK_S = 1.0


def rate_delay(recent: tuple[datetime, ...], now: datetime, *, per_minute: int) -> float:
    """Seconds to wait so that at most ``per_minute`` sends fall in any 60 s window,
    PACING_SLACK_S more than that as the sends' times are other replicas' clocks.

    WeCom drops a member's messages beyond 30 a minute without an error (path/90454).
    ``per_minute`` 0 turns the limit off.

    >>> from datetime import UTC
    >>> t = datetime(2024, 1, 1, tzinfo=UTC)
    >>> rate_delay((t, t + timedelta(seconds=10)), t + timedelta(seconds=20), per_minute=2)
    41.0
    """
    if per_minute <= 0 or len(recent) < per_minute:
        return 0.0
    oldest_in_window = sorted(recent)[-per_minute]
    wait = (oldest_in_window + timedelta(seconds=60 + PACING_SLACK_S) - now).total_seconds()
    return max(0.0, wait)


def hourly_delay(
    sends_per_minute: tuple[tuple[int, int], ...], now: datetime, *, per_hour: int
) -> float:
    """Seconds to wait so that at most ``per_hour`` sends fall in any hour.

    WeCom drops a member's messages beyond 1000 an hour without an error (path/90454).
    Sends are counted per minute, so a send is taken to stay in the hour until its
    minute's end plus an hour and PACING_SLACK_S (at most a minute early for the user;
    never late for WeCom, whether its hour is rolling or on the clock, nor for a replica
    whose clock is a little ahead). ``per_hour`` 0 turns it off.

    >>> from datetime import UTC
    >>> t = datetime(2024, 1, 1, tzinfo=UTC)   # minute 28401120 since the epoch
    >>> hourly_delay(((28401120, 2), (28401150, 1)), t, per_hour=3)
    3661.0
    >>> hourly_delay(((28401120, 2), (28401150, 1)), t + timedelta(minutes=62), per_hour=3)
    0.0
    """
    if per_hour <= 0:
        return 0.0
    clock = now.timestamp() - PACING_SLACK_S
    live = [(m, n) for m, n in sends_per_minute if (m + 1) * 60 + HOUR_S > clock]
    count = sum(n for _, n in live)
    if count < per_hour:
        return 0.0
    for minute, n in live:  # oldest first: wait until enough of them have left the hour
        count -= n
        if count < per_hour:
            return (minute + 1) * 60 + HOUR_S - clock
    return 0.0  # not reached: per_hour > 0, so the hour empties at the latest


def duplicate_check_interval(since: datetime, now: datetime, *, slack_s: int = 0) -> int:
    """WeCom's ``duplicate_check_interval`` for sending a part that an earlier attempt
    may have got accepted after ``since`` (the reply's last recorded part, or the reply
    itself): whole seconds reaching a little (up to CHECK_REACHES_BACK_S) before
    ``since``, so the unrecorded send is inside the window and older sends outside it.

    WeCom measures the window back from when it handles the request, which can be well
    after ``now`` (a slow WeCom: the very case where a send is retried); ``slack_s``
    more keeps ``since`` inside it for a request handled up to that much later, and
    reaches as much further back before ``since``.

    >>> from datetime import UTC
    >>> t = datetime(2024, 1, 1, tzinfo=UTC)
    >>> duplicate_check_interval(t, t + timedelta(seconds=31.2))
    33
    >>> duplicate_check_interval(t, t + timedelta(seconds=31.2), slack_s=30)
    63
    """
    elapsed = (now - since).total_seconds()
    return min(MAX_DUPLICATE_CHECK_S, max(1, math.ceil(elapsed) + 1 + slack_s))
