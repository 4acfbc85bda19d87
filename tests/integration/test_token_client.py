"""TokenClient, as the sender uses it, against a real nats-server and responders that
answer what a token service might: nothing, garbage, a failure of each kind.

What matters is which failures are passing (TransientTokenError: the reply is handed
back and tried again) and which need an operator (TokenError: parked with the reason).
A token service restarting must never park replies."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from tests.conftest import NatsHandle
from tests.waiting import until
from wecombot_common.tokens import TokenClient, TokenError, TransientTokenError
from wecombot_common.topology import TOKEN_GET, TOKEN_INVALIDATE

pytestmark = pytest.mark.integration

APP = "ww1-1000002"


Answer = Callable[[bytes, dict[str, str] | None], Awaitable[None]]


@pytest.fixture
async def answer(nc: NATS) -> AsyncIterator[Answer]:
    """Make the (only) token service answer every get with these bytes and headers."""
    subs = []

    async def set_answer(data: bytes, headers: dict[str, str] | None = None) -> None:
        async def respond(msg: Msg) -> None:
            await nc.publish(msg.reply, data, headers=headers)

        subs.append(await nc.subscribe(TOKEN_GET, cb=respond))
        await nc.flush()

    yield set_answer
    for sub in subs:
        await sub.unsubscribe()


async def test_no_token_service_is_a_passing_failure(nc: NATS) -> None:
    with pytest.raises(TransientTokenError) as raised:
        await TokenClient(nc, timeout=2).get(APP)
    assert raised.value.kind == "unavailable" and "no token service" in str(raised.value)


@pytest.mark.parametrize(
    ("data", "headers", "kind", "said"),
    [
        (b"oops", {"Nats-Service-Error": "boom"}, "unavailable", "bad token reply: boom"),
        (b"oops", None, "unavailable", "bad token reply"),
        (b'{"ok":false}', None, "wecom_error", "token service error"),
        (b'{"ok":true}', None, "wecom_error", "token service error"),  # ok, but no token
        (b'{"ok":false,"kind":"rate_limited","message":"45009","retry_after":3.5}', None,
         "rate_limited", "45009"),
        (b'{"ok":false,"kind":"network","message":"down"}', None, "network", "down"),
    ],
)  # fmt: skip
async def test_passing_failures(
    nc: NATS,
    answer: Answer,
    data: bytes,
    headers: dict[str, str] | None,
    kind: str,
    said: str,
) -> None:
    await answer(data, headers)
    with pytest.raises(TransientTokenError) as raised:
        await TokenClient(nc, timeout=2).get(APP)
    assert raised.value.kind == kind and said in str(raised.value)
    if kind == "rate_limited":
        assert raised.value.retry_after == 3.5


@pytest.mark.parametrize("kind", ["bad_secret", "bad_corp_id", "untrusted_ip", "unknown_app"])
async def test_failures_an_operator_must_fix(nc: NATS, answer: Answer, kind: str) -> None:
    await answer(f'{{"ok":false,"kind":"{kind}","message":"m","errcode":40001}}'.encode(), None)
    with pytest.raises(TokenError) as raised:
        await TokenClient(nc, timeout=2).get(APP)
    assert not isinstance(raised.value, TransientTokenError)
    assert (raised.value.kind, raised.value.errcode) == (kind, 40001)


async def test_a_failure_of_a_kind_unknown_here_keeps_its_words_and_its_wait(
    nc: NATS, answer: Answer
) -> None:
    """A token service of a newer build (a rolling upgrade, the sender not rolled yet)
    answers a failure of a kind this build does not know: passing, as an errcode this
    build does not know is (wecom_error), with the service's words and retry_after. As an
    undecodable reply it was "bad token reply: Invalid enum value", and the sender
    retried at its own pace, spending its deliveries, instead of waiting as told."""
    await answer(
        b'{"ok":false,"kind":"a_kind_of_a_newer_build","message":"its words",'
        b'"errcode":40999,"retry_after":42.0}',
        None,
    )
    with pytest.raises(TransientTokenError) as raised:
        await TokenClient(nc, timeout=2).get(APP)
    assert (raised.value.kind, str(raised.value)) == ("wecom_error", "its words")
    assert raised.value.retry_after == 42.0


async def test_a_token_is_answered(nc: NATS, answer: Answer) -> None:
    await answer(b'{"ok":true,"token":"t0k3n-value","expires_at":1.0}', None)
    assert await TokenClient(nc, timeout=2).get(APP) == "t0k3n-value"


async def test_a_request_lost_with_its_broker_is_asked_again_once_reconnected(
    nc: NATS, nats_server: NatsHandle
) -> None:
    """The broker restarted after the token service had the request and before its
    answer got through: the answer is lost, and the caller waited out its whole timeout
    (30 s, its reply held) though the service answered at once when asked again."""
    responder = await nats.connect(
        nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2
    )
    asked = 0
    lost = asyncio.Event()

    async def respond(msg: Msg) -> None:
        nonlocal asked
        asked += 1
        if asked == 1:
            lost.set()  # the broker goes before this one is answered
        else:
            await responder.publish(msg.reply, b'{"ok":true,"token":"t1"}')

    try:
        await responder.subscribe(TOKEN_GET, cb=respond)
        await responder.flush()
        get = asyncio.ensure_future(TokenClient(nc, timeout=600, reask_s=600).get(APP))
        await lost.wait()
        nats_server.stop()
        nats_server.start()
        async with asyncio.timeout(60):  # asked once only, it waits its 600 s
            assert await get == "t1"
        assert asked == 2
    finally:
        await responder.close()


async def test_a_request_its_replica_died_with_is_asked_again(nc: NATS) -> None:
    """The token replica given the request died before answering (killed, its node
    lost): the caller waited out its whole timeout, 30 s, though another replica would
    have answered at once. Asked again after ``reask_s``, another replica answers."""
    asked: list[bytes] = []

    async def respond(msg: Msg) -> None:
        asked.append(msg.data)
        if len(asked) > 1:  # the first went to the replica that died
            await nc.publish(msg.reply, b'{"ok":true,"token":"t2"}')

    sub = await nc.subscribe(TOKEN_INVALIDATE, cb=respond)
    try:
        client = TokenClient(nc, timeout=600, reask_s=0.2)
        async with asyncio.timeout(60):  # asked once only, it waits its 600 s
            assert await client.invalidate(APP, "t1") == "t2"
        assert len(asked) == 2 and asked[0] == asked[1]  # the same question
    finally:
        await sub.unsubscribe()


async def test_a_request_is_asked_again_within_its_timeout_by_default(nc: NATS) -> None:
    """Without ``reask_s``, a question no replica answers is asked again after a third of
    the timeout: the second has the two thirds left to be answered in. Asked once only,
    it is waited out to the timeout and the caller told "unavailable"."""
    asked = 0

    async def respond(msg: Msg) -> None:
        nonlocal asked
        asked += 1
        if asked > 1:  # the first went to a replica that died
            await nc.publish(msg.reply, b'{"ok":true,"token":"t3"}')

    sub = await nc.subscribe(TOKEN_GET, cb=respond)
    try:
        assert await TokenClient(nc, timeout=6).get(APP) == "t3"
        assert asked == 2
    finally:
        await sub.unsubscribe()


async def test_a_cancelled_question_leaves_no_request_waiting(nc: NATS) -> None:
    """A caller that stops waiting (its service stopping) takes its request with it: left
    running, it held its place for the answer until its timeout and ended in an error
    nobody retrieved."""
    asked = asyncio.Event()

    async def never(msg: Msg) -> None:
        asked.set()

    sub = await nc.subscribe(TOKEN_GET, cb=never)
    try:
        get = asyncio.ensure_future(TokenClient(nc, timeout=600).get(APP))
        await asked.wait()
        get.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await get

        def requests() -> list[asyncio.Task[object]]:
            return [t for t in asyncio.all_tasks() if "Client.request" in repr(t.get_coro())]

        await until(lambda: not requests(), timeout=10, what=lambda: f"{requests()} to end")
    finally:
        await sub.unsubscribe()
