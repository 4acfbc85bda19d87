"""``message/send`` on the wire, against raw loopback servers: the exact JSON the adapter
posts, and which failures may have reached WeCom (``maybe_delivered``, which decides
whether the next try asks WeCom's duplicate check)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from prometheus_client import REGISTRY

from tests.conftest import free_port
from tests.loopback import Handle, answer, answering, raw_http, read_request, reset
from wecombot_common.logs import REDACTED
from wecombot_common.settings import Secret, WeComApiSettings
from wecombot_sender.errors import SendRejected, SendRetryable
from wecombot_sender.wecom import HttpMessageApi, MessageType

pytestmark = pytest.mark.integration

ACCEPTED = b'{"errcode":0,"errmsg":"ok","msgid":"m"}'


@asynccontextmanager
async def adapter(
    base_url: str, message_type: MessageType = "text", timeout_s: float = 2.0
) -> AsyncIterator[HttpMessageApi]:
    settings = WeComApiSettings("ww1", 1000002, Secret(""), base_url)
    api = HttpMessageApi(settings, timeout_s=timeout_s, message_type=message_type)
    try:
        yield api
    finally:
        await api.aclose()


async def failed_send(base_url: str, timeout_s: float = 2.0) -> SendRetryable:
    async with adapter(base_url, timeout_s=timeout_s) as api:
        with pytest.raises(SendRetryable) as caught:
            await api.send_text("token", "u", "hi")
    return caught.value


def recording(bodies: list[bytes]) -> Handle:
    """A WeCom that accepts every send and keeps each request's body."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with_body = True
        while with_body:
            try:
                _, body = await read_request(reader)
            except asyncio.IncompleteReadError:
                with_body = False  # the client closed its keep-alive connection
            else:
                bodies.append(body)
                await answer(writer, 200, ACCEPTED, "application/json")
        writer.close()

    return handle


async def test_the_check_is_only_in_the_request_when_asked() -> None:
    bodies: list[bytes] = []
    async with raw_http(recording(bodies)) as base_url, adapter(base_url) as api:
        assert await api.send_text("token", "u", "hi") == "m"
        await api.send_text("token", "u", "hi", duplicate_check_s=42)
    assert bodies[0] == (
        b'{"touser":"u","agentid":1000002,"msgtype":"text","text":{"content":"hi"}}'
    )
    assert bodies[1].endswith(b'"enable_duplicate_check":1,"duplicate_check_interval":42}')


async def test_markdown_goes_in_the_markdown_object() -> None:
    bodies: list[bytes] = []
    async with raw_http(recording(bodies)) as base_url, adapter(base_url, "markdown") as api:
        assert await api.send_text("token", "u", "**hi**", duplicate_check_s=42) == "m"
    assert bodies == [
        b'{"touser":"u","agentid":1000002,"msgtype":"markdown","markdown":{"content":"**hi**"},'
        b'"enable_duplicate_check":1,"duplicate_check_interval":42}'
    ]


async def test_a_refused_connection_never_reached_wecom() -> None:
    failed = await failed_send(f"http://127.0.0.1:{free_port()}")
    assert failed.maybe_delivered is False
    assert "cannot reach WeCom (ConnectError)" in str(failed)


