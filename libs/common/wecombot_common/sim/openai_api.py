"""A simulated OpenAI-compatible model API, on a real HTTP port.

``POST /v1/chat/completions`` (non-streaming) and ``GET /v1/models``, answering like
OpenAI does, with latency and failures injectable, and every request recorded so a test
can assert on the exact context the model was sent::

    >>> api = SimulatedOpenAIApi(api_key="sk-sim")          # default reply: "echo: <text>"
    >>> await api.start()                                   # doctest: +SKIP
    >>> api.base_url                                        # doctest: +SKIP
    'http://127.0.0.1:41237/v1'
    >>> api.fail_next(Fault.rate_limited(retry_after="1"))  # next request: 429
    >>> api.fail_next(Fault.server_error(), times=3)        # then three 500s
    >>> api.fail_next(Fault.hanging())                         # then one that never answers
    >>> api.fail_always(Fault.server_error(503))            # from then on: always 503
    >>> api.chat_requests[-1].messages                      # doctest: +SKIP
    [{'role': 'system', 'content': '…'}, {'role': 'user', 'content': '你好'}]

Run it alone for the sandbox: ``python -m wecombot_common.sim.openai_api --port 8000``,
then ``OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY=sim``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import itertools
import json
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import web

from wecombot_common.http import LoopbackServer

__all__ = ["Answer", "Fault", "RecordedRequest", "SimulatedOpenAIApi", "echo_reply"]


@dataclass(frozen=True)
class Answer:
    """A reply with more than its text: how it ended (``length``: cut off at the output
    limit; ``content_filter``: stopped by the provider's filter), or a refusal (OpenAI's
    ``message.refusal``, with no content)."""

    text: str | None
    finish_reason: str = "stop"
    refusal: str | None = None


Messages = list[dict[str, Any]]
ReplyFunction = Callable[[Messages], str | Answer | Awaitable[str | Answer]]


def echo_reply(messages: Messages) -> str:
    """The default answer: ``echo: `` and the last user message."""
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    return f"echo: {users[-1] if users else ''}"


@dataclass(frozen=True)
class Fault:
    """One injected failure: an HTTP error status (with Retry-After), or a hang."""

    status: int = 500
    retry_after: str | None = None
    hang: bool = False

    @classmethod
    def rate_limited(cls, retry_after: str | None = "1") -> Fault:
        return cls(status=429, retry_after=retry_after)

    @classmethod
    def server_error(cls, status: int = 500) -> Fault:
        return cls(status=status)

    @classmethod
    def hanging(cls) -> Fault:
        """Never answer: the client's request timeout (or its cancellation) ends it."""
        return cls(status=0, hang=True)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    at: float  # time.monotonic()
    client: str = ""  # the client's host:port: one per connection it used

    @property
    def messages(self) -> Messages:
        body = self.body if isinstance(self.body, dict) else {}
        messages = body.get("messages")
        return messages if isinstance(messages, list) else []

    @property
    def last_user_text(self) -> str | None:
        users = [m.get("content") for m in self.messages if m.get("role") == "user"]
        return users[-1] if users else None


@dataclass
class _Faults:
    next: deque[Fault] = field(default_factory=deque)
    always: Fault | None = None


