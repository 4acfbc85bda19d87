"""The token service's request-reply contract, and the client other services use.

Only the token service calls WeCom ``gettoken``. Others ask it over NATS::

    tokens = TokenClient(nc)
    token = await tokens.get("ww1-1000002")
    await tokens.invalidate("ww1-1000002", token) # after a 40014/42001

Failures arrive with a ``kind`` the caller can act on. Permanent until an operator acts
(:class:`TokenError`): ``bad_secret`` (40001), ``bad_corp_id`` (40013), ``untrusted_ip``
(60020), ``unknown_app``. Transient (:class:`TransientTokenError`): ``rate_limited``
(45009, 45033), ``network`` (-1, 5xx, no answer), ``unavailable`` (no token service),
and ``wecom_error``: an errcode we do not know, or an HTTP status that is not WeCom's
answer (a proxy's 403, a wrong ``WECOM_API_BASE``), or a kind this build does not
know (a newer token service's). It may pass, so a caller retries it
and gives up only as it would on any passing failure (the sender: at a reply's last
delivery, with the reason).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal, get_args

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from .bus import reconnect_counter
from .errors import PermanentError, TransientError
from .topology import TOKEN_GET, TOKEN_INVALIDATE

__all__ = [
    "NoTokenService",
    "TokenClient",
    "TokenError",
    "TokenReply",
    "TokenRequest",
    "TokenServiceSilent",
    "TransientTokenError",
]

ErrorKind = Literal[
    "bad_secret",
    "bad_corp_id",
    "untrusted_ip",
    "rate_limited",
    "network",
    "unavailable",
    "unknown_app",
    "wecom_error",
]
# Every kind this build knows: one from a newer build is read as ``wecom_error``.
ERROR_KINDS: frozenset[str] = frozenset(get_args(ErrorKind))
TRANSIENT_KINDS: frozenset[str] = frozenset(
    {"rate_limited", "network", "unavailable", "wecom_error"}
)


class TokenRequest(msgspec.Struct, frozen=True, kw_only=True):
    app: str
    # invalidate only: the token the caller saw rejected (refresh only if still current)
    token: str | None = None


class TokenReply(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    ok: bool
    token: str | None = None
    expires_at: float | None = None
    kind: ErrorKind | None = None
    errcode: int | None = None
    message: str | None = None
    retry_after: float | None = None


class TokenError(PermanentError):
    """The token service answered with an error an operator must fix."""

    def __init__(self, kind: str, message: str, errcode: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.errcode = errcode


class TransientTokenError(TransientError):
    def __init__(self, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class TokenServiceSilent(TransientTokenError):
    """A token replica may run but did not answer in time (busy with a refresh)."""

    def __init__(self) -> None:
        super().__init__("unavailable", "token service did not answer")


class NoTokenService(TransientTokenError):
    """No token replica subscribes (no responders): an outage of our own, not a failure
    of the call; a caller may wait for one rather than spend its retries."""

    def __init__(self) -> None:
        super().__init__("unavailable", "no token service is running")


_encoder = msgspec.json.Encoder()
_reply_decoder = msgspec.json.Decoder(TokenReply)


def _of_a_newer_build(data: bytes) -> TokenReply | None:
    """A failure of a kind this build does not know, from a token service of a newer
    build (a rolling upgrade, or a rollback of the callers): read as this build reads an
    errcode it does not know (``wecom_error``: passing), with the service's words and its
    ``retry_after``. Refused whole, it lost both: the caller retried at its own pace,
    spending its deliveries, told only "bad token reply". None: not such a reply."""
    try:
        match msgspec.json.decode(data):
            case {"kind": str(kind)} as reply if kind not in ERROR_KINDS:
                return msgspec.convert({**reply, "kind": "wecom_error"}, TokenReply)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        pass
    return None


# Longer than the token service may take to answer with its defaults: up to one refresh
# waiting out a crashed holder's lock, then its own, 2 × (TOKEN_HTTP_TIMEOUT 10 + 2) =
# 24 s. A caller that gave up sooner was told "unavailable" while the token was coming.
DEFAULT_TIMEOUT_S = 30.0
# How often a request waiting for its answer looks whether the connection was made again
# meanwhile (``TokenClient._request``).
RECONNECT_CHECK_S = 0.5


class TokenClient:
    """``reask_s``: how long one request is waited for before the same question is asked
    again (a third of ``timeout`` unless given; see :meth:`_request`)."""

    def __init__(
        self, nc: NATS, *, timeout: float = DEFAULT_TIMEOUT_S, reask_s: float | None = None
    ) -> None:
        self._nc = nc
        self._timeout = timeout
        self._reask_s = timeout / 3 if reask_s is None else reask_s
        self._reconnects = reconnect_counter(nc) or (lambda: 0)

    async def get(self, app: str) -> str:
        reply = await self._ask(TOKEN_GET, TokenRequest(app=app))
        assert reply.token is not None
        return reply.token

    async def invalidate(self, app: str, token: str) -> str:
        """Report ``token`` rejected; returns the current (possibly refreshed) token."""
        reply = await self._ask(TOKEN_INVALIDATE, TokenRequest(app=app, token=token))
        assert reply.token is not None
        return reply.token

    async def _request(self, subject: str, data: bytes) -> Msg:
        """``nc.request``, asked again when the client reconnects while it waits, and
        every ``reask_s`` without an answer, until ``timeout``.

        A request lost on the way is waited for to the timeout all the same, 30 s, the
        sender's reply held meanwhile: one that reached a broker which then went away (a
        restart, a crash, a rolling upgrade of the NATS cluster moving the client to
        another node), or its answer did; one given to a token replica that died before
        answering (killed, its node lost). Asked again, a live replica answers (the
        queue group gives it to one that runs). Both questions are safe to ask twice (a
        get answers the current token; an invalidate refreshes only while the token it
        names is current, so the second finds the new one), and a replica that is slow
        because it is refreshing lets the second wait for that same refresh."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        while True:
            reconnects = self._reconnects()
            reask_at = loop.time() + self._reask_s
            ask = asyncio.ensure_future(
                self._nc.request(subject, data, timeout=max(0.0, deadline - loop.time()))
            )
            try:
                while not ask.done():
                    await asyncio.wait([ask], timeout=min(RECONNECT_CHECK_S, self._reask_s))
                    if ask.done() or not self._nc.is_connected:
                        continue  # reconnecting: asked again once it is back
                    if self._reconnects() == reconnects and loop.time() < reask_at:
                        continue
                    if deadline - loop.time() <= 0:
                        continue  # nats-py's own timeout ends it
                    ask.cancel()
                    with contextlib.suppress(asyncio.CancelledError, nats.errors.Error):
                        await ask
                    break
            finally:
                ask.cancel()  # the caller cancelled: no request outlives it (done: a no-op)
            if not ask.cancelled():
                return ask.result()  # the answer, or nats-py's error

    async def _ask(self, subject: str, request: TokenRequest) -> TokenReply:
        try:
            msg = await self._request(subject, _encoder.encode(request))
        except nats.errors.NoRespondersError as exc:
            raise NoTokenService from exc
        except nats.errors.TimeoutError as exc:
            raise TokenServiceSilent from exc
        except nats.errors.Error as exc:  # the connection closed, draining, its buffer full
            raise TransientTokenError(
                "unavailable", f"cannot ask the token service: {type(exc).__name__}"
            ) from exc
        try:
            reply = _reply_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            newer = _of_a_newer_build(msg.data)
            if newer is None:
                error = msg.headers.get("Nats-Service-Error") if msg.headers else None
                raise TransientTokenError(
                    "unavailable", f"bad token reply: {error or exc}"
                ) from exc
            reply = newer
        if reply.ok and reply.token:
            return reply
        kind = reply.kind or "wecom_error"
        message = reply.message or "token service error"
        if kind in TRANSIENT_KINDS:
            raise TransientTokenError(kind, message, reply.retry_after)
        raise TokenError(kind, message, reply.errcode)
