"""The pure parts of resuming a reply: which part the user saw last, and how far back
WeCom's duplicate check reaches; and which failed sends may have gone through."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest

from wecombot_common.bus import StoredEvent
from wecombot_common.events import PartDelivered, ReplyDelivered, ReplyGenerated
from wecombot_common.settings import Secret, WeComApiSettings
from wecombot_sender.domain import ConversationState, duplicate_check_interval, fold, record
from wecombot_sender.errors import SendRetryable
from wecombot_sender.wecom import HttpMessageApi, MessageType

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
ENV = {"app": "ww1-1000002", "conversation": "u", "correlation_id": "m"}


def _part(reply_id: str, index: int) -> PartDelivered:
    return PartDelivered(**ENV, reply_id=reply_id, index=index, total=2, wecom_msgid="w")


def test_the_last_recorded_part_is_tracked_by_fold_and_record() -> None:
    a, b = ReplyGenerated(**ENV, text="a"), ReplyGenerated(**ENV, text="b")
    state = fold(ConversationState(), [StoredEvent(1, a), StoredEvent(2, _part(a.event_id, 0))])
    assert state.last_part == (a.event_id, 0)
    done = ReplyDelivered(**ENV, reply_id=a.event_id, parts=1, wecom_msgids=["w"])
    state = fold(state, [StoredEvent(3, done), StoredEvent(4, b)])
    assert state.last_part == (a.event_id, 0)  # a terminal event is not a message
    state = record(state, StoredEvent(5, _part(b.event_id, 1)))
    assert state.last_part == (b.event_id, 1)
    assert ConversationState().last_part is None


@pytest.mark.parametrize(
    ("elapsed", "interval"),
    [(0.0, 1), (0.2, 2), (3.0, 4), (31.2, 33), (10 * 3600, 4 * 3600)],
)
def test_the_duplicate_check_reaches_just_before_the_last_send(
    elapsed: float, interval: int
) -> None:
    assert duplicate_check_interval(T0, T0 + timedelta(seconds=elapsed)) == interval


def test_a_clock_behind_still_asks_for_a_valid_interval() -> None:
    assert duplicate_check_interval(T0, T0 - timedelta(seconds=5)) == 1


@pytest.mark.parametrize(
    ("failure", "maybe_delivered"),
    [
        (httpx.ConnectError("refused"), False),
        (httpx.ConnectTimeout("connect"), False),
        (httpx.PoolTimeout("pool"), False),
        (httpx.ReadTimeout("read"), True),
        (httpx.RemoteProtocolError("closed"), True),
        (httpx.ReadError("reset"), True),
    ],
)
async def test_a_send_that_may_have_gone_through_says_so(
    failure: httpx.TransportError, maybe_delivered: bool
) -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise failure

    settings = WeComApiSettings("ww1", 1000002, Secret(""), "http://wecom.invalid")
    api = HttpMessageApi(settings, timeout_s=1, transport=httpx.MockTransport(fail))
    try:
        with pytest.raises(SendRetryable) as caught:
            await api.send_text("token", "u", "hi")
    finally:
        await api.aclose()
    assert caught.value.maybe_delivered is maybe_delivered


@pytest.mark.parametrize(("status", "maybe_delivered"), [(502, True), (504, True), (404, False)])
async def test_http_errors_from_a_front_end(status: int, maybe_delivered: bool) -> None:
    settings = WeComApiSettings("ww1", 1000002, Secret(""), "http://wecom.invalid")
    transport = httpx.MockTransport(lambda request: httpx.Response(status, text="bad gateway"))
    api = HttpMessageApi(settings, timeout_s=1, transport=transport)
    try:
        with pytest.raises(SendRetryable) as caught:
            await api.send_text("token", "u", "hi")
    finally:
        await api.aclose()
    assert caught.value.maybe_delivered is maybe_delivered


def _recording_api(message_type: MessageType = "text") -> tuple[HttpMessageApi, list[bytes]]:
    """The real adapter over a transport that keeps each request body and accepts it."""
    bodies: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return httpx.Response(200, json={"errcode": 0, "errmsg": "ok", "msgid": "m"})

    settings = WeComApiSettings("ww1", 1000002, Secret(""), "http://wecom.invalid")
    transport = httpx.MockTransport(answer)
    return HttpMessageApi(
        settings, timeout_s=1, message_type=message_type, transport=transport
    ), bodies


async def test_the_check_is_only_in_the_request_when_asked() -> None:
    api, bodies = _recording_api()
    try:
        await api.send_text("token", "u", "hi")
        await api.send_text("token", "u", "hi", duplicate_check_s=42)
    finally:
        await api.aclose()
    assert bodies[0] == (
        b'{"touser":"u","agentid":1000002,"msgtype":"text","text":{"content":"hi"}}'
    )
    assert bodies[1].endswith(b'"enable_duplicate_check":1,"duplicate_check_interval":42}')


async def test_markdown_goes_in_the_markdown_object() -> None:
    api, bodies = _recording_api("markdown")
    try:
        assert await api.send_text("token", "u", "**hi**", duplicate_check_s=42) == "m"
    finally:
        await api.aclose()
    assert bodies == [
        b'{"touser":"u","agentid":1000002,"msgtype":"markdown","markdown":{"content":"**hi**"},'
        b'"enable_duplicate_check":1,"duplicate_check_interval":42}'
    ]
