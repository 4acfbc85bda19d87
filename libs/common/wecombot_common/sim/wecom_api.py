"""A simulated WeCom server API: ``gettoken``, ``message/send`` and ``agent/get``, on a
real HTTP port.

It behaves as the official docs say (https://developer.work.weixin.qq.com/document/path/91039
gettoken, path/90236 message/send, path/90227 agent/get, path/90313 error codes), and lets
a test or the sandbox
console inject what WeCom does on a bad day::

    >>> api = SimulatedWeComApi(corp_id="wwsim", secret="s3cret", agent_id=1000002)
    >>> await api.start()                          # doctest: +SKIP
    >>> api.base_url                               # doctest: +SKIP
    'http://127.0.0.1:41235'
    >>> api.fail_sends(42001, times=1)             # next send: access_token expired
    >>> api.expire_tokens()                        # every issued token now gets 42001
    >>> api.fail_gettoken(60020, times=1)          # next gettoken: untrusted IP
    >>> hold = api.hold_sends(lambda user, text: user == "zhang.san")
    >>> await hold.wait_held()                     # doctest: +SKIP
    >>> hold.release(accept=False)                 # the held send is never accepted

Every call is reported to the :meth:`~SimulatedWeComApi.observe_calls` observers as an
:class:`ApiCall` (the api, HTTP status, errcode, and whether a scripted ``fail_*`` fault
produced the answer). Every accepted send is recorded in :attr:`sent` (and pushed to
subscribers) with the msgid WeCom would return; content over 2048 bytes is truncated
silently, as WeCom does, and flagged so tests can prove no part ever was.

Duplicate check (path/90236): a send with ``enable_duplicate_check=1`` that is identical
(touser, agentid, msgtype, content) to a send accepted within ``duplicate_check_interval``
seconds (default 1800, at most 4 h) is not delivered again and lands in
:attr:`duplicates`. Two things the docs do not say, so they are **assumptions** here:
the earlier send counts whether or not it asked for the check itself, and WeCom answers
the dropped request ``errcode 0`` ("ok") without a new ``msgid``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from wecombot_common.http import LoopbackServer

__all__ = ["ApiCall", "Hold", "SentMessage", "SimulatedWeComApi"]

MAX_CONTENT_BYTES = 2048  # text.content and markdown.content limit, path/90236
# What wecombot sends (a body of one `content`); any other type is refused here (40008).
SENDABLE_TYPES = frozenset(("text", "markdown"))
DUPLICATE_CHECK_DEFAULT_S = 1800  # path/90236
DUPLICATE_CHECK_MAX_S = 4 * 3600

ERRMSG = {
    0: "ok",
    -1: "system busy",
    40001: "invalid credential (corpsecret)",
    40013: "invalid corpid",
    40014: "invalid access_token",
    41001: "access_token missing",
    42001: "access_token expired",
    44004: "empty content",
    45009: "reach max api daily quota limit",
    45033: "api concurrent out of limit",
    60020: "not allow to access from your ip",
    301002: "not allow operate another agent",
    81013: "user & party & tag all invalid",
    82001: "all touser invalid",
}


@dataclass(frozen=True)
class ApiCall:
    """One call to the simulated API and its answer, as an observer sees it (never the
    secret or the access_token). The errcode fields are None for a bare HTTP answer."""

    api: str  # "gettoken" or "message/send"
    http: int  # the HTTP status answered
    injected: bool  # a fault scripted with fail_gettoken/fail_sends/fail_sends_http
    errcode: int | None = None
    errmsg: str | None = None
    msgid: str | None = None
    expires_in: int | None = None
    touser: str | None = None  # message/send: whom it was for, if the body says


# What a handler answered, kept on its response for the call's report.
_ANSWER = web.ResponseKey("wecombot_sim_answer", dict)
_INJECTED = web.ResponseKey("wecombot_sim_injected", bool)


@dataclass(frozen=True)
class SentMessage:
    touser: str
    agentid: int
    content: str
    msgid: str
    truncated: bool
    at: float  # time.time() when accepted
    msgtype: str = "text"
    access_token: str = field(default="", repr=False)


class Hold:
    """Requests that wait inside the simulated WeCom until released: a slow WeCom, or a
    request whose client is killed while it is pending. Made by
    :meth:`SimulatedWeComApi.hold_sends` and :meth:`SimulatedWeComApi.hold_gettoken`.

    ``release(accept=False)`` ends the held requests with HTTP 503, never accepted; a
    send held ``after_accept`` was accepted already, and only its answer was held.
    """

    def __init__(
        self, matches: Callable[[str, str], bool], *, after_accept: bool, limit: int | None
    ) -> None:
        self.matches = matches
        self.after_accept = after_accept
        self.limit = limit
        self.held = 0
        self.accept = True
        self._arrived = asyncio.Condition()
        self._released = asyncio.Event()

    def takes(self, touser: str, content: str) -> bool:
        return (
            not self._released.is_set()
            and (self.limit is None or self.held < self.limit)
            and self.matches(touser, content)
        )

    async def wait_held(self, count: int = 1, *, timeout: float = 10.0) -> None:
        """Until ``count`` requests are held (TimeoutError after ``timeout``)."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: self.held >= count)

    def release(self, *, accept: bool = True) -> None:
        self.accept = accept
        self._released.set()

    async def hold(self) -> bool:
        """Hold one request until released; True if it may be accepted."""
        self.held += 1
        async with self._arrived:
            self._arrived.notify_all()
        await self._released.wait()
        return self.accept


