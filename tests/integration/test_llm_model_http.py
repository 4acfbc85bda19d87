"""The model client on the wire: httpx over aiohttp's pool, against real loopback servers.

What the transport must keep from httpx's own pool: answers, timeouts and hang-ups
reported as retryable failures with their real cause, many calls in flight on one pool,
and the environment's HTTP proxy. And what it must not let through: an attempt that
outlasts LLM_REQUEST_TIMEOUT, an httpx error that escapes ``complete()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import random
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import httpx
import pytest

from tests.conftest import free_port
from tests.loopback import answering, raw_http, read_request
from wecombot_common.settings import EnvReader, Secret
from wecombot_common.sim.openai_api import (
    Answer,
    Fault,
    Messages,
    SimulatedOpenAIApi,
    echo_reply,
)
from wecombot_llm.model import (
    MAX_RESPONSE_BYTES,
    Completion,
    ModelError,
    ModelRejected,
    ModelUnavailable,
    OpenAIChatModel,
)
from wecombot_llm.prompt import ChatMessage
from wecombot_llm.settings import ModelSettings

KEY = "sk-integration-model"
HELLO = [ChatMessage("user", "你好")]
Failure = TypeVar("Failure", bound=ModelError)
ANSWER = b'{"choices":[{"message":{"content":"late answer"},"finish_reason":"stop"}]}'


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


async def failure(
    base_url: str, kind: type[Failure] = ModelUnavailable, **changes: object
) -> Failure:
    """The one attempt of a call that must fail so, through the real transport."""
    model = OpenAIChatModel(settings(base_url, **changes))
    try:
        with pytest.raises(kind) as info:
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


async def test_the_request_carries_the_bearer_key_and_the_chat_body(
    api: SimulatedOpenAIApi,
) -> None:
    model = OpenAIChatModel(settings(api.base_url, temperature=0.2))
    try:
        done = await model.complete([ChatMessage("system", "s"), ChatMessage("user", "u")])
    finally:
        await model.aclose()
    assert (done.text, done.model) == ("echo: u", "sim-model")
    assert (done.prompt_tokens, done.completion_tokens) == (2, 1)  # the sim's usage
    [request] = api.chat_requests
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert "api-key" not in request.headers and request.query == {}
    assert request.body == {
        "model": "sim-model",
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        "stream": False,
        "temperature": 0.2,
    }


async def test_a_temperature_of_zero_is_sent_not_left_to_the_provider(
    api: SimulatedOpenAIApi,
) -> None:
    """0 is the deterministic setting operators choose on purpose; a provider's default
    (often 1) is not what they asked for."""
    model = OpenAIChatModel(settings(api.base_url, temperature=0.0))
    try:
        await model.complete(HELLO)
    finally:
        await model.aclose()
    [request] = api.chat_requests
    assert request.body["temperature"] == 0.0


async def test_with_an_api_version_the_key_goes_in_the_api_key_header(
    api: SimulatedOpenAIApi,
) -> None:
    """Azure OpenAI's classic deployments: ``api-key`` and ``?api-version=``."""
    model = OpenAIChatModel(settings(api.base_url, api_version="2024-10-21"))
    try:
        await model.complete(HELLO)
    finally:
        await model.aclose()
    [request] = api.chat_requests
    assert request.query == {"api-version": "2024-10-21"}
    assert request.headers["api-key"] == KEY
    assert "authorization" not in request.headers


async def _complete(api: SimulatedOpenAIApi, said: Answer) -> str | ModelRejected:
    api.reply = lambda messages: said
    model = OpenAIChatModel(settings(api.base_url, retry_budget_s=5.0))
    try:
        done = await model.complete(HELLO)
    except ModelRejected as exc:
        return exc
    finally:
        await model.aclose()
    return f"{done.finish_reason}: {done.text}"


async def test_how_the_answer_ended_is_read(api: SimulatedOpenAIApi) -> None:
    """``length``: cut off at the output limit, kept and said so (the handler notes it);
    ``content_filter``: the provider stopped it, no answer; a refusal is the model's
    answer in its own words, not an empty completion."""
    assert await _complete(api, Answer("第一步：打开设置。第二步：点", "length")) == (
        "length: 第一步：打开设置。第二步：点"
    )
    filtered = await _complete(api, Answer("Here is how you", "content_filter"))
    assert isinstance(filtered, ModelRejected) and "content filter" in str(filtered)
    refused = await _complete(api, Answer(None, "stop", refusal="I can't help with that."))
    assert refused == "stop: I can't help with that."
    empty = await _complete(api, Answer("  ", "stop"))
    assert isinstance(empty, ModelRejected) and "empty completion" in str(empty)
    assert len(api.chat_requests) == 4  # none of them retried