class SimulatedOpenAIApi(LoopbackServer):
    # handler_cancellation: a client that gives up (timeout, shutdown) ends its hang.
    runner_options: ClassVar[dict[str, Any]] = {
        "handler_cancellation": True,
        "shutdown_timeout": 1.0,
    }

    def __init__(
        self,
        *,
        api_key: str | None = None,
        model: str = "sim-model",
        reply: ReplyFunction = echo_reply,
        latency_s: float | Callable[[], float] = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        strict_model: bool = False,
    ) -> None:
        self.api_key = api_key
        self.model = model
        # As OpenAI does: a chat for another model is 404 model_not_found (off by
        # default: most tests care about the answer, not the model's name).
        self.strict_model = strict_model
        self.reply = reply
        self.latency_s = latency_s
        self.host = host
        self.port = port
        self.requests: list[RecordedRequest] = []
        self.faults = _Faults()
        self._ids = itertools.count(1)
        self._arrived = asyncio.Condition()
        self._release = asyncio.Event()

    # ------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/chat/completions", self._chat),
            web.get("/v1/models", self._models),
        ]

    async def start(self) -> None:
        self._release = asyncio.Event()
        await super().start()

    async def stop(self) -> None:
        self._release.set()  # end every hang
        await super().stop()

    # ------------------------------------------------------------ faults and records
    def fail_next(self, fault: Fault, *, times: int = 1) -> None:
        """The next ``times`` chat requests (after those already scripted) fail so."""
        self.faults.next.extend([fault] * times)

    def fail_always(self, fault: Fault | None) -> None:
        """Every chat request without a scripted fault fails so (None: stop failing)."""
        self.faults.always = fault

    def clear_faults(self) -> None:
        self.faults = _Faults()

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/v1/chat/completions"]

    async def wait_for_requests(self, count: int, *, timeout: float = 10.0) -> None:
        """Until at least ``count`` chat requests arrived (TimeoutError after ``timeout``)."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: len(self.chat_requests) >= count)

    # ------------------------------------------------------------ handlers
    async def _record(self, request: web.Request) -> RecordedRequest:
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", errors="replace")
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            at=time.monotonic(),
            client=_client_of(request),
        )
        self.requests.append(record)
        async with self._arrived:
            self._arrived.notify_all()
        return record

    def _authorised(self, record: RecordedRequest) -> bool:
        if self.api_key is None:
            return True
        bearer = record.headers.get("authorization", "")
        given = (
            bearer[7:]
            if bearer.lower().startswith("bearer ")
            else record.headers.get("api-key", "")
        )
        return secrets.compare_digest(given.encode(), self.api_key.encode())

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        record = await self._record(request)
        if not self._authorised(record):
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        fault = self.faults.next.popleft() if self.faults.next else self.faults.always
        await self._delay()
        if fault is not None:
            return await self._fail(fault)
        messages = record.messages
        if not messages:
            return _error(400, "'messages' is a required property", "invalid_request_error")
        asked = record.body.get("model") if isinstance(record.body, dict) else None
        if self.strict_model and asked != self.model:
            return _error(
                404,
                f"The model `{asked}` does not exist or you do not have access to it.",
                "model_not_found",
            )
        reply = self.reply(messages)
        if inspect.isawaitable(reply):
            reply = await reply
        said = reply if isinstance(reply, Answer) else Answer(reply)
        message: dict[str, Any] = {"role": "assistant", "content": said.text}
        if said.refusal is not None:
            message["refusal"] = said.refusal
        body = record.body if isinstance(record.body, dict) else {}
        prompt_tokens = sum(_tokens(str(m.get("content", ""))) for m in messages)
        completion_tokens = _tokens(said.text or said.refusal or "")
        response = web.json_response(
            {
                "id": f"chatcmpl-sim-{next(self._ids)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": str(body.get("model") or self.model),
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": said.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
            dumps=lambda o: json.dumps(o, ensure_ascii=False),
        )
        # As OpenAI's API does for a client that accepts it (httpx asks for gzip): the
        # llm read every gzipped answer as malformed once, unseen by tests that got none.
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            response.enable_compression(web.ContentCoding.gzip)
        return response

    async def _models(self, request: web.Request) -> web.Response:
        record = await self._record(request)
        if not self._authorised(record):
            return _error(401, "Incorrect API key provided.", "invalid_api_key")
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": self.model, "object": "model", "owned_by": "wecombot-sim"}],
            }
        )

    async def _delay(self) -> None:
        latency = self.latency_s() if callable(self.latency_s) else self.latency_s
        if latency > 0:
            await asyncio.sleep(latency)

    async def _fail(self, fault: Fault) -> web.Response:
        if fault.hang:
            await self._release.wait()
            return _error(503, "the simulator stopped", "server_error")
        headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else None
        if fault.status == 429:
            return _error(429, "Rate limit reached", "rate_limit_exceeded", headers=headers)
        return _error(fault.status, "The server had an error", "server_error", headers=headers)


def _client_of(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peer[0]}:{peer[1]}" if peer else ""


def _error(
    status: int, message: str, code: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": {"message": message, "type": code, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


async def _serve_forever(api: SimulatedOpenAIApi) -> None:
    await api.start()
    print(f"simulated OpenAI API on {api.base_url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await api.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Simulated OpenAI-compatible chat API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    parser.add_argument("--api-key", default=None, help="require this key (default: any)")
    args = parser.parse_args(argv)
    api = SimulatedOpenAIApi(
        api_key=args.api_key, latency_s=args.latency, host=args.host, port=args.port
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(api))


if __name__ == "__main__":
    main()
