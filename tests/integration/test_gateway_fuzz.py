"""Property-based fuzzing of the gateway's verify → decrypt → parse path, end to end.

The real wired gateway (``run_gateway``: the aiohttp app, the real crypto, the real
JetStream publisher on a real nats-server) runs on its own event loop in a thread; each
Hypothesis example is one real HTTP request from a synchronous client. Whatever arrives
(arbitrary queries, bodies and content types; signed garbage ciphertexts; validly
encrypted and signed garbage plaintexts, so the inner XML parser is reached; hand-made
AES buffers with lying length prefixes and paddings; generated message XML), the answer
is never a 500, no exception escapes a handler, a refusal is exactly one warning line,
and only accepted callbacks are stored.

Quick by default (a few seconds, derandomised: the same examples every run). The long
run explores afresh each time, for minutes::

    make fuzz                      # WECOMBOT_FUZZ=long, thousands of examples per property
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import threading
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import httpx
import pytest
from Crypto.Cipher import AES
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tests.conftest import free_port
from wecombot_common import bus, topology
from wecombot_common.crypto import WeComCrypto, generate_encoding_aes_key, generate_token
from wecombot_common.embedded import EmbeddedNats
from wecombot_gateway.main import run_gateway
from wecombot_gateway.settings import GatewaySettings

pytestmark = pytest.mark.integration

LONG = os.environ.get("WECOMBOT_FUZZ") == "long"
FUZZ = settings(
    max_examples=int(os.environ.get("WECOMBOT_FUZZ_EXAMPLES", 20_000 if LONG else 150)),
    deadline=None,
    derandomize=not LONG,  # the quick run is deterministic; the long one explores
    database=None if not LONG else settings().database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CORP = "wwfuzz0123456789"
AGENT = 1000002
TOKEN = generate_token()
KEY = generate_encoding_aes_key()
CRYPTO = WeComCrypto(TOKEN, KEY, CORP)
PATH = "/wecom/callback"
BODY_LIMIT = 4096
# Every status the gateway may answer a callback with (503: the log did not confirm in
# time, possible on a loaded machine, and a correct answer). Never 500.
ALLOWED = frozenset({200, 400, 403, 413, 415, 503})


# ---------------------------------------------------------------- the gateway in a thread


@dataclass
class FuzzedGateway:
    """run_gateway on its own loop in a thread; counts what it was asked and answered."""

    settings: GatewaySettings
    nats_url: str
    base: str
    client: httpx.Client
    stored_new: int = 0  # callback.stored lines with duplicate=False
    statuses: dict[int, int] = field(default_factory=dict)

    def request(
        self,
        method: str,
        params: list[tuple[str, str]],
        body: bytes | None = None,
        content_type: str | None = "text/xml",
    ) -> tuple[int, MutableMapping[str, Any] | None]:
        """One request; checks the invariants; returns the status and the rejection."""
        query: list[tuple[str, str | int | float | bool | None]] = list(params)
        headers = {} if content_type is None else {"Content-Type": content_type}
        with capture_logs() as logs:
            response = self.client.request(
                method, self.base + PATH, params=query, content=body, headers=headers
            )
        status = response.status_code
        self.statuses[status] = self.statuses.get(status, 0) + 1
        assert status in ALLOWED, (status, response.text, logs)
        rejected = [e for e in logs if e["event"] == "callback.rejected"]
        assert not [e for e in logs if e["event"] == "callback.failed"], logs
        assert not [e for e in logs if e["log_level"] in ("error", "critical")], logs
        if 400 <= status < 500:
            assert len(rejected) == 1, logs
            assert rejected[0]["status"] == status
            assert rejected[0]["log_level"] == "warning"
        elif status == 200:
            assert not rejected, logs
        self.stored_new += sum(
            1 for e in logs if e["event"] == "callback.stored" and not e["duplicate"]
        )
        return status, rejected[0] if rejected else None


class _StdlibErrors(logging.Handler):
    """Collects ERROR records of any stdlib logger (aiohttp logs escaped exceptions so)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _gateway_settings(nats_url: str, port: int) -> GatewaySettings:
    return GatewaySettings.from_env(
        {
            "WECOM_CORP_ID": CORP,
            "WECOM_AGENT_ID": str(AGENT),
            "WECOM_TOKEN": TOKEN,
            "WECOM_ENCODING_AES_KEY": KEY,
            "NATS_URL": nats_url,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(port),
            "GATEWAY_MAX_BODY_BYTES": str(BODY_LIMIT),
            "GATEWAY_PUBLISH_TIMEOUT": "4",
            "GATEWAY_REFUSAL_LOG_RATE": "0",  # a line for every refusal: each is checked
        }
    )