async def test_what_the_user_would_not_see_is_not_the_answer(api: SimulatedOpenAIApi) -> None:
    """A reasoning model served without a reasoning parser (DeepSeek-R1 on Ollama) puts
    its thinking first in the content, between <think> tags: it was sent to the user.
    An answer of zero-width characters only was sent as an empty bubble."""
    thought = "<think>\nThe user greets me. I should reason privately…\n</think>\n\n你好！"
    assert await _complete(api, Answer(thought, "stop")) == "stop: 你好！"
    kept = "Use <think> tags like this: <think>…</think>"  # not first: part of the answer
    assert await _complete(api, Answer(kept, "stop")) == f"stop: {kept}"
    nothing_shown = (
        "\u200b\u200b",
        "\u200b \u2060 \u200b",
        "<think>only thinking</think>",
        "<think>thinking until the output limit" + "\n" * 30_000,  # no quadratic search
        " \ufeff\n\u2060",
        "\u200f\u200e ",  # direction marks
    )
    for nothing in nothing_shown:
        empty = await _complete(api, Answer(nothing, "stop"))
        assert isinstance(empty, ModelRejected) and "empty completion" in str(empty), nothing


async def test_a_redirect_is_not_followed_and_names_the_base_url() -> None:
    """Followed, the key would go where it points; refused, it named no setting (logged
    as a warning): a 3xx means OPENAI_BASE_URL is off (http for https, no /v1)."""

    async def moved(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: https://elsewhere.example/v1/"
            b"chat/completions\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    async with raw_http(moved) as base_url:
        failed = await failure(base_url, ModelRejected, retry_budget_s=5.0)
    assert str(failed).startswith("HTTP 307")
    assert failed.setting == "OPENAI_BASE_URL"


@pytest.mark.parametrize("status", [200, 401])
async def test_a_gzipped_answer_is_read(status: int) -> None:
    """httpx asks for gzip; the body read (and decoded) under the size limit was decoded
    a second time by its Content-Encoding: every gzipped answer, "malformed"."""
    body = ANSWER if status == 200 else b'{"error": {"message": "Incorrect API key"}}'

    async def gzipped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        sent = gzip.compress(body)
        head = f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
        head += f"Content-Encoding: gzip\r\nContent-Length: {len(sent)}\r\n\r\n"
        writer.write(head.encode() + sent)
        await writer.drain()
        writer.close()

    async with raw_http(gzipped) as base_url:
        model = OpenAIChatModel(settings(base_url, retry_budget_s=5.0))
        try:
            if status == 200:
                assert (await model.complete(HELLO)).text == "late answer"
            else:
                with pytest.raises(ModelRejected, match="HTTP 401: Incorrect API key"):
                    await model.complete(HELLO)
        finally:
            await model.aclose()


@pytest.mark.parametrize("coding", ["identity", "gzip"])
async def test_an_answer_too_big_to_be_one_is_refused_as_it_arrives(coding: str) -> None:
    """Read whole, a broken proxy's endless body (or a small gzip that unpacks to
    gigabytes) took the replica's memory; retried, it came back the same."""
    body = b'{"choices":[{"message":{"content":"' + b"0" * MAX_RESPONSE_BYTES + b'"}}]}'
    sent = gzip.compress(body) if coding == "gzip" else body
    requests = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        requests += 1
        await read_request(reader)
        head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        head += f"Content-Encoding: {coding}\r\nContent-Length: {len(sent)}\r\n\r\n"
        writer.write(head.encode() + sent)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async with raw_http(endless) as base_url:
        failed = await failure(base_url, ModelRejected, retry_budget_s=5.0)
    assert str(failed).startswith("answer over 2 MiB"), failed
    assert requests == 1


@pytest.mark.parametrize(
    ("status", "kind", "setting"),
    [(429, ModelUnavailable, None), (503, ModelUnavailable, None),
     (401, ModelRejected, "OPENAI_API_KEY")],
)  # fmt: skip
async def test_an_error_page_of_any_size_is_judged_by_its_status(
    status: int, kind: type[ModelError], setting: str | None
) -> None:
    """A proxy's error page past the 2 MiB an answer may have made a 429 or 503 a refusal
    for good (the size limit tripped first): its status decides, its start is the reason."""
    page = b"<html><title>Too busy</title>" + b"x" * (MAX_RESPONSE_BYTES + 1024) + b"</html>"
    async with raw_http(answering(status, page, "text/html")) as base_url:
        failed = await failure(base_url, kind)
    assert str(failed).startswith(f"HTTP {status}: <html><title>Too busy</title>xxx"), failed
    assert getattr(failed, "setting", None) == setting


async def test_an_endless_error_body_is_read_no_further_than_its_start() -> None:
    """A broken proxy's 503 whose body never ends: read to its end, the attempt lasted
    until LLM_REQUEST_TIMEOUT and failed as a timeout, the status and its words lost."""
    chunk = b"x" * 65536
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n1d\r\n<html><title>Too busy</title>\r\n"
        )
        with contextlib.suppress(ConnectionError):
            for _ in range(256):  # 16 MiB, then silence: the body has no end
                writer.write(framed)
                await writer.drain()
            await reader.read()  # until the client hangs up
        writer.close()

    async with raw_http(endless) as base_url:
        failed = await failure(base_url, ModelUnavailable, request_timeout_s=3.0)
    assert str(failed).startswith("HTTP 503: <html><title>Too busy</title>xxx"), failed


