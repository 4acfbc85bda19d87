"""The console's backend without a browser: a real nats-server, the real gateway, the
simulated WeCom API; the page's stream read as Server-Sent Events over real HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
from aiohttp import web
from nats.js.manager import JetStreamManager
from structlog.testing import capture_logs

from tests.conftest import NatsHandle, free_port
from tests.fakes import received, reply_to
from tests.integration.wecom_app import AGENT, CORP, KEY, SECRET, TOKEN, running_gateway
from tests.waiting import until
from wecombot.console import Console, ConsoleConfig, server
from wecombot_common import bus, topology
from wecombot_common.embedded import EmbeddedNats
from wecombot_common.events import Event, PartDelivered, ReplyDelivered, ReplyGenerated
from wecombot_common.http import LocalSite
from wecombot_common.settings import EnvReader, NatsSettings
from wecombot_common.sim.callbacks import CallbackBuilder
from wecombot_common.sim.wecom_api import SimulatedWeComApi
from wecombot_llm.gate import GatePolicy

pytestmark = pytest.mark.integration


@pytest.fixture
async def console(nats_server: NatsHandle) -> AsyncIterator[Console]:
    async with running_console(nats_server) as console:
        yield console


@asynccontextmanager
async def running_console(
    nats_server: NatsHandle,
    *,
    proxy: str | None = None,
    gate: GatePolicy | None = None,
    welcome: bool = False,
) -> AsyncIterator[Console]:
    """``proxy``: the environment's HTTP proxy while the console starts (and builds its
    client), without NO_PROXY; the gateway and this test's own clients are not behind it.
    ``gate``: the llm's, as dev reads it (LLM_USER_RATE_PER_MINUTE, LLM_ALLOWED_USERS)."""
    async with (
        running_gateway(nats_server.url) as gateway,
        SimulatedWeComApi(corp_id=CORP, secret=SECRET, agent_id=AGENT) as wecom,
    ):
        config = ConsoleConfig(
            port=0,
            callback_url=f"{gateway}/wecom/callback",
            ready_url=f"{gateway}/readyz",
            nats=NatsSettings.read(EnvReader({"NATS_URL": nats_server.url})),
            app=f"{CORP}-{AGENT}",
            corp_id=CORP,
            model="offline echo model",
            offline=True,
        )
        if gate is not None:
            config = dataclasses.replace(config, gate=gate)
        config = dataclasses.replace(config, welcome=welcome)
        builder = CallbackBuilder(corp_id=CORP, agent_id=AGENT, token=TOKEN, encoding_aes_key=KEY)
        console = Console(config, builder, wecom)
        unset = {name: "" for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY")}
        proxies = {"http_proxy": proxy, "HTTP_PROXY": proxy, **unset} if proxy else {}
        with mock.patch.dict(os.environ, proxies):
            await console.start()
        try:
            yield console
        finally:
            await console.stop()


class Stream:
    """The page's view: items read from /api/stream as they come."""

    def __init__(self, response: httpx.Response) -> None:
        self.lines = response.aiter_lines()
        self.hello: dict[str, Any] | None = None
        self.items: list[dict[str, Any]] = []

    async def next(self) -> dict[str, Any]:
        event, data = "", ""
        async for line in self.lines:
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line == "" and data:
                if event == "hello":
                    self.hello = json.loads(data)
                    event, data = "", ""
                    continue
                item: dict[str, Any] = json.loads(data)
                self.items.append(item)
                return item
        raise AssertionError("the stream ended")

    async def until(self, kind: str, **match: Any) -> dict[str, Any]:
        async with asyncio.timeout(15):
            while True:
                item = await self.next()
                if item["kind"] == kind and all(item["data"].get(k) == v for k, v in match.items()):
                    return item


@pytest.fixture
async def stream(console: Console) -> AsyncIterator[Stream]:
    async with (
        httpx.AsyncClient(base_url=console.url.rstrip("/"), timeout=15) as http,
        http.stream("GET", "/api/stream") as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        yield Stream(response)


async def post(console: Console, path: str, body: object, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(base_url=console.url.rstrip("/"), timeout=15) as http:
        return await http.post(path, json=body, **kwargs)


async def test_a_message_is_posted_as_wecom_would_and_its_event_streamed(
    console: Console, stream: Stream
) -> None:
    answer = await post(console, "/api/send", {"user": "zhang.san", "text": "你好 hello"})
    assert answer.status_code == 200
    sent = answer.json()
    assert sent["status"] == 200
    said = await stream.until("said", key=sent["key"])
    assert said["data"]["text"] == "你好 hello"
    assert stream.hello is not None
    assert stream.hello["mode"] == "sandbox"
    assert stream.hello["offline"] is True
    assert 81013 in [e["errcode"] for e in stream.hello["errcodes"]]
    event = await stream.until("event", type="MessageReceived")
    stored = event["data"]["event"]
    assert stored["conversation"] == "zhang.san"
    assert stored["msg_id"] == sent["msg_id"]
    assert stored["payload"] == {"kind": "text", "content": "你好 hello"}
    assert event["data"]["subject"] == "wecombot.conv.wwdoctortest01-1000002.zhang~2Esan.in"
    assert event["data"]["seq"] == 1


async def test_a_menu_click_is_posted_with_its_items_key(console: Console, stream: Stream) -> None:
    """The page's menu: an event ``click`` with the item's key as EventKey, as WeCom sends
    a custom-menu click (the llm runs a key that is a command)."""
    answer = await post(console, "/api/event", {"user": "li.si", "event": "click", "key": "/help"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == 200
    said = await stream.until("said", key=answer.json()["key"])
    assert (said["data"]["kind"], said["data"]["text"]) == ("event", "click /help")
    event = await stream.until("event", type="MessageReceived")
    stored = event["data"]["event"]
    assert stored["conversation"] == "li.si"
    assert stored["payload"] == {
        "kind": "event",
        "event": "click",
        "event_key": "/help",
        "fields": {},
    }
    for body, said_back in (
        ({"user": "li.si", "event": "click"}, "a click names its menu item's key"),
        ({"user": "li.si", "event": "click", "key": "k" * 129}, "at most 128 bytes"),
        ({"user": "li.si", "event": "enter_agent", "key": "/help"}, "only a click"),
    ):
        refused = await post(console, "/api/event", body)
        assert refused.status_code == 400, body
        assert said_back in refused.text, refused.text


async def test_the_console_reaches_the_gateway_whatever_the_environment_proxy(
    nats_server: NatsHandle,
) -> None:
    """With HTTP_PROXY set and no NO_PROXY (a corporate laptop), every callback went to
    the proxy, which cannot reach this machine's gateway: 'the gateway is unreachable'."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with running_console(nats_server, proxy=dead) as console:
        answer = await post(console, "/api/send", {"user": "zhang.san", "text": "hi"})
    assert answer.status_code == 200
    assert answer.json()["status"] == 200, answer.json()


async def test_a_reconnecting_page_replays_after_its_last_item(
    console: Console, stream: Stream
) -> None:
    await post(console, "/api/send", {"user": "a", "text": "one"})
    first = await stream.until("callback")
    await post(console, "/api/send", {"user": "a", "text": "two"})
    await stream.until("callback", attempt=1, status=200)
    async with (
        httpx.AsyncClient(base_url=console.url.rstrip("/"), timeout=15) as http,
        http.stream("GET", "/api/stream", headers={"Last-Event-ID": str(first["id"])}) as response,
    ):
        again = Stream(response)
        replayed = await again.next()
        # The backlog from exactly after it (a page given only live items would have
        # missed "two" and what followed).
        assert replayed["id"] == first["id"] + 1


@pytest.mark.parametrize("first", [200, 503])
async def test_a_retry_is_said_as_kept_once_only_after_a_stored_first_try(
    console: Console, stream: Stream, first: int
) -> None:
    """WeCom's retry of a callback whose first try was refused (503: the log was away) is
    the one stored; the page said "same MsgId: JetStream kept one" of it whenever its
    event came before the retry's answer, as it does (the gateway answers after the
    PubAck). A front on the gateway's port answers the first POST ``first`` itself when
    that is 503."""
    gateway = console.config.callback_url
    posts = 0

    async def front(request: web.Request) -> web.Response:
        nonlocal posts
        posts += 1
        if posts == 1 and first == 503:
            return web.Response(status=503, text="the event log is not available")
        async with httpx.AsyncClient() as http:
            answer = await http.post(
                gateway, params=dict(request.query), content=await request.read()
            )
        return web.Response(status=answer.status_code, body=answer.content)

    app = web.Application()
    app.router.add_post("/wecom/callback", front)
    site = await LocalSite.start(app, "127.0.0.1", 0)
    console.config = dataclasses.replace(
        console.config, callback_url=f"http://127.0.0.1:{site.port}/wecom/callback"
    )
    try:
        with mock.patch.object(server, "RETRY_AFTER_S", 0.0):
            sent = await post(console, "/api/send", {"user": "a", "text": "twice", "retry": True})
            assert sent.json()["status"] == first
            retry = await stream.until("callback", attempt=2)
        # Stored once either way: the marker's event comes after any second one would.
        marker = (await post(console, "/api/send", {"user": "a", "text": "marker"})).json()
    finally:
        await site.stop()
    assert retry["data"]["status"] == 200
    assert retry["data"]["dupe"] is (first == 200)

    def received() -> list[str]:
        return [
            item["data"]["event"]["msg_id"]
            for item in stream.items
            if item["kind"] == "event" and item["data"]["type"] == "MessageReceived"
        ]

    while marker["msg_id"] not in received():
        await stream.until("event", type="MessageReceived")
    assert received() == [sent.json()["msg_id"], marker["msg_id"]]


async def test_switches_drive_the_simulated_wecom_api(console: Console, stream: Stream) -> None:
    answer = await post(
        console, "/api/faults", {"action": "fail_sends", "errcode": 45009, "times": 3}
    )
    assert answer.status_code == 200
    assert list(console.wecom.faults.send) == [45009, 45009, 45009]
    stats = await stream.until("stats")
    assert stats["data"]["pending_faults"] == [{"errcode": 45009, "times": 3}]
    await post(console, "/api/faults", {"action": "clear_faults"})
    assert not console.wecom.faults.send
    await post(console, "/api/faults", {"action": "expire_token"})
    switch = await stream.until("switch", action="expire_token")
    assert "42001" in switch["data"]["text"]
    refused = await post(console, "/api/faults", {"action": "fail_sends", "errcode": 0})
    assert refused.status_code == 400


async def test_each_api_call_is_shown_with_whether_a_fault_was_injected(
    console: Console, stream: Stream
) -> None:
    """A call answered while an injected one passes is not marked injected (the two
    interleave: a gettoken held inside WeCom while a send gets the scripted errcode)."""
    wecom = console.wecom
    gettoken = {"corpid": CORP, "corpsecret": SECRET}
    async with httpx.AsyncClient(base_url=wecom.base_url, timeout=15) as http:
        token = (await http.get("/cgi-bin/gettoken", params=gettoken)).json()["access_token"]
        await stream.until("api", api="gettoken", errcode=0)
        hold = wecom.hold_gettoken()
        held = asyncio.create_task(http.get("/cgi-bin/gettoken", params=gettoken))
        await hold.wait_held()
        wecom.fail_sends(45009)
        body = {
            "touser": "zhang.san",
            "agentid": AGENT,
            "msgtype": "text",
            "text": {"content": "x"},
        }
        refused = await http.post(
            "/cgi-bin/message/send", params={"access_token": token}, json=body
        )
        assert refused.json()["errcode"] == 45009
        send = await stream.until("api", api="message/send")
        assert send["data"] == {
            "api": "message/send",
            "http": 200,
            "injected": True,
            "errcode": 45009,
            "errmsg": "reach max api daily quota limit",
            "touser": "zhang.san",
        }
        hold.release()
        assert (await held).json()["errcode"] == 0
        later = await stream.until("api", api="gettoken")
    assert later["data"]["injected"] is False
    assert later["data"]["errcode"] == 0 and later["data"]["expires_in"] == 7200
    assert token not in json.dumps(stream.items) and SECRET not in json.dumps(stream.items)


async def test_the_console_refuses_what_a_page_elsewhere_could_send(console: Console) -> None:
    foreign = await post(
        console, "/api/send", {"user": "u", "text": "x"}, headers={"Host": "evil.example:80"}
    )
    assert foreign.status_code == 403
    async with httpx.AsyncClient(base_url=console.url.rstrip("/")) as http:
        form = await http.post("/api/send", data={"user": "u", "text": "x"})
    assert form.status_code == 415
    bad_user = await post(console, "/api/send", {"user": ".dot-first", "text": "x"})
    assert bad_user.status_code == 400
    assert "UserID" in bad_user.json()["error"]
    empty = await post(console, "/api/send", {"user": "u", "text": "  "})
    assert empty.status_code == 400
    # JSON may escape a lone surrogate, which no UTF-8 (and no WeCom message) can hold:
    # a bare 500 when the callback was built from it
    async with httpx.AsyncClient(base_url=console.url.rstrip("/")) as http:
        lone = await http.post(
            "/api/send",
            content=b'{"user": "u", "text": "\\ud800 hi"}',
            headers={"Content-Type": "application/json"},
        )
    assert lone.status_code == 400, lone.text
    assert "surrogate" in lone.json()["error"]


async def test_the_page_is_served_without_external_assets(console: Console) -> None:
    async with httpx.AsyncClient(base_url=console.url.rstrip("/")) as http:
        page = await http.get("/")
        script = await http.get("/static/console.js")
        style = await http.get("/static/console.css")
    assert page.status_code == script.status_code == style.status_code == 200
    for text in (page.text, script.text, style.text):
        assert "https://" not in text and "http://" not in text


@pytest.mark.parametrize(
    ("gate", "silent", "why"),
    [
        (
            GatePolicy(rate_per_minute=1),
            [2],  # the first is answered, the second gets the notice
            "over LLM_USER_RATE_PER_MINUTE (1), and told so once already this minute",
        ),
        (
            GatePolicy(allowed_users=frozenset({"boss"})),
            [1, 2],  # the first gets the refusal
            "not in LLM_ALLOWED_USERS, and refused once already today",
        ),
    ],
    ids=["over-the-rate", "not-allowed"],
)
async def test_a_message_the_llm_leaves_unanswered_is_said(
    nats_server: NatsHandle, gate: GatePolicy, silent: list[int], why: str
) -> None:
    """The llm appends nothing for a message its gate silences (the user was told once):
    the page showed a reply coming for ever. What gets the llm's notice is not said."""
    async with (
        running_console(nats_server, gate=gate) as console,
        httpx.AsyncClient(base_url=console.url.rstrip("/"), timeout=15) as http,
        http.stream("GET", "/api/stream") as response,
    ):
        stream = Stream(response)
        msg_ids = []
        for text in ("一", "二", "三"):
            sent = await post(console, "/api/send", {"user": "li.si", "text": text})
            msg_ids.append(sent.json()["msg_id"])
            await stream.until("event", type="MessageReceived")
        async with asyncio.timeout(15):
            while len(said := [i for i in stream.items if i["kind"] == "silenced"]) < len(silent):
                await stream.next()
        assert [s["data"] for s in said] == [
            {"user": "li.si", "msg_id": msg_ids[i], "why": why} for i in silent
        ]


async def test_the_gateway_not_ready_is_said_with_its_reason(
    nats_server: NatsHandle, console: Console, stream: Stream
) -> None:
    """NATS away, the badge said "gateway starting…" and nothing of NATS."""
    await stream.until("gateway", state="ready")
    nats_server.stop()
    try:
        away = await stream.until("gateway", state="not ready")
        assert away["data"]["detail"] == "NATS is not connected"
    finally:
        nats_server.start()
    await stream.until("gateway", state="ready", detail="")


async def test_the_consoles_nats_client_closed_for_good_is_said(tmp_path: Path) -> None:
    """nats-py closes a client for good on an -ERR from the broker: the event log just
    stopped moving, with 'gateway ready' still showing. Here its payload limit is lowered
    by a reload, as an operator may, and the console's client sends past it."""
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 1MB\n", encoding="utf-8")
    broker = EmbeddedNats(tmp_path / "nats", config_file=conf, log_file=tmp_path / "nats.log")
    broker.start()
    try:
        async with running_console(NatsHandle(broker, broker.url)) as console:
            conf.write_text("max_payload: 1KB\n", encoding="utf-8")
            assert broker.process is not None and broker.log_file is not None
            log = broker.log_file
            broker.process.send_signal(signal.SIGHUP)
            await until(
                lambda: "Reloaded: max_payload = 1024" in log.read_text(encoding="utf-8"),
                timeout=10,
                what="the broker to reload its configuration",
            )
            assert console._nc is not None
            await console._nc.publish("wecombot.nowhere", b"x" * 2048)  # the -ERR
            async with (
                httpx.AsyncClient(base_url=console.url.rstrip("/"), timeout=15) as http,
                http.stream("GET", "/api/stream") as response,
            ):
                lost = await Stream(response).until("nats", state="lost")
            assert "closed for good" in lost["data"]["reason"], lost
    finally:
        broker.stop()


async def test_a_console_stopping_logs_no_error(nats_server: NatsHandle) -> None:
    """Its own close of its NATS client, as dev stops, was logged as the client closed
    for good: ``[error] nats.closed … closed by nats-py`` at every Ctrl-C."""
    with capture_logs() as logs:
        async with running_console(nats_server):
            pass
    assert [e for e in logs if e["log_level"] in ("error", "warning")] == []


async def test_a_menu_command_over_the_rate_is_said_as_over_the_rate(
    nats_server: NatsHandle,
) -> None:
    """A menu click whose key is a command is the user asking, counted against the rate
    (not welcomed once a day): one silenced over the rate was said as "welcomed once
    already today"."""
    async with (
        running_console(nats_server, gate=GatePolicy(rate_per_minute=1)) as console,
        httpx.AsyncClient(base_url=console.url.rstrip("/"), timeout=15) as http,
        http.stream("GET", "/api/stream") as response,
    ):
        stream = Stream(response)
        await post(console, "/api/send", {"user": "li.si", "text": "一"})  # answered
        for key in ("/help", "/reset"):  # the notice, then nothing
            sent = await post(
                console, "/api/event", {"user": "li.si", "event": "click", "key": key}
            )
            assert sent.status_code == 200, sent.text
        said = await stream.until("silenced")
        assert said["data"]["why"] == (
            "over LLM_USER_RATE_PER_MINUTE (1), and told so once already this minute"
        )


async def test_a_second_welcome_the_same_day_is_said_as_welcomed(
    nats_server: NatsHandle,
) -> None:
    """With LLM_WELCOME_MESSAGE, the llm welcomes a user once a day: a second
    enter_agent gets nothing, said as such (not as over the rate)."""
    async with (
        running_console(nats_server, welcome=True) as console,
        httpx.AsyncClient(base_url=console.url.rstrip("/"), timeout=15) as http,
        http.stream("GET", "/api/stream") as response,
    ):
        stream = Stream(response)
        for _ in range(2):
            # a second apart: WeCom's event retries are told by user and CreateTime
            await asyncio.sleep(1.1)
            sent = await post(console, "/api/event", {"user": "li.si", "event": "enter_agent"})
            assert sent.status_code == 200, sent.text
            await stream.until("event", type="MessageReceived")
        said = await stream.until("silenced")
        assert said["data"]["why"] == "welcomed once already today"


async def test_the_folds_are_kept_between_messages_the_least_recent_let_go(
    nats_server: NatsHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read whole for each message, a conversation kept in the data dir cost more every
    time: a user's fold goes on from where it stopped, until other users' push it out."""
    monkeypatch.setattr(server, "MAX_FOLDS", 1)
    reads = _recording_reads(monkeypatch)
    async with running_console(nats_server) as console:
        for n, user in enumerate(["li.si", "li.si", "wang.wu", "li.si"], start=1):
            await post(console, "/api/send", {"user": user, "text": str(n)})
            await until(lambda n=n: len(reads) == n, timeout=10, what=f"fold read {n}")
    assert [user for user, _ in reads] == ["li.si", "li.si", "wang.wu", "li.si"]
    assert reads[0][1] == 0 and reads[1][1] > 0  # kept, and gone on from there
    assert (reads[2][1], reads[3][1]) == (0, 0)  # li.si's let go for wang.wu's


async def logged(nats_server: NatsHandle, *events: Event) -> list[int]:
    """``events`` appended to the log, as an earlier run of the sandbox left them: their
    stream sequences."""
    settings = NatsSettings.read(EnvReader({"NATS_URL": nats_server.url}))
    nc = await bus.connect(settings, "test")
    try:
        js = nc.jetstream()
        await bus.ensure_topology(js, settings)
        return [(await bus.append_event(js, event)).seq for event in events]
    finally:
        await nc.close()


@asynccontextmanager
async def streamed(console: Console) -> AsyncIterator[Stream]:
    async with (
        httpx.AsyncClient(base_url=console.url.rstrip("/"), timeout=15) as http,
        http.stream("GET", "/api/stream") as response,
    ):
        yield Stream(response)


def part(reply: ReplyGenerated, index: int, total: int, start: int, end: int) -> PartDelivered:
    return PartDelivered(
        app=reply.app,
        conversation=reply.conversation,
        correlation_id=reply.correlation_id,
        causation_id=reply.event_id,
        reply_id=reply.event_id,
        index=index,
        total=total,
        wecom_msgid=f"sim-{reply.event_id[:6]}-{index}",
        start=start,
        end=end,
    )


async def test_a_console_started_on_a_kept_log_shows_its_last_events_then_follows_it(
    nats_server: NatsHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data dir outlives ``make run``: a console following only new events started
    empty, the conversation still in the log. The last HISTORY_EVENTS are shown, however
    long the log, then each new event once, with none between left out."""
    monkeypatch.setattr(server, "HISTORY_EVENTS", 4, raising=False)
    seqs = await logged(nats_server, *(received(str(n), user="li.si") for n in range(10)))
    async with running_console(nats_server) as console, streamed(console) as stream:
        history = await stream.until("history")
        assert history["data"] == {"from_seq": 7, "through_seq": 10, "earlier": 6}
        shown = [(await stream.until("event"))["data"] for _ in range(4)]
        assert [e["seq"] for e in shown] == seqs[-4:]
        assert [e["event"]["payload"]["content"] for e in shown] == ["6", "7", "8", "9"]
        assert all(e["history"] for e in shown)
        [later] = await logged(nats_server, received("10", user="li.si"))
        live = (await stream.until("event"))["data"]
        assert (live["seq"], live["history"]) == (later, False)  # next: nothing twice
    assert later == seqs[-1] + 1


async def test_a_console_started_on_an_empty_log_shows_what_comes(
    nats_server: NatsHandle,
) -> None:
    async with running_console(nats_server) as console, streamed(console) as stream:
        history = await stream.until("history")
        assert history["data"] == {"from_seq": 1, "through_seq": 0, "earlier": 0}
        [seq] = await logged(nats_server, received("一", user="li.si"))
        event = (await stream.until("event"))["data"]
        assert (event["seq"], event["history"]) == (seq, False)


async def test_replies_delivered_before_the_console_started_are_told_from_the_log(
    nats_server: NatsHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulated WeCom keeps what it accepted in memory: after a restart the page
    showed the user's messages and no reply. Each part the log records as delivered is
    shown with its text from the reply it was cut from, or said to be unknown when that
    reply is older than the events shown."""
    monkeypatch.setattr(server, "HISTORY_EVENTS", 6, raising=False)
    old = received("很早以前", user="li.si")
    old_reply = reply_to(old, "早")
    asked = received("你好", user="li.si")
    reply = reply_to(asked, "第一段。second part")
    delivered = ReplyDelivered(
        app=reply.app,
        conversation=reply.conversation,
        correlation_id=reply.correlation_id,
        causation_id=reply.event_id,
        reply_id=reply.event_id,
        parts=2,
        wecom_msgids=[part(reply, 0, 2, 0, 4).wecom_msgid, part(reply, 1, 2, 4, 15).wecom_msgid],
    )
    await logged(
        nats_server,
        old,
        old_reply,  # seq 2: before the 6 shown
        asked,
        reply,
        part(old_reply, 0, 1, 0, 1),
        part(reply, 0, 2, 0, 4),
        part(reply, 1, 2, 4, 15),
        delivered,
    )
    async with running_console(nats_server) as console, streamed(console) as stream:
        await stream.until("event", seq=8)
        sent = [i["data"] for i in stream.items if i["kind"] == "sent"]
    assert sent == [
        {
            "user": "li.si",
            "text": None,
            "msgid": part(old_reply, 0, 1, 0, 1).wecom_msgid,
            "from_log": True,
        },
        {"user": "li.si", "text": "第一段。", "msgid": delivered.wecom_msgids[0], "from_log": True},
        {
            "user": "li.si",
            "text": "second part",
            "msgid": delivered.wecom_msgids[1],
            "from_log": True,
        },
    ]


async def test_a_message_left_unanswered_before_the_console_started_is_said(
    nats_server: NatsHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replayed, a message the llm's gate silenced showed a reply coming for ever. Only
    a message whose outcome is not in the events shown costs a read of its conversation
    (the others were answered): one read here, not three."""
    reads = _recording_reads(monkeypatch)
    first, second, third = (received(text, user="li.si") for text in ("一", "二", "三"))
    await logged(
        nats_server,
        first,
        reply_to(first, "一"),
        second,
        reply_to(second, "你发送得有点快", kind="notice"),  # the first one over the rate
        third,  # over it again: the llm appends nothing
    )
    gate = GatePolicy(rate_per_minute=1)
    async with (
        running_console(nats_server, gate=gate) as console,
        streamed(console) as stream,
    ):
        said = await stream.until("silenced")
        assert said["data"] == {
            "user": "li.si",
            "msg_id": third.correlation_id,
            "why": "over LLM_USER_RATE_PER_MINUTE (1), and told so once already this minute",
        }
    assert reads == [("li.si", 0)]


async def test_the_events_before_the_start_end_when_the_logs_last_one_is_gone(
    nats_server: NatsHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The events from before the start ended at the log's last seq, or at one with
    nothing after it. The last seq had been deleted (``nats stream rmm``, a subject
    purged) and an event came before the last one shown: they never ended, and a message
    the llm left unanswered then kept its '…' for ever."""
    first, second, third = (received(text, user="li.si") for text in ("一", "二", "三"))
    *_, gone = await logged(
        nats_server,
        first,
        reply_to(first, "一"),
        second,
        reply_to(second, "你发送得有点快", kind="notice"),
        third,  # over the rate again: the llm appends nothing
        received("删", user="zhou"),  # deleted: the log's last seq holds nothing
    )
    settings = NatsSettings.read(EnvReader({"NATS_URL": nats_server.url}))
    nc = await bus.connect(settings, "test")
    try:
        assert await nc.jetstream().delete_msg(topology.CONVERSATION_STREAM, gone)
    finally:
        await nc.close()
    stream_info = JetStreamManager.stream_info
    appended: list[int] = []

    async def then_a_new_event(self: JetStreamManager, *args: Any, **kwargs: Any) -> Any:
        info = await stream_info(self, *args, **kwargs)
        if sys._getframe(1).f_code is Console.start.__code__ and not appended:
            # the console read how far the log goes: an event comes before it reads on
            appended.extend(await logged(nats_server, received("新", user="wang.wu")))
        return info

    monkeypatch.setattr(JetStreamManager, "stream_info", then_a_new_event)
    gate = GatePolicy(rate_per_minute=1)
    async with (
        running_console(nats_server, gate=gate) as console,
        streamed(console) as stream,
    ):
        said = await stream.until("silenced")
        assert said["data"]["msg_id"] == third.correlation_id
        events = [i["data"] for i in stream.items if i["kind"] == "event"]
        assert [(e["seq"], e["history"]) for e in events] == [
            (1, True), (2, True), (3, True), (4, True), (5, True), (appended[0], False)
        ]  # fmt: skip


def _recording_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Where each of the console's conversation reads starts (the user, after which seq);
    the reads themselves still go to the real nats-server."""
    reads: list[tuple[str, int]] = []
    read_conversation = bus.read_conversation

    def recorded(js: Any, ref: Any, *, after_seq: int = 0, **kwargs: Any) -> Any:
        reads.append((ref.user, after_seq))
        return read_conversation(js, ref, after_seq=after_seq, **kwargs)

    monkeypatch.setattr(bus, "read_conversation", recorded)
    return reads