def _wait_ready(client: httpx.Client, base: str, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert thread.is_alive(), "the gateway thread died"
        try:
            if client.get(f"{base}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # polling a condition with a deadline
    raise AssertionError("the fuzzed gateway never became ready")


async def _stream_count(nats_url: str) -> int:
    nc = await bus.connect(_gateway_settings(nats_url, 1).nats, "fuzz-check")
    try:
        info = await nc.jetstream().stream_info(topology.CONVERSATION_STREAM)
        return int(info.state.messages)
    finally:
        await nc.close()


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzedGateway]:
    store: Path = tmp_path_factory.mktemp("fuzz-nats")
    server = EmbeddedNats(store, log_file=store / "nats.log")
    server.start()
    port = free_port()
    gw_settings = _gateway_settings(server.url, port)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    errors = _StdlibErrors()
    logging.getLogger().addHandler(errors)
    # callback.stored is a debug line, written only when the level allows it: it is
    # what this module counts stored callbacks by.
    app_log = logging.getLogger("wecombot_gateway.app")
    level = app_log.level
    app_log.setLevel(logging.DEBUG)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(run_gateway(gw_settings, stop))

    thread = threading.Thread(target=run, name="fuzzed-gateway", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=15) as client:
            _wait_ready(client, base, thread)
            gw = FuzzedGateway(gw_settings, server.url, base, client)
            yield gw
            # Still alive and answering after everything, and only accepted callbacks
            # were stored.
            assert client.get(f"{base}/healthz").status_code == 200
            assert asyncio.run(_stream_count(server.url)) == gw.stored_new
            assert not errors.records, [r.getMessage() for r in errors.records]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(20)
        loop.close()
        logging.getLogger().removeHandler(errors)
        app_log.setLevel(level)
        server.stop()


# ---------------------------------------------------------------- strategies

PARAM = st.sampled_from(["msg_signature", "timestamp", "nonce", "echostr"]) | st.text(max_size=8)
PRINTABLE = st.characters(min_codepoint=32, max_codepoint=126)
CONTENT_TYPES = st.sampled_from(
    [
        None,
        "text/xml",
        "application/xml",
        "application/atom+xml",
        "text/xml; charset=gbk",
        "",
        "application/json",
        "multipart/form-data; boundary=x",
        "text/plain",
    ]
) | st.text(PRINTABLE, max_size=30).map(str.strip)  # no edge spaces: httpx refuses them
B64_CHARS = st.text(
    st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= -_!%"),
    max_size=200,
)
FIELDS = st.sampled_from(
    [
        "ToUserName", "FromUserName", "CreateTime", "MsgType", "Content", "MsgId", "AgentID",
        "Event", "EventKey", "PicUrl", "MediaId", "Format", "ThumbMediaId", "Location_X",
        "Location_Y", "Scale", "Label", "Title", "Description", "Url",
    ]
) | st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,12}", fullmatch=True)  # fmt: skip
XML_CHARS = st.characters(exclude_categories=("Cs", "Cc")) | st.sampled_from("\n\t")
VALUES = st.sampled_from(
    [
        CORP, "zhang.san", "li.si@corp", "-bad", "text", "image", "voice", "video",
        "location", "link", "event", "miniprogram", "", "Text", "x" * 40, "enter_agent",
        "1409659813", "0", "-1", "99999999999999", "1e308", "nan", "inf", "23.1", "amr",
        "4561255354251345929", str(AGENT), "<b>&amp;</b>", "]]>", "&lol;",
    ]
) | st.text(XML_CHARS, max_size=40) | st.text(max_size=10)  # fmt: skip


