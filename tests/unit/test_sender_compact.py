"""A cached conversation state keeps only its newest delivered replies, and its size is
counted: held whole, each long conversation grew by ≈ 1 KB a reply for the pod's life
(a soak: 0.93 KB a message, and 1 ms of CPU a message at 20,000), and the cache,
bounded by a count alone, had no bound in bytes."""

from __future__ import annotations

import random
import tracemalloc
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from wecombot_common.bus import StoredEvent
from wecombot_common.events import (
    DeliveryFailed,
    Event,
    PartDelivered,
    ReplyDelivered,
    ReplyGenerated,
    ReplyRequeued,
)
from wecombot_common.topology import ConversationRef
from wecombot_sender.domain import (
    FINISHED_KEPT,
    ConversationState,
    OutcomeState,
    compact,
    fold,
    pending_before,
)
from wecombot_sender.handler import ConversationCache

APP = "ww1-1000002"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def _conversation(
    replies: int, *, user: str = "long.talk", seed: int = 7
) -> tuple[list[StoredEvent], list[str]]:
    """A conversation's log: most replies delivered in 1-3 parts, some failed, some
    requeued after failing, some never finished (a sender died)."""
    rng = random.Random(seed)
    env = {"app": APP, "conversation": user}
    events: list[StoredEvent] = []
    ids: list[str] = []

    def add(event: Event) -> None:
        events.append(StoredEvent(len(events) + 1, event))

    for i in range(replies):
        reply = ReplyGenerated(**env, correlation_id=f"m{i}", text="答" * 10)
        ids.append(reply.event_id)
        add(reply)
        fate = rng.random()
        parts = rng.randint(1, 3) if fate > 0.1 else rng.randint(0, 1)
        for k in range(parts):
            at = T0 + timedelta(seconds=10 * len(events))
            add(PartDelivered(**env, correlation_id=f"m{i}", reply_id=reply.event_id, index=k,
                              total=3, wecom_msgid=f"w{i}.{k}", start=k, end=k + 1,
                              occurred_at=at))  # fmt: skip
        if fate > 0.1:
            add(ReplyDelivered(**env, correlation_id=f"m{i}", reply_id=reply.event_id,
                               parts=parts, wecom_msgids=[]))  # fmt: skip
        elif fate > 0.05:
            add(DeliveryFailed(**env, correlation_id=f"m{i}", reply_id=reply.event_id,
                               errcode=81013, reason="refused", parts_delivered=parts))  # fmt: skip
            if fate > 0.08:
                add(ReplyRequeued(**env, correlation_id=f"m{i}", reply_id=reply.event_id,
                                  reason="replayed"))  # fmt: skip
        # else: never finished
    return events, ids


def test_a_long_conversation_keeps_its_newest_delivered_replies_and_decides_the_same() -> None:
    events, ids = _conversation(600)
    whole = fold(ConversationState(), events)
    kept = ConversationState()
    for i in range(0, len(events), 5):  # folded and cached a few events at a time
        kept = compact(fold(kept, events[i : i + 5]))

    delivered = [o for o in whole.outcomes.values() if o.terminal and o.failure is None and o.seq]
    referenced = {p.reply_id for p in whole.recent_parts}
    assert len(delivered) > 500
    assert len(kept.outcomes) < len(whole.outcomes) - 400
    # Every reply not finished, or finished as failed, stays; so do the newest delivered.
    for outcome in whole.outcomes.values():
        if not outcome.terminal or outcome.failure is not None:
            assert kept.outcomes[outcome.event_id] == outcome
    newest = sorted(delivered, key=lambda o: o.seq or 0)[-FINISHED_KEPT:]
    assert {o.event_id for o in newest} | referenced <= set(kept.outcomes)
    # What stays is what the whole fold says; what went is known to be missing.
    for event_id, outcome in kept.outcomes.items():
        assert whole.outcomes[event_id] == outcome
    dropped = set(whole.outcomes) - set(kept.outcomes)
    assert dropped and all(kept.may_have_forgotten(i) for i in dropped)
    assert not any(kept.may_have_forgotten(i) for i in kept.outcomes)
    assert kept.pruned_through == max(whole.outcomes[i].seq or 0 for i in dropped)
    # The rest of the state is the same, and so is every order decision.
    assert (kept.last_seq, kept.last_send_seq) == (whole.last_seq, whole.last_send_seq)
    assert kept.recent_parts == whole.recent_parts
    assert kept.sends_per_minute == whole.sends_per_minute
    for seq in range(1, len(events) + 2, 7):
        assert pending_before(kept, seq) == pending_before(whole, seq)
    assert ids[0] in dropped


def test_a_short_conversation_is_left_as_it_is() -> None:
    events, _ = _conversation(FINISHED_KEPT)
    state = fold(ConversationState(), events)
    assert compact(state) is state
    assert state.pruned_through == 0 and not state.may_have_forgotten("anything")
    # Exactly as many delivered replies as it keeps: nothing is forgotten, so nothing
    # is read again for a reply missing from it.
    done = {f"r{i}": OutcomeState(f"r{i}", seq=i, terminal=True) for i in range(1, 5)}
    exactly = ConversationState(done)
    assert compact(exactly, finished_kept=4) is exactly


def _cache(**kwargs: Any) -> ConversationCache:
    return ConversationCache(cast(Any, None), **kwargs)  # put() never reads the log


def test_the_cache_counts_what_its_states_really_hold() -> None:
    """About what tracemalloc finds the cached states hold, for short and long ones."""
    cache = _cache(max_entries=100_000, max_bytes=None)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i, n in enumerate([1, 2, 3] * 300 + [200] * 20):
            events, _ = _conversation(n, user=f"u{i}", seed=i)
            cache.put(ConversationRef(APP, f"u{i}"), fold(ConversationState(), events))
            del events  # the cache holds what it keeps of them alone
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.8 < cache.bytes / held < 1.25, (cache.bytes, held)


def test_the_cache_keeps_to_its_byte_budget_dropping_the_least_recently_used() -> None:
    state = fold(ConversationState(), _conversation(40)[0])
    cache = _cache(max_bytes=None)
    cache.put(ConversationRef(APP, "probe"), state)
    size = cache.bytes
    cache = _cache(max_bytes=int(size * 3.5))
    convs = [ConversationRef(APP, f"user{i}") for i in range(6)]
    for conv in convs:
        cache.put(conv, state)
    assert len(cache) == 3 and cache.bytes <= size * 3.5
    assert [cache.cached(c) is not None for c in convs] == [False] * 3 + [True] * 3
    # One state over the whole budget is still cached (alone): it is in use.
    tiny = _cache(max_bytes=1)
    tiny.put(convs[0], state)
    tiny.put(convs[1], state)
    assert tiny.cached(convs[0]) is None and tiny.cached(convs[1]) is not None


def test_the_byte_budget_binds_not_a_count() -> None:
    """At 4,096 conversations the count bound first (at 18 of 64 MiB in a soak of 7,400
    users): each one past it was read whole again, from the log's start, at its next
    reply."""
    events, _ = _conversation(2)
    state = fold(ConversationState(), events)
    cache = _cache(max_bytes=64 << 20)  # SENDER_CACHE_MB's default
    for i in range(10_000):
        cache.put(ConversationRef(APP, f"u{i}"), state)
    assert len(cache) == 10_000 and cache.bytes < 64 << 20, (len(cache), cache.bytes)
