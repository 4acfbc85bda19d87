"""WeCom's answers read up to MAX_ANSWER_BYTES, no further."""

from __future__ import annotations

import httpx
import pytest

from wecombot_common.wecom_http import MAX_ANSWER_BYTES, AnswerTooLarge, send_capped


async def _send(body: bytes) -> tuple[int, bytes]:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        return await send_capped(client, client.build_request("GET", "http://wecom/x"))


async def test_an_answer_of_the_limit_is_read_and_one_byte_more_is_refused() -> None:
    assert await _send(b"x" * MAX_ANSWER_BYTES) == (200, b"x" * MAX_ANSWER_BYTES)
    with pytest.raises(AnswerTooLarge) as refused:
        await _send(b"x" * (MAX_ANSWER_BYTES + 1))
    assert refused.value.limit == MAX_ANSWER_BYTES == 64 * 1024
