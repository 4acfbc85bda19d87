"""An experiment, not product code: how cheap could the gateway's append be without
nats-py? ``bench/bare.py --work raw-append`` counts it (scenario 1, counted).

The smallest client that does what :class:`wecombot_common.bus.PipelinedAppender` does
on its hot path: append with a ``Nats-Msg-Id`` and await the PubAck, over one asyncio
Protocol. ``HPUB`` goes straight to the transport (no flusher task), the ``MSG`` lines
of the PubAcks are parsed in ``data_received`` and resolve the append's future there
(no Msg object, no subscription queue or task). It leaves out everything a product
client needs: reconnection, authentication, TLS, lame-duck mode, no-responders
statuses, slow-consumer and write-buffer limits. So it bounds what a leaner client could
save; docs/benchmarks.md says why the gateway does not use one.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import cast

import msgspec

from wecombot_common.events import Event, encode_event
from wecombot_common.topology import subject_for

__all__ = ["RawAppender"]

_CONNECT = (
    b'CONNECT {"verbose":false,"pedantic":false,"headers":true,'
    b'"no_responders":true,"protocol":1,"name":"bench-raw-append"}\r\n'
)


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False


_decode = msgspec.json.Decoder(_PubAck).decode


class RawAppender(asyncio.Protocol):
    def __init__(self) -> None:
        self._buffer = b""
        self._waiting: dict[bytes, asyncio.Future[_PubAck]] = {}
        self._next = itertools.count()
        self._inbox = "_INBOX.bench-raw-append"
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None

    @classmethod
    async def start(cls, host: str, port: int) -> RawAppender:
        _, protocol = await asyncio.get_running_loop().create_connection(cls, host, port)
        await protocol._ready
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        pos, size = 0, len(buffer)
        while (end := buffer.find(b"\r\n", pos)) >= 0:
            line = buffer[pos:end]
            if line.startswith(b"MSG "):  # MSG <subject> <sid> <bytes>
                fields = line.split(b" ")
                start = end + 2
                stop = start + int(fields[-1])
                if stop + 2 > size:
                    break  # the payload is not all here yet
                pos = stop + 2
                waiter = self._waiting.pop(fields[1].rpartition(b".")[2], None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(_decode(buffer[start:stop]))
                continue
            pos = end + 2
            self._control(line)
        self._buffer = buffer[pos:]

    def _control(self, line: bytes) -> None:
        assert self._transport is not None
        if line.startswith(b"INFO "):
            self._transport.write(_CONNECT + f"SUB {self._inbox}.* 1\r\nPING\r\n".encode())
        elif line == b"PONG" and not self._ready.done():
            self._ready.set_result(None)
        elif line == b"PING":
            self._transport.write(b"PONG\r\n")
        elif line.startswith(b"-ERR"):
            raise RuntimeError(line.decode(errors="replace"))

    async def append(self, event: Event, *, msg_id: str, timeout: float) -> _PubAck:
        assert self._transport is not None
        data = encode_event(event)
        token = str(next(self._next))
        headers = f"NATS/1.0\r\nNats-Msg-Id: {msg_id}\r\n\r\n".encode()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_PubAck] = loop.create_future()
        self._waiting[token.encode()] = waiter
        command = f"HPUB {subject_for(event)} {self._inbox}.{token} {len(headers)} "
        self._transport.write(
            f"{command}{len(headers) + len(data)}\r\n".encode() + headers + data + b"\r\n"
        )
        deadline = loop.call_later(timeout, _expire, waiter, timeout)
        try:
            return await waiter
        finally:
            deadline.cancel()


def _expire(waiter: asyncio.Future[_PubAck], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError(f"no PubAck within {timeout:g}s"))
