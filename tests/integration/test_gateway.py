"""The gateway over real HTTP (loopback) against a real nats-server.

Callbacks are built with the real crypto (a fresh key per run, current timestamps) or
taken from the official vectors; stored events are read back from the stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import gzip
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode
from xml.sax.saxutils import escape

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from Crypto.Cipher import AES
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client import REGISTRY
from structlog.testing import capture_logs
from yarl import URL

from tests.conftest import NatsHandle, free_port
from tests.waiting import until
from wecombot_common import bus, topology
from wecombot_common.bus import Appended, AppendUnavailable
from wecombot_common.crypto import WeComCrypto, generate_encoding_aes_key, generate_token
from wecombot_common.errors import ConfigError
from wecombot_common.events import (
    ImagePayload,
    LinkPayload,
    LocationPayload,
    MessageReceived,
    TextPayload,
    UnknownPayload,
    VideoPayload,
    VoicePayload,
    WeComEventPayload,
    decode_event,
)
from wecombot_gateway.app import MAX_HEADERS, create_app, runner_options, stop_keeping_alive
from wecombot_gateway.main import run_gateway
from wecombot_gateway.parse import parse_message
from wecombot_gateway.publisher import JetStreamPublisher, Publisher
from wecombot_gateway.readiness import jetstream_ready
from wecombot_gateway.settings import GatewaySettings

pytestmark = pytest.mark.integration


_VECTORS = json.loads(
    (Path(__file__).parent.parent / "data" / "wecom_vectors.json").read_text(encoding="utf-8")
)
VECTOR_SETS: list[dict[str, Any]] = [_VECTORS, *_VECTORS["additional_sets"]]
VECTOR_AGENT = {"A_official_doc_90968": 218, "B_sbzhu_sample_pre2025": 1000002}

CORP = "wwgatewaytest01"
AGENT = 1000002
APP = f"{CORP}-{AGENT}"
TOKEN = generate_token()
KEY = generate_encoding_aes_key()
PATH = "/wecom/callback"
SMALL_BODY_LIMIT = 4096


# ---------------------------------------------------------------- building callbacks


def message_xml(fields: Mapping[str, str | int], *, to: str = CORP) -> bytes:
    """A decrypted WeCom message as WeCom writes it (CDATA for strings)."""
    parts = [f"<ToUserName><![CDATA[{to}]]></ToUserName>"]
    for name, value in fields.items():
        text = str(value) if isinstance(value, int) else f"<![CDATA[{value}]]>"
        parts.append(f"<{name}>{text}</{name}>")
    return ("<xml>" + "".join(parts) + "</xml>").encode()


def text_message(msg_id: str, *, user: str = "zhang.san", content: str = "你好") -> bytes:
    return message_xml(
        {
            "FromUserName": user,
            "CreateTime": int(time.time()),
            "MsgType": "text",
            "Content": content,
            "MsgId": msg_id,
            "AgentID": AGENT,
        }
    )


def envelope(encrypt: str) -> bytes:
    return (
        f"<xml><ToUserName><![CDATA[{CORP}]]></ToUserName>"
        f"<Encrypt><![CDATA[{escape(encrypt)}]]></Encrypt>"
        f"<AgentID><![CDATA[{AGENT}]]></AgentID></xml>"
    ).encode()


@dataclass
class Call:
    """One HTTP request to the callback path."""

    method: str = "POST"
    params: list[tuple[str, str]] = field(default_factory=list)
    body: Any = None
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "text/xml"})
    path: str | None = None  # the callback path unless given


def signed(
    encrypt: str,
    *,
    crypto: WeComCrypto | None = None,
    timestamp: int | None = None,
    nonce: str = "1372623149",
) -> list[tuple[str, str]]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    sig = (crypto or CRYPTO).signature(ts, nonce, encrypt)
    return [("msg_signature", sig), ("timestamp", ts), ("nonce", nonce)]


def post(plaintext: bytes, *, crypto: WeComCrypto | None = None, **kw: Any) -> Call:
    encrypt = (crypto or CRYPTO).encrypt(plaintext)
    return Call(params=signed(encrypt, **kw), body=envelope(encrypt))


CRYPTO = WeComCrypto(TOKEN, KEY, CORP)


# ---------------------------------------------------------------- the gateway under test


def gateway_settings(nats_url: str, **overrides: str) -> GatewaySettings:
    env = {
        "WECOM_CORP_ID": CORP,
        "WECOM_AGENT_ID": str(AGENT),
        "WECOM_TOKEN": TOKEN,
        "WECOM_ENCODING_AES_KEY": KEY,
        "NATS_URL": nats_url,
        "GATEWAY_PUBLISH_TIMEOUT": "0.5",
        **overrides,
    }
    return GatewaySettings.from_env(env)


@dataclass
class Gateway:
    client: TestClient[Any, Any]
    settings: GatewaySettings
    js: JetStreamContext

    async def send(self, call: Call) -> aiohttp.ClientResponse:
        return await self.client.request(
            call.method,
            call.path or self.settings.callback_path,
            params=call.params,
            data=call.body,
            headers=call.headers,
        )

    async def get_raw(self, raw_query: str) -> aiohttp.ClientResponse:
        """GET with the query exactly as WeCom sends it (no re-encoding by the client)."""
        base = str(self.client.make_url(self.settings.callback_path))
        return await self.client.session.get(URL(f"{base}?{raw_query}", encoded=True))

    async def stored(self) -> list[tuple[MessageReceived, str, str]]:
        """Every event in the stream with its subject and Nats-Msg-Id, in order."""
        info = await self.js.stream_info(topology.CONVERSATION_STREAM)
        out: list[tuple[MessageReceived, str, str]] = []
        if not info.state.messages:
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            raw = await self.js.get_msg(topology.CONVERSATION_STREAM, seq)
            event = decode_event(raw.data or b"")
            assert isinstance(event, MessageReceived)
            out.append((event, raw.subject or "", (raw.headers or {}).get("Nats-Msg-Id", "")))
        return out

    async def events(self) -> list[MessageReceived]:
        return [event for event, _, _ in await self.stored()]


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway(nats_server: NatsHandle, js: JetStreamContext) -> AsyncIterator[MakeGateway]:
    """Build gateways (own NATS connection each, like the real process) on loopback."""
    async with AsyncExitStack() as stack:

        async def make(publisher: Publisher | None = None, **env: str) -> Gateway:
            settings = gateway_settings(nats_server.url, **env)
            gw_nc: NATS = await bus.connect(settings.nats, "wecombot-gateway-test")
            stack.push_async_callback(gw_nc.close)
            gw_js = gw_nc.jetstream()
            await bus.ensure_topology(gw_js, settings.nats)
            if publisher is None:
                appender = await bus.PipelinedAppender.start(gw_nc)
                publisher = JetStreamPublisher(appender, timeout_s=settings.publish_timeout_s)
            app = create_app(
                settings,
                publisher,
                ready=jetstream_ready(gw_nc, gw_js),
            )
            server = TestServer(app, host="127.0.0.1")
            await server.start_server(**runner_options(settings))  # served as main.py serves it
            client: TestClient[Any, Any] = TestClient(server)
            await client.start_server()
            stack.push_async_callback(client.close)
            return Gateway(client=client, settings=settings, js=js)

        yield make


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> Gateway:
    return await make_gateway()


def rejections(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["event"] == "callback.rejected"]


# ---------------------------------------------------------------- official vectors


@pytest.mark.parametrize("vectors", VECTOR_SETS, ids=[s["name"] for s in VECTOR_SETS])
async def test_official_url_verification_answers_the_exact_plaintext(
    make_gateway: MakeGateway, vectors: dict[str, Any]
) -> None:
    gw = await make_gateway(
        WECOM_CORP_ID=vectors["corp_id"],
        WECOM_AGENT_ID=str(VECTOR_AGENT[vectors["name"]]),
        WECOM_TOKEN=vectors["token"],
        WECOM_ENCODING_AES_KEY=vectors["encoding_aes_key"],
        GATEWAY_TIMESTAMP_WINDOW="0",
    )
    case = next(c for c in vectors["cases"] if c["kind"] == "verify_url")
    encoded = case.get("echostr_as_sent_urlencoded") or quote(case["encrypt"], safe="")
    # As WeCom sends it (percent-encoded), and with a raw '+' (decoded to ' ' by the query
    # parser; the gateway maps it back).
    for echostr in (encoded, case["encrypt"].replace("/", "%2F").replace("=", "%3D")):
        query = f"msg_signature={case['signature']}&timestamp={case['timestamp']}"
        query += f"&nonce={case['nonce']}&echostr={echostr}"
        resp = await gw.get_raw(query)
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        assert await resp.read() == case["expected_plaintext"].encode()


@pytest.mark.parametrize("vectors", VECTOR_SETS, ids=[s["name"] for s in VECTOR_SETS])
async def test_official_post_is_stored_once_with_its_fields(
    make_gateway: MakeGateway, vectors: dict[str, Any]
) -> None:
    agent = VECTOR_AGENT[vectors["name"]]
    gw = await make_gateway(
        WECOM_CORP_ID=vectors["corp_id"],
        WECOM_AGENT_ID=str(agent),
        WECOM_TOKEN=vectors["token"],
        WECOM_ENCODING_AES_KEY=vectors["encoding_aes_key"],
        GATEWAY_TIMESTAMP_WINDOW="0",
    )
    case = next(c for c in vectors["cases"] if c["kind"] == "post_xml")
    params = [("msg_signature", case["signature"]), ("timestamp", case["timestamp"])]
    params.append(("nonce", case["nonce"]))
    resp = await gw.send(Call(params=params, body=case["request_body_example"].encode()))
    assert resp.status == 200
    assert await resp.read() == b""

    [(event, subject, msg_id)] = await gw.stored()
    app = f"{vectors['corp_id']}-{agent}"
    plain = case["expected_plaintext"]
    expected_msg_id = plain.split("<MsgId>")[1].split("</MsgId>")[0]
    expected_user = "mycreate" if "mycreate" in plain else "ChenJiaShun"
    assert event.app == app
    assert event.conversation == event.from_user == expected_user
    assert event.to_user == vectors["corp_id"]
    assert event.msg_type == "text"
    assert event.msg_id == event.correlation_id == expected_msg_id
    assert event.create_time == int(case["timestamp"])
    assert event.payload == TextPayload(content="hello" if "hello" in plain else "你好")
    assert msg_id == f"{app}:{expected_msg_id}"
    assert subject == f"wecombot.conv.{app}.{expected_user}.in"


# ---------------------------------------------------------------- every message type

NOW = int(time.time())
USER = "li.si@corp"
EVERY_TYPE: list[tuple[dict[str, str | int], object]] = [
    (
        {"MsgType": "text", "Content": "<b>hi</b> & bye", "MsgId": "101"},
        TextPayload(content="<b>hi</b> & bye"),
    ),
    (
        {
            "MsgType": "image",
            "PicUrl": "https://p.example/1.jpg",
            "MediaId": "m-img",
            "MsgId": "102",
        },
        ImagePayload(pic_url="https://p.example/1.jpg", media_id="m-img"),
    ),
    (
        {"MsgType": "voice", "MediaId": "m-voice", "Format": "amr", "MsgId": "103"},
        VoicePayload(media_id="m-voice", format="amr"),
    ),
    (
        {"MsgType": "video", "MediaId": "m-video", "ThumbMediaId": "m-thumb", "MsgId": "104"},
        VideoPayload(media_id="m-video", thumb_media_id="m-thumb"),
    ),
    (
        {
            "MsgType": "location",
            "Location_X": "23.134521",
            "Location_Y": "113.358803",
            "Scale": 20,
            "Label": "广州市海珠区",
            "MsgId": "105",
        },
        LocationPayload(latitude=23.134521, longitude=113.358803, scale=20, label="广州市海珠区"),
    ),
    (
        {
            "MsgType": "link",
            "Title": "WeCom",
            "Description": "docs",
            "Url": "https://work.weixin.qq.com",
            "PicUrl": "https://p.example/2.jpg",
            "MsgId": "106",
        },
        LinkPayload(
            title="WeCom",
            description="docs",
            url="https://work.weixin.qq.com",
            pic_url="https://p.example/2.jpg",
        ),
    ),
    (
        {"MsgType": "event", "Event": "enter_agent", "EventKey": ""},
        WeComEventPayload(event="enter_agent", event_key=""),
    ),
    ({"MsgType": "event", "Event": "subscribe"}, WeComEventPayload(event="subscribe")),
    (
        {"MsgType": "event", "Event": "click", "EventKey": "menu#1"},
        WeComEventPayload(event="click", event_key="menu#1"),
    ),
    (
        {"MsgType": "miniprogram_notice", "Title": "t", "MsgId": "107"},
        UnknownPayload(msg_type="miniprogram_notice", fields={"Title": "t"}),
    ),
]


async def test_every_message_type_is_stored_exactly_once(gateway: Gateway) -> None:
    for fields, _ in EVERY_TYPE:
        full = {"FromUserName": USER, "CreateTime": NOW, **fields, "AgentID": AGENT}
        resp = await gateway.send(post(message_xml(full)))
        assert resp.status == 200, fields

    stored = await gateway.stored()
    assert [event.payload for event, _, _ in stored] == [payload for _, payload in EVERY_TYPE]
    for (event, _, msg_id), (fields, _) in zip(stored, EVERY_TYPE, strict=True):
        assert event.from_user == USER
        assert event.agent_id == AGENT
        if "MsgId" in fields:
            assert msg_id == f"{APP}:{fields['MsgId']}" == f"{APP}:{event.correlation_id}"
        else:
            assert msg_id == event.correlation_id
            assert msg_id.startswith(f"{APP}:{USER}:{NOW}:{fields['Event']}.")


async def test_two_menu_clicks_in_one_second_are_both_stored(gateway: Gateway) -> None:
    """Same user, same second, same Event, another EventKey: one dedupe key made the
    second a duplicate, answered 200 and never stored."""
    for key in ("#sendmsg#_0_0", "#sendmsg#_0_1", "#sendmsg#_0_1"):  # the last: a retry
        click = {"FromUserName": USER, "CreateTime": NOW, "MsgType": "event", "Event": "click"}
        resp = await gateway.send(post(message_xml({**click, "EventKey": key, "AgentID": AGENT})))
        assert resp.status == 200
    keys = [event.payload.event_key for event, _, _ in await gateway.stored()]  # type: ignore[union-attr]
    assert keys == ["#sendmsg#_0_0", "#sendmsg#_0_1"]


async def test_a_control_character_is_stored_not_refused(gateway: Gateway) -> None:
    resp = await gateway.send(post(text_message("31", content="line1\x0bline2")))
    assert resp.status == 200
    [event] = await gateway.events()
    assert event.payload == TextPayload(content="line1\ufffdline2")


async def test_an_event_with_no_sender_is_answered_and_not_stored(gateway: Gateway) -> None:
    kf = {"CreateTime": NOW, "MsgType": "event", "Event": "kf_msg_or_event", "Token": "t"}
    with capture_logs() as logs:
        resp = await gateway.send(post(message_xml({**kf, "OpenKfId": "wk1"})))
    assert resp.status == 200
    assert [e["event"] for e in logs] == ["callback.ignored"]
    assert await gateway.events() == []


async def test_the_same_msgid_three_times_is_stored_once(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="wecombot_gateway.app")  # callback.stored is debug
    message = text_message("4561255354251345929")
    with capture_logs() as logs:
        first = await gateway.send(post(message))
        retries = await asyncio.gather(*(gateway.send(post(message)) for _ in range(2)))
    assert [r.status for r in (first, *retries)] == [200, 200, 200]
    [event] = await gateway.events()
    assert event.msg_id == "4561255354251345929"
    stored = [e for e in logs if e["event"] == "callback.stored"]
    assert sorted(e["duplicate"] for e in stored) == [False, True, True]
    assert not rejections(logs)


# ---------------------------------------------------------------- NATS outage


async def test_503_while_nats_is_down_then_recovers_without_restart(
    gateway: Gateway, nats_server: NatsHandle
) -> None:
    assert (await gateway.send(post(text_message("1")))).status == 200
    nats_server.stop()
    client = gateway.js._nc
    await until(lambda: not client.is_connected, timeout=10, what="the client to see it gone")
    with capture_logs() as logs:
        down = await gateway.send(post(text_message("2")))
    assert down.status == 503
    [rejected] = rejections(logs)
    assert rejected["status"] == 503
    assert rejected["log_level"] == "warning"
    # at once: kept by nats-py, it would be sent at the reconnect, however late
    assert "NATS is away (reconnecting)" in rejected["reason"]
    # Known once the message was opened: the refusal names who it was about.
    assert (rejected["app"], rejected["user"], rejected["msg_id"]) == (APP, "zhang.san", "2")
    assert (await gateway.client.get("/readyz")).status == 503
    assert (await gateway.client.get("/healthz")).status == 200

    nats_server.start()

    async def accepted() -> bool:
        return (await gateway.send(post(text_message("2")))).status == 200

    async def ready() -> bool:
        return (await gateway.client.get("/readyz")).status == 200

    await until(accepted, timeout=20, what="a callback stored after NATS came back")
    await until(ready, timeout=20, what="the gateway ready")
    assert sorted(e.msg_id or "" for e in await gateway.events()) == ["1", "2"]


async def test_503_while_nats_hangs_then_the_retry_finds_it_stored_once(
    gateway: Gateway, nats_server: NatsHandle
) -> None:
    # A hung server (SIGSTOP): the connection stays up, nothing is answered. The append
    # went out but its PubAck does not come: 503, and WeCom retries. Once the server
    # runs again it stores what it was sent; the retry is deduplicated against it.
    assert (await gateway.send(post(text_message("1")))).status == 200
    nats_server.pause()
    try:
        with capture_logs() as logs:
            hung = await gateway.send(post(text_message("2")))
    finally:
        nats_server.resume()
    assert hung.status == 503
    [rejected] = rejections(logs)
    assert "no PubAck within 0.5s" in rejected["reason"]

    async def accepted() -> bool:
        return (await gateway.send(post(text_message("2")))).status == 200

    await until(accepted, timeout=20, what="WeCom's retry answered 200")
    assert [event.msg_id for event, _, _ in await gateway.stored()] == ["1", "2"]


# ---------------------------------------------------------------- the Publisher port


class MemoryPublisher:
    """The fake Publisher: dedupes by msg_id like JetStream; ``available`` = broker up."""

    def __init__(self) -> None:
        self.stored: dict[str, tuple[int, MessageReceived]] = {}
        self.available = True

    async def append(self, event: MessageReceived, *, msg_id: str) -> Appended:
        if not self.available:
            raise AppendUnavailable("memory publisher switched off")
        if msg_id in self.stored:
            return Appended(seq=self.stored[msg_id][0], duplicate=True)
        self.stored[msg_id] = (len(self.stored) + 1, event)
        return Appended(seq=len(self.stored), duplicate=False)


def _received(msg_id: str) -> MessageReceived:
    return parse_message(text_message(msg_id), corp_id=CORP, agent_id=AGENT, app=APP)


@pytest.fixture(params=["jetstream", "memory"])
async def publisher_and_outage(
    request: pytest.FixtureRequest, nats_server: NatsHandle, nc: NATS, js: JetStreamContext
) -> tuple[Publisher, Callable[[], None]]:
    """The real adapter (on a real nats-server) and the fake, with a way to break each."""
    if request.param == "memory":
        fake = MemoryPublisher()
        return fake, lambda: setattr(fake, "available", False)
    await bus.ensure_topology(js, gateway_settings(nats_server.url).nats)
    appender = await bus.PipelinedAppender.start(nc)
    return JetStreamPublisher(appender, timeout_s=0.3), nats_server.stop


async def test_publisher_contract(
    publisher_and_outage: tuple[Publisher, Callable[[], None]],
) -> None:
    publisher, outage = publisher_and_outage
    first = await publisher.append(_received("1"), msg_id=f"{APP}:1")
    assert first == Appended(seq=1, duplicate=False)
    assert await publisher.append(_received("1"), msg_id=f"{APP}:1") == Appended(1, True)
    assert await publisher.append(_received("2"), msg_id=f"{APP}:2") == Appended(2, False)
    outage()
    with pytest.raises(AppendUnavailable):
        await publisher.append(_received("3"), msg_id=f"{APP}:3")


async def test_the_app_hands_the_event_and_its_dedupe_key_to_the_publisher(
    make_gateway: MakeGateway,
) -> None:
    fake = MemoryPublisher()
    gw = await make_gateway(publisher=fake)
    message = text_message("55")
    assert (await gw.send(post(message))).status == 200
    [(key, (_, event))] = fake.stored.items()
    assert key == f"{APP}:55"
    assert event == parse_message(message, corp_id=CORP, agent_id=AGENT, app=APP)
    fake.available = False
    assert (await gw.send(post(text_message("56")))).status == 503


class BrokenPublisher:
    async def append(self, event: MessageReceived, *, msg_id: str) -> Appended:
        raise RuntimeError("a bug")


async def test_an_unexpected_error_is_a_500_logged_with_its_stack(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(publisher=BrokenPublisher())
    with capture_logs() as logs:
        resp = await gw.send(post(text_message("57")))
    assert resp.status == 500
    assert b"a bug" not in await resp.read()
    [failed] = [e for e in logs if e["event"] == "callback.failed"]
    assert failed["log_level"] == "error"
    assert failed["exc_info"] is True
    assert not rejections(logs)
    assert (await gw.client.get("/healthz")).status == 200


# ---------------------------------------------------------------- bad input


def _raw_aes(plaintext: bytes) -> str:
    key = base64.b64decode(KEY + "=")
    return base64.b64encode(AES.new(key, AES.MODE_CBC, key[:16]).encrypt(plaintext)).decode()


def _raw_plain(message: bytes, *, length: int | None = None, pad: int | None = None) -> str:
    """Encrypt a hand-built plaintext buffer: a lying length prefix, or a bad pad value."""
    plain = b"r" * 16 + (len(message) if length is None else length).to_bytes(4, "big")
    plain += message + CORP.encode()
    fill = 32 - len(plain) % 32
    if pad is None:
        return _raw_aes(plain + bytes([fill]) * fill)
    return _raw_aes(plain + b"\0" * (fill - 1) + bytes([pad]))


def _with_msg_type(msg_type: str) -> Call:
    fields = {"FromUserName": USER, "CreateTime": NOW, "MsgType": msg_type, "MsgId": "9"}
    return post(message_xml(fields))


def _signed_envelope(encrypt: str, **kw: Any) -> Call:
    return Call(params=signed(encrypt, **kw), body=envelope(encrypt))


def _forged(call: Call) -> Call:
    call.params = [(k, "0" * 40 if k == "msg_signature" else v) for k, v in call.params]
    return call


def _truncated() -> Call:
    raw = base64.b64decode(CRYPTO.encrypt(text_message("9")))
    return _signed_envelope(base64.b64encode(raw[:-5]).decode())


def _without(name: str, call: Call) -> Call:
    call.params = [(k, v) for k, v in call.params if k != name]
    return call


def _twice(name: str, call: Call) -> Call:
    call.params += [(k, v) for k, v in call.params if k == name]
    return call


def _url_check(encrypt: str = "", **kw: Any) -> Call:
    echostr = encrypt or CRYPTO.encrypt(b"1616140317555161061")
    return Call(method="GET", params=[*signed(echostr, **kw), ("echostr", echostr)], headers={})


async def _chunks(total: int) -> AsyncIterator[bytes]:
    for _ in range(total // 1024):
        yield b"x" * 1024


XXE = (
    b'<?xml version="1.0"?><!DOCTYPE xml [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
    b"<xml><Encrypt>&xxe;</Encrypt></xml>"
)
BILLION_LAUGHS = (
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + b"".join(
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10 if i > 1 else "&lol;" * 10}">'.encode()
        for i in range(1, 10)
    )
    + b"]><xml><Encrypt>&lol9;</Encrypt></xml>"
)


@dataclass(frozen=True)
class Bad:
    build: Callable[[], Call]
    status: int
    reason: str
    code: int | None = None


BAD_INPUTS: dict[str, Bad] = {
    "forged signature": Bad(
        lambda: _forged(post(text_message("9"))), 403, "signature mismatch", -40001
    ),
    "wrong corp id (receive_id)": Bad(
        lambda: post(text_message("9"), crypto=WeComCrypto(TOKEN, KEY, "wwsomeoneelse")),
        403,
        "receive_id mismatch",
        -40005,
    ),
    "wrong corp id (ToUserName)": Bad(
        lambda: post(
            message_xml(
                {"FromUserName": USER, "CreateTime": NOW, "MsgType": "text", "Content": "x"},
                to="wwother",
            )
        ),
        403,
        "not to our CorpID",
    ),
    "another app's message (AgentID)": Bad(
        lambda: post(text_message("9").replace(f">{AGENT}<".encode(), f">{AGENT + 1}<".encode())),
        403,
        f"AgentID {AGENT + 1}, not for ours",
    ),
    "bad base64": Bad(lambda: _signed_envelope("!!not*base64!!"), 400, "base64", -40010),
    "bad padding (value 0)": Bad(
        lambda: _signed_envelope(_raw_aes(bytes(32))), 400, "padding", -40008
    ),
    "bad padding (value over 32)": Bad(
        lambda: _signed_envelope(_raw_plain(text_message("9"), pad=33)), 400, "padding", -40008
    ),
    "bad padding (bytes disagree)": Bad(
        lambda: _signed_envelope(_raw_plain(text_message("9"), pad=7)), 400, "padding", -40008
    ),
    "length prefix beyond the buffer": Bad(
        lambda: _signed_envelope(_raw_plain(text_message("9"), length=10_000)),
        400,
        "length prefix beyond the buffer",
        -40008,
    ),
    "buffer shorter than its header": Bad(
        lambda: _signed_envelope(_raw_aes(b"r" * 16 + bytes([16]) * 16)),
        400,
        "shorter than 20 bytes",
        -40008,
    ),
    "truncated ciphertext": Bad(_truncated, 400, "multiple of 16", -40007),
    "XXE": Bad(lambda: Call(params=signed("x"), body=XXE), 400, "DTDForbidden", -40002),
    "billion laughs": Bad(
        lambda: Call(params=signed("x"), body=BILLION_LAUGHS), 400, "DTDForbidden", -40002
    ),
    "XXE in the decrypted message": Bad(
        lambda: post(XXE.replace(b"<Encrypt>&xxe;</Encrypt>", b"<x>&xxe;</x>")),
        400,
        "decrypted message refused",
    ),
    "external DTD": Bad(
        lambda: Call(
            params=signed("x"),
            body=b'<!DOCTYPE xml SYSTEM "http://127.0.0.1:9/evil.dtd"><xml><Encrypt>x</Encrypt></xml>',
        ),
        400,
        "DTDForbidden",
        -40002,
    ),
    "envelope not UTF-8": Bad(
        lambda: Call(params=signed("x"), body=b"<xml><Encrypt>\xff</Encrypt></xml>"),
        400,
        "not valid UTF-8",
        -40002,
    ),
    "not XML": Bad(lambda: Call(params=signed("x"), body=b"{}"), 400, "not well-formed", -40002),
    "no Encrypt element": Bad(
        lambda: Call(params=signed("x"), body=b"<xml><ToUserName>a</ToUserName></xml>"),
        400,
        "no Encrypt",
        -40002,
    ),
    "oversized body (Content-Length)": Bad(
        lambda: Call(params=signed("x"), body=b"<xml>" + b"x" * SMALL_BODY_LIMIT + b"</xml>"),
        413,
        "Content-Length",
    ),
    "oversized body (chunked)": Bad(
        lambda: Call(params=signed("x"), body=_chunks(SMALL_BODY_LIMIT + 2048)),
        413,
        "body exceeds",
    ),
    "replayed (stale) timestamp": Bad(
        lambda: post(text_message("9"), timestamp=int(time.time()) - 301), 403, "window"
    ),
    "future timestamp": Bad(
        lambda: post(text_message("9"), timestamp=int(time.time()) + 3600), 403, "window"
    ),
    "stale timestamp (GET)": Bad(
        lambda: _url_check(timestamp=int(time.time()) - 3600), 403, "window"
    ),
    "non-numeric timestamp": Bad(
        lambda: Call(params=[("msg_signature", "a"), ("timestamp", "12a"), ("nonce", "n")]),
        400,
        "timestamp",
    ),
    "missing timestamp": Bad(
        lambda: _without("timestamp", post(text_message("9"))), 400, "timestamp is missing"
    ),
    "empty nonce": Bad(
        lambda: Call(params=[("msg_signature", "a"), ("timestamp", "1"), ("nonce", "")]),
        400,
        "nonce is empty",
    ),
    "missing nonce": Bad(
        lambda: _without("nonce", post(text_message("9"))), 400, "nonce is missing"
    ),
    "missing msg_signature": Bad(
        lambda: _without("msg_signature", post(text_message("9"))), 400, "msg_signature is missing"
    ),
    "missing echostr (GET)": Bad(
        lambda: _without("echostr", _url_check()), 400, "echostr is missing"
    ),
    "duplicated msg_signature": Bad(
        lambda: _twice("msg_signature", post(text_message("9"))), 400, "repeated"
    ),
    "duplicated timestamp": Bad(
        lambda: _twice("timestamp", post(text_message("9"))), 400, "timestamp is repeated"
    ),
    "duplicated echostr (GET)": Bad(lambda: _twice("echostr", _url_check()), 400, "repeated"),
    "a message's Encrypt as the echostr (GET)": Bad(
        lambda: _url_check(CRYPTO.encrypt(text_message("9"))), 400, "echostr decrypts to XML"
    ),
    "Expect other than 100-continue (GET)": Bad(
        lambda: dataclasses.replace(_url_check(), headers={"Expect": "x-gimme"}),
        417,
        "Expect must be 100-continue",
    ),
    "Expect other than 100-continue (another path)": Bad(
        lambda: Call(method="GET", path="/healthz", headers={"Expect": "x-gimme"}),
        417,
        "Expect must be 100-continue",
    ),
    "a newline in the path": Bad(
        lambda: Call(method="GET", path="/wecom%0Acallback", headers={}),
        404,
        "no such path",
    ),
    "an encoded slash in the callback path": Bad(
        lambda: dataclasses.replace(post(text_message("9")), path="%2F".join(PATH.rsplit("/", 1))),
        404,
        "no such path",
    ),
    "forged signature (GET)": Bad(lambda: _forged(_url_check()), 403, "signature mismatch", -40001),
    "wrong content type (JSON)": Bad(
        lambda: Call(
            params=signed("x"),
            body=b'{"encrypt": "x"}',
            headers={"Content-Type": "application/json"},
        ),
        415,
        "application/json",
    ),
    "wrong content type (multipart)": Bad(
        lambda: Call(
            params=signed("x"),
            body=b"--b\r\n\r\nx\r\n--b--\r\n",
            headers={"Content-Type": "multipart/form-data; boundary=b"},
        ),
        415,
        "multipart/form-data",
    ),
    "compressed body (gzip)": Bad(
        lambda: Call(
            params=signed("x"),
            body=gzip.compress(b"<xml><Encrypt>x</Encrypt></xml>"),
            headers={"Content-Type": "text/xml", "Content-Encoding": "gzip"},
        ),
        415,
        "Content-Encoding 'gzip'",
    ),
    "corrupt compressed body (deflate)": Bad(
        lambda: Call(
            params=signed("x"),
            body=b"not deflate at all",
            headers={"Content-Type": "text/xml", "Content-Encoding": "deflate"},
        ),
        415,
        "Content-Encoding 'deflate'",
    ),
    "invalid UTF-8 in the decrypted message": Bad(
        lambda: post(text_message("9").replace("你好".encode(), b"\xff\xfe")), 400, "UTF-8"
    ),
    "MsgType empty": Bad(lambda: _with_msg_type(""), 400, "MsgType is empty"),
    "MsgType overlong": Bad(lambda: _with_msg_type("x" * 33), 400, "not a type token"),
    "MsgType outside [a-z_]": Bad(lambda: _with_msg_type("text<script>"), 400, "not a type token"),
    "MsgType upper case": Bad(lambda: _with_msg_type("Text"), 400, "not a type token"),
    "missing FromUserName": Bad(
        lambda: post(
            message_xml({"CreateTime": NOW, "MsgType": "text", "Content": "x", "MsgId": "9"})
        ),
        400,
        "FromUserName is missing",
    ),
    "invalid UserID": Bad(lambda: post(text_message("9", user="-not valid")), 400, "valid UserID"),
    "callback path with a trailing slash": Bad(
        lambda: dataclasses.replace(post(text_message("9")), path=f"{PATH}/"),
        404,
        f"no such path: the callback is served at {PATH}",
    ),
    "PUT to the callback path": Bad(
        lambda: dataclasses.replace(post(text_message("9")), method="PUT"),
        405,
        "PUT is not served here",
    ),
    "bad CreateTime": Bad(
        lambda: post(
            message_xml(
                {"FromUserName": USER, "CreateTime": "soon", "MsgType": "text", "Content": "x"}
            )
        ),
        400,
        "CreateTime",
    ),
    "AgentID that is no app's id": Bad(
        lambda: post(text_message("9").replace(f">{AGENT}<".encode(), b">1000002x<")),
        400,
        "AgentID '1000002x' is not an app's id (digits)",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
async def test_bad_input_is_refused_logged_once_and_nothing_is_stored(
    make_gateway: MakeGateway, case: Bad, caplog: pytest.LogCaptureFixture
) -> None:
    """Each row: its documented 4xx (docs/security.md), exactly one log line with the
    reason, nothing stored, the process still answering."""
    gw = await make_gateway(GATEWAY_MAX_BODY_BYTES=str(SMALL_BODY_LIMIT))
    caplog.set_level(logging.WARNING)  # aiohttp's own error lines, had a handler escaped
    with capture_logs() as logs:
        resp = await gw.send(case.build())
        body = await resp.read()
    assert resp.status == case.status
    assert b"<xml" not in body and "你好".encode() not in body  # never echoes input
    assert logs == rejections(logs), logs  # exactly one line: the rejection
    [rejected] = logs
    assert rejected["log_level"] == "warning"
    assert rejected["status"] == case.status
    assert case.reason in rejected["reason"]
    assert rejected.get("code") == case.code
    assert "exc_info" not in rejected
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    assert await gw.events() == []
    assert (await gw.client.get("/healthz")).status == 200
    assert not caplog.records, caplog.records


async def test_a_body_that_stops_arriving_is_answered_408_and_its_connection_freed(
    make_gateway: MakeGateway,
) -> None:
    """A client declaring more than it sends held its connection for good (slowloris):
    enough of them, and no descriptor was left for WeCom's callbacks."""
    gw = await make_gateway(GATEWAY_BODY_TIMEOUT="0.3")
    url = gw.client.make_url(gw.settings.callback_path)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(
            f"POST {gw.settings.callback_path}?msg_signature=s&timestamp=1&nonce=n HTTP/1.1\r\n"
            f"Host: x\r\nContent-Type: text/xml\r\nContent-Length: 100\r\n\r\n<xml>".encode()
        )
        await writer.drain()
        with capture_logs() as logs:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n"), timeout=10)
            rest = await asyncio.wait_for(reader.read(), timeout=5)  # closed (≤ 1 s drain)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 408")
    assert b"Connection: close" in rest and rest.endswith(b"Request Timeout")
    [rejected] = rejections(logs)
    assert (rejected["status"], rejected["error"]) == (408, "BodyTimeout")
    assert await gw.events() == []


