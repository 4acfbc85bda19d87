"""The model client on the wire: httpx over aiohttp's pool, against real loopback servers.

What the transport must keep from httpx's own pool: answers, timeouts and hang-ups
reported as retryable failures with their real cause, many calls in flight on one pool,
and the environment's HTTP proxy.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.conftest import free_port
from wecombot_common.settings import Secret
from wecombot_common.sim.openai_api import Fault, Messages, SimulatedOpenAIApi, echo_reply
from wecombot_llm.model import ModelUnavailable, OpenAIChatModel
from wecombot_llm.prompt import ChatMessage
from wecombot_llm.settings import ModelSettings

KEY = "sk-integration-model"
HELLO = [ChatMessage("user", "你好")]


def settings(base_url: str, **changes: object) -> ModelSettings:
    base: dict[str, object] = {
        "api_key": Secret(KEY),
        "base_url": base_url,
        "model": "sim-model",
        "api_version": None,
        "temperature": None,
        "request_timeout_s": 5.0,
        "retry_budget_s": 0.0,  # one attempt: the failure itself is under test
        "max_connections": 8,
    }
    base.update(changes)
    return ModelSettings(**base)  # type: ignore[arg-type]


async def failure(base_url: str, **changes: object) -> ModelUnavailable:
    """The one attempt of a call that must fail, through the real transport."""
    model = OpenAIChatModel(settings(base_url, **changes))
    try:
        with pytest.raises(ModelUnavailable) as info:
            await model.complete(HELLO)
    finally:
        await model.aclose()
    assert info.value.attempts == 1
    return info.value


@pytest.fixture
async def api() -> AsyncIterator[SimulatedOpenAIApi]:
    async with SimulatedOpenAIApi(api_key=KEY) as server:
        yield server


async def test_answers_through_the_aiohttp_pool(api: SimulatedOpenAIApi) -> None:
    model = OpenAIChatModel(settings(api.base_url))
    try:
        done = await model.complete(HELLO)
    finally:
        await model.aclose()
    assert "你好" in done.text and done.model == "sim-model"
    [request] = api.chat_requests
    assert request.last_user_text == "你好"


async def test_many_calls_in_flight_share_one_pool_of_max_connections(
    api: SimulatedOpenAIApi,
) -> None:
    in_flight = peak = 0
    all_busy = asyncio.Event()

    async def held_echo(messages: Messages) -> str:
        """The first calls are held until 40 are in at once (a smaller pool never gets
        there: its calls time out and the test fails)."""
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if in_flight == 40:
            all_busy.set()
        try:
            await all_busy.wait()
            return echo_reply(messages)
        finally:
            in_flight -= 1

    api.reply = held_echo
    model = OpenAIChatModel(settings(api.base_url, max_connections=40))
    try:
        answers = await asyncio.gather(
            *(model.complete([ChatMessage("user", f"q{i}")]) for i in range(120))
        )
    finally:
        await model.aclose()
    assert all(f"q{i}" in answer.text for i, answer in enumerate(answers))
    assert peak == 40, "the pool is LLM_MAX_CONCURRENCY + 8 connections, all of them used"
    connections = {request.client for request in api.chat_requests}
    assert len(connections) == 40, "kept alive and reused, never more than the pool"


async def test_a_hanging_model_is_a_timeout(api: SimulatedOpenAIApi) -> None:
    api.fail_always(Fault.hanging())
    failed = await failure(api.base_url, request_timeout_s=0.3)
    assert str(failed).startswith("timeout (")


async def test_a_refused_connection_is_a_connection_error() -> None:
    failed = await failure(f"http://127.0.0.1:{free_port()}/v1")
    assert str(failed).startswith("connection error (ClientConnectorError")
    assert KEY not in str(failed)


async def test_a_server_that_hangs_up_is_a_connection_error_not_a_timeout() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the request's head, then close unanswered
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        failed = await failure(f"http://127.0.0.1:{port}/v1")
    finally:
        server.close()
        await server.wait_closed()
    assert str(failed).startswith("connection error (ServerDisconnectedError")


async def test_the_environment_proxy_carries_the_call(
    api: SimulatedOpenAIApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Companies reach their provider through an egress proxy (HTTP_PROXY): the call goes
    to the proxy in absolute form; here the simulator itself plays the proxy."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{api.port}")
    model = OpenAIChatModel(settings("http://llm.invalid/v1"))  # resolvable only by the proxy
    try:
        done = await model.complete(HELLO)
    finally:
        await model.aclose()
    assert "你好" in done.text
    assert len(api.chat_requests) == 1
