"""Raw HTTP servers on loopback for the wire tests: each connection is answered byte by
byte by a test's ``handle``, so a test can make the server hang, hang up, reset, or
answer what a front end in the way would (a 502 page, a body that is not JSON)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

__all__ = ["Handle", "answer", "answering", "raw_http", "read_request", "reset"]

Handle = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_http(handle: Handle) -> AsyncIterator[str]:
    """A loopback server whose every connection ``handle`` answers: its base URL
    (``http://127.0.0.1:<port>``)."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request: its head (request line and headers) and its Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


async def answer(writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str) -> None:
    writer.write(
        f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()


def answering(
    status: int, body: bytes, content_type: str, *, heads: list[bytes] | None = None
) -> Handle:
    """A handle that answers each request with ``status`` and ``body`` (the client may
    hang up before it has read it all), recording each request's head, lower-cased, in
    ``heads``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if heads is not None:
            heads.append(head.lower())
        with contextlib.suppress(ConnectionError):
            await answer(writer, status, body, content_type)
        writer.close()

    return handle


def reset(writer: asyncio.StreamWriter) -> None:
    """Close the connection with a TCP reset (SO_LINGER 0), not a clean FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
