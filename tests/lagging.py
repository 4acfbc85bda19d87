"""A stream follower that lags its leader, played in front of a real nats-server.

Direct reads of a replicated stream (``allow_direct``) may be answered by any replica,
and "a lookup after an update" may "not include the message that was just added"
(nats.js's DirectStreamAPI docs). A real nats-server has one copy, so the follower is
played: its direct gets see the log only through a given sequence; everything else (the
leader's reads, appends, consumers) is the real server's.
"""

from __future__ import annotations

from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg

__all__ = ["LaggingFollower"]


class LaggingFollower:
    """``js``, with every direct get answered as by a follower that has applied the log
    through stream seq ``applied`` only."""

    def __init__(self, js: JetStreamContext, applied: int, *, leaderless: bool = False) -> None:
        self._js = js
        self.applied = applied
        self.leader_reads = 0
        # electing a leader (a node was lost): leader reads time out, direct ones answer
        self.leaderless = leaderless

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def get_msg(
        self,
        stream_name: str,
        seq: int | None = None,
        subject: str | None = None,
        direct: bool | None = False,
        next: bool | None = False,  # nats-py's name
    ) -> RawStreamMsg:
        if not direct:
            self.leader_reads += 1
            if self.leaderless:
                raise nats.errors.TimeoutError
        elif seq is not None and not next and seq > self.applied:
            raise nats.js.errors.NotFoundError
        raw = await self._js.get_msg(stream_name, seq, subject, direct=direct, next=next)
        if direct and (raw.seq or 0) > self.applied:
            raise nats.js.errors.NotFoundError  # not applied here yet
        return raw
