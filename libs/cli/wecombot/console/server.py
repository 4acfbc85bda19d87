"""The console's backend: aiohttp on loopback, run inside ``wecombot dev``'s process.

::

    GET  /                 the page (static/index.html; plain HTML, CSS and JS, no CDN)
    GET  /api/stream       Server-Sent Events: a ``hello`` with the current state, then
                           every item (replayed after ``Last-Event-ID``, then live)
    POST /api/send         {"user", "text", "retry"}: a text callback to the gateway
    POST /api/event        {"user", "event", "key"}: an event callback (enter_agent; click,
                           a custom-menu item, with its ``key``)
    POST /api/faults       {"action": "expire_token" | "fail_sends" | "clear_faults", …}

Items (``kind``): ``said`` (a callback the console built), ``callback`` (the gateway's
answer to one POST of it), ``history`` (the log's events the console shows from before
its start: ``from_seq`` through ``through_seq``, and how many ``earlier`` ones it leaves
out), ``event`` (a JetStream event, from an ordered consumer on ``wecombot.conv.>``:
the last ``HISTORY_EVENTS`` of the log, ``history`` true, then each new one), ``sent``
(a message the simulated ``message/send`` accepted: what the WeCom user sees; or, with
``from_log``, a part the log records as delivered before the start, its text cut from
its reply, None when that reply is older than the events shown), ``api`` (any call to
the simulated WeCom API and its errcode), ``switch`` (a fault injected from the page),
``nats`` (the console's NATS client closed for good: the event log stops), ``silenced``
(a stored message the llm leaves unanswered, and why: the page would wait for its reply
forever), ``stats`` (the simulated WeCom's counts since the start) and
``gateway`` (state: ``starting``, ``ready``, ``not ready`` with the gateway's reason,
``down``).

It listens on 127.0.0.1 only and refuses other Host headers (DNS rebinding) and POSTs
that are not JSON (cross-site forms): it can inject faults, so it is not for a network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import re
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats.errors
import structlog
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from wecombot_common import bus, topology
from wecombot_common.events import (
    ConversationReset,
    EventDecodeError,
    MessageReceived,
    PartDelivered,
    ReplyFailed,
    ReplyGenerated,
    WeComEventPayload,
    decode_event,
)
from wecombot_common.http import LocalSite
from wecombot_common.runtime import cancel_until_done
from wecombot_common.settings import NatsSettings
from wecombot_common.sim.callbacks import Callback, CallbackBuilder
from wecombot_common.sim.wecom_api import ApiCall, SentMessage, SimulatedWeComApi
from wecombot_common.topology import ConversationRef
from wecombot_llm.commands import menu_command
from wecombot_llm.conversation import Conversation
from wecombot_llm.decide import requires_outcome
from wecombot_llm.gate import GatePolicy, Verdict
from wecombot_llm.settings import ReplyPolicy
from wecombot_sender.errcodes import ErrorClass, classify, explain

__all__ = ["Console", "ConsoleConfig", "Hub"]

log = structlog.get_logger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
RETRY_AFTER_S = 5.0  # WeCom gives up on a callback after 5 s and posts it again
CALLBACK_TIMEOUT_S = 5.0  # …so the console waits for the gateway no longer than WeCom does
MAX_TEXT_CHARS = 20_000
MAX_FAIL_TIMES = 100
KEEPALIVE_S = 15.0
MAX_FOLDS = 1000  # the conversations whose llm fold the console keeps (least recent go)
# The log's last events a console shows at start, before the new ones: the data dir
# outlives `make run`, and a console showing only new events started empty after each.
# A bound, so reading them costs the same however long the log is.
HISTORY_EVENTS = 500
# A WeCom UserID: 1–64 letters, digits and _-@. starting with a letter or digit.
USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-@.]{0,63}")
EVENTS = ("enter_agent", "click", "subscribe", "unsubscribe")
# WeCom's limit on a menu item's key (创建菜单, path/90231: "不超过128字节").
MAX_MENU_KEY_BYTES = 128
# message/send errcodes offered by the page, in the order shown.
ERRCODES = (-1, 45009, 45033, 42001, 40014, 81013, 82001, 44004, 60020)
_WHAT_THE_SENDER_DOES = {
    ErrorClass.RETRYABLE: "the sender retries with backoff",
    ErrorClass.TOKEN: "the sender gets a new token and retries",
    ErrorClass.PERMANENT: "the reply fails for good (DeliveryFailed)",
}

Item = dict[str, Any]
# What a page opened (or reloaded) is sent before the new items: the hub's last items.
# Older ones are dropped; the event log keeps every event.
HUB_ITEMS = 5000


class Hub:
    """An ordered, bounded log of what the page shows. A client replays, then follows."""

    def __init__(self, maxlen: int = HUB_ITEMS) -> None:
        self._items: deque[Item] = deque(maxlen=maxlen)
        self._ids = itertools.count(1)
        self._followers: set[asyncio.Queue[Item | None]] = set()

    def publish(self, kind: str, data: dict[str, Any]) -> Item:
        item: Item = {"id": next(self._ids), "kind": kind, "at": time.time(), "data": data}
        self._items.append(item)
        for queue in self._followers:
            queue.put_nowait(item)
        return item

    def follow(self, after: int) -> tuple[list[Item], asyncio.Queue[Item | None]]:
        """Items after ``after``, and a queue of every later one (None: the hub closed)."""
        queue: asyncio.Queue[Item | None] = asyncio.Queue()
        self._followers.add(queue)
        return [item for item in self._items if item["id"] > after], queue

    def unfollow(self, queue: asyncio.Queue[Item | None]) -> None:
        self._followers.discard(queue)

    def close(self) -> None:
        for queue in self._followers:
            queue.put_nowait(None)


@dataclass
class _Fold:
    """The llm's fold of one conversation, as far as the console has read it."""

    conversation: Conversation
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)


