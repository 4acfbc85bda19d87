"""Fakes of the services' ports, for tests of the logic above them, and the events
they are fed (``received``, ``reply_to``).

Each is held to its real adapter by a contract test that runs the same assertions
against both, the real one on a real nats-server: ``FakeLog`` (the llm's
``ConversationLog``) by tests/integration/test_llm_log_contract.py.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

from wecombot_common.bus import Appended, AppendUnavailable, ConcurrencyConflict, StoredEvent
from wecombot_common.events import (
    Event,
    MessageReceived,
    Payload,
    ReplyGenerated,
    TextPayload,
)
from wecombot_common.topology import ConversationRef, subject_for

__all__ = ["APP", "FakeLog", "received", "reply_to"]

APP = "ww1-1000002"


class FakeLog:
    """An in-memory event log with JetStream's append semantics (dedupe, expected seq)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, StoredEvent]] = []
        self.msg_ids: dict[str, int] = {}
        self.stored_at: dict[int, float] = {}  # seq → when the broker stored it
        self.settled = 0
        self.unavailable = 0  # the next N appends fail
        self.reads = 0
        self.leader_reads = 0
        self.events_read = 0
        # direct reads answered by a stream follower that has applied the log this far
        self.follower_at: int | None = None
        self._last_seq = 0

    def add(self, event: Event, *, stored_at: float | None = None) -> int:
        """Store ``event`` (as the broker would at ``stored_at``: now, unless given)."""
        seq = self._last_seq = self._last_seq + 1
        self.events.append((subject_for(event), StoredEvent(seq, event)))
        self.stored_at[seq] = time.time() if stored_at is None else stored_at
        return seq

    def recreate(self) -> None:
        """The stream deleted and created again (an operator, or a single node that lost
        its tail): empty, its sequences from 1 again."""
        self.events, self.msg_ids, self.stored_at, self._last_seq = [], {}, {}, 0

    def expire(self, through_seq: int) -> None:
        """Drop every event up to ``through_seq``, as the stream's max age does."""
        self.events = [(subj, s) for subj, s in self.events if s.seq > through_seq]

    async def read(
        self, conv: ConversationRef, *, after_seq: int, direct: bool = True, reach: int = 0
    ) -> AsyncIterator[StoredEvent]:
        """As ``read_conversation``: a direct read answered by the follower at
        ``follower_at`` that ends before ``reach`` goes on from the leader."""
        self.reads += 1
        if direct:
            through = self._last_seq if self.follower_at is None else self.follower_at
            for s in self._read(conv, after_seq, through):
                after_seq = s.seq
                yield s
            if after_seq >= reach:
                return
        self.leader_reads += 1
        for s in self._read(conv, after_seq, self._last_seq):
            yield s

    def _read(self, conv: ConversationRef, after_seq: int, through: int) -> list[StoredEvent]:
        found = [
            s
            for subject, s in self.events
            if after_seq < s.seq <= through and subject.startswith(conv.root + ".")
        ]
        self.events_read += len(found)
        return found

    async def append(
        self, event: Event, *, msg_id: str, expect_last_seq: int, expect_scope: str
    ) -> Appended:
        await asyncio.sleep(0)
        if self.unavailable:
            self.unavailable -= 1
            raise AppendUnavailable("broker away")
        # nats-server checks the expected sequence before the Nats-Msg-Id: a repeat sent
        # with a stale expectation is a conflict, not a duplicate (the contract test).
        prefix = expect_scope.removesuffix(">")
        last = max((s.seq for subj, s in self.events if subj.startswith(prefix)), default=0)
        if last != expect_last_seq:
            raise ConcurrencyConflict(f"expected {expect_last_seq}, last is {last}")
        if msg_id in self.msg_ids:
            return Appended(self.msg_ids[msg_id], duplicate=True)
        seq = self.msg_ids[msg_id] = self.add(event)
        return Appended(seq, duplicate=False)

    async def settled_through(self) -> int | None:
        return self.settled

    def outcomes(self) -> list[Event]:
        return [s.event for _, s in self.events if not isinstance(s.event, MessageReceived)]


def received(
    text: str | None = None, *, user: str, payload: Payload | None = None
) -> MessageReceived:
    """A message from ``user`` as the gateway appends it (a text one unless ``payload``)."""
    return MessageReceived(
        app=APP,
        conversation=user,
        correlation_id=str(random.getrandbits(60)),
        msg_type="text",
        msg_id=None,
        from_user=user,
        to_user="ww1",
        agent_id=1000002,
        create_time=0,
        payload=payload if payload is not None else TextPayload(content=text or ""),
    )


def reply_to(m: MessageReceived, text: str, kind: str = "answer") -> ReplyGenerated:
    """The llm's outcome for ``m``."""
    return ReplyGenerated(
        app=APP,
        conversation=m.conversation,
        correlation_id=m.correlation_id,
        causation_id=m.event_id,
        text=text,
        kind=kind,  # type: ignore[arg-type]
    )
