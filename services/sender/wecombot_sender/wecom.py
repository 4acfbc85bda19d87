"""The WeCom ``message/send`` adapter (https://developer.work.weixin.qq.com/document/path/90236).

The port is :class:`MessageApi`, one method; :class:`HttpMessageApi` is the real adapter
over ``httpx``. It returns WeCom's msgid or raises a :mod:`wecombot_sender.errors` error;
httpx's own errors are translated here and never leak (their text may hold the URL, and
the URL holds the access_token)::

    api = HttpMessageApi(settings.wecom, timeout_s=10)
    await api.send_text(token, "zhang.san", "你好")
    # → '4A1y…'

Replies go as ``text`` messages, or as ``markdown`` ones (``SENDER_MESSAGE_TYPE``): the
same ``content`` field and the same 2048-byte limit. WeCom renders a subset of Markdown
(headings, bold, links, inline code, quotes) and shows the rest as typed; 微工作台 (WeCom
inside WeChat) does not show markdown messages at all (path/90236).

``duplicate_check_s`` sets WeCom's ``enable_duplicate_check`` with that
``duplicate_check_interval``: WeCom drops the request if an identical one (same touser,
agentid and content) was sent within the interval. Only a send that may repeat an
accepted one uses it (see handler.py). What WeCom answers for a dropped duplicate is not
documented; we assume ``errcode 0`` without a new msgid, so ``send_text`` returns "".
"""

from __future__ import annotations

import asyncio
from typing import Literal, Protocol

import httpx
import msgspec

from wecombot_common.logs import redact, register_secret
from wecombot_common.metrics import SENDER_WECOM_ERRORS, BoundedLabel
from wecombot_common.proxy import client_options
from wecombot_common.settings import WeComApiSettings
from wecombot_common.wecom_http import UNCODED, AnswerTooLarge, send_capped

from .errcodes import BUSY, DOCUMENTED, ErrorClass, classify, explain
from .errors import SendError, SendRejected, SendRetryable, TokenRejected

__all__ = ["MESSAGE_TYPES", "HttpMessageApi", "MessageApi", "MessageType", "may_have_gone_out"]

MessageType = Literal["text", "markdown"]
MESSAGE_TYPES: tuple[MessageType, ...] = ("text", "markdown")


class MessageApi(Protocol):
    async def send_text(
        self, token: str, touser: str, content: str, *, duplicate_check_s: int | None = None
    ) -> str:
        """Send ``content`` to one member (as the adapter's message type: text, or
        markdown); returns WeCom's msgid ("" when WeCom's duplicate check dropped it)."""
        ...


class _Content(msgspec.Struct, frozen=True):
    content: str


class _SendRequest(msgspec.Struct, frozen=True, omit_defaults=True):
    touser: str
    agentid: int
    msgtype: MessageType
    text: _Content | None = None
    markdown: _Content | None = None
    enable_duplicate_check: int = 0
    duplicate_check_interval: int | None = None


class _SendResponse(msgspec.Struct, frozen=True):
    # Required: WeCom always answers with one. A 200 without it is someone else's answer
    # (a front end, a wrong WECOM_API_BASE): taken as success, the reply was lost.
    errcode: int
    errmsg: str = ""
    msgid: str = ""
    invaliduser: str = ""
    unlicenseduser: str = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_SendResponse)
# errcode is whatever the answer says: a few dozen series at most (metrics.BoundedLabel)
_errcode_label = BoundedLabel(limit=32, known=DOCUMENTED)