async def test_headers_trickled_in_do_not_hold_a_connection(make_gateway: MakeGateway) -> None:
    """A client sending one header line at a time, never the blank line, held its
    connection for aiohttp's default keep-alive time (3630 s)."""
    gw = await make_gateway(GATEWAY_KEEPALIVE_TIMEOUT="1")
    url = gw.client.make_url(gw.settings.callback_path)
    reader, writer = await asyncio.open_connection(url.host, url.port)

    async def trickle() -> None:
        writer.write(f"POST {gw.settings.callback_path} HTTP/1.1\r\nHost: x\r\n".encode())
        with contextlib.suppress(ConnectionError):
            while True:
                await writer.drain()
                await asyncio.sleep(0.2)  # the client's pace, not a wait for the server
                writer.write(b"X-Slow: 1\r\n")

    trickling = asyncio.create_task(trickle())
    try:
        closed = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        trickling.cancel()
        writer.close()
    assert closed == b""  # let go, with nothing to answer
    assert await gw.events() == []


@pytest.mark.parametrize(
    ("request_head", "error"),
    [
        (b"POST /wecom/callback HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n", "BadHttpMessage"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "LineTooLong"),
        (
            b"POST /wecom/callback HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            "BadHttpMessage",
        ),
        (  # each up to 8 KB, so 128 of them (aiohttp's limit) held 1 MB per connection
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS))
            + b"\r\n",
            "BadHttpMessage",
        ),
    ],
    ids=["header-without-colon", "line-too-long", "length-and-chunked", "too-many-headers"],
)
async def test_a_request_the_server_cannot_parse_is_one_counted_warning_without_a_stack(
    make_gateway: MakeGateway,
    caplog: pytest.LogCaptureFixture,
    request_head: bytes,
    error: str,
) -> None:
    """aiohttp logged each as an error with its stack, uncounted (anyone can send them:
    a megabyte of error log a second from one client)."""
    gw = await make_gateway()
    url = gw.client.make_url("/")
    before = _refusals("400", error)
    caplog.set_level(logging.DEBUG, logger="wecombot_gateway.http")
    with capture_logs() as logs:
        reader, writer = await asyncio.open_connection(url.host, url.port)
        try:
            writer.write(request_head)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), timeout=10)
        finally:
            writer.close()
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")  # aiohttp's answer
    [rejected] = rejections(logs)
    assert (rejected["status"], rejected["error"]) == (400, error)
    assert "exc_info" not in rejected
    assert not [r for r in caplog.records if r.name == "wecombot_gateway.http"]
    assert _refusals("400", error) - before == 1