def _cdata(value: str) -> str:
    return "<![CDATA[" + value.replace("]]>", "]]]]><![CDATA[>") + "]]>"


@st.composite
def elements(draw: st.DrawFn, depth: int = 0) -> str:
    name = draw(FIELDS)
    attrs = draw(st.sampled_from(["", "", "", ' a="1"', " b='&amp;'", ' c="&lt;"', ' d="<"']))
    if depth < 2 and draw(st.integers(0, 5)) == 5:
        inner = "".join(draw(st.lists(elements(depth + 1), max_size=3)))
    else:
        value = draw(VALUES)
        inner = _cdata(value) if draw(st.booleans()) else escape(value)
    return f"<{name}{attrs}>{inner}</{name}>"


TYPE_FIELDS = {
    "text": ["Content"],
    "image": ["PicUrl", "MediaId"],
    "voice": ["MediaId", "Format"],
    "video": ["MediaId", "ThumbMediaId"],
    "location": ["Location_X", "Location_Y", "Scale", "Label"],
    "link": ["Title", "Description", "Url", "PicUrl"],
    "event": ["Event", "EventKey"],
    "miniprogram": ["AppId", "Title"],
}
NUMERIC = st.sampled_from(["23.134521", "20", "-0", "1e3", "nan", "inf", "", "x"]) | st.integers(
    -(10**20), 10**20
).map(str)


@st.composite
def message_documents(draw: st.DrawFn) -> bytes:
    """Inner message XML: often a whole plausible message with fuzzed values, else a
    subset of the common fields; then noise elements, a prolog, sometimes cut short."""
    if not draw(st.booleans()):  # False, the simplest draw, is the plausible message
        msg_type = draw(st.sampled_from(sorted(TYPE_FIELDS)))
        fields = {
            "ToUserName": CORP,
            "FromUserName": draw(st.sampled_from(["zhang.san", "li.si@corp", "w_1-2"])),
            "CreateTime": str(int(time.time())),
            "MsgType": msg_type,
            "MsgId": str(draw(st.integers(0, 2**64))),
        }
        for name in TYPE_FIELDS[msg_type]:
            numeric = name.startswith("Location") or name == "Scale"
            fields[name] = draw(NUMERIC if numeric else VALUES)
        kept = list(fields)
        if draw(st.integers(0, 4)) == 3:
            kept = draw(st.lists(st.sampled_from(kept), unique=True))
    else:
        fields = {
            "ToUserName": draw(st.sampled_from([CORP, "wwother", ""])),
            "FromUserName": draw(st.sampled_from(["zhang.san", "li.si@corp", "-x", "a" * 65])),
            "CreateTime": draw(st.sampled_from([str(int(time.time())), "1", "", "12a"])),
            "MsgType": draw(VALUES),
        }
        kept = draw(st.lists(st.sampled_from(sorted(fields)), unique=True))
    head = "".join(f"<{k}>{_cdata(fields[k])}</{k}>" for k in kept)
    tail = "".join(draw(st.lists(elements(), max_size=4)))
    prolog = draw(
        st.sampled_from(
            [
                "",
                "",
                '<?xml version="1.0" encoding="UTF-8"?>',
                '<?xml version="1.0" encoding="GBK"?>',
                '<!DOCTYPE xml [<!ENTITY e "x">]>',
                '<!DOCTYPE xml SYSTEM "file:///etc/passwd">',
                "\ufeff",
            ]
        )
    )
    text = f"{prolog}<xml>{head}{tail}</xml>"
    if draw(st.integers(0, 19)) == 7:  # now and then (not 0: Hypothesis favours it), cut
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode("utf-8", "surrogatepass")