async def test_a_client_error_is_permanent_and_not_retried(api: SimulatedOpenAIApi) -> None:
    api.fail_always(Fault.server_error(400))
    failed = await failure(api.base_url, ModelRejected, retry_budget_s=5.0)
    assert str(failed).startswith("HTTP 400: The server had an error")
    assert len(api.chat_requests) == 1


@pytest.mark.parametrize(
    ("status", "setting"),
    [(401, "OPENAI_API_KEY"), (403, "OPENAI_API_KEY"), (404, "OPENAI_MODEL or OPENAI_BASE_URL"),
     (400, None), (422, None)],
)  # fmt: skip
async def test_a_refusal_of_our_configuration_names_the_setting_to_fix(
    api: SimulatedOpenAIApi, status: int, setting: str | None
) -> None:
    """The llm's failure line says which setting to fix when every request alike would be
    refused (a key without access to the model is a 403); none when it is this request."""
    api.fail_always(Fault.server_error(status))
    failed = await failure(api.base_url, ModelRejected, retry_budget_s=5.0)
    assert failed.setting == setting and str(failed).startswith(f"HTTP {status}: ")


async def test_a_provider_error_given_as_a_string_is_the_reason() -> None:
    body = b'{"error": "Insufficient balance"}'  # DeepSeek's and others' shape
    async with raw_http(answering(402, body, "application/json")) as base_url:
        failed = await failure(base_url, ModelRejected)
    assert str(failed) == "HTTP 402: Insufficient balance"


async def test_transient_failures_are_retried_within_the_budget(
    api: SimulatedOpenAIApi,
) -> None:
    api.fail_next(Fault.server_error(503))
    api.fail_next(Fault.rate_limited(retry_after="0"))
    model = OpenAIChatModel(settings(api.base_url, retry_budget_s=5.0), rng=random.Random(0))
    try:
        done = await model.complete(HELLO)
    finally:
        await model.aclose()
    assert done.text == "echo: 你好" and len(api.chat_requests) == 3


async def test_a_retry_after_beyond_the_budget_is_not_waited_for(
    api: SimulatedOpenAIApi,
) -> None:
    api.fail_always(Fault.rate_limited(retry_after="30"))
    failed = await failure(api.base_url, retry_budget_s=5.0)
    assert "HTTP 429" in str(failed) and len(api.chat_requests) == 1


async def test_a_retry_is_not_started_without_time_for_its_attempt(
    api: SimulatedOpenAIApi,
) -> None:
    """A Retry-After that ends just before the budget would leave the retry a moment:
    hardly an answer comes so fast, so the call ends at once (LLM_RETRY_BUDGET)."""
    api.fail_always(Fault.rate_limited(retry_after="1.8"))
    failed = await failure(api.base_url, retry_budget_s=2.0)
    assert "HTTP 429" in str(failed) and len(api.chat_requests) == 1


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

    async with raw_http(hang_up) as base_url:
        failed = await failure(base_url)
    assert str(failed).startswith("connection error (ServerDisconnectedError")