@pytest.mark.parametrize(
    ("first_bytes", "said"),
    [
        (  # a proxy speaking HTTPS to the gateway's plain-HTTP port: a TLS ClientHello
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32) + b"\x00\x00\x02\x13\x01",
            "TLS on the plain-HTTP port",
        ),
        (  # a load balancer with the PROXY protocol on
            b"PROXY TCP4 203.0.113.7 10.0.0.5 51234 8080\r\n"
            b"POST /wecom/callback HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "a PROXY protocol header before the request",
        ),
        (  # version 2 (AWS NLB sends only this): the binary signature, then addresses
            b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes(12) + b"POST / HTTP/1.1\r\n\r\n",
            "a PROXY protocol header before the request",
        ),
        (b"FOO /wecom/callback HTTP/1.1\r\nHost: x\r\n\r\n", "not an HTTP request, or a method"),
    ],
    ids=["tls", "proxy-protocol", "proxy-protocol-v2", "unknown-method"],
)
async def test_what_is_no_http_request_is_counted_and_said_with_its_likely_cause(
    make_gateway: MakeGateway, first_bytes: bytes, said: str
) -> None:
    """aiohttp logs these at debug only, on a connection's first request: an ingress
    sending HTTPS, or a load balancer the PROXY protocol, had every callback refused 400
    with no log line and no refusal counted (logs, metrics, /readyz all healthy)."""
    gw = await make_gateway()
    before = _refusals("400", "BadHttpMethod")
    with capture_logs() as logs:
        answer = await _exchange(gw, first_bytes)
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer
    [rejected] = rejections(logs)
    assert (rejected["status"], rejected["error"]) == (400, "BadHttpMethod")
    assert said in rejected["reason"], rejected
    assert "exc_info" not in rejected
    assert _refusals("400", "BadHttpMethod") - before == 1
    assert await gw.events() == []


