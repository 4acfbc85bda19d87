"""HTTP body guards for the callback POST: media type and a size limit while reading.

>>> check_content_type("text/xml; charset=utf-8")
>>> check_content_type("application/json")
Traceback (most recent call last):
...
wecombot_gateway.errors.UnsupportedMediaType: Content-Type 'application/json' is not XML
"""

from __future__ import annotations

import asyncio

from aiohttp import StreamReader
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import RequestPayloadError

from .errors import BodyTimeout, BodyTooLarge, UnreadableBody, UnsupportedMediaType

__all__ = ["check_content_encoding", "check_content_type", "check_declared_length", "read_limited"]

_XML_TYPES = frozenset(("text/xml", "application/xml"))


def check_content_type(header: str | None) -> None:
    """Accept text/xml (what WeCom sends), application/xml, any ``+xml``, or no header.

    A missing Content-Type is tolerated: the body is still parsed as XML and fully
    verified by its signature, and refusing it would gain nothing. A declared non-XML
    type (JSON, a form, multipart…) is a client that is not WeCom: 415.
    """
    if header is None:
        return
    mime = header.split(";", 1)[0].strip().lower()
    if mime in _XML_TYPES or mime.endswith("+xml"):
        return
    raise UnsupportedMediaType(f"Content-Type {mime[:60]!r} is not XML")


def check_content_encoding(header: str | None) -> None:
    """Accept an uncoded body only: WeCom posts the XML as it is (no Content-Encoding).

    The gateway's server leaves bodies undecoded (``app.runner_options``), so a gzip or
    deflate body would reach the parser as bytes that are not XML: it is refused here,
    by its header, instead. Nothing is ever decompressed (no decompression bomb).

    >>> check_content_encoding("identity")
    >>> check_content_encoding("gzip")
    Traceback (most recent call last):
    ...
    wecombot_gateway.errors.UnsupportedMediaType: Content-Encoding 'gzip' is not accepted: \
WeCom posts the XML uncoded
    """
    if header is None:
        return
    coding = header.strip().lower()
    if coding in ("", "identity"):
        return
    raise UnsupportedMediaType(
        f"Content-Encoding {coding[:40]!r} is not accepted: WeCom posts the XML uncoded"
    )


def check_declared_length(length: int | None, limit: int) -> None:
    """Refuse a Content-Length over ``limit`` before reading a byte of the body."""
    if length is not None and length > limit:
        raise BodyTooLarge(f"Content-Length {length} exceeds {limit} bytes")


async def read_limited(stream: StreamReader, limit: int, timeout_s: float) -> bytes:
    """Read the whole body, refusing as soon as it grows past ``limit`` (chunked bodies),
    or when it has not all arrived ``timeout_s`` after the read began: a client that
    declares a length and sends less, or trickles, holds a connection otherwise.

    WeCom's small bodies arrive with the headers: read at once, with no deadline to set.
    """
    if stream.is_eof():
        return await _read_all(stream, limit)
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_all(stream, limit)
    except TimeoutError:
        raise BodyTimeout(f"body not received within {timeout_s:g} s") from None


async def _read_all(stream: StreamReader, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await _read_chunk(stream):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _read_chunk(stream: StreamReader) -> bytes:
    try:
        return await stream.readany()
    except HttpProcessingError as exc:  # bad chunking, Content-Length
        raise UnreadableBody(f"body cannot be read: {exc.message}") from None
    except RequestPayloadError as exc:  # a coded body that does not decode, where a
        # server decodes bodies (the gateway's does not: app.runner_options)
        raise UnreadableBody(f"body cannot be read: {exc}") from None
    except ConnectionResetError:
        raise UnreadableBody("client disconnected while sending the body") from None
