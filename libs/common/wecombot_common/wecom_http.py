"""WeCom's answers to the token service and the sender, read up to a size limit (the
llm reads its model provider's answers with :func:`read_capped` too, at a limit of its
own).

``gettoken`` and ``message/send`` answer a few hundred bytes of JSON. Read whole, an
answer of any size was held in memory: what a wrong ``WECOM_API_BASE``, a captive
portal or a broken proxy serves (a 400 MB body took a sender to 970 MB within its
timeout, over its pod's 256 MiB), or a gzip body that inflates a thousandfold (1 MB
sent became 2.1 GB in the token service and in the sender). So the answer is asked for
uncoded and read only up to ``MAX_ANSWER_BYTES``, as it arrives::

    client = httpx.AsyncClient(headers=UNCODED, ...)
    status, body = await send_capped(client, client.build_request("GET", url))

A server that codes its answer all the same, though asked not to, is decoded by httpx
a read at a time, each inflated whole: the same bomb then held 130 MB once before it was
refused (a hostile WeCom end, no broken one; refusing every coded answer instead would
lose every reply should WeCom's front end code them regardless).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:  # httpx is imported by the services that call WeCom only
    import httpx

__all__ = ["MAX_ANSWER_BYTES", "UNCODED", "AnswerTooLarge", "read_capped", "send_capped"]

# WeCom's JSON answers, an errmsg with its hint and a list of invalid users included,
# are far under this; an errmsg this long still fits a DeliveryFailed in one event.
MAX_ANSWER_BYTES: Final = 64 * 1024
# httpx asks for gzip and deflate (br and zstd too when installed) by default: nothing
# WeCom's small answers need, and a bomb's way past any limit on the bytes received.
UNCODED: Final = {"Accept-Encoding": "identity"}


class AnswerTooLarge(Exception):
    """The answer's body (decoded) went past the limit; the rest was not read."""

    def __init__(self, limit: int, size: int) -> None:
        super().__init__(f"a body over {limit // 1024} KiB: not WeCom's JSON")
        self.limit = limit
        self.size = size  # read when it went past


async def read_capped(response: httpx.Response, limit: int, *, cut: bool = False) -> bytes:
    """The streamed ``response``'s body (decoded), read as it arrives; AnswerTooLarge as
    soon as it passes ``limit`` bytes, the rest unread (``cut``: its first ``limit``
    bytes instead, as for an error's message). Closes the response. The llm reads its
    provider's answers with it too."""
    try:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit and not cut:
                raise AnswerTooLarge(limit, size)
            chunks.append(chunk)
            if size >= limit and cut:
                break
    finally:
        await response.aclose()
    return b"".join(chunks)[:limit]


async def send_capped(
    client: httpx.AsyncClient, request: httpx.Request, *, limit: int = MAX_ANSWER_BYTES
) -> tuple[int, bytes]:
    """``request``'s status and body, AnswerTooLarge as soon as the body passes ``limit``
    bytes; httpx's errors as ``client.send`` raises them.

    The body of an answer other than 200 is not read (``b""``): WeCom answers 200, with
    an errcode, and neither caller reads another's; read, a proxy's error page past the
    limit (a wrong ``WECOM_API_BASE``'s 404) was refused as too large, its status lost."""
    response = await client.send(request, stream=True)
    if response.status_code != 200:
        await response.aclose()
        return response.status_code, b""
    return response.status_code, await read_capped(response, limit)