async def test_a_provider_sending_blank_lines_is_cut_off_at_the_request_timeout() -> None:
    """DeepSeek keeps a busy non-streaming request alive with blank lines, for up to 30
    minutes: LLM_REQUEST_TIMEOUT bounds the whole attempt, not the gap between reads."""
    hung_up = asyncio.Event()
    answered = False

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(300):  # a blank line every 0.1 s for 30 s, then the answer
                writer.write(b"1\r\n\n\r\n")
                await writer.drain()
                await asyncio.sleep(0.1)
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(ANSWER), ANSWER))
            await writer.drain()
            answered = True
        except ConnectionError:
            hung_up.set()
        finally:
            writer.close()

    async with raw_http(trickle) as base_url:
        model = OpenAIChatModel(settings(base_url, request_timeout_s=1.0))
        try:
            with pytest.raises(ModelUnavailable) as info:
                await model.complete(HELLO)
            # The attempt gave its connection up (none is left mid-answer in the pool).
            await asyncio.wait_for(hung_up.wait(), timeout=15)
        finally:
            await model.aclose()
    assert str(info.value).startswith("timeout (no whole answer within 1s)")
    assert info.value.attempts == 1
    assert not answered, "the call waited for the answer at the end of the blank lines"


def corrupt_gzip(body: bytes) -> bytes:
    """A 200 labelled gzip whose body is not (a proxy or provider mislabelling it)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
    return head + b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)


async def test_an_undecodable_answer_is_a_retryable_failure() -> None:
    """httpx's DecodingError is no TransportError: it escaped complete() and the llm
    handler, and the worker took it for a crash (no apology, the model asked again)."""

    async def mislabel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(corrupt_gzip(ANSWER))
        await writer.drain()
        writer.close()

    async with raw_http(mislabel) as base_url:
        failed = await failure(base_url)
    assert str(failed).startswith("malformed response (DecodingError: ")
    assert KEY not in str(failed)


async def test_an_undecodable_answer_is_retried_within_the_budget() -> None:
    requests = 0

    async def mislabel_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        requests += 1
        await reader.readuntil(b"\r\n\r\n")
        body = corrupt_gzip(ANSWER)
        if requests > 1:
            body = body.replace(b"Content-Encoding: gzip\r\n", b"")
        writer.write(body)
        await writer.drain()
        writer.close()

    async with raw_http(mislabel_once) as base_url:
        model = OpenAIChatModel(settings(base_url, retry_budget_s=30.0))
        try:
            done = await model.complete(HELLO)
        finally:
            await model.aclose()
    assert done.text == "late answer"
    assert requests == 2


async def _answering(*bodies: bytes) -> tuple[Completion | ModelError, int]:
    """complete() against a provider answering these bodies with 200, one per request
    (the last again for any later request); what it returned and the requests made."""
    requests = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        requests += 1
        await reader.readuntil(b"\r\n\r\n")
        body = bodies[min(requests, len(bodies)) - 1]
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        writer.write(head % len(body) + b"Connection: close\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    async with raw_http(answer) as base_url:
        model = OpenAIChatModel(settings(base_url, retry_budget_s=30.0))
        try:
            return await model.complete(HELLO), requests
        except ModelError as exc:
            return exc, requests
        finally:
            await model.aclose()


async def test_an_answer_in_parts_with_counts_as_floats_is_an_answer() -> None:
    """Strict decoding threw these away as malformed: retried for the whole budget, each
    try a billed completion, then the apology."""
    done, requests = await _answering(
        b'{"choices":[{"message":{"content":[{"type":"text","text":"part one, "},'
        b'{"type":"image_url"},{"type":"thinking","text":"(the model thinking) "},'
        b'{"type":"text","text":"part two"}]},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":12.0,"completion_tokens":3.0}}'
    )
    assert isinstance(done, Completion) and requests == 1
    assert (done.text, done.prompt_tokens, done.completion_tokens) == ("part one, part two", 12, 3)
    assert done.model == "sim-model"  # the provider named none: the one asked for


async def test_an_answer_the_provider_interrupted_is_asked_again() -> None:
    """DeepSeek's finish_reason=insufficient_system_resource: the text stops mid-way; it
    was stored and sent as a whole answer (and kept as history)."""
    interrupted = (
        b'{"choices":[{"message":{"content":"step one: open the sett"},'
        b'"finish_reason":"insufficient_system_resource"}]}'
    )
    done, requests = await _answering(interrupted, ANSWER)
    assert isinstance(done, Completion) and (done.text, requests) == ("late answer", 2)


async def test_a_200_that_is_no_chat_answer_is_retried_within_the_budget() -> None:
    """A front end's page with status 200 (a captive proxy, a gateway's maintenance page)
    is no answer of the model's: asked again, not turned into an apology at once."""
    done, requests = await _answering(b"<html>maintenance</html>", ANSWER)
    assert isinstance(done, Completion) and (done.text, requests) == ("late answer", 2)


