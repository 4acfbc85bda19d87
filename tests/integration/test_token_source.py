"""gettoken over HTTP against loopback servers that answer what WeCom would not."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.loopback import answer, answering, raw_http, read_request
from wecombot_common.settings import Secret, WeComApiSettings
from wecombot_token.domain import Failure, IssuedToken
from wecombot_token.source import WeComTokenSource

pytestmark = pytest.mark.integration

SECRET = "corp-s3cret-value"


async def _fetch(base: str) -> IssuedToken | Failure:
    """One gettoken from a token source pointed at ``base``: its outcome."""
    api = WeComApiSettings(corp_id="ww1", agent_id=1000002, secret=Secret(SECRET), api_base=base)
    source = WeComTokenSource(api, timeout_s=3)
    try:
        return await source.fetch()
    finally:
        await source.aclose()


async def test_a_redirect_is_not_followed_and_points_at_the_api_base() -> None:
    """Following it would send the corpsecret (in gettoken's query) wherever the
    Location says; a WeCom API base answers gettoken itself."""
    elsewhere: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        elsewhere.append(head)
        writer.close()

    async with raw_http(record) as other:

        async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(
                b"HTTP/1.1 302 Found\r\nLocation: %s/cgi-bin/gettoken\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n" % other.encode()
            )
            await writer.drain()
            writer.close()

        async with raw_http(redirect) as base:
            failure = await _fetch(base)
    assert isinstance(failure, Failure)
    assert failure.kind == "wecom_error" and "HTTP 302" in failure.message
    assert "WECOM_API_BASE" in failure.message and SECRET not in failure.message
    assert elsewhere == []


async def test_an_answer_past_the_limit_is_not_read_on() -> None:
    """Read whole, an answer of any size was held in memory (a gzip bomb of 1 MB took
    the token service to 2.1 GB): what a wrong WECOM_API_BASE or a broken proxy may
    serve. Past the limit it is refused as it arrives, even when it would have decoded
    as a token; and it is asked for uncoded."""
    heads: list[bytes] = []
    padded = b" " * (1 << 20) + b'{"errcode":0,"access_token":"tok-abcdef","expires_in":7200}'

    wecom = answering(200, padded, "application/json", heads=heads)

    async with raw_http(wecom) as base:
        failure = await _fetch(base)
    assert isinstance(failure, Failure)
    assert "gettoken answered a body over 64 KiB" in failure.message
    assert b"accept-encoding: identity\r\n" in heads[0]


async def test_an_errmsg_quoting_the_secret_never_carries_it_on() -> None:
    """The failure's texts reach the senders (DeliveryFailed.reason, a dead letter's
    reason), the shared bucket and doctor's output; a gateway in front of WeCom that
    quotes the request in its errmsg must not put the Secret there, bare or in the URL."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        target = head.split(b" ")[1].decode()
        body = json.dumps(
            {"errcode": 40001, "errmsg": f"invalid credential: {target} (secret {SECRET})"}
        ).encode()
        await answer(writer, 200, body, "application/json")
        writer.close()

    async with raw_http(echo) as base:
        failure = await _fetch(base)
    assert isinstance(failure, Failure)
    assert failure.kind == "bad_secret" and failure.errcode == 40001
    assert failure.errmsg is not None and "invalid credential" in failure.errmsg
    for text in (failure.message, failure.errmsg):
        assert SECRET not in text and "[REDACTED]" in text


@pytest.mark.parametrize(
    ("status", "kind", "said"),
    [(404, "wecom_error", "HTTP 404: check WECOM_API_BASE"), (429, "rate_limited", "HTTP 429")],
)
async def test_a_large_error_page_is_told_by_its_status(status: int, kind: str, said: str) -> None:
    """An answer that is not 200 is told by its status, its body unread: a proxy's or a
    wrong WECOM_API_BASE's error page past the limit was read, refused as too large,
    and said as WeCom unreachable (network), without the status or the setting to check."""
    page = b"<html>" + b"x" * (100 * 1024) + b"</html>"

    wecom = answering(status, page, "text/html")

    async with raw_http(wecom) as base:
        failure = await _fetch(base)
    assert isinstance(failure, Failure)
    assert (failure.kind, said in failure.message) == (kind, True), failure


async def test_an_errmsg_quoting_the_secret_percent_encoded_never_carries_it_on() -> None:
    """A Secret with a character a URL encodes is quoted in the request's target as
    sent, not as configured: only the corpsecret= pattern finds it there."""
    secret = "corp+s3cret/value"
    targets: list[str] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        targets.append(head.split(b" ")[1].decode())
        body = json.dumps({"errcode": 40001, "errmsg": f"invalid credential: {targets[0]}"})
        await answer(writer, 200, body.encode(), "application/json")
        writer.close()

    async with raw_http(echo) as base:
        api = WeComApiSettings(
            corp_id="ww1", agent_id=1000002, secret=Secret(secret), api_base=base
        )
        source = WeComTokenSource(api, timeout_s=3)
        try:
            failure = await source.fetch()
        finally:
            await source.aclose()
    assert isinstance(failure, Failure) and failure.errmsg is not None
    assert secret not in targets[0] and "corpsecret=corp%2Bs3cret" in targets[0]
    for text in (failure.message, failure.errmsg):
        assert "s3cret" not in text and "[REDACTED]" in text, text
