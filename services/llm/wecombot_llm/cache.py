"""Conversations held in memory between messages: a bounded LRU, never authoritative.

Each entry is caught up from the log before it is used, so evicting one only costs a
re-read. An entry also coordinates this process's deliveries of one conversation:

- ``lock``: one delivery at a time reads, decides, calls the model and appends;
- ``active``: event_ids delivered to this process right now (a waiter whose blocker is
  here knows it is being worked on);
- ``changed``: set when this process appended to the conversation, waking waiters at
  once instead of at their next poll.

Entries in use are never evicted, so all deliveries of a conversation share one lock.
The cache holds about ``max_bytes`` (each entry counted
after use: ENTRY_BYTES plus :meth:`Conversation.approx_bytes`, ``LLM_CACHE_MB``): a
conversation holds up to twice ``LLM_MAX_TURNS`` turns (those the user read, and newer
ones not known read) and a thousand settled ids, so a count
alone let a busy replica grow past its pod's memory (``capacity`` is only a safety net,
the bytes bind first)::

    cache = ConversationCache(
        lambda: Conversation(needs_outcome=…), capacity=1_000_000, max_bytes=64 << 20)
    entry = cache.get(conv)
    with entry.handling(event_id):
        async with entry.lock: ...
    cache.used(conv)
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from wecombot_common.events import Outcome
from wecombot_common.topology import ConversationRef

from .conversation import Conversation

__all__ = ["ConversationCache", "Entry"]

# What an entry holds besides its fold (the Entry, its lock, Counter and dict, the key,
# its slot in the cache): ≈ 530 bytes under tracemalloc, 5,000 fresh entries.
ENTRY_BYTES = 600


class Entry:
    def __init__(self, state: Conversation, now: float = 0.0) -> None:
        self.state = state
        self.used_at = now
        self.size = 0  # ENTRY_BYTES + state.approx_bytes() when last counted
        # When the fold began reading the log from its start (wall clock, as the broker
        # stamps a message's storage): every message stored before then that the log
        # still holds was read by it (handler._handle).
        self.built_at = time.time()
        self.lock = asyncio.Lock()
        self.active: Counter[str] = Counter()
        # An outcome computed but not appended (the broker was away): reused by a
        # redelivery while the llm branch is still at the recorded seq.
        self.prepared: dict[str, tuple[int, Outcome]] = {}
        # Made when someone waits: most entries never have a waiter, and an Event costs
        # ~0.7 KB (its deque), per cached conversation and per message in flight.
        self._changed: asyncio.Event | None = None

    def rebuild(self, state: Conversation) -> None:
        """Start the fold again from ``state`` (empty: read from the log's start)."""
        self.state = state
        self.built_at = time.time()
        self.prepared.clear()

    def forget_stale(self) -> None:
        """Drop the prepared outcomes decided on another llm branch than the fold's now:
        only one decided where the branch still ends is reused, and the branch never
        goes back (a rebuild clears them all). Kept until the entry left the cache (and
        not counted in its size), one stayed for each message a broker outage caught at
        its append and another replica answered on redelivery: up to 64 KiB each."""
        if self.prepared:
            branch = self.state.llm_last_seq
            self.prepared = {k: v for k, v in self.prepared.items() if v[0] == branch}

    @property
    def changed(self) -> asyncio.Event:
        """An event set at the next change; take it before waiting, under the lock."""
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    @property
    def busy(self) -> bool:
        return bool(self.active) or self.lock.locked()

    @contextmanager
    def handling(self, event_id: str) -> Iterator[None]:
        self.active[event_id] += 1
        try:
            yield
        finally:
            self.active[event_id] -= 1
            if self.active[event_id] <= 0:
                del self.active[event_id]


class ConversationCache:
    """``max_idle_s``: an idle entry unused for longer is rebuilt from the log, so no
    replica keeps turns the stream has since dropped (``WECOMBOT_HISTORY_MAX_AGE``, or
    past ``WECOMBOT_HISTORY_MAX_MB``) for long while a restarted one would not."""

    def __init__(
        self,
        new_state: Callable[[], Conversation],
        *,
        capacity: int,
        max_bytes: int | None = None,
        max_idle_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._new_state = new_state
        self._capacity = capacity
        self._max_bytes = max_bytes
        self.bytes = 0  # the entries' sizes as last counted
        self._max_idle_s = max_idle_s
        self._clock = clock
        self._entries: OrderedDict[ConversationRef, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, conv: ConversationRef) -> Entry:
        now = self._clock()
        entry = self._entries.get(conv)
        if entry is not None and not entry.busy and now - entry.used_at > self._max_idle_s:
            self._drop(conv)
            entry = None
        if entry is None:
            self._evict(room_for=1)
            entry = self._entries[conv] = Entry(self._new_state())
        entry.used_at = now
        self._entries.move_to_end(conv)
        return entry

    def used(self, conv: ConversationRef) -> None:
        """Count ``conv``'s entry again after a delivery used it, and keep to the budget."""
        entry = self._entries.get(conv)
        if entry is not None:
            entry.forget_stale()
            size = ENTRY_BYTES + entry.state.approx_bytes()
            self.bytes += size - entry.size
            entry.size = size
        self._evict(room_for=0)

    def _over(self, room_for: int, count: int | None = None, size: int | None = None) -> bool:
        count = len(self._entries) if count is None else count
        size = self.bytes if size is None else size
        return count + room_for > self._capacity or (
            self._max_bytes is not None and size > self._max_bytes
        )

    def _evict(self, *, room_for: int) -> None:
        """Drop the least recently used idle entries while over the count or the byte
        budget (busy ones stay, over both).

        The victims are found walking from the oldest, without copying the cache: a
        copy of every entry on each miss of a full cache (10,000 tuples, long-lived
        enough to reach the oldest GC generation) set off full collections, and the
        llm's CPU per message went from 2.6 to 11.7 ms once 10,000 users had written."""
        if not self._over(room_for):
            return
        victims: list[ConversationRef] = []
        count, size = len(self._entries), self.bytes
        for key, entry in self._entries.items():  # oldest first
            if not self._over(room_for, count, size):
                break
            if not entry.busy:
                victims.append(key)
                count, size = count - 1, size - entry.size
        for key in victims:
            self._drop(key)

    def _drop(self, conv: ConversationRef) -> None:
        entry = self._entries.pop(conv)
        self.bytes -= entry.size