@pytest.mark.parametrize(
    "base_url",
    [
        f"http://127.0.0.1:99999/{KEY}/v1",  # no such port: aiohttp's InvalidUrlClientError
        "http://127.0.0.1/" + "v1/" * 30_000,  # httpx's InvalidURL: too long
    ],
    ids=["bad-port", "too-long"],
)
async def test_a_request_that_cannot_be_sent_is_rejected_at_once(base_url: str) -> None:
    """httpx.InvalidURL escaped complete(); an unusable URL was retried for the budget."""
    model = OpenAIChatModel(settings(base_url, retry_budget_s=5.0))
    try:
        with pytest.raises(ModelRejected) as info:
            await model.complete(HELLO)
    finally:
        await model.aclose()
    assert str(info.value).startswith("request not sendable (")
    assert info.value.attempts == 1
    assert KEY not in str(info.value)


async def test_the_environment_proxy_carries_the_call(api: SimulatedOpenAIApi) -> None:
    """Companies reach their provider through an egress proxy (HTTP_PROXY, read with the
    settings): the call goes to the proxy in absolute form; here the simulator itself
    plays the proxy."""
    env = EnvReader(
        {
            "OPENAI_API_KEY": KEY,
            "OPENAI_BASE_URL": "http://llm.invalid/v1",  # resolvable only by the proxy
            "HTTP_PROXY": f"http://127.0.0.1:{api.port}",
        }
    )
    proxy = ModelSettings.read(env, max_concurrency=1).proxy
    assert env.problems == [] and proxy is not None
    model = OpenAIChatModel(settings("http://llm.invalid/v1", proxy=proxy))
    try:
        done = await model.complete(HELLO)
    finally:
        await model.aclose()
    assert "你好" in done.text
    assert len(api.chat_requests) == 1