class HttpMessageApi:
    def __init__(
        self,
        settings: WeComApiSettings,
        *,
        timeout_s: float,
        message_type: MessageType = "text",
    ) -> None:
        self._agent_id = settings.agent_id
        self._message_type = message_type
        self._timeout_s = timeout_s
        self._url = f"{settings.api_base}/cgi-bin/message/send"
        self._client = httpx.AsyncClient(
            headers=UNCODED,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            follow_redirects=False,
            **client_options(settings.proxy),  # the environment's, read with the settings
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def send_text(
        self, token: str, touser: str, content: str, *, duplicate_check_s: int | None = None
    ) -> str:
        try:
            return await self._send(token, touser, content, duplicate_check_s)
        except SendError as exc:
            SENDER_WECOM_ERRORS.labels(_errcode_label(exc.errcode)).inc()  # each failed call
            raise

    async def _send(
        self, token: str, touser: str, content: str, duplicate_check_s: int | None
    ) -> str:
        register_secret(token, ephemeral=True)
        markdown = self._message_type == "markdown"
        request = _SendRequest(
            touser=touser,
            agentid=self._agent_id,
            msgtype=self._message_type,
            text=None if markdown else _Content(content),
            markdown=_Content(content) if markdown else None,
            enable_duplicate_check=int(duplicate_check_s is not None),
            duplicate_check_interval=duplicate_check_s,
        )
        body = _encoder.encode(request)
        try:
            # The whole call, at most twice the timeout: httpx's is per read, and an answer
            # trickled a byte at a time held the reply (and the user's next ones) for as
            # long as it lasted. The body is read up to a limit (wecom_http): a body of
            # any size was held whole, for each send in flight.
            async with asyncio.timeout(2 * self._timeout_s):
                status, answered = await send_capped(
                    self._client,
                    self._client.build_request(
                        "POST",
                        self._url,
                        params={"access_token": token},
                        content=body,
                        headers={"Content-Type": "application/json; charset=utf-8"},
                    ),
                )
        except AnswerTooLarge as exc:
            raise SendRetryable(BUSY, f"WeCom answered {exc}", maybe_delivered=True) from exc
        except TimeoutError as exc:
            reason = f"WeCom's answer did not arrive whole within {2 * self._timeout_s:g}s"
            raise SendRetryable(BUSY, reason, maybe_delivered=True) from exc
        except httpx.TimeoutException as exc:
            reason = f"WeCom did not answer in time ({type(exc).__name__})"
            raise SendRetryable(BUSY, reason, maybe_delivered=may_have_gone_out(exc)) from exc
        except httpx.TransportError as exc:
            reason = f"cannot reach WeCom ({type(exc).__name__})"
            raise SendRetryable(BUSY, reason, maybe_delivered=may_have_gone_out(exc)) from exc
        except httpx.HTTPError as exc:
            # The request went out, its answer could not be read (a body that is not the
            # gzip its header says: httpx.DecodingError): it escaped as httpx's own error,
            # with no retry here and no DeliveryFailed at the last delivery.
            reason = f"WeCom's answer could not be read ({type(exc).__name__})"
            raise SendRetryable(BUSY, reason, maybe_delivered=True) from exc
        if status != 200:
            # WeCom answers 200 with an errcode; anything else is a proxy or front end
            # having a bad moment (or a wrong WECOM_API_BASE, which operators must see).
            reason = f"WeCom answered HTTP {status}"
            raise SendRetryable(BUSY, reason, maybe_delivered=status >= 500)
        try:
            answer = _decoder.decode(answered)
        except msgspec.DecodeError as exc:
            reason = f"WeCom answered 200 with a body that is not its JSON answer ({exc})"
            raise SendRetryable(BUSY, reason, maybe_delivered=True) from exc
        return _msgid_or_raise(answer, touser)


_UNLICENSED = (
    "WeCom accepted the message for nobody: the recipient has no API license "
    "(unlicenseduser; 接口许可, buy or assign one in the admin console)"
)


def may_have_gone_out(exc: httpx.TransportError) -> bool:
    """Whether the request may have reached WeCom (not a connect or pool failure)."""
    return not isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)


def _msgid_or_raise(answer: _SendResponse, touser: str) -> str:
    if answer.errcode == 0:
        # Accepted for nobody: WeCom lists the one recipient as invalid, or as a member
        # without the API license (接口许可) the message needs ("unlicenseduser",
        # https://developer.work.weixin.qq.com/document/path/90236). UserIDs are
        # case-insensitive in WeCom: its lists may not spell it as we did.
        user = touser.casefold()
        if user in answer.invaliduser.casefold().split("|"):
            raise SendRejected(82001, explain(82001, redact(answer.errmsg)))
        if user in answer.unlicenseduser.casefold().split("|"):
            raise SendRejected(82001, _UNLICENSED)
        return answer.msgid
    # WeCom's words go into logs and into the DeliveryFailed event: never a token or
    # secret quoted in them (the one just sent is registered above).
    reason = explain(answer.errcode, redact(answer.errmsg))
    kind = classify(answer.errcode)
    if kind is ErrorClass.RETRYABLE:
        raise SendRetryable(answer.errcode, reason)
    if kind is ErrorClass.TOKEN:
        raise TokenRejected(answer.errcode, reason)
    raise SendRejected(answer.errcode, reason)