def _signed(encrypt: str, timestamp: int | None = None) -> list[tuple[str, str]]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = "1372623149"
    signature = CRYPTO.signature(ts, nonce, encrypt)
    return [("msg_signature", signature), ("timestamp", ts), ("nonce", nonce)]


def _envelope(encrypt: str) -> bytes:
    return (
        f"<xml><ToUserName>{_cdata(CORP)}</ToUserName><Encrypt>{escape(encrypt)}</Encrypt>"
        f"<AgentID>{AGENT}</AgentID></xml>"
    ).encode("utf-8", "surrogatepass")


def _raw_aes(buffer: bytes) -> str:
    key = base64.b64decode(KEY + "=")
    return base64.b64encode(AES.new(key, AES.MODE_CBC, key[:16]).encrypt(buffer)).decode()


# ---------------------------------------------------------------- properties


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST"]),
    params=st.lists(st.tuples(PARAM, st.text(max_size=60)), max_size=6),
    body=st.binary(max_size=BODY_LIMIT + 512) | message_documents(),
    content_type=CONTENT_TYPES,
)
def test_arbitrary_requests(
    fuzzed: FuzzedGateway,
    method: str,
    params: list[tuple[str, str]],
    body: bytes,
    content_type: str | None,
) -> None:
    fuzzed.request(method, params, body if method == "POST" else None, content_type)


@FUZZ
@given(
    encrypt=B64_CHARS | st.binary(max_size=600).map(lambda b: base64.b64encode(b).decode()),
    skew=st.sampled_from([0, 0, 0, -299, 301, -(10**6)]),
    as_url_check=st.booleans(),
)
def test_signed_garbage_ciphertexts(
    fuzzed: FuzzedGateway, encrypt: str, skew: int, as_url_check: bool
) -> None:
    params = _signed(encrypt, int(time.time()) + skew)
    if as_url_check:
        fuzzed.request("GET", [*params, ("echostr", encrypt)], content_type=None)
    else:
        fuzzed.request("POST", params, _envelope(encrypt))


VALID = (
    f"<xml><ToUserName>{CORP}</ToUserName><FromUserName>zhang.san</FromUserName>"
    f"<CreateTime>1409659813</CreateTime><MsgType>text</MsgType><Content>hi</Content>"
    f"<MsgId>1</MsgId></xml>"
).encode()


@FUZZ
@example(plaintext=VALID)
@given(plaintext=st.binary(max_size=1500) | message_documents())
def test_encrypted_and_signed_garbage_reaches_the_inner_parser(
    fuzzed: FuzzedGateway, plaintext: bytes
) -> None:
    encrypt = CRYPTO.encrypt(plaintext)
    status, rejected = fuzzed.request("POST", _signed(encrypt), _envelope(encrypt))
    if plaintext == VALID:
        assert status == 200
    if status == 413:
        assert len(_envelope(encrypt)) > BODY_LIMIT
    elif rejected is not None:
        # Signature, timestamp and crypto all passed: only the inner message is refused
        # (those refusals carry no official -400xx code).
        assert "code" not in rejected, rejected


@FUZZ
@given(
    length=st.integers(0, 2**32 - 1) | st.integers(0, 64),
    message=st.binary(max_size=200),
    receive_id=st.sampled_from([CORP.encode(), b"", b"wwother", CORP.encode() + b"x"]),
    pad=st.integers(0, 255) | st.integers(1, 32),
    prefix=st.integers(0, 16),
)
def test_hand_made_buffers_with_lying_lengths_and_paddings(
    fuzzed: FuzzedGateway, length: int, message: bytes, receive_id: bytes, pad: int, prefix: int
) -> None:
    buffer = b"r" * prefix + length.to_bytes(4, "big") + message + receive_id
    fill = -(len(buffer) + 1) % 16
    buffer += b"\0" * fill + bytes([pad])
    encrypt = _raw_aes(buffer)
    fuzzed.request("POST", _signed(encrypt), _envelope(encrypt))
