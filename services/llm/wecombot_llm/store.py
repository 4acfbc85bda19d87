"""The event log as the llm handler needs it: a port and its JetStream adapter::

log_ = JetStreamLog(js, consumer="llm")
async for stored in log_.read(conv, after_seq=41): ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import nats.errors
import structlog
from nats.js import JetStreamContext

from wecombot_common.bus import (
    Appended,
    StoredEvent,
    ack_floor,
    append_event,
    read_conversation,
)
from wecombot_common.errors import TransientError
from wecombot_common.events import Event
from wecombot_common.topology import ConversationRef

__all__ = ["ConversationLog", "JetStreamLog", "LogUnavailable"]

log = structlog.get_logger(__name__)


class LogUnavailable(TransientError):
    """The conversation could not be read (broker away, timeout)."""


class ConversationLog(Protocol):
    def read(
        self, conv: ConversationRef, *, after_seq: int, direct: bool = True, reach: int = 0
    ) -> AsyncIterator[StoredEvent]:
        """The conversation's events after ``after_seq``, in order, up to now; a direct
        read may be answered by a stream follower and end early, unless before ``reach``
        (then it goes on from the leader); ``direct=False`` is answered by the stream
        leader (``read_conversation``)."""
        ...

    async def append(
        self, event: Event, *, msg_id: str, expect_last_seq: int, expect_scope: str
    ) -> Appended:
        """Append conditionally; ConcurrencyConflict / AppendUnavailable as in bus."""
        ...

    async def settled_through(self) -> int | None:
        """A stream seq at or below which the work consumer has settled every message
        (acknowledged, or terminated after dead-lettering); None when it cannot be read."""
        ...


class JetStreamLog:
    def __init__(self, js: JetStreamContext, *, consumer: str) -> None:
        self._js = js
        self._consumer = consumer

    async def read(
        self, conv: ConversationRef, *, after_seq: int, direct: bool = True, reach: int = 0
    ) -> AsyncIterator[StoredEvent]:
        try:
            async for stored in read_conversation(
                self._js, conv, after_seq=after_seq, direct=direct, reach=reach
            ):
                yield stored
        except (TimeoutError, nats.errors.Error) as exc:
            raise LogUnavailable(f"cannot read the conversation: {type(exc).__name__}") from exc

    async def append(
        self, event: Event, *, msg_id: str, expect_last_seq: int, expect_scope: str
    ) -> Appended:
        return await append_event(
            self._js,
            event,
            msg_id=msg_id,
            expect_last_seq=expect_last_seq,
            expect_scope=expect_scope,
        )

    async def settled_through(self) -> int | None:
        return await ack_floor(self._js, self._consumer)