@dataclass
class _Faults:
    gettoken: deque[int] = field(default_factory=deque)
    send: deque[int] = field(default_factory=deque)
    send_http: deque[int] = field(default_factory=deque)
    always_fail_users: dict[str, int] = field(default_factory=dict)
    down: bool = False


class SimulatedWeComApi(LoopbackServer):
    def __init__(
        self,
        *,
        corp_id: str,
        secret: str,
        agent_id: int,
        host: str = "127.0.0.1",
        port: int = 0,
        expires_in: int = 7200,
        latency_s: float = 0.0,
        token_file: Path | None = None,
    ) -> None:
        """``token_file`` keeps the tokens issued, so that a restarted sandbox still
        accepts them as WeCom would (they live 7200 s, whoever restarts)."""
        self.corp_id = corp_id
        self.secret = secret
        self.agent_id = agent_id
        self.host = host
        self.port = port
        self.expires_in = expires_in
        self.latency_s = latency_s
        self.sent: list[SentMessage] = []
        self.duplicates: list[SentMessage] = []  # dropped by the duplicate check
        self.gettoken_calls = 0
        self.send_calls = 0
        self.faults = _Faults()
        self._tokens: dict[str, float] = {}  # token -> expiry (monotonic)
        self._token_file = token_file
        self._load_tokens()
        # Unique across runs, as WeCom's are: `make run` keeps the log, whose parts name
        # the msgids of earlier runs (numbered from 1 in each, the console took a new
        # reply for the part of the same msgid in the log).
        self._msgid_prefix = f"sim-{secrets.token_hex(4)}-"
        self._msgids = itertools.count(1)
        self._subscribers: set[asyncio.Queue[SentMessage]] = set()
        self._send_holds: list[Hold] = []
        self._gettoken_holds: list[Hold] = []
        self._call_observers: list[Callable[[ApiCall], None]] = []

    # ------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/cgi-bin/gettoken", self._reported("gettoken", self._gettoken)),
            web.post("/cgi-bin/message/send", self._reported("message/send", self._send)),
            web.get("/cgi-bin/agent/get", self._reported("agent/get", self._agent)),
        ]

    # ------------------------------------------------------------ observation
    def observe_calls(self, observer: Callable[[ApiCall], None]) -> None:
        """Call ``observer`` with every API call once it is answered (not a held one
        before it is released)."""
        self._call_observers.append(observer)

    def unobserve_calls(self, observer: Callable[[ApiCall], None]) -> None:
        if observer in self._call_observers:
            self._call_observers.remove(observer)

    def _reported(
        self, api: str, handler: Callable[[web.Request], Awaitable[web.Response]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            response = await handler(request)
            if self._call_observers:
                answer: dict[str, Any] = response.get(_ANSWER) or {}
                call = ApiCall(
                    api=api,
                    http=response.status,
                    injected=response.get(_INJECTED, False),
                    errcode=answer.get("errcode"),
                    errmsg=answer.get("errmsg"),
                    msgid=answer.get("msgid"),
                    expires_in=answer.get("expires_in"),
                    touser=await self._touser(request) if api == "message/send" else None,
                )
                for observer in list(self._call_observers):
                    observer(call)
            return response

        return handle

    @staticmethod
    async def _touser(request: web.Request) -> str | None:
        try:
            body = json.loads(await request.read())  # read already: cached
        except ValueError:
            return None
        touser = body.get("touser") if isinstance(body, dict) else None
        return None if touser is None else str(touser)

    @staticmethod
    def _injected(response: web.Response) -> web.Response:
        response[_INJECTED] = True
        return response

    # ------------------------------------------------------------ fault injection
    def fail_gettoken(self, errcode: int, *, times: int = 1) -> None:
        self.faults.gettoken.extend([errcode] * times)

    def fail_sends(self, errcode: int, *, times: int = 1) -> None:
        self.faults.send.extend([errcode] * times)

    def fail_sends_http(self, status: int, *, times: int = 1) -> None:
        """The next sends get a bare HTTP error (a proxy or WeCom front end failing)."""
        self.faults.send_http.extend([status] * times)

    def reject_user(self, userid: str, errcode: int = 81013) -> None:
        """Every send to this user fails with ``errcode`` (a permanent refusal)."""
        self.faults.always_fail_users[userid] = errcode

    def set_down(self, down: bool) -> None:
        """While down, every call answers HTTP 503 (WeCom unreachable)."""
        self.faults.down = down

    def hold_sends(
        self,
        matches: Callable[[str, str], bool] | None = None,
        *,
        after_accept: bool = False,
        limit: int | None = 1,
    ) -> Hold:
        """Hold the next ``limit`` sends for which ``matches(touser, content)`` (None: all)
        until the hold is released; ``after_accept``: accept them first, hold the answer."""
        hold = Hold(matches or (lambda _user, _text: True), after_accept=after_accept, limit=limit)
        self._send_holds.append(hold)
        return hold

    def hold_gettoken(self, *, limit: int | None = 1) -> Hold:
        """Hold the next ``limit`` gettoken calls until the hold is released."""
        hold = Hold(lambda _user, _text: True, after_accept=False, limit=limit)
        self._gettoken_holds.append(hold)
        return hold

    def expire_tokens(self) -> None:
        """Every token issued so far is now expired (42001), as after a quiet night."""
        now = time.monotonic()
        for token in self._tokens:
            self._tokens[token] = min(self._tokens[token], now)
        self._save_tokens()

    def _load_tokens(self) -> None:
        if self._token_file is None or not self._token_file.is_file():
            return
        try:
            saved = json.loads(self._token_file.read_text())
        except (OSError, ValueError):  # unreadable: as if none were issued
            return
        offset = time.monotonic() - time.time()  # wall-clock expiry -> monotonic
        self._tokens.update({token: float(at) + offset for token, at in saved.items()})

    def _save_tokens(self) -> None:
        if self._token_file is None:
            return
        now = time.monotonic()
        offset = time.time() - now
        # expired ones too, for a day (they answer 42001, not 40014, as WeCom's would)
        live = {token: at + offset for token, at in self._tokens.items() if at > now - 86400}
        self._token_file.write_text(json.dumps(live))
        self._token_file.chmod(0o600)

    def subscribe(self) -> asyncio.Queue[SentMessage]:
        queue: asyncio.Queue[SentMessage] = asyncio.Queue()
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[SentMessage]) -> None:
        self._subscribers.discard(queue)

    def messages_to(self, userid: str) -> list[str]:
        return [m.content for m in self.sent if m.touser == userid]

    # ------------------------------------------------------------ handlers
    @staticmethod
    def _json(payload: dict[str, Any]) -> web.Response:
        response = web.json_response(payload, dumps=lambda o: json.dumps(o, ensure_ascii=False))
        response[_ANSWER] = payload
        return response

    @staticmethod
    def _error(errcode: int) -> dict[str, Any]:
        return {"errcode": errcode, "errmsg": ERRMSG.get(errcode, "error")}

    @classmethod
    def _gettoken_error(cls, errcode: int, request: web.Request) -> dict[str, Any]:
        """An injected gettoken error; 60020 names the caller's IP, as WeCom's errmsg does
        ("not allow to access from your ip, hint: […], from ip: 203.0.113.5, more info …")."""
        error = cls._error(errcode)
        if errcode == 60020:
            error["errmsg"] = (
                f"not allow to access from your ip, hint: [{int(time.time())}-sim], "
                f"from ip: {request.remote}, more info at "
                "https://open.work.weixin.qq.com/devtool/query?e=60020"
            )
        return error

    @staticmethod
    def _taking(holds: list[Hold], touser: str, content: str) -> Hold | None:
        hold = next((h for h in holds if h.takes(touser, content)), None)
        if hold is not None and hold.limit is not None and hold.held + 1 >= hold.limit:
            holds.remove(hold)  # full after this one
        return hold

    async def _gettoken(self, request: web.Request) -> web.Response:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        hold = self._taking(self._gettoken_holds, "", "")
        if hold is not None and not await hold.hold():
            return web.Response(status=503, text="service unavailable")
        if self.faults.down:
            return web.Response(status=503, text="service unavailable")
        self.gettoken_calls += 1
        if self.faults.gettoken:
            error = self._gettoken_error(self.faults.gettoken.popleft(), request)
            return self._injected(self._json(error))
        if request.query.get("corpid") != self.corp_id:
            return self._json(self._error(40013))
        if not secrets.compare_digest(request.query.get("corpsecret", ""), self.secret):
            return self._json(self._error(40001))
        token = secrets.token_urlsafe(48)
        self._tokens[token] = time.monotonic() + self.expires_in
        self._save_tokens()
        return self._json(
            {"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": self.expires_in}
        )

    def _check_token(self, token: str | None) -> int:
        if not token:
            return 41001
        expiry = self._tokens.get(token)
        if expiry is None:
            return 40014
        if expiry <= time.monotonic():
            return 42001
        return 0

    async def _peek(self, request: web.Request) -> tuple[str, str]:
        """(touser, content) of a send, for matching holds ("" when unreadable)."""
        try:
            body = json.loads(await request.read())
            return str(body["touser"]), str(body[body["msgtype"]]["content"])
        except (ValueError, KeyError, TypeError):
            return "", ""

    def _duplicate_of(self, body: dict[str, Any], msg: SentMessage) -> SentMessage | None:
        """The accepted send ``msg`` repeats within the interval, if it asked for the check."""
        if str(body.get("enable_duplicate_check", 0)) != "1":
            return None
        try:
            interval = int(body.get("duplicate_check_interval", DUPLICATE_CHECK_DEFAULT_S))
        except (TypeError, ValueError):
            interval = DUPLICATE_CHECK_DEFAULT_S
        interval = min(max(interval, 0), DUPLICATE_CHECK_MAX_S)
        for earlier in reversed(self.sent):
            if msg.at - earlier.at > interval:
                return None
            if (earlier.touser, earlier.agentid, earlier.msgtype, earlier.content) == (
                msg.touser,
                msg.agentid,
                msg.msgtype,
                msg.content,
            ):
                return earlier
        return None

    async def _agent(self, request: web.Request) -> web.Response:
        """The app's details (path/90227); a self-built app's token reads its own app
        only: another AgentId is 301002, as message/send answers it."""
        if self.faults.down:
            return web.Response(status=503, text="service unavailable")
        token_error = self._check_token(request.query.get("access_token"))
        if token_error:
            return self._json(self._error(token_error))
        try:
            agentid = int(request.query.get("agentid", ""))
        except ValueError:
            return self._json({"errcode": 40056, "errmsg": "invalid agentid"})
        if agentid != self.agent_id:
            return self._json(self._error(301002))
        return self._json(
            {"errcode": 0, "errmsg": "ok", "agentid": agentid, "name": "wecombot", "close": 0}
        )

    async def _send(self, request: web.Request) -> web.Response:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self._send_holds:
            hold = self._taking(self._send_holds, *await self._peek(request))
            if hold is not None and not hold.after_accept and not await hold.hold():
                return web.Response(status=503, text="service unavailable")
        else:
            hold = None
        if self.faults.down:
            return web.Response(status=503, text="service unavailable")
        self.send_calls += 1
        if self.faults.send_http:
            status = self.faults.send_http.popleft()
            return self._injected(web.Response(status=status, text="bad gateway"))
        token_error = self._check_token(request.query.get("access_token"))
        if token_error:
            return self._json(self._error(token_error))
        if self.faults.send:
            return self._injected(self._json(self._error(self.faults.send.popleft())))
        try:
            body = await request.json()
            touser = str(body["touser"])
            agentid = int(body["agentid"])
            msgtype = body["msgtype"]
            if msgtype not in SENDABLE_TYPES:
                raise ValueError(msgtype)
            content = str(body[msgtype]["content"])
        except (ValueError, KeyError, TypeError):
            return self._json({"errcode": 40008, "errmsg": "invalid message type"})
        if agentid != self.agent_id:
            return self._json({"errcode": 301002, "errmsg": "not allow operate another agent"})
        if not content:
            return self._json(self._error(44004))
        if touser in self.faults.always_fail_users:
            code = self.faults.always_fail_users[touser]
            return self._json({**self._error(code), "invaliduser": touser})
        raw = content.encode("utf-8")
        truncated = len(raw) > MAX_CONTENT_BYTES
        if truncated:  # WeCom truncates silently (path/90236)
            content = raw[:MAX_CONTENT_BYTES].decode("utf-8", errors="ignore")
        msg = SentMessage(
            touser=touser,
            agentid=agentid,
            content=content,
            msgid="",
            truncated=truncated,
            at=time.time(),
            msgtype=str(msgtype),
            access_token=request.query.get("access_token", ""),
        )
        if self._duplicate_of(body, msg) is not None:
            # Not delivered again. What WeCom answers is not documented: assumed "ok"
            # without a new msgid (see the module doc).
            self.duplicates.append(msg)
            return self._json({"errcode": 0, "errmsg": "ok", "invaliduser": ""})
        msg = dataclasses.replace(msg, msgid=f"{self._msgid_prefix}{next(self._msgids)}")
        self.sent.append(msg)
        for queue in self._subscribers:
            queue.put_nowait(msg)
        if hold is not None and hold.after_accept:
            await hold.hold()  # accepted; only the answer waits
        return self._json({"errcode": 0, "errmsg": "ok", "invaliduser": "", "msgid": msg.msgid})
