"""No secret ever reaches a log line or a stored event, over the whole flow.

Distinctive values for every secret (the callback AES key and Token, the app's corp
secret, the access_tokens the simulated WeCom issues, the model API key, the NATS
password of a broker that requires one), then everything a deployment does on a normal
and on a bad day: messages answered, an access_token expiring and being refreshed, the
model failing (the apology is delivered), a reply WeCom never accepts (dead-lettered).
Then every log line (the gateway and one llm replica in this process at DEBUG, the
token, sender and a second llm replica as real processes at DEBUG, and the broker's own
log) and every stored message (the whole WECOMBOT stream and the DLQ, data and headers)
is searched for each secret, as is and URL-encoded.

In this process every in-process service registers its secrets with the one redaction
list, so a service forgetting one of its own is only caught in the separate processes:
that is why the llm runs both ways.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from tests.conftest import free_port
from tests.e2e.harness import AGENT_ID, CORP_ID, Stack
from tests.waiting import until
from wecombot_common import topology
from wecombot_common.crypto import WeComCrypto
from wecombot_common.embedded import EmbeddedNats
from wecombot_common.events import DeliveryFailed, ReplyFailed, decode_event
from wecombot_common.sim.callbacks import CallbackBuilder
from wecombot_common.sim.openai_api import Fault
from wecombot_common.tokens import TokenClient, TokenError, TransientTokenError

pytestmark = pytest.mark.e2e

AES_KEY = "SeKrEtAesKeyQ9wZx7" + "ABCDEFGHIJKLMNOPQRSTUVWXY"  # 43 base64 characters
WECOM_TOKEN = "SeKrEtCallbackTokenT0k3nQ7"
CORP_SECRET = "SeKrEt-corp-secret-Vq8Lm2Xz_Pw4"
LLM_API_KEY = "sk-SeKrEt-llm-api-key-Hq4Tn8Rw2"
NATS_USER = "wecombot"
NATS_PASSWORD = "SeKrEtNatsPassw0rdK7Lq2"
APOLOGY = "抱歉，模型暂时不可用（测试）。"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server that requires a user and password."""
    conf = tmp_path / "auth.conf"
    conf.write_text(
        f'authorization {{ user: "{NATS_USER}", password: "{NATS_PASSWORD}" }}\n',
        encoding="utf-8",
    )
    server = EmbeddedNats(tmp_path / "nats", config_file=conf, log_file=tmp_path / "nats.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def nc(broker: EmbeddedNats) -> AsyncIterator[NATS]:
    client = await nats.connect(broker.url, user=NATS_USER, password=NATS_PASSWORD)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def js(nc: NATS) -> JetStreamContext:
    return nc.jetstream()


def _with_secrets(stack: Stack) -> None:
    """Replace the harness's secrets with the distinctive ones, before anything starts."""
    stack.wecom.secret = CORP_SECRET
    stack.model.api_key = LLM_API_KEY
    stack.client = CallbackBuilder(
        corp_id=CORP_ID, agent_id=AGENT_ID, token=WECOM_TOKEN, encoding_aes_key=AES_KEY
    )
    stack.env_extra.update(
        WECOM_TOKEN=WECOM_TOKEN,
        WECOM_ENCODING_AES_KEY=AES_KEY,
        OPENAI_API_KEY=LLM_API_KEY,
        NATS_USER=NATS_USER,
        NATS_PASSWORD=NATS_PASSWORD,
        LOG_LEVEL="debug",
        LLM_RETRY_BUDGET="1",
        LLM_APOLOGY_MESSAGE=APOLOGY,
        SENDER_RETRY_ATTEMPTS="0",
        SENDER_MAX_DELIVER="2",  # a send failing twice is dead-lettered
    )


Stored = tuple[str, dict[str, str], bytes]


async def _stored(js: JetStreamContext, stream: str) -> list[Stored]:
    """Every message of ``stream``: subject, headers and data."""
    info = await js.stream_info(stream)
    out: list[Stored] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        try:
            raw = await js.get_msg(stream, seq)
        except nats.js.errors.NotFoundError:
            continue
        out.append((raw.subject or "", dict(raw.headers or {}), raw.data or b""))
    return out


def _blob(message: Stored) -> bytes:
    subject, headers, data = message
    lines = [subject, *(f"{k}: {v}" for k, v in headers.items())]
    return "\n".join(lines).encode() + b"\n" + data


async def _refusal_recorded(js: JetStreamContext) -> bool:
    stored = await _stored(js, topology.CONVERSATION_STREAM)
    return any(isinstance(decode_event(data), DeliveryFailed) for _, _, data in stored)


async def _dead_lettered(js: JetStreamContext) -> bool:
    return bool((await js.stream_info(topology.DEAD_LETTER_STREAM)).state.messages)


async def _token_service_answers(nc: NATS) -> bool:
    try:
        await TokenClient(nc).get(f"{CORP_ID}-{AGENT_ID}")
    except (TokenError, TransientTokenError):
        return False
    return True


def _forms(secret: str) -> list[str]:
    return sorted({secret, quote(secret, safe=""), quote_plus(secret)})


async def test_no_secret_in_any_log_line_or_stored_event(
    broker: EmbeddedNats,
    nc: NATS,
    js: JetStreamContext,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    WeComCrypto(WECOM_TOKEN, AES_KEY, CORP_ID)  # the distinctive values are valid ones
    async with Stack(broker.url, tmp_path) as stack:
        _with_secrets(stack)
        # The token service takes its credentials in the URL, as many deployments do.
        url = broker.url.replace("nats://", f"nats://{NATS_USER}:{NATS_PASSWORD}@")
        ports = {name: free_port() for name in ("token", "sender", "llm")}
        stack.start_process(
            "token",
            NATS_URL=url,
            NATS_USER="",
            NATS_PASSWORD="",
            WECOMBOT_HEALTH_PORT=str(ports["token"]),
        )
        stack.start_process("sender", WECOMBOT_HEALTH_PORT=str(ports["sender"]))
        stack.start_process("llm", WECOMBOT_HEALTH_PORT=str(ports["llm"]))
        await stack.start_in_process("llm", "gateway")
        # It fetches the first access_token.
        await until(
            lambda: _token_service_answers(nc), timeout=30, what="the token service's answer"
        )

        # A normal day, for several users (either llm replica may answer each).
        users = [f"secret.user{i}@corp" for i in range(4)]
        await asyncio.gather(*(stack.say(u, f"hello from {u}") for u in users))
        for user in users:
            assert await stack.wait_replies(user, 1) == [f"echo: hello from {user}"]

        # The access_token expires: the sender gets 42001, the token service refreshes.
        stack.wecom.expire_tokens()
        await stack.say(users[0], "after the night")
        await stack.wait_replies(users[0], 2)
        assert stack.wecom.gettoken_calls == 2

        # The model fails: the apology is stored (ReplyFailed) and delivered.
        stack.model.fail_always(Fault.server_error(500))
        await stack.say(users[1], "are you there?")
        assert (await stack.wait_replies(users[1], 2))[-1] == APOLOGY
        stack.model.fail_always(None)

        # WeCom refuses a reply for good, and a send fails on every allowed delivery:
        # both end in DeliveryFailed and in the DLQ.
        stack.wecom.reject_user("refused.user", 81013)
        await stack.say("refused.user", "you will not hear back")
        await until(lambda: _refusal_recorded(js), timeout=30, what="the refusal's DeliveryFailed")
        stack.wecom.fail_sends_http(502, times=2)
        await stack.say(users[2], "this reply is dead-lettered")
        await until(lambda: _dead_lettered(js), timeout=30, what="the dead-lettered reply")
        issued = list(stack.wecom._tokens)  # every access_token WeCom handed out
        # What Prometheus would scrape after such a day, from every process.
        scrapes = {
            name: (await stack.http.get(f"http://127.0.0.1:{port}/metrics")).text
            for name, port in {**ports, "in-process": stack.gateway_port}.items()
        }
        for service in reversed(stack.services):  # flush and close every log
            await service.terminate()
        stack.services.clear()

    assert len(issued) == 2
    events = [decode_event(d) for _, _, d in await _stored(js, topology.CONVERSATION_STREAM)]
    assert any(isinstance(e, ReplyFailed) for e in events)

    captured = capfd.readouterr()
    in_process = captured.err + captured.out
    process_logs = {p.name: p.read_text(encoding="utf-8") for p in tmp_path.glob("*.log")}
    # The capture really holds the services' lines (so an empty search proves nothing).
    assert '"service": "gateway"' in in_process and '"service": "llm"' in in_process
    for name in ("token", "sender", "llm"):
        assert any(f'"service": "{name}"' in text for text in process_logs.values()), name
    stored = [_blob(m) for m in await _stored(js, topology.CONVERSATION_STREAM)]
    dead = await _stored(js, topology.DEAD_LETTER_STREAM)
    reasons = [(h["Wecombot-Dlq-Consumer"], h["Wecombot-Dlq-Reason"]) for _, h, _ in dead]
    assert [c for c, _ in reasons] == ["sender", "sender"], reasons
    assert "81013" in reasons[0][1] and "HTTP 502" in reasons[1][1], reasons
    stored += [_blob(m) for m in dead]
    assert len(stored) > 20
    # The scrapes hold the day's counts (so an empty search proves nothing).
    assert 'wecombot_token_fetches_total{result="ok"} 2.0' in scrapes["token"]
    assert 'wecombot_sender_wecom_errors_total{errcode="81013"}' in scrapes["sender"]
    assert 'wecombot_gateway_callbacks_total{result="stored"}' in scrapes["in-process"]

    secrets = {
        "EncodingAESKey": AES_KEY,
        "callback Token": WECOM_TOKEN,
        "corp secret": CORP_SECRET,
        "model API key": LLM_API_KEY,
        "NATS password": NATS_PASSWORD,
        **{f"access_token #{i}": token for i, token in enumerate(issued, start=1)},
    }
    for what, secret in secrets.items():
        for form in _forms(secret):
            assert form not in in_process, f"{what} in the in-process services' log"
            for name, text in process_logs.items():
                assert form not in text, f"{what} in {name}"
            for data in stored:
                assert form.encode() not in data, f"{what} in a stored message: {data[:300]!r}"
            for name, text in scrapes.items():
                assert form not in text, f"{what} in the metrics of {name}"