def after_the_request(then: Callable[[asyncio.StreamWriter], object]) -> Handle:
    """A server that reads the whole request, then does ``then`` instead of answering."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        then(writer)
        with contextlib.suppress(ConnectionError):
            await reader.read()  # until the client gives up and closes (or was cut off)
        writer.close()

    return handle


def _never_answer(writer: asyncio.StreamWriter) -> None:
    pass


@pytest.mark.parametrize(
    ("then", "kind"),
    [
        (_never_answer, "WeCom did not answer in time (ReadTimeout)"),
        (lambda writer: writer.close(), "cannot reach WeCom (RemoteProtocolError)"),
        (reset, "cannot reach WeCom (Read"),  # ReadError: the connection was reset
    ],
    ids=["no answer", "hung up", "reset"],
)
async def test_a_send_that_went_out_unanswered_may_have_been_delivered(
    then: Callable[[asyncio.StreamWriter], object], kind: str
) -> None:
    async with raw_http(after_the_request(then)) as base_url:
        failed = await failed_send(base_url, timeout_s=0.3)
    assert failed.maybe_delivered is True
    assert kind in str(failed)


async def test_an_answer_trickled_in_is_cut_off_at_twice_the_timeout() -> None:
    """httpx's timeout is per read: headers at once, then a byte a second, held the
    reply (and the user's next replies) for as long as WeCom or a proxy kept it up."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b"Content-Length: 100000\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(600):
                writer.write(b" ")
                await writer.drain()
                await asyncio.sleep(0.1)  # paces the trickle: under the per-read timeout
        writer.close()

    async with raw_http(trickle) as base_url, asyncio.timeout(30):
        failed = await failed_send(base_url, timeout_s=0.3)
    assert failed.maybe_delivered is True
    assert "did not arrive whole within 0.6s" in str(failed)


@pytest.mark.parametrize(
    ("status", "maybe_delivered"),
    [(500, True), (502, True), (504, True), (404, False), (302, False)],
)
async def test_http_errors_from_a_front_end(status: int, maybe_delivered: bool) -> None:
    async def front_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await answer(writer, status, b"<html>bad gateway</html>", "text/html")
        writer.close()

    async with raw_http(front_end) as base_url:
        failed = await failed_send(base_url)
    assert failed.maybe_delivered is maybe_delivered
    assert f"WeCom answered HTTP {status}" in str(failed)


@pytest.mark.parametrize("listed", ["Zhang.San", "zhang.san", "li.si|ZHANG.SAN"])
async def test_an_ok_that_lists_the_recipient_as_invalid_is_no_delivery(listed: str) -> None:
    """errcode 0 with the user in ``invaliduser``: accepted for nobody. WeCom's UserIDs
    are case-insensitive, so its list may spell the user otherwise than we did."""
    body = json.dumps({"errcode": 0, "errmsg": "ok", "invaliduser": listed}).encode()

    async def wecom(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await answer(writer, 200, body, "application/json")
        writer.close()

    async with raw_http(wecom) as base_url, adapter(base_url) as api:
        with pytest.raises(SendRejected) as caught:
            await api.send_text("token", "Zhang.San", "hi")
    assert caught.value.errcode == 82001


@pytest.mark.parametrize(
    ("listed", "delivered"),
    [("zhang.san", False), ("li.si|ZHANG.SAN", False), ("li.si", True), ("", True)],
)
async def test_an_ok_that_lists_the_recipient_as_unlicensed_is_no_delivery(
    listed: str, delivered: bool
) -> None:
    """errcode 0 with the user in ``unlicenseduser`` (no API license, path/90236): the
    message went to nobody; another user listed there is none of this send's business."""
    answer_ = {"errcode": 0, "errmsg": "ok", "invaliduser": "", "msgid": "m1"}
    body = json.dumps({**answer_, "unlicenseduser": listed}).encode()

    async def wecom(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await answer(writer, 200, body, "application/json")
        writer.close()

    async with raw_http(wecom) as base_url, adapter(base_url) as api:
        if delivered:
            assert await api.send_text("token", "Zhang.San", "hi") == "m1"
            return
        with pytest.raises(SendRejected) as caught:
            await api.send_text("token", "Zhang.San", "hi")
    assert caught.value.errcode == 82001
    assert "API license" in str(caught.value)


@pytest.mark.parametrize(
    ("body", "content_type", "why"),
    [
        (b"<html>captive portal</html>", "text/html", "JSON is malformed"),
        (b'{"status": "ok"}', "application/json", "missing required field `errcode`"),
        (b"{}", "application/json", "missing required field `errcode`"),
    ],
    ids=["a page", "JSON without errcode", "empty JSON"],
)
async def test_a_200_that_is_not_wecoms_answer_is_no_delivery(
    body: bytes, content_type: str, why: str
) -> None:
    """A front end answering its own 200: the request went through it, so it may have
    been delivered, but nothing says so. JSON without an errcode used to count as
    delivered (errcode defaulted to 0): a reply lost behind a wrong WECOM_API_BASE."""

    async def portal(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await answer(writer, 200, body, content_type)
        writer.close()

    async with raw_http(portal) as base_url:
        failed = await failed_send(base_url)
    assert failed.maybe_delivered is True
    assert "not its JSON answer" in str(failed) and why in str(failed)


async def test_an_answer_that_cannot_be_decoded_is_a_send_that_may_have_gone_out() -> None:
    """A body that is not the gzip its header says: httpx's DecodingError escaped the
    adapter (no retry, not counted, a traceback, and no DeliveryFailed at the last try)."""

    async def wecom(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        body = b"not gzip at all"
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    async with raw_http(wecom) as base_url:
        failed = await failed_send(base_url)
    assert failed.maybe_delivered is True
    assert str(failed) == "WeCom's answer could not be read (DecodingError)"


async def test_an_errmsg_quoting_the_token_is_kept_out_of_the_reason() -> None:
    """WeCom's errmsg for an errcode we do not know goes into the logs and into the
    DeliveryFailed event the log keeps: an access_token quoted in it (by a front end,
    say) is hidden there, as in every log line."""
    token = "tOkEn-quoted-back-7Hq2Lm9Xw4"
    errmsg = f"refused for token {token}, hint: [x]"
    body = json.dumps({"errcode": 99999, "errmsg": errmsg}).encode()

    async def wecom(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await answer(writer, 200, body, "application/json")
        writer.close()

    async with raw_http(wecom) as base_url, adapter(base_url) as api:
        with pytest.raises(SendRejected) as caught:
            await api.send_text(token, "u", "hi")
    assert caught.value.reason == (
        f"WeCom refused the message (errcode 99999: refused for token {REDACTED}, hint: [x])"
    )


async def test_an_answer_past_the_limit_is_not_read_on_and_is_no_delivery() -> None:
    """Read whole, an answer of any size was held in memory (a 400 MB one took the
    sender to 970 MB within its timeout, a gzip bomb of 1 MB to 2.1 GB): what a wrong
    WECOM_API_BASE or a broken proxy may serve. Past the limit it is refused as it
    arrives, even when it would have decoded as WeCom's JSON; and it is asked for
    uncoded (a coded answer inflates past any limit on what is received)."""
    heads: list[bytes] = []
    padded = b" " * (1 << 20) + ACCEPTED

    wecom = answering(200, padded, "application/json", heads=heads)

    async with raw_http(wecom) as base_url:
        failed = await failed_send(base_url)
    assert failed.maybe_delivered is True
    assert str(failed) == "WeCom answered a body over 64 KiB: not WeCom's JSON"
    assert b"accept-encoding: identity\r\n" in heads[0]


async def test_a_large_error_page_is_told_by_its_status() -> None:
    """An answer that is not 200 is told by its status, its body unread: a proxy's or a
    wrong WECOM_API_BASE's 404 page past the limit was read and refused as too large,
    its status lost, and taken as maybe delivered (a 4xx is not)."""
    page = b"<html>" + b"x" * (100 * 1024) + b"</html>"

    wecom = answering(404, page, "text/html")

    async with raw_http(wecom) as base_url:
        failed = await failed_send(base_url)
    assert str(failed) == "WeCom answered HTTP 404"
    assert failed.maybe_delivered is False


def _errcode_series() -> dict[str, float]:
    [family] = [m for m in REGISTRY.collect() if m.name == "wecombot_sender_wecom_errors"]
    return {s.labels["errcode"]: s.value for s in family.samples if s.name.endswith("_total")}


async def test_made_up_errcodes_cannot_grow_the_metric_without_bound() -> None:
    """A front end answering a new errcode per call (or a faulty build) made a series per
    call in every scrape and in Prometheus, for as long as the replica lived."""
    codes = iter(range(970_000, 970_100))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                await read_request(reader)
                said = {"errcode": next(codes), "errmsg": "made up"}
                await answer(writer, 200, json.dumps(said).encode(), "application/json")
        writer.close()

    before = _errcode_series()
    async with raw_http(handle) as base_url, adapter(base_url) as api:
        for _ in range(100):
            with pytest.raises(SendRejected):
                await api.send_text("token", "u", "hi")
    documented = b'{"errcode":81013,"errmsg":"user not found"}'  # keeps its own series
    wecom = answering(200, documented, "application/json")
    async with raw_http(wecom) as base_url, adapter(base_url) as api:
        with pytest.raises(SendRejected):
            await api.send_text("token", "u", "hi")
    after = _errcode_series()
    made_up = [code for code in after if code.startswith("970")]
    assert 0 < len(made_up) <= 32
    assert after["other"] - before.get("other", 0.0) == 100 - len(made_up)
    assert after["81013"] - before.get("81013", 0.0) == 1
