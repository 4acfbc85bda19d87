"""A stream follower that lags its leader, played in front of a real nats-server.

Direct reads of a replicated stream (``allow_direct``) may be answered by any replica,
and "a lookup after an update" may "not include the message that was just added"
(nats.js's DirectStreamAPI docs). A real nats-server has one copy, so the follower is
played: its direct gets see the log only through a given sequence, nats-py's one at a
time (``get_msg``) and the batched ones (``bus._DirectReads``, whose answers come to a
subscription of the connection: its messages past that sequence end the batch);
everything else (the leader's reads, appends, consumers) is the real server's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
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
        self._nc = _LaggingConnection(js._nc, self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._js, name)

    async def get_last_msg(self, stream_name: str, subject: str) -> RawStreamMsg:
        self.leader_reads += 1  # STREAM.MSG.GET: the leader's
        if self.leaderless:
            raise nats.errors.TimeoutError
        return await self._js.get_last_msg(stream_name, subject)

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


class _LaggingConnection:
    """The connection under a :class:`LaggingFollower`: the answers of a batched direct
    get end, as the follower's would, before the first message it has not applied (a
    ``404`` when that is the first, else a ``204 EOB`` with nothing pending)."""

    def __init__(self, nc: NATS, follower: LaggingFollower) -> None:
        self._nc = nc
        self._follower = follower

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nc, name)

    async def subscribe(
        self, subject: str, cb: Callable[[Msg], Awaitable[None]], **options: Any
    ) -> Subscription:
        last: dict[str, int | None] = {}  # by reply token: the last seq passed on
        ended: set[str] = set()

        async def as_the_follower(msg: Msg) -> None:
            token = msg.subject.rpartition(".")[2]
            if token in ended:
                return
            headers = msg.headers or {}
            seq = headers.get("Nats-Sequence")
            if seq is not None and int(seq) > self._follower.applied:
                ended.add(token)
                passed = last.get(token)
                end = (
                    {"Status": "404", "Description": "Message Not Found"}
                    if passed is None
                    else {"Status": "204", "Description": "EOB", "Nats-Num-Pending": "0"}
                )
                await cb(Msg(self._nc, subject=msg.subject, headers=end))
                return
            if seq is None:
                ended.add(token)
            else:
                last[token] = int(seq)
            await cb(msg)

        return await self._nc.subscribe(subject, cb=as_the_follower, **options)