@pytest.mark.parametrize(
    "head",
    [
        b"X-Api-Key : k3y-in-a-header\r\n\r\n",  # the space before the colon
        b"Cookie: session=k3y-in-a-header" + b"a" * 9000 + b"\r\n\r\n",  # over 8 KB
        b"X-Api-Key: k3y-in-a-header\x00\r\n\r\n",  # a NUL in the value
    ],
    ids=["bad-header-name", "line-too-long", "nul-in-value"],
)
async def test_a_parse_refusal_does_not_log_the_request_it_quotes(
    make_gateway: MakeGateway, head: bytes
) -> None:
    """aiohttp's error quotes the bytes it was reading: a header's value (an API key, a
    session cookie) reached the log (a Bearer token only was redacted)."""
    gw = await make_gateway()
    with capture_logs() as logs:
        answer = await _exchange(gw, b"POST /wecom/callback HTTP/1.1\r\nHost: x\r\n" + head)
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    [rejected] = rejections(logs)
    assert "k3y-in-a-header" not in json.dumps(rejected), rejected
    assert rejected["reason"] and "\n" not in rejected["reason"]


async def test_an_event_over_the_brokers_max_payload_is_413_not_503(
    make_gateway: MakeGateway,
) -> None:
    """A signed message under the body limit whose event is over NATS's max_payload (1 MiB;
    each '"' doubles in the event's JSON): 503 at each of WeCom's retries, counted where
    the "NATS is failing" alert looks. No retry can store it."""
    gw = await make_gateway(GATEWAY_MAX_BODY_BYTES=str(4 * 1024 * 1024))
    before, unavailable = _refusals("413", "EventTooLarge"), _refusals("503", "AppendUnavailable")
    with capture_logs() as logs:
        resp = await gw.send(post(text_message("big1", content='"' * 700_000)))
    assert resp.status == 413
    [rejected] = rejections(logs)
    assert rejected["error"] == "EventTooLarge"
    assert "over the broker's max_payload" in rejected["reason"]
    assert _refusals("413", "EventTooLarge") - before == 1
    assert _refusals("503", "AppendUnavailable") == unavailable
    assert await gw.events() == []
    ok = await gw.send(post(text_message("small1")))  # the connection to NATS is fine
    assert ok.status == 200
    assert [e.msg_id for e in await gw.events()] == ["small1"]


