"""The model port, and its two adapters: an OpenAI-compatible HTTP API, and offline.

::

    ModelError                    the model gave no answer; .attempts, str() = the reason
    ├── ModelUnavailable          transient failures outlasted the retry budget
    └── ModelRejected             refused (4xx, empty answer) or never sendable (bad URL)

    async with open_model(settings.model) as model:
        done = await model.complete([ChatMessage("user", "你好")])
    done.text
    # → '你好！有什么可以帮你？'

``OpenAIChatModel`` speaks ``POST {base_url}/chat/completions`` (non-streaming), which
OpenAI, Azure OpenAI, DeepSeek, DashScope (Qwen), Ollama and vLLM all serve; see
docs/providers.md. Without an API key, ``OfflineModel`` echoes what it received.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import httpx
import msgspec
import structlog
from httpx_aiohttp import AiohttpTransport

from wecombot_common.errors import PermanentError, TransientError, WecombotError
from wecombot_common.logs import REDACTED, redact
from wecombot_common.proxy import httpx_proxy
from wecombot_common.text import shows_nothing
from wecombot_common.wecom_http import AnswerTooLarge, read_capped

from .prompt import ChatMessage
from .retry import is_retryable_status, next_delay, retry_after_of
from .settings import ModelSettings

__all__ = [
    "ChatModel",
    "Completion",
    "ModelError",
    "ModelRejected",
    "ModelUnavailable",
    "OfflineModel",
    "OpenAIChatModel",
    "error_detail",
    "open_model",
    "provider_auth",
    "without_key",
]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # "length": the provider stopped at its output limit, the text is cut off
    finish_reason: str | None = None


class ModelError(WecombotError):
    """The model gave no answer. ``attempts`` counts the HTTP requests made."""

    def __init__(self, reason: str, *, attempts: int) -> None:
        super().__init__(reason)
        self.attempts = attempts


class ModelUnavailable(ModelError, TransientError):
    """Timeouts, 429 or 5xx, connection errors or unreadable answers until the retry
    budget ran out."""


class ModelRejected(ModelError, PermanentError):
    """The provider refused the request (a 4xx other than 408/429) or answered nothing,
    or the request cannot be sent at all (an unusable ``OPENAI_BASE_URL``). ``setting``:
    ours the refusal points at (401/403: OPENAI_API_KEY; 404: the model or the base URL),
    so that the failure line says what to fix; None when it is about this request."""

    def __init__(self, reason: str, *, attempts: int, setting: str | None = None) -> None:
        super().__init__(reason, attempts=attempts)
        self.setting = setting


# A retry is not started with less of LLM_RETRY_BUDGET left: hardly any answer comes so fast.
MIN_ATTEMPT_S = 0.25

# A refusal of every request alike: our configuration, not the message.
_SETTING_FOR_STATUS = {
    # redirects are not followed (the key would go where they point): the base URL is
    # off (http for https, a path without /v1)
    **dict.fromkeys((301, 302, 303, 307, 308), "OPENAI_BASE_URL"),
    401: "OPENAI_API_KEY",
    403: "OPENAI_API_KEY",
    404: "OPENAI_MODEL or OPENAI_BASE_URL",
}


class ChatModel(Protocol):
    """Anything that turns chat messages into one completion."""

    async def complete(self, messages: Sequence[ChatMessage]) -> Completion:
        """The answer to ``messages``; raises ModelUnavailable or ModelRejected."""
        ...


# ---------------------------------------------------------------- offline


class OfflineModel:
    """No network: a deterministic echo, labelled so nobody mistakes it for an LLM."""

    async def complete(self, messages: Sequence[ChatMessage]) -> Completion:
        users = [m.content for m in messages if m.role == "user"]
        said = users[-1] if users else ""
        text = f"[offline model] you said: {said} (context: {len(users) - 1} earlier turns)"
        return Completion(text=text, model="offline")


# ---------------------------------------------------------------- OpenAI-compatible HTTP


class _Part(msgspec.Struct):
    type: str = "text"
    text: str | None = None


class _Message(msgspec.Struct):
    # a string, or (some providers, newer APIs) a list of parts of which the text ones
    # make the answer
    content: str | list[_Part] | None = None
    refusal: str | None = None  # OpenAI: the model declined, in its own words

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class _Choice(msgspec.Struct):
    message: _Message
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    # counts only, never worth refusing an answer over: some providers send 12.0
    prompt_tokens: int | float | None = None
    completion_tokens: int | float | None = None


def _count(value: float | None) -> int | None:
    return int(value) if value is not None and math.isfinite(value) else None


class _Response(msgspec.Struct):
    choices: list[_Choice]
    model: str | None = None
    usage: _Usage | None = None


_decode_response = msgspec.json.Decoder(_Response).decode
# The body as httpx's ``json=`` would send it (UTF-8, compact), at a fifth of the CPU.
_encode_body = msgspec.json.Encoder().encode
_JSON_BODY = {"Content-Type": "application/json"}
# Idle connections to the provider are closed after this (httpx's own default): a load
# balancer that drops idle connections earlier costs one retried attempt.
_KEEPALIVE_S = 5.0


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


# The request can never be sent (our URL; redirects, which are not followed, and streams,
# which are read once, cannot arise but must not escape complete()): no retry can help.
_UNSENDABLE = (
    httpx.InvalidURL,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
    httpx.TooManyRedirects,
    httpx.StreamError,
    aiohttp.InvalidURL,
)
# The provider, or what lies between, failed this once: a timeout, a dropped or refused
# connection, a malformed or undecodable answer (a body not in its Content-Encoding).
_PROVIDER_FAULTS = (httpx.TransportError, httpx.DecodingError, aiohttp.ClientError)


def provider_auth(settings: ModelSettings) -> tuple[dict[str, str], dict[str, str]]:
    """The headers and query parameters that authenticate a call to the provider.

    Bearer by default; with ``api_version`` set (Azure OpenAI's classic
    ``/openai/deployments/{name}`` URLs) an ``api-key`` header and ``?api-version=``.
    ``wecombot doctor`` calls the provider with exactly these.

    >>> from wecombot_common.settings import EnvReader
    >>> env = EnvReader({"OPENAI_API_KEY": "sk-test", "OPENAI_API_VERSION": "2024-06-01"})
    >>> provider_auth(ModelSettings.read(env, max_concurrency=1))
    ({'api-key': 'sk-test'}, {'api-version': '2024-06-01'})
    """
    if settings.api_key is None:
        raise ValueError("the provider needs an API key")
    key = settings.api_key.reveal()
    if settings.api_version:
        return {"api-key": key}, {"api-version": settings.api_version}
    return {"Authorization": f"Bearer {key}"}, {}


class OpenAIChatModel:
    """``POST {base_url}/chat/completions`` with retries inside a time budget.

    Bearer authentication by default; with ``api_version`` set (Azure OpenAI's classic
    ``/openai/deployments/{name}`` URLs) the key goes in an ``api-key`` header and the
    version in ``?api-version=``.
    """

    def __init__(
        self,
        settings: ModelSettings,
        *,
        rng: random.Random | None = None,
    ) -> None:
        if settings.api_key is None:
            raise ValueError("OpenAIChatModel needs an API key")
        self._key = settings.api_key.reveal()
        self._settings = settings
        self._url = f"{settings.base_url}/chat/completions"
        headers, self._params = provider_auth(settings)
        timeout = settings.request_timeout_s
        # httpx is the client; its wire is aiohttp's connection pool and C HTTP parser
        # (httpx-aiohttp, the transport the openai SDK offers): half the CPU per call of
        # httpcore + h11, and no per-request walk over the pool (encode/httpcore#1035),
        # which capped a replica at 36 calls/s with 1,000 in flight (docs/benchmarks.md).
        # HTTP(S)_PROXY, ALL_PROXY and NO_PROXY from the environment apply, read once with
        # the settings (ModelSettings.proxy): aiohttp's trust_env re-read them, and
        # ~/.netrc, in a thread on every request, which was 60 % of a saturated replica's CPU.
        self._client = httpx.AsyncClient(
            headers=headers,
            # No read timeout: aiohttp's is a gap between two reads, which a provider that
            # keeps the connection alive with blank lines never trips (DeepSeek does so
            # for up to 30 minutes under load). _attempt bounds the whole attempt instead.
            timeout=httpx.Timeout(
                connect=min(10.0, timeout),
                read=None,
                write=min(30.0, timeout),
                pool=timeout,
            ),
            transport=_aiohttp_transport(settings),
        )
        self._rng = rng or random.Random()  # noqa: S311 (jitter, not security)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def complete(self, messages: Sequence[ChatMessage]) -> Completion:
        """The model's answer. Retried (408, 429, 5xx, a timeout, a dropped connection)
        within LLM_RETRY_BUDGET: a retry starts only with at least ``MIN_ATTEMPT_S`` of
        it left, and is cut where it ends (the first attempt has LLM_REQUEST_TIMEOUT, each
        retry as much or what the budget has left: the call ends by the later of the two).
        """
        body = self._body(messages)
        started = time.monotonic()
        deadline = started + self._settings.retry_budget_s
        limit = self._settings.request_timeout_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(body, attempt, limit)
            except _Retryable as exc:
                delay = next_delay(attempt, exc.retry_after, self._rng)
                elapsed = time.monotonic() - started
                if time.monotonic() + delay + MIN_ATTEMPT_S > deadline:
                    raise ModelUnavailable(
                        f"{exc} (gave up after {attempt} attempts in {elapsed:.1f}s)",
                        attempts=attempt,
                    ) from None
                log.info("model.retry", reason=str(exc), attempt=attempt, delay_s=round(delay, 2))
                await asyncio.sleep(delay)
                limit = min(self._settings.request_timeout_s, deadline - time.monotonic())
            except ModelError:
                raise
            except Exception as exc:
                # A defect met on one answer (its parsing, say): the apology now, rather
                # than a crash that asks the model again at every delivery and then
                # parks the message without any outcome.
                log.exception("model.unexpected_error", attempt=attempt)
                reason = self._clean(f"unexpected {type(exc).__name__}: {exc}")
                raise ModelRejected(reason, attempts=attempt) from exc

    def _body(self, messages: Sequence[ChatMessage]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._settings.model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": False,
        }
        if self._settings.temperature is not None:
            body["temperature"] = self._settings.temperature
        return body

    async def _attempt(self, body: dict[str, Any], attempt: int, limit: float) -> Completion:
        started = time.monotonic()
        try:
            async with asyncio.timeout(limit):
                response = await self._post(body)
        except _UNSENDABLE as exc:
            reason = self._clean(f"request not sendable ({_named(exc)})")
            raise ModelRejected(reason, attempts=attempt, setting="OPENAI_BASE_URL") from exc
        except AnswerTooLarge as exc:
            # Read whole, a broken proxy's endless body took the replica's memory; asked
            # again, the same answer would come back.
            raise ModelRejected(
                f"answer over {exc.limit // (1024 * 1024)} MiB (read {exc.size} "
                "bytes): no chat answer is that long",
                attempts=attempt,
            ) from None
        except _PROVIDER_FAULTS as exc:
            raise _Retryable(self._clean(_transport_failure(exc))) from exc
        except TimeoutError as exc:
            raise _Retryable(f"timeout (no whole answer within {round(limit, 1):g}s)") from exc
        status = response.status_code
        log.debug(
            "model.response",
            status=status,
            attempt=attempt,
            latency_ms=round((time.monotonic() - started) * 1000),
        )
        if status == 200:
            return self._parse(response, attempt)
        detail = error_detail(response, key=self._key)
        if is_retryable_status(status):
            raise _Retryable(f"HTTP {status}: {detail}", retry_after_of(response.headers))
        raise ModelRejected(
            f"HTTP {status}: {detail}", attempts=attempt, setting=_SETTING_FOR_STATUS.get(status)
        )

    async def _post(self, body: dict[str, Any]) -> httpx.Response:
        """The provider's answer, its body read up to MAX_RESPONSE_BYTES (decompressed);
        an error's only its first MAX_ERROR_BYTES, whatever its size: its status decides
        (a 429 or 5xx stays worth a retry) and its message is at its start."""
        request = self._client.build_request(
            "POST", self._url, content=_encode_body(body), headers=_JSON_BODY, params=self._params
        )
        response = await self._client.send(request, stream=True)
        if response.status_code == 200:
            content = await read_capped(response, MAX_RESPONSE_BYTES)
        else:
            content = await read_capped(response, MAX_ERROR_BYTES, cut=True)
        # The bytes are decoded already (gzip): httpx would decode them again by the
        # Content-Encoding header, and its length is the coded one.
        headers = [
            (name, value)
            for name, value in response.headers.multi_items()
            if name.lower() not in ("content-encoding", "content-length")
        ]
        return httpx.Response(
            response.status_code,
            headers=headers,
            content=content,
            request=request,
            extensions=response.extensions,
        )

    def _clean(self, text: str) -> str:
        """Provider and transport texts end up in ReplyFailed.reason, a stored event that
        no log redaction sees: a proxy echoing the key (or a URL with a password) must
        not put it there."""
        return without_key(text, self._key)

    def _parse(self, response: httpx.Response, attempt: int) -> Completion:
        try:
            parsed = _decode_response(response.content)
        except msgspec.DecodeError as exc:
            # A proxy or overloaded provider answering 200 with junk: worth another try.
            raise _Retryable(f"malformed completion: {exc}") from exc
        choice = parsed.choices[0] if parsed.choices else None
        finish = choice.finish_reason if choice is not None else None
        if finish == "insufficient_system_resource":
            # DeepSeek: the answer was interrupted for want of capacity, not finished
            raise _Retryable("the provider interrupted the answer (finish_reason=" + finish + ")")
        if finish == "content_filter":
            # What came before the filter stopped it is no answer to send as one.
            raise ModelRejected(
                "stopped by the provider's content filter (finish_reason=content_filter)",
                attempts=attempt,
            )
        text = _visible(choice.message.text) if choice is not None else ""
        if not text and choice is not None:
            text = _visible(choice.message.refusal or "")
        if not text:
            raise ModelRejected(f"empty completion (finish_reason={finish})", attempts=attempt)
        usage = parsed.usage or _Usage()
        return Completion(
            text=text,
            model=parsed.model or self._settings.model,
            prompt_tokens=_count(usage.prompt_tokens),
            completion_tokens=_count(usage.completion_tokens),
            finish_reason=finish,
        )


def _visible(content: str) -> str:
    """The answer to send, stripped; "" when nothing in it would show. A reasoning model
    served without a reasoning parser (DeepSeek-R1 or QwQ on Ollama or vLLM) puts its
    thinking first in the content, between ``<think>`` tags: not for the user (a block
    never closed, the output limit reached while thinking, leaves no answer)."""
    text = content.strip()
    if text.startswith("<think>"):
        end = text.find("</think>")
        text = "" if end < 0 else text[end + len("</think>") :].strip()
    return "" if shows_nothing(text) else text


# A chat answer, reasoning included, is kilobytes (a long reasoning model's, a few
# hundred); the reply keeps 64 KiB of it at most (decide.MAX_ANSWER_BYTES). A body
# (decompressed) past this is refused as it arrives. Each call in flight may hold it
# about twice (the chunks, then the body): at 8 MiB, 16 such answers at once took a
# replica from 42 to 228 MB, and LLM_MAX_CONCURRENCY's 64 would pass the pod's 512 MiB.
MAX_RESPONSE_BYTES = 2 * 1024 * 1024
# An error's body is read this far, the rest left unread: error_detail keeps 200
# characters of its message, and a proxy's error page past MAX_RESPONSE_BYTES made a 429
# or 503 a refusal for good.
MAX_ERROR_BYTES = 64 * 1024


def _aiohttp_transport(settings: ModelSettings) -> httpx.AsyncBaseTransport:
    """httpx's wire: one aiohttp pool of ``max_connections``, TLS verified as httpx does
    (the transport's own context: one CA store in memory, not two).

    The session is built on the first request, inside the event loop that uses it.
    """

    def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=settings.max_connections,
            ssl=transport.ssl_context,
            keepalive_timeout=_KEEPALIVE_S,
        )
        return aiohttp.ClientSession(connector=connector)

    transport = AiohttpTransport(client=session, proxy=httpx_proxy(settings.proxy))
    return transport


def _transport_failure(exc: Exception) -> str:
    """``timeout (…)``, ``malformed response (…)`` or ``connection error (…)``, named
    after what really failed (see :func:`_named`)."""
    failed = _real_error(exc)
    if isinstance(failed, httpx.TimeoutException | asyncio.TimeoutError):
        return f"timeout ({_named(exc)})"
    if isinstance(failed, httpx.DecodingError):
        return f"malformed response ({_named(exc)})"
    return f"connection error ({_named(exc)})"


def _real_error(exc: Exception) -> BaseException:
    """The aiohttp transport re-raises aiohttp's errors as httpx's, not always as the same
    kind (a server that hangs up becomes ``ConnectTimeout``), so aiohttp's error decides."""
    cause = exc.__cause__
    return cause if isinstance(cause, aiohttp.ClientError | asyncio.TimeoutError) else exc


def _named(exc: Exception) -> str:
    """``Type: message`` of the error that really failed (just ``Type`` without one)."""
    failed = _real_error(exc)
    text = str(failed)
    return f"{type(failed).__name__}: {text}" if text else type(failed).__name__


_DETAIL_CHARS = 200
_REDACT_SLACK = 1024  # past the cut, so a secret the cut would halve is still whole


def error_detail(response: httpx.Response, *, key: str) -> str:
    """The provider's error message ({"error": {"message": …}}) or the start of the body,
    at most 200 characters, with ``key`` and anything secret-shaped redacted *before* the
    cut: a key the cut halved would match neither and leave its first part.

    A proxy or provider may echo the key: the llm stores this text (ReplyFailed.reason)
    and doctor prints it.
    """
    text = _error_message(response)[: _DETAIL_CHARS + len(key) + _REDACT_SLACK]
    return without_key(text, key)[:_DETAIL_CHARS]


# A key as providers quote it masked: OpenAI's 401 "Incorrect API key provided:
# sk-proj-****…****abcd." (its first characters and last four), DeepSeek's
# "Your api key: ****abcd is invalid".
# (Each match starts where a run of key characters starts: not quadratic in a long run.)
_MASKED = re.compile(r"(?<![A-Za-z0-9_\-])([A-Za-z0-9_\-]*)\*{3,}([A-Za-z0-9_\-]*)")


def without_key(text: str, key: str) -> str:
    """``text`` redacted (:func:`redact`), ``key`` in it too, whole or as a provider
    masks it: the characters a mask leaves (the first 8 and last 4 of an OpenAI key)
    are part of the secret, and this text is stored (ReplyFailed.reason) and printed::

        >>> without_key("Incorrect API key provided: sk-abc12***********wxyz.", "sk-abc12…wxyz")
        'Incorrect API key provided: [REDACTED].'

    A masked token is redacted only when what the mask leaves is the start or the end of
    ``key``: another key's mask (which key did the proxy send?) is not this secret.
    """
    if not key:
        return redact(text)
    text = text.replace(key, REDACTED)
    if "***" in text:

        def masked(match: re.Match[str]) -> str:
            head, tail = match.group(1), match.group(2)
            ours = (head and key.startswith(head)) or (tail and key.endswith(tail))
            return REDACTED if ours else match.group(0)

        text = _MASKED.sub(masked, text)
    return redact(text)


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        return response.text or response.reason_phrase
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return str(data)


@asynccontextmanager
async def open_model(settings: ModelSettings) -> AsyncIterator[ChatModel]:
    """The configured model for the life of the block (offline without an API key)."""
    if settings.api_key is None:
        yield OfflineModel()
        return
    model = OpenAIChatModel(settings)
    try:
        yield model
    finally:
        await model.aclose()
