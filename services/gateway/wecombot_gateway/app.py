"""The HTTP entrypoint: WeCom callbacks in, MessageReceived events appended, statuses out::

    publisher = JetStreamPublisher(await PipelinedAppender.start(nc), timeout_s=2)
    app = create_app(settings, publisher, ready=jetstream_ready(nc, js))
    runner = web.AppRunner(app, **runner_options(settings))

Routes
    GET  {callback_path}  URL verification: 200 text/plain = the decrypted echostr, verbatim
    POST {callback_path}  a message or event: 200 empty once stored (or already stored)
    GET  /healthz         200 while the process answers
    GET  /readyz          200 when NATS is connected and the stream exists, else 503

WeCom retries a callback that is not answered 200 within 5 s, three times
(https://developer.work.weixin.qq.com/document/path/90238): so 200 only for a message the
log confirmed, 503 when the log did not confirm in time, 4xx for input that can never be
valid. Statuses (one warning line ``callback.rejected`` each, with reason and the
official -400xx code where there is one):

=====================================================  ======  ======
refusal                                                status  code
=====================================================  ======  ======
query parameter missing / repeated / empty / bad ts     400
echostr that decrypts to XML (a message's Encrypt)      400
Content-Type declared and not XML                       415
Content-Encoding declared (gzip…): WeCom sends none     415
body over GATEWAY_MAX_BODY_BYTES (declared or read)     413
body not received within GATEWAY_BODY_TIMEOUT           408
Expect other than 100-continue (any route)              417
body unreadable (framing, encoding, disconnect)         400
envelope not XML / no Encrypt / DTD (XXE, bomb)         400    -40002
msg_signature does not match                            403    -40001
timestamp outside ±GATEWAY_TIMESTAMP_WINDOW (replay)    403
Encrypt not base64                                      400    -40010
ciphertext not a multiple of 16 bytes                   400    -40007
decrypted buffer malformed (padding, length)            400    -40008
receive_id is not our CorpID                            403    -40005
message not UTF-8 / not XML / field missing or bad      400
message ToUserName is not our CorpID                    403
message AgentID is there and is not WECOM_AGENT_ID      403
event over the broker's max_payload (EventTooLarge)     413
no HTTP request at all (TLS, PROXY protocol: aiohttp)   400
the log did not confirm the append in time              503
anything else (a bug): logged with its stack            500
=====================================================  ======  ======
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from functools import partial
from http import HTTPStatus
from typing import Any, Final

import structlog
from aiohttp import HttpVersion11, hdrs, web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError

from wecombot_common.bus import AppendUnavailable, EventTooLarge
from wecombot_common.crypto import (
    Base64DecodeError,
    CryptoError,
    DecryptError,
    ParseError,
    PlaintextBufferError,
    ReceiveIdError,
    SignatureError,
    WeComCrypto,
)
from wecombot_common.events import MessageReceived
from wecombot_common.http import name_server
from wecombot_common.logs import LogSampler
from wecombot_common.metrics import GATEWAY_CALLBACKS, GATEWAY_REFUSALS
from wecombot_common.runtime import Check, HealthServer

from .body import (
    check_content_encoding,
    check_content_type,
    check_declared_length,
    read_limited,
)
from .callback import CallbackOpener, CallbackQuery
from .errors import (
    BodyTimeout,
    BodyTooLarge,
    CallbackRejected,
    InvalidMessage,
    InvalidQuery,
    MalformedXml,
    NoSender,
    StaleTimestamp,
    UnknownExpectation,
    UnreadableBody,
    UnsafeXml,
    UnsupportedMediaType,
    WrongRecipient,
)
from .parse import dedupe_key
from .publisher import Publisher
from .settings import GatewaySettings

__all__ = [
    "CallbackReader",
    "RefusalLog",
    "create_app",
    "runner_options",
    "status_for",
    "stop_keeping_alive",
]

log = structlog.get_logger(__name__)
# A filtered structlog call still costs ≈ 4 µs (a bound logger is built per call); the
# stdlib's level check is cached. Per callback, that is 3 % of the gateway's CPU.
_debug_enabled = logging.getLogger(__name__).isEnabledFor
# Bound once: the label lookup costs more than the increment.
_STORED = GATEWAY_CALLBACKS.labels("stored")
_DUPLICATE = GATEWAY_CALLBACKS.labels("duplicate")
_IGNORED = GATEWAY_CALLBACKS.labels("ignored")
_REFUSED = GATEWAY_CALLBACKS.labels("refused")
_FAILED = GATEWAY_CALLBACKS.labels("failed")
_URL_VERIFIED = GATEWAY_CALLBACKS.labels("url_verified")


class RefusalLog:
    """Every refusal counted (``wecombot_gateway_refusals_total``) and said in a
    ``callback.rejected`` line, but only ``burst`` lines of one kind (status, error) a
    second are written; the next line of that kind says how many were not
    (``suppressed``). A flood of bad requests (anyone can send them) wrote a warning
    each: megabytes a second of logs."""

    __slots__ = ("_sampler",)

    def __init__(
        self,
        *,
        burst: int | None = 20,
        period_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sampler = LogSampler(burst=burst, period_s=period_s, clock=clock)

    def refused(self, status: int, error: str, **fields: object) -> None:
        GATEWAY_REFUSALS.labels(str(status), error).inc()
        suppressed = self._sampler.take((status, error))
        if suppressed is None:
            return
        if suppressed:
            fields["suppressed"] = suppressed
        # Input from the internet: one warning, no stack trace; the body never echoes it.
        log.warning("callback.rejected", status=status, error=error, **fields)


_REFUSALS: Final = web.AppKey("refusals", RefusalLog)
_STOPPING: Final = web.AppKey("stopping", asyncio.Event)


def stop_keeping_alive(app: web.Application) -> None:
    """From now on every answer closes its connection (``Connection: close``): a stop is
    under way. Answered as a keep-alive, a callback in flight at SIGTERM had its client
    send the next one on a connection the stop then closed: no answer (the client, or the
    ingress, saw it dropped)."""
    app[_STOPPING].set()


class _MalformedHttp(logging.Filter):
    """aiohttp logs a request it cannot parse (a header without a colon, a line over 8 KB,
    broken chunking) as an error with a stack, uncounted: anyone could fill the log
    with them. They are refusals like ours: counted, and said as ``callback.rejected``
    (through the refusal log of the application made last: one per process).

    What is no HTTP request at all on a connection's first request aiohttp logs at
    debug only (the internet's probes): it was neither counted nor said, so a proxy
    speaking HTTPS to the gateway, or a load balancer sending the PROXY protocol, had
    every callback refused while logs and metrics looked healthy. Counted and said
    too, with its likely cause (the log's sampling bounds a flood of probes)."""

    refusals = RefusalLog()

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            # Anything else from the server is as it is, at the configured level (this
            # logger lets debug through for the refusals above).
            return logging.getLogger().isEnabledFor(record.levelno)
        self.refusals.refused(exc.code or 400, type(exc).__name__, reason=parse_reason(exc))
        return False


# The PROXY protocol's header as aiohttp quotes the bytes it failed on: version 1 is
# text (``PROXY TCP4 …``); version 2's binary signature fails at its first NUL byte.
_PROXY_PROTOCOL = re.compile(r"PROXY (?:TCP4|TCP6|UNKNOWN)|b'\\x00")
# Where aiohttp's error starts quoting the request (b'…', bytearray(b'…'), '…').
_QUOTED = re.compile(r"""bytearray\(|b?['"]""")


def parse_reason(exc: HttpProcessingError) -> str:
    """The reason logged for a request aiohttp cannot parse: its error up to where it
    quotes the request's own bytes (a header's value: a cookie, an API key; the target
    with its query), or the likely cause of a request that is no HTTP at all."""
    message = str(exc.message)
    if isinstance(exc, BadHttpMethod):
        if "HTTPS traffic" in message:
            return (
                "TLS on the plain-HTTP port: what sits in front of the gateway speaks HTTPS "
                "to it (end TLS before the gateway, or send it http://)"
            )
        if _PROXY_PROTOCOL.search(message):
            return (
                "a PROXY protocol header before the request: the load balancer sends the "
                "PROXY protocol, which the gateway does not read (turn it off for this backend)"
            )
    said = _QUOTED.split(message.split("\n", 1)[0], maxsplit=1)[0].strip().rstrip(":.").strip()
    if isinstance(exc, BadHttpMethod):
        said += " (not an HTTP request, or a method no server knows)"
    return said[:200] or type(exc).__name__


_HTTP_LOG = logging.getLogger("wecombot_gateway.http")
_HTTP_LOG.setLevel(logging.DEBUG)  # aiohttp's debug refusal reaches _MalformedHttp
MAX_HEADERS: Final = 64
_MALFORMED = _MalformedHttp()
_HTTP_LOG.addFilter(_MALFORMED)


def runner_options(settings: GatewaySettings) -> dict[str, Any]:
    """How the gateway's application is served (main.py, and the tests' servers)::

        runner = web.AppRunner(app, **runner_options(settings))

    - no access log: one debug line per callback is ours, none on the hot path;
    - bodies are not decoded: WeCom posts plain XML, so a Content-Encoding is refused by
      its header (415). Were bodies decoded, one that does not decode would fail again
      when the server drains it after our answer: an aiohttp error with a stack, per
      request, that anyone could send;
    - the unread rest of a refused body is drained for 1 s at most (aiohttp: 10 s), so
      that its client sees our status; a client that sends it slowly on purpose is let go;
    - a connection without a whole request's headers for ``GATEWAY_KEEPALIVE_TIMEOUT`` is
      closed (aiohttp's keep-alive timer runs from the connection's start and from each
      answer until the next request's headers are in; its default is 3630 s): an idle
      keep-alive connection, or headers trickled to hold one;
    - at most ``MAX_HEADERS`` header lines (aiohttp: 128, each up to 8 KB): a connection
      trickling 126 headers of 8 KB held ≈ 2 MB of the gateway's memory for the
      keep-alive time, so a hundred of them took it past its 256 MiB limit; WeCom sends
      about six, and a load balancer, a WAF, an ingress and a mesh together add twenty
      or so (``X-Forwarded-*``, ``x-b3-*``, ``x-envoy-*``, ``traceparent``);
    - what the server cannot parse is logged through ``_HTTP_LOG`` (see _MalformedHttp).
    """
    return {
        "access_log": None,
        "auto_decompress": False,
        "max_headers": MAX_HEADERS,
        "lingering_time": 1.0,
        "keepalive_timeout": settings.keepalive_timeout_s,
        "logger": _HTTP_LOG,
    }


_STATUS: dict[type[Exception], int] = {
    BodyTimeout: 408,
    UnknownExpectation: 417,
    InvalidQuery: 400,
    UnsupportedMediaType: 415,
    BodyTooLarge: 413,
    UnreadableBody: 400,
    MalformedXml: 400,
    UnsafeXml: 400,
    StaleTimestamp: 403,
    InvalidMessage: 400,
    WrongRecipient: 403,
    SignatureError: 403,
    ReceiveIdError: 403,
    Base64DecodeError: 400,
    DecryptError: 400,
    PlaintextBufferError: 400,
    ParseError: 400,
    CallbackRejected: 400,
    CryptoError: 400,
    AppendUnavailable: 503,
    EventTooLarge: 413,
}


# Every refusal the gateway makes itself, at zero from the start: a counter's first sample
# is the baseline of rate() and increase(), so the first 503 (NATS away) or bad signature
# after a start did not count in the alerts of docs/deploy.md.
for _refused, _status in _STATUS.items():
    if _refused not in (CallbackRejected, CryptoError, ParseError):  # never raised as such
        GATEWAY_REFUSALS.labels(str(_status), _refused.__name__)
# ... and those aiohttp's parser and router make (_MalformedHttp, _unrouted).
for _status, _error in (
    (400, "BadHttpMessage"),
    (400, "BadHttpMethod"),
    (400, "BadStatusLine"),
    (400, "InvalidHeader"),
    (400, "InvalidURLError"),
    (400, "LineTooLong"),
    (404, "HTTPNotFound"),
    (405, "HTTPMethodNotAllowed"),
):
    GATEWAY_REFUSALS.labels(str(_status), _error)

_SUSPECT: dict[type[Exception], str] = {
    SignatureError: "WECOM_TOKEN",
    PlaintextBufferError: "WECOM_ENCODING_AES_KEY",
    ReceiveIdError: "WECOM_CORP_ID",
}


def status_for(exc: Exception) -> int:
    """The HTTP status for a refusal (500 for anything not in the table)."""
    for cls in type(exc).__mro__:
        status = _STATUS.get(cls)
        if status is not None:
            return status
    return 500


def create_app(
    settings: GatewaySettings,
    publisher: Publisher,
    *,
    ready: Check,
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """Build the gateway's aiohttp application (crypto and parsers are built here, once)."""
    handlers = _CallbackHandlers(settings, publisher, clock)
    app = web.Application(client_max_size=settings.max_body_bytes)
    refusals = RefusalLog(burst=settings.refusal_log_rate or None)
    app[_REFUSALS] = refusals
    app[_STOPPING] = asyncio.Event()
    _MALFORMED.refusals = refusals
    # Every route refuses an Expect it does not know as ours do (aiohttp's own answers
    # 417 quoting the header, neither logged nor counted).
    app.router.add_get(
        settings.callback_path, handlers.url_check, allow_head=False, expect_handler=_expect
    )
    app.router.add_post(settings.callback_path, handlers.receive, expect_handler=handlers.expect)
    for route in HealthServer(settings.host, 0, ready).routes():  # all GET
        app.router.add_get(route.path, route.handler, expect_handler=_expect, **route.kwargs)
    # Last: what no route above takes (a route, not a middleware, which every callback
    # would pay for); `(?s:…)`: a path holding a newline (%0A) too.
    app.router.add_route(
        "*",
        "/{anything:(?s:.*)}",
        partial(_unrouted, settings.callback_path),
        expect_handler=_expect,
    )
    name_server(app, stopping=app[_STOPPING])
    return app


class CallbackReader:
    """A POSTed callback up to its event: everything the gateway does before the append.

    Query shape, media type and size, the body (:meth:`read_http`), then
    :class:`CallbackOpener` (signature, replay window, AES, both XML documents). Raises
    CallbackRejected or CryptoError. ``bench/bare.py --work open`` measures exactly this,
    ``--work http`` the HTTP half.
    """

    __slots__ = ("_body_timeout", "_clock", "_max_body", "opener")

    def __init__(self, settings: GatewaySettings, clock: Callable[[], float] = time.time) -> None:
        wecom = settings.wecom
        crypto = WeComCrypto(
            wecom.token.reveal(), wecom.encoding_aes_key.reveal(), receive_id=wecom.corp_id
        )
        self.opener = CallbackOpener(
            crypto,
            corp_id=wecom.corp_id,
            agent_id=wecom.agent_id,
            app=settings.app,
            window_s=settings.timestamp_window_s,
        )
        self._clock = clock
        self._max_body = settings.max_body_bytes
        self._body_timeout = settings.body_timeout_s

    async def read(self, request: web.Request) -> MessageReceived:
        query, body = await self.read_http(request)
        return self.opener.message(query, body, now=self._clock())

    async def read_http(self, request: web.Request) -> tuple[CallbackQuery, bytes]:
        """The HTTP half: the query's shape, the media type and size guards, the body."""
        query = self.check_head(request)
        return query, await read_limited(request.content, self._max_body, self._body_timeout)

    def check_head(self, request: web.Request) -> CallbackQuery:
        """What the request's line and headers alone can refuse: the query's shape, the
        media type, the coding and the declared size."""
        query = CallbackQuery.parse(request.query, url_check=False)
        check_content_type(request.headers.get(hdrs.CONTENT_TYPE))
        check_content_encoding(request.headers.get(hdrs.CONTENT_ENCODING))
        check_declared_length(request.content_length, self._max_body)
        return query


class _CallbackHandlers:
    __slots__ = ("_clock", "_publisher", "_reader")

    def __init__(
        self, settings: GatewaySettings, publisher: Publisher, clock: Callable[[], float]
    ) -> None:
        self._reader = CallbackReader(settings, clock)
        self._publisher = publisher
        self._clock = clock

    async def url_check(self, request: web.Request) -> web.Response:
        """GET: answer the decrypted echostr exactly (no quotes, BOM or newline)."""
        try:
            query = CallbackQuery.parse(request.query, url_check=True)
            plaintext = self._reader.opener.url_check(query, now=self._clock())
        except (CallbackRejected, CryptoError) as exc:
            return _refuse(request, exc)
        except Exception:
            return _failed(request)
        _URL_VERIFIED.inc()
        log.debug("callback.url_verified")
        return web.Response(body=plaintext, content_type="text/plain")

    async def expect(self, request: web.Request) -> web.Response | None:
        """A POST with ``Expect: 100-continue`` waits for our go before sending its body:
        refused by its line and headers first, it never sends it (aiohttp's default
        answered 100 to any request, then the client pushed a body we refused)."""
        return await _expect(request, self._reader.check_head)

    async def receive(self, request: web.Request) -> web.Response:
        """POST: verify, decrypt, parse, append; 200 only once the log has it."""
        message: MessageReceived | None = None
        try:
            message = await self._reader.read(request)
            appended = await self._publisher.append(message, msg_id=dedupe_key(message))
        except NoSender as exc:
            _IGNORED.inc()
            log.info("callback.ignored", reason=exc.reason)
            return web.Response()
        except (CallbackRejected, CryptoError, AppendUnavailable, EventTooLarge) as exc:
            return _refuse(request, exc, message)
        except Exception:
            return _failed(request, message)
        (_DUPLICATE if appended.duplicate else _STORED).inc()
        if _debug_enabled(logging.DEBUG):
            log.debug(
                "callback.stored",
                seq=appended.seq,
                duplicate=appended.duplicate,
                **_identity(message),
            )
        return web.Response()


async def _expect(
    request: web.Request, check_head: Callable[[web.Request], object] | None = None
) -> web.Response | None:
    """``Expect: 100-continue`` is answered 100 once ``check_head`` (if any) passed; any
    other expectation, or what ``check_head`` refuses, is a counted refusal."""
    try:
        if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
            raise UnknownExpectation("Expect must be 100-continue, if given")
        if check_head is not None:
            check_head(request)
    except CallbackRejected as exc:
        response = _refuse(request, exc)
        response.force_close()  # its body, if it comes after all, is not ours to read
        return response
    if request.version == HttpVersion11:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own: the answer is still to come
    return None


async def _unrouted(callback_path: str, request: web.Request) -> web.Response:
    """A request no route takes (a URL saved with a typo or a trailing slash in the WeCom
    admin; a method the callback does not serve): 404 / 405 as aiohttp would answer, and
    said in the log once, naming the path we serve."""
    # As the router saw it: '%2F' is not a '/' (request.path decodes it).
    path = request.rel_url.path_safe
    allowed = sorted(
        {
            route.method
            for resource in request.app.router.resources()
            if resource.canonical == path
            for route in resource
            if route.method != "*"
        }
    )
    if allowed:  # a route of ours, another method: as aiohttp answers it
        how = "GET verifies, POST delivers" if path == callback_path else ", ".join(allowed)
        status, reason = 405, f"{request.method} is not served here ({how})"
        error, headers = "HTTPMethodNotAllowed", {"Allow": ",".join(allowed)}
    else:
        status, reason = 404, f"no such path: the callback is served at {callback_path}"
        error, headers = "HTTPNotFound", {}
    request.app[_REFUSALS].refused(
        status, error, method=request.method, path=path[:200], reason=reason
    )
    return web.Response(status=status, text=HTTPStatus(status).phrase, headers=headers)


def _identity(message: MessageReceived | None) -> dict[str, object]:
    """Who a callback's log line is about, once the message is opened."""
    if message is None:
        return {}
    return {"app": message.app, "user": message.from_user, "msg_id": message.correlation_id}


def _refuse(
    request: web.Request,
    exc: CallbackRejected | CryptoError | AppendUnavailable | EventTooLarge,
    message: MessageReceived | None = None,
) -> web.Response:
    status = status_for(exc)
    fields: dict[str, object] = {"method": request.method}
    fields.update(_identity(message))
    if isinstance(exc, CryptoError):
        fields["reason"] = f"{exc.reason}: {exc.detail}" if exc.detail else exc.reason
        fields["code"] = exc.code
    elif isinstance(exc, CallbackRejected):
        fields["reason"] = exc.reason
        if exc.code is not None:
            fields["code"] = exc.code
    else:
        fields["reason"] = str(exc)
    # Which of our settings differs from the app's, if WeCom itself sent it (else: a
    # forged or foreign request); the first thing to check after a change in the admin.
    setting = exc.setting if isinstance(exc, WrongRecipient) else _SUSPECT.get(type(exc))
    if setting is not None:
        fields["setting"] = setting
    _REFUSED.inc()
    request.app[_REFUSALS].refused(status, type(exc).__name__, **fields)
    response = web.Response(status=status, text=HTTPStatus(status).phrase)
    if isinstance(exc, BodyTimeout):
        response.force_close()  # no keep-alive for a client that stalls
    return response


def _failed(request: web.Request, message: MessageReceived | None = None) -> web.Response:
    _FAILED.inc()
    log.exception("callback.failed", status=500, method=request.method, **_identity(message))
    return web.Response(status=500, text=HTTPStatus.INTERNAL_SERVER_ERROR.phrase)
