"""The token contract served over NATS request-reply with ``nats.micro``.

Service TOKEN_SERVICE, queue group TOKEN_QUEUE (one replica answers each request),
endpoints ``get`` on TOKEN_GET and ``invalidate`` on TOKEN_INVALIDATE. These subjects lie
outside every stream on purpose: JetStream would answer a captured request with a PubAck.
Requests and replies are :class:`~wecombot_common.tokens.TokenRequest` /
:class:`~wecombot_common.tokens.TokenReply` as JSON.

A subscription's handler runs one message at a time, so answers from memory are given
inline (the hot path) and only requests that must wait get a task of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from importlib.metadata import PackageNotFoundError, version

import msgspec
import nats.errors
import structlog
from nats import micro
from nats.aio.client import Client as NATS
from nats.micro.request import Request
from nats.micro.service import Service

from wecombot_common.metrics import TOKEN_REQUESTS
from wecombot_common.tokens import TokenReply, TokenRequest
from wecombot_common.topology import TOKEN_GET, TOKEN_INVALIDATE, TOKEN_QUEUE, TOKEN_SERVICE

from .keeper import TokenKeeper

__all__ = ["TokenEndpoints"]

log = structlog.get_logger(__name__)

_decoder = msgspec.json.Decoder(TokenRequest)
# A TokenRequest is an app id and a token: well under this. Anything longer is refused
# before it is decoded (JSON nested 400,000 deep raised RecursionError: a 500).
MAX_REQUEST_BYTES = 4096
_encoder = msgspec.json.Encoder()


def _version() -> str:
    try:
        return version("wecombot")
    except PackageNotFoundError:
        return "0.0.0"


class TokenEndpoints:
    def __init__(self, keeper: TokenKeeper) -> None:
        self._keeper = keeper
        self._service: Service | None = None
        self._waiting: set[asyncio.Task[None]] = set()

    async def start(self, nc: NATS) -> None:
        self._service = await micro.add_service(
            nc,
            name=TOKEN_SERVICE,
            version=_version(),
            description="WeCom access_tokens for wecombot (the only caller of gettoken)",
            queue_group=TOKEN_QUEUE,
        )
        await self._service.add_endpoint(name="get", subject=TOKEN_GET, handler=self._get)
        await self._service.add_endpoint(
            name="invalidate", subject=TOKEN_INVALIDATE, handler=self._invalidate
        )

    async def stop(self, grace_s: float) -> None:
        """Stop taking requests, then give the waiting ones ``grace_s`` to be answered."""
        if self._service is not None:
            await self._drain_endpoints(self._service)
            # A connection nats-py closed for good (the service then stops as failed):
            # nothing to unsubscribe from, and nats.micro raises half-way through.
            with contextlib.suppress(nats.errors.ConnectionClosedError):
                await self._service.stop()
        if self._waiting:
            log.info("token.stop_grace", waiting=len(self._waiting), grace_s=grace_s)
            await asyncio.wait(set(self._waiting), timeout=grace_s)
        unanswered = [task for task in self._waiting if not task.done()]
        if unanswered:
            log.warning("token.stop_unanswered", cancelled=len(unanswered), grace_s=grace_s)
        for task in unanswered:
            task.cancel()

    @staticmethod
    async def _drain_endpoints(service: Service) -> None:
        """Take no new requests, and answer the ones already routed here.

        nats.micro's ``stop()`` unsubscribes its endpoints, and nats-py then discards
        what the subscription holds: the requests already routed to this replica went
        unanswered, and each caller waited its whole timeout (30 s) on a rolling
        restart. nats.micro offers no drain, so its endpoints' subscriptions are drained
        here (nats-py < 3 pinned; tests/integration/test_token_service.py checks it).
        """
        for endpoint in getattr(service, "_endpoints", ()):
            subscription = getattr(endpoint, "_subscription", None)
            if subscription is None:
                continue
            with contextlib.suppress(nats.errors.Error):
                await subscription.drain()
            endpoint._subscription = _Drained()

    async def _get(self, req: Request) -> None:
        request = await _decode(req, "get")
        if request is None:
            return
        reply = self._keeper.answer_now(request.app)
        if reply is not None:
            _count("get", reply)
            await req.respond(_encoder.encode(reply))
            return
        self._answer_later(req, "get", self._keeper.get(request.app))

    async def _invalidate(self, req: Request) -> None:
        request = await _decode(req, "invalidate")
        if request is None:
            return
        if request.token is None:
            await _bad_request(req, "invalidate", "invalidate needs the token WeCom rejected")
            return
        self._answer_later(req, "invalidate", self._keeper.invalidate(request.app, request.token))

    def _answer_later(self, req: Request, endpoint: str, work: Awaitable[TokenReply]) -> None:
        task = asyncio.create_task(_respond(req, endpoint, work))
        self._waiting.add(task)
        task.add_done_callback(self._waiting.discard)


class _Drained:
    """Stands for a drained endpoint subscription when nats.micro stops it."""

    async def unsubscribe(self) -> None:
        return None


async def _decode(req: Request, endpoint: str) -> TokenRequest | None:
    """The request, or None when it was refused (or cannot be answered at all)."""
    if not _has_reply_subject(req):
        # Published, not requested (`nats pub`): nobody to answer. Counted, never answered
        # (respond() raised ValueError, which reached the logs as a crash).
        TOKEN_REQUESTS.labels(endpoint, "bad_request").inc()
        log.info("token.request_without_reply_subject", endpoint=endpoint)
        return None
    if len(req.data) > MAX_REQUEST_BYTES:
        await _bad_request(req, endpoint, f"over {MAX_REQUEST_BYTES} bytes: not a TokenRequest")
        return None
    try:
        return _decoder.decode(req.data)
    except (msgspec.DecodeError, RecursionError) as exc:  # JSON nested past msgspec's depth
        await _bad_request(req, endpoint, f"not a TokenRequest: {exc}")
        return None


def _has_reply_subject(req: Request) -> bool:
    msg = getattr(req, "_msg", None)  # nats.micro has no public accessor for it
    return bool(getattr(msg, "reply", True))


async def _bad_request(req: Request, endpoint: str, why: str) -> None:
    """A caller's bug: answered 400 (nats.micro's error headers), counted, not retried."""
    TOKEN_REQUESTS.labels(endpoint, "bad_request").inc()
    await req.respond_error("400", why)


def _count(endpoint: str, reply: TokenReply) -> None:
    TOKEN_REQUESTS.labels(endpoint, "ok" if reply.ok else (reply.kind or "error")).inc()


async def _respond(req: Request, endpoint: str, work: Awaitable[TokenReply]) -> None:
    try:
        reply = await work
    except Exception as exc:  # a bug must still answer the caller, not leave it to time out
        TOKEN_REQUESTS.labels(endpoint, "crashed").inc()
        log.exception("token.request_failed")
        with contextlib.suppress(nats.errors.Error):
            await req.respond_error("500", type(exc).__name__)
        return
    _count(endpoint, reply)
    try:
        await req.respond(_encoder.encode(reply))
    except (nats.errors.Error, ValueError) as exc:  # ValueError: no reply subject
        log.warning("token.reply_failed", error=type(exc).__name__)
