"""The gateway's one outbound port: append a received message to the event log::

appender = await PipelinedAppender.start(nc)
publisher = JetStreamPublisher(appender, timeout_s=2.0)
await publisher.append(message, msg_id="ww1-2:4561255354251345929")
# → Appended(seq=1, duplicate=False)
"""

from __future__ import annotations

from typing import Protocol

from wecombot_common.bus import Appended, AppendUnavailable, PipelinedAppender
from wecombot_common.events import MessageReceived
from wecombot_common.runtime import Check, DeferredCheck

__all__ = ["JetStreamPublisher", "Pending", "Publisher"]


class Publisher(Protocol):
    """Store one event exactly once per ``msg_id``.

    Returns once the store confirmed it (``duplicate=True``: it was already stored);
    raises :class:`wecombot_common.bus.AppendUnavailable` when it could not confirm in
    time, in which case the caller must not report success, and
    :class:`wecombot_common.bus.EventTooLarge` for an event no broker could store.
    """

    async def append(self, event: MessageReceived, *, msg_id: str) -> Appended: ...


class JetStreamPublisher:
    """Publisher over JetStream: ``Nats-Msg-Id`` dedupe, awaits the PubAck."""

    __slots__ = ("_appender", "_timeout_s")

    def __init__(self, appender: PipelinedAppender, *, timeout_s: float) -> None:
        self._appender = appender
        self._timeout_s = timeout_s

    async def append(self, event: MessageReceived, *, msg_id: str) -> Appended:
        # nats-py buffers publishes while it reconnects, so the PubAck deadline, not the
        # connection state, decides between 200 and 503 (shared/nats/FACTS.md). The
        # publish itself does not wait (the appender refuses at once what nats-py's full
        # buffer would hold up), so WeCom (5 s) hears 503 in time and retries.
        return await self._appender.append(event, msg_id=msg_id, timeout=self._timeout_s)


class Pending:
    """The publisher before NATS is reachable: every callback is answered 503 (WeCom
    retries) until :meth:`attach`. Readiness meanwhile: runtime.DeferredCheck."""

    __slots__ = ("_publisher", "ready")

    def __init__(self) -> None:
        self._publisher: Publisher | None = None
        self.ready = DeferredCheck()

    def attach(self, publisher: Publisher, ready: Check) -> None:
        self._publisher = publisher
        self.ready.attach(ready)

    async def append(self, event: MessageReceived, *, msg_id: str) -> Appended:
        if self._publisher is None:
            raise AppendUnavailable("not connected to NATS yet")
        return await self._publisher.append(event, msg_id=msg_id)