async def test_an_unrouted_request_logs_the_path_the_router_saw(gateway: Gateway) -> None:
    """``/wecom%2Fcallback`` was logged as ``/wecom/callback`` (decoded) beside "no such
    path: the callback is served at /wecom/callback": a line that contradicted itself."""
    encoded = "%2F".join(PATH.rsplit("/", 1))
    with capture_logs() as logs:
        resp = await gateway.send(dataclasses.replace(post(text_message("9")), path=encoded))
    assert resp.status == 404
    [rejected] = rejections(logs)
    assert rejected["path"] == encoded


async def test_a_message_with_markup_in_its_content_keeps_all_its_text(gateway: Gateway) -> None:
    """Content with elements in it (markup instead of CDATA; not WeCom's own shape, but
    signed): only the text before the first element was stored, silently."""
    plain = (
        f"<xml><ToUserName>{CORP}</ToUserName><FromUserName>zhang.san</FromUserName>"
        f"<CreateTime>{int(time.time())}</CreateTime><MsgType>text</MsgType>"
        "<Content>please summarise <b>this part</b> and this tail</Content>"
        f"<MsgId>mixed1</MsgId><AgentID>{AGENT}</AgentID></xml>"
    ).encode()
    resp = await gateway.send(post(plain))
    assert resp.status == 200
    [stored] = await gateway.events()
    assert isinstance(stored.payload, TextPayload)
    assert stored.payload.content == "please summarise this part and this tail"


