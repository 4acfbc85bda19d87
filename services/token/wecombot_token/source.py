"""The only caller of WeCom ``gettoken`` in wecombot.

``GET {api_base}/cgi-bin/gettoken?corpid=…&corpsecret=…`` answers
``{"errcode": 0, "access_token": "…", "expires_in": 7200}`` or an errcode
(https://developer.work.weixin.qq.com/document/path/91039). Failures come back as
:class:`~.domain.Failure` values, never as exceptions: they are expected outcomes the
service records and backs off on::

    source = WeComTokenSource(settings.wecom, timeout_s=10)
    outcome = await source.fetch()
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Protocol
from urllib.parse import urlsplit

import httpx
import msgspec

from wecombot_common.logs import REDACTED, redact
from wecombot_common.proxy import client_options
from wecombot_common.settings import WeComApiSettings
from wecombot_common.wecom_http import UNCODED, AnswerTooLarge, send_capped

from .domain import (
    Failure,
    IssuedToken,
    classify_errcode,
    http_failure,
    issued,
    network_failure,
)

__all__ = ["TokenSource", "WeComTokenSource", "interpret"]


class TokenSource(Protocol):
    async def fetch(self) -> IssuedToken | Failure: ...


class _GettokenBody(msgspec.Struct):
    errcode: int = 0
    errmsg: str = ""
    access_token: str | None = None
    expires_in: float | None = None


_decoder = msgspec.json.Decoder(_GettokenBody)


def interpret(body: bytes, requested_at: float) -> IssuedToken | Failure:
    """Turn gettoken's JSON body into a token or a failure (pure)."""
    try:
        parsed = _decoder.decode(body)
    except msgspec.DecodeError:
        return network_failure("gettoken answered something that is not WeCom's JSON")
    if parsed.errcode != 0:
        return classify_errcode(parsed.errcode, parsed.errmsg)
    # errcode 0 and no usable token is no refusal an operator could fix: a glitch of
    # WeCom's or of something in between, retried like a body that is not JSON at all.
    if not parsed.access_token:
        return network_failure("gettoken answered errcode 0 without an access_token")
    lifetime = parsed.expires_in
    if lifetime is None or not math.isfinite(lifetime) or lifetime <= 0:
        return network_failure(
            f"gettoken answered a token without a usable expires_in ({lifetime!r})"
        )
    return issued(parsed.access_token, lifetime, requested_at)


class WeComTokenSource:
    """httpx against the real (or simulated) WeCom API, bounded by one total timeout."""

    def __init__(
        self,
        settings: WeComApiSettings,
        *,
        timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._timeout_s = timeout_s
        self._clock = clock
        self._url = f"{settings.api_base}/cgi-bin/gettoken"
        self._host = urlsplit(settings.api_base).netloc
        self._http = httpx.AsyncClient(
            headers=UNCODED,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2),
            follow_redirects=False,
            **client_options(settings.proxy),  # the environment's, read with the settings
        )

    async def fetch(self) -> IssuedToken | Failure:
        requested_at = self._clock()
        params = {"corpid": self._settings.corp_id, "corpsecret": self._settings.secret.reveal()}
        try:
            # httpx's timeouts are per phase; this bounds the whole call, which is what the
            # cluster lock's deadline assumes. The body is read up to a limit (wecom_http).
            async with asyncio.timeout(self._timeout_s):
                status, body = await send_capped(
                    self._http, self._http.build_request("GET", self._url, params=params)
                )
        except AnswerTooLarge as exc:
            return network_failure(f"gettoken answered {exc}")
        except TimeoutError:
            return network_failure(f"no answer from {self._host} within {self._timeout_s:g}s")
        except httpx.HTTPError as exc:
            # The exception text may hold the URL and so the secret: name the type only.
            return network_failure(f"{type(exc).__name__} calling {self._host}")
        if status != httpx.codes.OK:
            return http_failure(status)
        outcome = interpret(body, requested_at)
        if isinstance(outcome, Failure) and outcome.errmsg:
            outcome = msgspec.structs.replace(
                outcome, errmsg=self._clean(outcome.errmsg), message=self._clean(outcome.message)
            )
        return outcome

    def _clean(self, text: str) -> str:
        """WeCom's errmsg travels far from here: into the shared bucket, to every sender
        (a TokenError becomes a DeliveryFailed.reason and a dead letter's reason, stored
        where no log redaction looks) and into doctor's output. An answer that quotes the
        request (a gateway or proxy in front of WeCom) would put the Secret there, and
        the sender, which never holds it, could not take it out."""
        secret = self._settings.secret.reveal()
        return redact(text.replace(secret, REDACTED) if secret else text)

    async def aclose(self) -> None:
        await self._http.aclose()