async def _refused_quoting_the_key(quote: Callable[[str], str]) -> str:
    """The reason of a 401 whose message is ``quote(key)``, the key as the request sent
    it, over the production stack (httpx over aiohttp)."""

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        fields = dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)
        lower = {k.lower(): v for k, v in fields.items()}
        await reader.readexactly(int(lower.get("content-length", "0")))
        message = quote(lower["authorization"].removeprefix("Bearer "))
        body = json.dumps({"error": {"message": message}}).encode()
        writer.write(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    async with raw_http(refuse) as base_url:
        model = OpenAIChatModel(settings(base_url))
        try:
            with pytest.raises(ModelRejected) as refused:
                await model.complete(HELLO)
        finally:
            await model.aclose()
    assert refused.value.setting == "OPENAI_API_KEY"  # said on the llm's failure line
    return str(refused.value)


@pytest.mark.parametrize("before", [0, 185], ids=["whole", "across the 200-character cut"])
async def test_a_provider_echoing_the_key_never_puts_it_in_the_reason(before: int) -> None:
    """The reason is stored (ReplyFailed.reason), so no log redaction ever sees it; the
    key must be gone already, also when the 200-character cut of the provider's message
    falls inside the key (cut first, the first part of the key stayed)."""
    reason = await _refused_quoting_the_key(lambda key: "x" * before + f"bad key {key} via proxy")
    assert KEY[:7] not in reason
    assert "bad key [REDACT" in reason
    assert len(reason) <= len("HTTP 401: ") + 200


@pytest.mark.parametrize(
    "masked",
    [
        lambda key: f"Incorrect API key provided: {key[:8]}{'*' * 20}{key[-4:]}. You can find",
        lambda key: f"Authentication Fails, Your api key: ****{key[-4:]} is invalid",
        lambda key: f"key {key[:6]}***",
    ],
    ids=["openai", "deepseek", "head only"],
)
async def test_the_key_as_a_provider_masks_it_is_not_kept_either(
    masked: Callable[[str], str],
) -> None:
    """OpenAI's 401 quotes the key's first 8 and last 4 characters between asterisks:
    part of the secret, and they were stored in ReplyFailed.reason."""
    reason = await _refused_quoting_the_key(masked)
    assert KEY[:6] not in reason and KEY[-4:] not in reason, reason
    assert "[REDACTED]" in reason and "*" not in reason, reason


async def test_another_keys_mask_is_kept() -> None:
    """Asterisks around what is not this key (another key a proxy sent, a word in bold)
    are the provider's message, not this secret."""
    reason = await _refused_quoting_the_key(lambda key: "key sk-other*****zzzz is **not** set")
    assert "key sk-other*****zzzz is **not** set" in reason


async def test_a_retry_after_date_past_the_year_9999_is_no_wait(api: SimulatedOpenAIApi) -> None:
    """The date parser raised OverflowError for it, out of complete() and the handler:
    the model was asked again at each delivery and the message parked with no outcome,
    not even the apology. A Retry-After that cannot be read is no Retry-After."""
    api.fail_next(Fault.rate_limited(retry_after="Wed, 21 Oct 99999999999 07:28:00 GMT"))
    model = OpenAIChatModel(settings(api.base_url, retry_budget_s=5.0), rng=random.Random(0))
    try:
        done = await model.complete(HELLO)
    finally:
        await model.aclose()
    assert done.text == "echo: 你好" and len(api.chat_requests) == 2


async def test_a_retry_ends_with_the_budget(api: SimulatedOpenAIApi) -> None:
    """LLM_RETRY_BUDGET bounded when a retry may start, not when it ends: a retry started
    just inside it had a whole LLM_REQUEST_TIMEOUT more (with the defaults, a hanging
    provider was given up after 120-150 s, not 90). The retry now has what is left."""
    api.fail_always(Fault.hanging())
    model = OpenAIChatModel(
        settings(api.base_url, request_timeout_s=2.0, retry_budget_s=4.0), rng=random.Random(0)
    )
    try:
        with pytest.raises(ModelUnavailable) as failed:
            await model.complete(HELLO)
    finally:
        await model.aclose()
    assert failed.value.attempts == 2
    # the first attempt had its 2 s; the retry, started after a backoff, what was left
    limit = float(str(failed.value).split("no whole answer within ")[1].split("s)")[0])
    assert 1.0 <= limit < 2.0, str(failed.value)


async def test_a_defect_met_on_an_answer_is_the_apology_not_a_crash(
    api: SimulatedOpenAIApi,
) -> None:
    """Whatever escapes the reading of one answer ends the call as a refusal (the
    apology), once: a crash was asked again at each delivery, then parked unanswered."""

    class Defective(OpenAIChatModel):
        def _parse(self, response: httpx.Response, attempt: int) -> Completion:
            raise KeyError("a defect")

    model = Defective(settings(api.base_url, retry_budget_s=5.0))
    try:
        with pytest.raises(ModelRejected) as failed:
            await model.complete(HELLO)
    finally:
        await model.aclose()
    assert str(failed.value) == "unexpected KeyError: 'a defect'"
    assert failed.value.attempts == 1 and len(api.chat_requests) == 1


async def test_a_defect_quoting_the_key_never_puts_it_in_the_reason(
    api: SimulatedOpenAIApi,
) -> None:
    """The reason is stored (ReplyFailed.reason): a defect's text that quotes what it
    met (the key, a URL's password) must not carry it there."""

    class Defective(OpenAIChatModel):
        def _parse(self, response: httpx.Response, attempt: int) -> Completion:
            raise ValueError(f"met {KEY} and http://user:pw-secret@proxy:3128")

    model = Defective(settings(api.base_url))
    try:
        with pytest.raises(ModelRejected) as failed:
            await model.complete(HELLO)
    finally:
        await model.aclose()
    reason = str(failed.value)
    assert reason.startswith("unexpected ValueError: met [REDACT")
    assert KEY not in reason and "pw-secret" not in reason