async def test_a_request_with_headers_from_a_mesh_and_an_ingress_is_served(
    make_gateway: MakeGateway,
) -> None:
    """The header limit leaves room for what sits in front of the gateway (the pure-Python
    parser counts the request line among them: one less)."""
    gw = await make_gateway()
    many = b"".join(b"X-Forwarded-%d: v\r\n" % i for i in range(MAX_HEADERS - 2))
    answer = await _exchange(gw, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer


def _refusals(status: str, error: str) -> float:
    value = REGISTRY.get_sample_value(
        "wecombot_gateway_refusals_total", {"status": status, "reason": error}
    )
    return value or 0.0


async def _exchange(gw: Gateway, head: bytes, then: bytes = b"") -> bytes:
    """Send a request head, read the first answer; send ``then`` after a 100, read on."""
    url = gw.client.make_url("/")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(head)
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        if answer.startswith(b"HTTP/1.1 100") and then:
            writer.write(then)
            await writer.drain()
            answer += await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        return answer
    finally:
        writer.close()


async def test_expect_100_continue_is_answered_after_the_checks_a_body_cannot_change(
    make_gateway: MakeGateway,
) -> None:
    """aiohttp answered 100 to any such request: a client declaring 50 MB was told to
    go on, sent it all, and only then heard 413."""
    gw = await make_gateway(GATEWAY_MAX_BODY_BYTES=str(SMALL_BODY_LIMIT))
    call = post(text_message("100c"))
    query = urlencode(call.params)
    body = call.body if isinstance(call.body, bytes) else str(call.body).encode()
    line = f"POST {gw.settings.callback_path}?{query} HTTP/1.1\r\nHost: x\r\n".encode()

    def head(length: int, expect: str = "100-continue") -> bytes:
        return (
            line
            + (
                f"Content-Type: text/xml\r\nContent-Length: {length}\r\nExpect: {expect}\r\n\r\n"
            ).encode()
        )

    with capture_logs() as logs:
        too_large = await _exchange(gw, head(50_000_000))
        unknown = await _exchange(gw, head(len(body), "something-else"))
    assert too_large.startswith(b"HTTP/1.1 413") and b"100 Continue" not in too_large
    assert unknown.startswith(b"HTTP/1.1 417")
    assert [(e["status"], e["error"]) for e in rejections(logs)] == [
        (413, "BodyTooLarge"),
        (417, "UnknownExpectation"),
    ]
    accepted = await _exchange(gw, head(len(body)), then=body)
    assert accepted.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200")
    assert [e.msg_id for e in await gw.events()] == ["100c"]


def test_every_bad_input_is_documented_with_its_status() -> None:
    """docs/security.md lists every row of BAD_INPUTS with the same status and code."""
    doc = (Path(__file__).parents[2] / "docs" / "security.md").read_text(encoding="utf-8")
    rows = {
        cells[0]: cells[1:]
        for line in doc.splitlines()
        if line.startswith("| ")
        for cells in [[c.strip().strip("`") for c in line.strip("|").split("|")]]
    }
    for name, case in BAD_INPUTS.items():
        assert name in rows, f"{name!r} is missing from docs/security.md"
        status, code = rows[name][0], rows[name][1]
        assert status == str(case.status), name
        assert code == ("" if case.code is None else str(case.code)), name


FORGED_AND_STALE: dict[str, Callable[[], Call]] = {
    "POST": lambda: _forged(post(text_message("9"), timestamp=int(time.time()) - 3600)),
    "GET": lambda: _forged(_url_check(timestamp=int(time.time()) - 3600)),
}


@pytest.mark.parametrize("build", FORGED_AND_STALE.values(), ids=FORGED_AND_STALE.keys())
async def test_a_forged_stale_callback_is_refused_for_its_signature_not_its_clock(
    gateway: Gateway, build: Callable[[], Call]
) -> None:
    """The signature is checked before the replay window: a forged request learns
    nothing about our clock (both refusals are 403; the log line tells them apart)."""
    with capture_logs() as logs:
        resp = await gateway.send(build())
    assert resp.status == 403
    [rejected] = rejections(logs)
    assert (rejected["error"], rejected.get("code"), rejected["reason"]) == (
        "SignatureError",
        -40001,
        "signature mismatch",
    )
    assert await gateway.events() == []


def _other_apps_message(setting: str) -> Call:
    """A callback WeCom would send for an app whose ``setting`` differs from ours."""
    message = text_message("77")
    if setting == "WECOM_TOKEN":
        other = WeComCrypto(generate_token(), KEY, CORP)
        encrypt = other.encrypt(message)
        return Call(params=signed(encrypt, crypto=other), body=envelope(encrypt))
    if setting == "WECOM_ENCODING_AES_KEY":
        return post(message, crypto=WeComCrypto(TOKEN, generate_encoding_aes_key(), CORP))
    if setting == "WECOM_CORP_ID":
        return post(message, crypto=WeComCrypto(TOKEN, KEY, "wwanothercorp"))
    fields = {"FromUserName": "zhang.san", "CreateTime": int(time.time()), "MsgType": "text"}
    if setting == "WECOM_AGENT_ID":
        return post(message_xml({**fields, "Content": "hi", "MsgId": "78", "AgentID": AGENT + 1}))
    return post(message_xml({**fields, "Content": "hi", "MsgId": "79"}, to="wwanothercorp"))


@pytest.mark.parametrize(
    ("setting", "error"),
    [
        ("WECOM_TOKEN", "SignatureError"),
        ("WECOM_ENCODING_AES_KEY", "PlaintextBufferError"),
        ("WECOM_CORP_ID", "ReceiveIdError"),
        ("WECOM_AGENT_ID", "WrongRecipient"),
        ("ToUserName", "WrongRecipient"),
    ],
)
async def test_a_refusal_for_another_apps_keys_names_the_setting_to_check(
    gateway: Gateway, setting: str, error: str
) -> None:
    """A Token, key, CorpID or AgentId copied wrong: every message is refused, and lost
    after WeCom's retries. The line must say which setting to compare with the app's."""
    with capture_logs() as logs:
        resp = await gateway.send(_other_apps_message(setting))
    assert resp.status in (400, 403)
    [rejected] = rejections(logs)
    expected = "WECOM_CORP_ID" if setting == "ToUserName" else setting
    assert (rejected["error"], rejected["setting"]) == (error, expected)
    assert await gateway.events() == []


async def test_a_method_a_health_route_does_not_serve_is_405_not_404(gateway: Gateway) -> None:
    """The catch-all route that logs what no route takes must not turn a health route's
    405 into a 404 (as it did at first)."""
    with capture_logs() as logs:
        resp = await gateway.client.post("/healthz")
    assert (resp.status, resp.headers["Allow"]) == (405, "GET,HEAD")
    [rejected] = rejections(logs)
    assert rejected["reason"] == "POST is not served here (GET, HEAD)"


async def test_health_and_readiness(gateway: Gateway) -> None:
    assert (await gateway.client.get("/healthz")).status == 200
    ready = await gateway.client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["status"] == "ready"


async def test_no_answer_names_the_versions_of_python_or_aiohttp(gateway: Gateway) -> None:
    """aiohttp's default ``Server: Python/3.11 aiohttp/3.14.5`` tells a scanner what to
    try; every answer the application makes says ``wecombot``."""
    forged = signed("x", crypto=WeComCrypto("another-token", KEY, CORP))
    answers = [
        await gateway.send(post(text_message("41"))),  # stored
        await gateway.send(dataclasses.replace(post(text_message("42")), params=forged)),
        await gateway.client.get("/no-such-path"),
        await gateway.client.post("/healthz"),  # 405
        await gateway.client.get("/healthz"),
        await gateway.client.get("/readyz"),
        await gateway.client.get("/metrics"),
    ]
    assert [resp.status for resp in answers] == [200, 403, 404, 405, 200, 200, 200]
    assert {resp.headers["Server"] for resp in answers} == {"wecombot"}


async def test_readiness_fails_without_the_stream(gateway: Gateway) -> None:
    await gateway.js.delete_stream(topology.CONVERSATION_STREAM)
    resp = await gateway.client.get("/readyz")
    assert resp.status == 503
    assert "does not exist" in (await resp.json())["detail"]


# ---------------------------------------------------------------- the wired process


@pytest.fixture
def process_settings(nats_server: NatsHandle) -> GatewaySettings:
    return gateway_settings(
        nats_server.url, GATEWAY_HOST="127.0.0.1", GATEWAY_PORT=str(free_port())
    )


async def _status(url: str) -> int | None:
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as resp:
            return resp.status
    except aiohttp.ClientConnectionError:
        return None


async def test_run_gateway_serves_then_stops_gracefully(
    process_settings: GatewaySettings, js: JetStreamContext
) -> None:
    base = f"http://127.0.0.1:{process_settings.port}"
    stop = asyncio.Event()
    task = asyncio.create_task(run_gateway(process_settings, stop))

    async def ready() -> bool:
        return await _status(f"{base}/readyz") == 200

    await until(ready, timeout=20, what="the gateway ready")
    call = post(text_message("77"))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base}{PATH}", params=call.params, data=call.body, headers=call.headers
        ) as resp,
    ):
        assert resp.status == 200
    info = await js.stream_info(topology.CONVERSATION_STREAM)
    assert info.state.messages == 1

    stop.set()
    await asyncio.wait_for(task, 10)
    assert await _status(f"{base}/healthz") is None