@dataclass(frozen=True)
class ConsoleConfig:
    port: int  # 0: any free port
    callback_url: str  # the gateway's callback endpoint (what WeCom would POST to)
    ready_url: str  # the gateway's /readyz
    nats: NatsSettings
    app: str
    corp_id: str
    model: str  # what answers: "offline echo model" or "<model> at <host>"
    offline: bool
    host: str = "127.0.0.1"
    # The llm's gate (LLM_USER_RATE_PER_MINUTE, LLM_ALLOWED_USERS) and whether it has a
    # welcome (LLM_WELCOME_MESSAGE): what the llm's own fold needs to tell a message it
    # leaves unanswered (``silenced``).
    gate: GatePolicy = dataclasses.field(default_factory=lambda: ReplyPolicy().gate)
    welcome: bool = False


class Console:
    """The console server. ``await start()``, then ``url``; ``await stop()``."""

    def __init__(
        self, config: ConsoleConfig, builder: CallbackBuilder, wecom: SimulatedWeComApi
    ) -> None:
        self.config = config
        self.builder = builder
        self.wecom = wecom
        self.hub = Hub()
        self.port = config.port
        self.gateway = "starting"
        self.gateway_detail = ""  # the gateway's own reason when it is not ready
        self._folds: OrderedDict[ConversationRef, _Fold] = OrderedDict()  # the llm's, kept
        # The log's last seq when the console started: an event at or below it was
        # appended before (``history``), while the shown events are read.
        self._history_through = 0
        self._shown_through = 0  # the last seq shown: the page gets each event once
        # Of the events before the start: the messages whose outcome is not read yet (the
        # llm's fold is read for these alone, once all are read), and the outcomes'
        # texts, by event id, which their delivered parts are cut from.
        self._unanswered: dict[str, tuple[MessageReceived, int]] = {}
        self._outcome_texts: dict[str, str] = {}
        self._was_ready = False
        self._boot = secrets.token_hex(4)
        self._events = itertools.count(1)
        self._nc: NATS | None = None
        self._http: httpx.AsyncClient | None = None
        self._site: LocalSite | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}/"

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        # Only ever the gateway on this machine: never the environment's proxy (one
        # without NO_PROXY took every callback there, reported as the gateway unreachable).
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(CALLBACK_TIMEOUT_S), trust_env=False)
        self._nc = await bus.connect(self.config.nats, "wecombot-console", on_lost=self._lost)
        js = self._nc.jetstream()
        await bus.ensure_topology(js, self.config.nats)
        stored = (await js.stream_info(topology.CONVERSATION_STREAM)).state
        # The last HISTORY_EVENTS, then what comes: one consumer from one start seq, so
        # nothing appended meanwhile falls between the two, and nothing shows twice.
        first = max(stored.first_seq, 1)  # 0 in a stream never written to
        start = max(first, stored.last_seq - HISTORY_EVENTS + 1)
        self._history_through = stored.last_seq
        self._shown_through = start - 1
        self.hub.publish(
            "history",
            {"from_seq": start, "through_seq": stored.last_seq, "earlier": start - first},
        )
        # An ordered consumer: ephemeral, flow-controlled, re-created by the client on a
        # gap, so the page sees every event appended from ``start`` on, in stream order.
        await js.subscribe(
            topology.CONVERSATION_SUBJECTS,
            stream=topology.CONVERSATION_STREAM,
            ordered_consumer=True,
            config=ConsumerConfig(opt_start_seq=start),
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            cb=self._on_event,
        )
        self.wecom.observe_calls(self._on_api_call)
        self._spawn(self._pump_sent())
        self._spawn(self._watch_gateway())
        self._site = await LocalSite.start(
            self.app(), self.config.host, self.config.port, shutdown_timeout=1.0
        )
        self.port = self._site.port

    async def stop(self) -> None:
        self.hub.close()  # every open stream ends
        self.wecom.unobserve_calls(self._on_api_call)
        await cancel_until_done(*self._tasks)
        if self._site is not None:
            await self._site.stop()
        if self._nc is not None:  # closed as ours: not "closed for good" (nats.closed)
            await bus.close_quietly(self._nc, "wecombot-console")
        if self._http is not None:
            await self._http.aclose()

    def _lost(self, reason: str) -> None:
        """nats-py closed the console's client for good (an -ERR from the broker): the
        event log stops. Said on the page, where it only stopped moving."""
        self.hub.publish("nats", {"state": "lost", "reason": reason})

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=1024 * 1024)
        app.router.add_get("/", self._index)
        app.router.add_get("/api/stream", self._stream)
        app.router.add_post("/api/send", self._send)
        app.router.add_post("/api/event", self._event)
        app.router.add_post("/api/faults", self._faults)
        app.router.add_static("/static/", STATIC_DIR)
        return app

    # ------------------------------------------------------------ sources
    async def _on_event(self, msg: Msg) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        # nats-py re-creates an ordered consumer after its last seq, or at the log's start
        # when none was delivered yet: what was shown, or is older than shown, is not again.
        if seq <= self._shown_through:
            return
        self._shown_through = seq
        history = seq <= self._history_through
        data: dict[str, Any] = {
            "seq": seq,
            "subject": msg.subject,
            "appended_at": meta.timestamp.isoformat(),  # when JetStream stored it
            "history": history,  # appended before the console started
        }
        event = None
        try:
            event = decode_event(msg.data)
        except EventDecodeError as exc:
            data.update(type="Undecodable", error=str(exc))
        else:
            data.update(type=type(event).__name__, event=msgspec.to_builtins(event))
        self.hub.publish("event", data)
        if history:
            self._recall(event, seq)
            if seq >= self._history_through or meta.num_pending == 0:
                self._end_history()
            return
        if self._unanswered or self._outcome_texts:
            # The log's last seq at the start held nothing (deleted, a subject purged) and
            # this came before the last one shown: the events from before end here.
            self._end_history()
        if isinstance(event, MessageReceived):
            self._spawn(self._say_if_silenced(event, seq))

    def _recall(self, event: object, seq: int) -> None:
        """An event appended before the console started. The simulated WeCom's messages
        of that run are gone with its process: a part the log records as delivered is
        shown as ``sent`` with its text cut from its reply (None: the reply is older than
        the events shown). A message is told silenced once all are read, if its outcome
        was not among them (the others were answered: no read of their conversation)."""
        if isinstance(event, MessageReceived):
            self._unanswered[event.event_id] = (event, seq)
        elif isinstance(event, ReplyGenerated | ReplyFailed | ConversationReset):
            self._unanswered.pop(event.causation_id or "", None)
            self._outcome_texts[event.event_id] = event.text
        elif isinstance(event, PartDelivered):
            text = self._outcome_texts.get(event.reply_id)
            if text is not None and event.start is not None and event.end is not None:
                shown: str | None = text[event.start : event.end]
            else:
                shown = None  # cut by an older sender (no span), or from a reply not shown
            self.hub.publish(
                "sent",
                {
                    "user": event.conversation,
                    "text": shown,
                    "msgid": event.wecom_msgid,
                    "from_log": True,
                },
            )

    def _end_history(self) -> None:
        for received, seq in self._unanswered.values():
            self._spawn(self._say_if_silenced(received, seq))
        self._unanswered.clear()
        self._outcome_texts.clear()

    async def _say_if_silenced(self, received: MessageReceived, seq: int) -> None:
        """A ``silenced`` item when the llm will append nothing for ``received``: a user
        over the rate or not allowed, told so once already, or welcomed today (the page
        showed a reply coming for ever). The llm's verdict is its own fold's over the
        same log: its gate depends on the conversation's earlier events alone."""
        welcome = self.config.welcome

        def needs_outcome(message: MessageReceived) -> bool:
            return requires_outcome(message, welcome=welcome)

        if not needs_outcome(received) or self._nc is None:
            return
        ref = ConversationRef.of(received)
        # Kept between messages and caught up from where it stopped: read whole for each
        # message, a conversation kept in the data dir cost more every time. One reader
        # at a time: the fold skips what is at or below its last seq.
        fold = self._folds.pop(ref, None) or _Fold(
            Conversation(needs_outcome=needs_outcome, gate_policy=self.config.gate)
        )
        self._folds[ref] = fold
        while len(self._folds) > MAX_FOLDS:
            self._folds.popitem(last=False)
        async with fold.lock:
            conv = fold.conversation
            if seq > conv.last_seq:
                read = bus.read_conversation(
                    self._nc.jetstream(), ref, after_seq=conv.last_seq, reach=seq
                )
                try:
                    async for stored in read:
                        conv.apply(stored)
                        if stored.seq >= seq:
                            break
                except (TimeoutError, nats.errors.Error) as exc:  # the page keeps waiting
                    log.warning(
                        "console.conversation_unread", reason=f"{type(exc).__name__}: {exc}"
                    )
                    return
            silenced = conv.verdict(received.event_id) is Verdict.SILENT
        if not silenced:
            return
        gate = self.config.gate
        # as the fold tells them: a menu click that runs a command is the user asking
        welcomed = (
            isinstance(received.payload, WeComEventPayload)
            and menu_command(received.payload) is None
        )
        if not gate.allows(received.from_user):
            why = (
                "not in LLM_ALLOWED_USERS, whose events get nothing"
                if welcomed
                else "not in LLM_ALLOWED_USERS, and refused once already today"
            )
        elif welcomed:
            why = "welcomed once already today"
        else:
            why = (
                f"over LLM_USER_RATE_PER_MINUTE ({gate.rate_per_minute}), and told so "
                "once already this minute"
            )
        self.hub.publish(
            "silenced",
            {"user": received.conversation, "msg_id": received.correlation_id, "why": why},
        )

    async def _pump_sent(self) -> None:
        queue = self.wecom.subscribe()
        try:
            while True:
                msg: SentMessage = await queue.get()
                self.hub.publish(
                    "sent",
                    {
                        "user": msg.touser,
                        "text": msg.content,
                        "msgid": msg.msgid,
                        "truncated": msg.truncated,
                    },
                )
        finally:
            self.wecom.unsubscribe(queue)

    def _on_api_call(self, call: ApiCall) -> None:
        # What the page shows of the call; a field that does not apply is left out.
        data = {k: v for k, v in dataclasses.asdict(call).items() if v is not None}
        self.hub.publish("api", data)
        self.hub.publish("stats", self._stats())

    async def _watch_gateway(self) -> None:
        """Poll the gateway's /readyz so the page can say when callbacks will be stored."""
        assert self._http is not None
        while True:
            detail = ""
            try:
                response = await self._http.get(self.config.ready_url, timeout=2.0)
                if response.status_code == 200:
                    state = "ready"
                    self._was_ready = True
                elif self._was_ready:  # NATS away, say: the gateway answers 503 meanwhile
                    state, detail = "not ready", _readiness_detail(response)
                else:
                    state = "starting"
            except httpx.HTTPError:
                state = "down" if self._was_ready else "starting"
            if (state, detail) != (self.gateway, self.gateway_detail):
                self.gateway, self.gateway_detail = state, detail
                self.hub.publish("gateway", {"state": state, "detail": detail})
            await asyncio.sleep(0.25 if state != "ready" else 2.0)

    def _stats(self) -> dict[str, Any]:
        pending = Counter(self.wecom.faults.send)
        return {
            "gettoken_calls": self.wecom.gettoken_calls,
            "send_calls": self.wecom.send_calls,
            "delivered": len(self.wecom.sent),
            "pending_faults": [{"errcode": c, "times": n} for c, n in pending.items()],
        }

    def _hello(self) -> dict[str, Any]:
        return {
            "boot": self._boot,
            "mode": "sandbox",
            "app": self.config.app,
            "corp_id": self.config.corp_id,
            "model": self.config.model,
            "offline": self.config.offline,
            "callback_url": self.config.callback_url,
            "gateway": self.gateway,
            "gateway_detail": self.gateway_detail,
            "retry_after_s": RETRY_AFTER_S,
            "stats": self._stats(),
            "errcodes": [
                {
                    "errcode": code,
                    "reason": explain(code),
                    "then": _WHAT_THE_SENDER_DOES[classify(code)],
                }
                for code in ERRCODES
            ],
            "events": list(EVENTS),
        }

    # ------------------------------------------------------------ HTTP
    @web.middleware
    async def _guard(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        host = request.host.rsplit(":", 1)[0]
        if host not in ("127.0.0.1", "localhost", "[::1]"):
            return web.json_response({"error": "the console answers on localhost only"}, status=403)
        if request.method == "POST" and request.content_type != "application/json":
            return web.json_response({"error": "send JSON"}, status=415)
        return await handler(request)

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        try:
            after = int(request.headers.get("Last-Event-ID") or request.query.get("after") or 0)
        except ValueError:
            after = 0
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        backlog, queue = self.hub.follow(after)
        try:
            await response.write(_sse("hello", self._hello()))
            for item in backlog:
                await response.write(_sse_item(item))
            while True:
                try:
                    next_item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keepalive\n\n")
                    continue
                if next_item is None:
                    break
                await response.write(_sse_item(next_item))
        except (ConnectionError, RuntimeError):
            pass  # the page went away (aiohttp raises ClientConnectionResetError)
        finally:
            self.hub.unfollow(queue)
        return response

    async def _send(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        user = _user(body)
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise _bad("type something to send")
        if len(text) > MAX_TEXT_CHARS:
            raise _bad(f"keep it under {MAX_TEXT_CHARS} characters")
        callback = self.builder.text(user, text)
        return await self._deliver(callback, user, text, kind="text", retry=body.get("retry"))

    async def _event(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        user = _user(body)
        name = body.get("event")
        if name not in EVENTS:
            raise _bad(f"event must be one of {', '.join(EVENTS)}")
        key = body.get("key")
        if name == "click":
            if not isinstance(key, str) or not key.strip():
                raise _bad("a click names its menu item's key")
            if len(key.encode()) > MAX_MENU_KEY_BYTES:
                raise _bad(f"a menu item's key is at most {MAX_MENU_KEY_BYTES} bytes")
        elif key is not None:
            raise _bad("only a click (a menu item) has a key")
        # Stamped here: what tells this event from another to WeCom (the gateway keeps one
        # of two clicks in one second), so the page can tell which of its bubbles is stored.
        created = int(time.time())
        callback = self.builder.event(user, str(name), event_key=key, create_time=created)
        shown = f"{name} {key}" if key else str(name)
        identity = {"create_time": created, "event": name, "event_key": key}
        return await self._deliver(
            callback, user, shown, kind="event", retry=body.get("retry"), identity=identity
        )

    async def _deliver(
        self,
        callback: Callback,
        user: str,
        text: str,
        *,
        kind: str,
        retry: object,
        identity: dict[str, Any] | None = None,
    ) -> web.StreamResponse:
        key = callback.msg_id or f"event-{next(self._events)}"
        said = {"key": key, "msg_id": callback.msg_id, "user": user, "text": text, "kind": kind}
        self.hub.publish("said", {**said, **(identity or {})})
        answer = await self._post(callback, key, user, attempt=1)
        if retry is True:
            stored = answer["status"] == 200
            self._spawn(self._retry_later(callback, key, user, stored=stored))
        return web.json_response({"key": key, "msg_id": callback.msg_id, **answer})

    async def _retry_later(self, callback: Callback, key: str, user: str, *, stored: bool) -> None:
        await asyncio.sleep(RETRY_AFTER_S)
        await self._post(callback, key, user, attempt=2, stored=stored)

    async def _post(
        self, callback: Callback, key: str, user: str, *, attempt: int, stored: bool = False
    ) -> Item:
        """POST the callback as WeCom does, and publish the gateway's answer. ``stored``:
        an earlier attempt was answered 200, so this one's 200 is JetStream's duplicate
        (``dupe``); after a refused first try, the retry's 200 is the one stored."""
        assert self._http is not None
        started = time.monotonic()
        try:
            response = await self._http.post(
                self.config.callback_url,
                params=callback.query,
                content=callback.body,
                headers={"Content-Type": "text/xml"},
            )
            status, detail = response.status_code, response.text[:200]
        except httpx.TimeoutException:
            status, detail = 0, f"no answer within {CALLBACK_TIMEOUT_S:g} s: WeCom would retry"
        except httpx.HTTPError as exc:
            status, detail = 0, f"the gateway is unreachable ({type(exc).__name__})"
        answer: Item = {
            "key": key,
            "user": user,
            "attempt": attempt,
            "status": status,
            "detail": detail,
            "dupe": stored and status == 200,
            "ms": round((time.monotonic() - started) * 1000),
        }
        self.hub.publish("callback", answer)
        return answer

    async def _faults(self, request: web.Request) -> web.StreamResponse:
        body = await _json_object(request)
        action = body.get("action")
        if action == "expire_token":
            self.wecom.expire_tokens()
            text = "every access_token issued so far is now expired: message/send answers 42001"
        elif action == "fail_sends":
            errcode, times = body.get("errcode"), body.get("times", 1)
            if not isinstance(errcode, int) or isinstance(errcode, bool) or errcode == 0:
                raise _bad("errcode must be a non-zero number")
            if not isinstance(times, int) or not 1 <= times <= MAX_FAIL_TIMES:
                raise _bad(f"times must be between 1 and {MAX_FAIL_TIMES}")
            self.wecom.fail_sends(errcode, times=times)
            text = (
                f"the next {times} message/send call{'s' if times > 1 else ''} "
                f"fail{'' if times > 1 else 's'} with {explain(errcode)}"
            )
        elif action == "clear_faults":
            self.wecom.faults.send.clear()
            text = "message/send failures cleared"
        else:
            raise _bad("action must be expire_token, fail_sends or clear_faults")
        self.hub.publish("switch", {"action": action, "text": text})
        stats = self._stats()
        self.hub.publish("stats", stats)
        return web.json_response({"ok": True, "text": text, "stats": stats})


def _readiness_detail(response: httpx.Response) -> str:
    """The gateway's reason for not being ready (/readyz: {"status", "detail"})."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    return str(detail)[:200] if detail else f"/readyz answered HTTP {response.status_code}"


def _sse(event: str, data: dict[str, Any], item_id: int | None = None) -> bytes:
    lines = f"id: {item_id}\n" if item_id is not None else ""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str)
    return f"{lines}event: {event}\ndata: {payload}\n\n".encode()


def _sse_item(item: Item) -> bytes:
    return _sse("item", item, item["id"])


def _bad(reason: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(
        text=json.dumps({"error": reason}, ensure_ascii=False), content_type="application/json"
    )


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise _bad("the body must be JSON") from None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    try:  # JSON may escape a lone surrogate ("\ud800"), which UTF-8 cannot hold
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("the body holds a lone surrogate (\\ud800-\\udfff): not text") from None
    return body


def _user(body: dict[str, Any]) -> str:
    user = body.get("user")
    if not isinstance(user, str) or not USER_ID.fullmatch(user.strip()):
        raise _bad("a UserID is 1 to 64 letters, digits or _-@. and starts with a letter or digit")
    return user.strip()