async def test_a_port_in_use_is_a_configuration_error(
    process_settings: GatewaySettings,
) -> None:
    with socket.socket() as taken:
        taken.bind((process_settings.host, process_settings.port))
        taken.listen()
        with pytest.raises(ConfigError, match="GATEWAY_PORT"):
            await asyncio.wait_for(run_gateway(process_settings, asyncio.Event()), 10)


async def test_run_gateway_is_alive_but_not_ready_while_nats_is_away(
    process_settings: GatewaySettings, nats_server: NatsHandle
) -> None:
    """Liveness passes (no restart loop while NATS comes up), readiness does not, and a
    callback gets 503 so WeCom retries it later; stop still works while waiting."""
    nats_server.stop()
    stop = asyncio.Event()
    base = f"http://127.0.0.1:{process_settings.port}"
    with capture_logs() as logs:
        task = asyncio.create_task(run_gateway(process_settings, stop))

        async def failed_to_connect() -> bool:
            return any(e["event"] == "nats.error" for e in logs)

        await until(failed_to_connect, timeout=20, what="a nats.error logged")
        await nats_server.turn_away(3)  # still trying, however long NATS is away
        assert await _status(f"{base}/healthz") == 200
        assert await _status(f"{base}/readyz") == 503
        call = post(text_message("77"))
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{base}{process_settings.callback_path}",
                params=call.params,
                data=call.body,
                headers=call.headers,
            ) as resp,
        ):
            assert resp.status == 503
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 5)
    assert await _status(f"{base}/healthz") is None


async def test_run_gateway_starts_once_nats_comes_up(
    process_settings: GatewaySettings, nats_server: NatsHandle
) -> None:
    nats_server.stop()
    stop = asyncio.Event()
    task = asyncio.create_task(run_gateway(process_settings, stop))
    await nats_server.start_after(3)

    async def ready() -> bool:
        return await _status(f"http://127.0.0.1:{process_settings.port}/readyz") == 200

    try:
        await until(ready, timeout=20, what="the gateway ready")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_once_stopping_every_answer_closes_its_connection(gateway: Gateway) -> None:
    """A callback in flight at SIGTERM was answered as a keep-alive; the client sent its
    next one on that connection, which the stop then closed: no answer at all (WeCom, or
    the ingress's pool, saw it dropped). run_gateway says it before the runner stops."""
    before = await gateway.send(post(text_message("1")))
    await before.read()
    assert (before.status, before.headers.get("Connection")) == (200, None)  # kept alive
    stop_keeping_alive(gateway.client.server.app)
    during = await gateway.send(post(text_message("2")))
    await during.read()
    assert (during.status, during.headers.get("Connection")) == (200, "close")
    probe = await gateway.client.get("/healthz")  # on a new connection: the last one closed
    assert probe.headers.get("Connection") == "close"
