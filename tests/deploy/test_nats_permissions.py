"""The production NATS permissions (deploy/nats/auth.conf), for real.

A nats-server (JetStream on) runs with exactly the authorization file the Helm release
uses. Each service runs in this process with its own NATS user, as in Kubernetes, against
a simulated WeCom API and model; a message must go all the way through (twice: a second
start meets existing streams, consumers and bucket), without a single permission
violation in the server's log. Then each user tries what it must not do, and the server
must refuse it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import StreamConfig

from tests.e2e.harness import AGENT_ID, CORP_ID, InProcessService, Stack, service
from tests.waiting import until
from wecombot import setup as setup_command
from wecombot_common import bus, topology
from wecombot_common.embedded import EmbeddedNats
from wecombot_common.events import Event, ReplyDelivered, ReplyGenerated
from wecombot_common.settings import EnvReader, NatsSettings
from wecombot_common.topology import ConversationRef

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
AUTH_CONF = ROOT / "deploy" / "nats" / "auth.conf"
USERS = ("gateway", "llm", "sender", "token", "setup", "admin")
SERVICES = ("token", "llm", "sender", "gateway")
APP = f"{CORP_ID}-{AGENT_ID}"
# How nats-server logs a refusal: `... - "$G/user:llm" - Publish Violation - Subject "x"`.
VIOLATION = re.compile(r"(Publish|Subscription) Violation")


@dataclass
class SecuredNats:
    server: EmbeddedNats
    passwords: dict[str, str]
    log_file: Path

    @property
    def url(self) -> str:
        return self.server.url

    def violations(self) -> list[str]:
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return [line for line in text.splitlines() if VIOLATION.search(line)]


@pytest.fixture
def secured_nats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SecuredNats]:
    # nats-server resolves $WECOMBOT_NATS_<USER>_PASSWORD from its environment, as the
    # Helm values arrange from the Secret wecombot-nats.
    # nats-server parses an environment variable's value as a config value, so passwords
    # are letters and digits starting with a letter (docs/deploy.md shows how to make them).
    passwords = {user: "p" + secrets.token_hex(24) for user in USERS}
    for user, password in passwords.items():
        monkeypatch.setenv(f"WECOMBOT_NATS_{user.upper()}_PASSWORD", password)
    log_file = tmp_path / "nats.log"
    server = EmbeddedNats(tmp_path / "nats", config_file=AUTH_CONF, log_file=log_file)
    server.start()
    try:
        yield SecuredNats(server, passwords, log_file)
    finally:
        server.stop()


# ---------------------------------------------------------------- the services, for real


def _service_env(stack: Stack, nats_: SecuredNats, user: str) -> dict[str, str]:
    return {**stack.env(), "NATS_USER": user, "NATS_PASSWORD": nats_.passwords[user]}


async def _start_services(stack: Stack, nats_: SecuredNats) -> None:
    for name in SERVICES:
        load, serve = service(name)
        stop = asyncio.Event()
        settings = load(_service_env(stack, nats_, name))
        task = asyncio.create_task(serve(settings, stop), name=f"svc-{name}")
        stack.services.append(InProcessService(name, stop, task))
    await stack.wait_ready()


async def _stop_services(stack: Stack) -> None:
    while stack.services:
        await stack.services.pop().terminate()


@pytest.fixture
async def stack(secured_nats: SecuredNats, tmp_path: Path) -> AsyncIterator[Stack]:
    async with Stack(secured_nats.url, tmp_path) as s:
        yield s


async def _admin(nats_: SecuredNats) -> NATS:
    return await nats.connect(nats_.url, user="admin", password=nats_.passwords["admin"])


async def test_each_service_with_its_own_user_carries_a_message_end_to_end(
    stack: Stack, secured_nats: SecuredNats
) -> None:
    await _start_services(stack, secured_nats)
    await stack.say("zhang.san", "hello")
    assert await stack.wait_replies("zhang.san", 1) == ["echo: hello"]
    await stack.say("zhang.san", "/reset")  # ConversationReset on the llm branch
    await stack.wait_replies("zhang.san", 2)
    stack.wecom.expire_tokens()  # 42001 → sender asks token to invalidate → one refresh
    await stack.say("zhang.san", "after the token expired")
    assert (await stack.wait_replies("zhang.san", 3))[2] == "echo: after the token expired"
    assert stack.wecom.gettoken_calls == 2

    # A second start meets existing streams, consumers and the KV bucket.
    await _stop_services(stack)
    await _start_services(stack, secured_nats)
    await stack.say("li.si@corp", "after a restart")
    assert await stack.wait_replies("li.si@corp", 1) == ["echo: after a restart"]
    assert stack.wecom.gettoken_calls == 2  # the token came from the bucket

    assert secured_nats.violations() == []


async def test_poison_messages_reach_the_dead_letter_stream(
    stack: Stack, secured_nats: SecuredNats
) -> None:
    await _start_services(stack, secured_nats)
    admin = await _admin(secured_nats)
    try:
        js = admin.jetstream()
        root = ConversationRef(APP, "poison").root
        await js.publish(f"{root}.in", b"not an event")  # llm dead-letters it
        await js.publish(f"{root}.llm.reply", b"not an event either")  # sender does
        dlq_subjects: set[str] = set()

        async def collect() -> bool:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                for consumer in ("llm", "sender"):
                    msg = await js.get_last_msg(
                        topology.DEAD_LETTER_STREAM, f"{topology.PREFIX}.dlq.{consumer}"
                    )
                    dlq_subjects.add(msg.subject)
            return len(dlq_subjects) == 2

        await until(collect, timeout=20, what=lambda: f"both dead letters (have {dlq_subjects})")
    finally:
        await admin.close()
    assert secured_nats.violations() == []


@pytest.mark.parametrize(
    ("user", "branch"), [("llm", "llm"), ("sender", "send")], ids=["llm", "sender"]
)
async def test_an_append_goes_after_a_message_that_is_not_an_event(
    clients: dict[str, Client], secured_nats: SecuredNats, user: str, branch: str
) -> None:
    """The conditional append reads its branch's last message (a message get, not a
    direct one) to tell junk from a real conflict; refused, the conversation wedged."""
    client = clients[user]
    conv = ConversationRef(APP, f"after.junk.{user}")
    junk = await client.js.publish(f"{conv.root}.{branch}.x", b"not an event")
    reply = ReplyGenerated(app=APP, conversation=conv.user, correlation_id="m", text="hi")
    event: Event = reply
    if user == "sender":
        event = ReplyDelivered(
            app=APP,
            conversation=conv.user,
            correlation_id="m",
            reply_id=reply.event_id,
            parts=1,
            wecom_msgids=["w1"],
        )
    appended = await bus.append_event(
        client.js,
        event,
        expect_last_seq=0,
        expect_scope=f"{conv.root}.{branch}.>",
        timeout=5,
    )
    assert appended.seq > junk.seq
    assert client.errors == []
    assert secured_nats.violations() == []


# ---------------------------------------------------------------- what each user may not do


@dataclass
class Client:
    """One user's connection, as the service makes it (its own inbox prefix)."""

    nc: NATS
    errors: list[str] = field(default_factory=list)

    @property
    def js(self) -> Any:
        # Room for what must succeed (a file-store stream made on a loaded machine);
        # ``refused`` does not wait for its attempt, so this never slows a refusal.
        return self.nc.jetstream(timeout=10.0)

    async def refused(self, what: Callable[[], Awaitable[object]], subject: str) -> None:
        """Run ``what`` and expect the server to refuse ``subject`` to this user (the
        server says so at once; a refused request would only time out, so it is not
        waited for)."""
        before = len(self.errors)
        attempt = asyncio.ensure_future(what())
        try:
            await until(
                # nats-py lower-cases the server's "-ERR 'Permissions Violation for …'".
                lambda: any(
                    "permissions violation" in e.lower() and f'"{subject.lower()}"' in e.lower()
                    for e in self.errors[before:]
                ),
                timeout=5,
                what=lambda: f"a permissions violation for {subject!r} ({self.errors[before:]})",
            )
        finally:
            attempt.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError, nats.errors.Error):
                await attempt


@pytest.fixture
async def clients(secured_nats: SecuredNats) -> AsyncIterator[dict[str, Client]]:
    made: dict[str, Client] = {}
    for user in ("gateway", "llm", "sender", "token", "setup"):
        errors: list[str] = []

        async def on_error(exc: Exception, errors: list[str] = errors) -> None:
            errors.append(str(exc))

        # Connected exactly as the service connects (bus.connect: its own inbox prefix).
        settings = _nats_settings(
            NATS_URL=secured_nats.url,
            NATS_USER=user,
            NATS_PASSWORD=secured_nats.passwords[user],
        )
        nc = await bus.connect(settings, f"wecombot-{user}", error_cb=on_error)
        client = Client(nc, errors)
        made[user] = client
    # The streams exist (created as the gateway does at start).
    await bus.ensure_topology(made["gateway"].js, _nats_settings())
    try:
        yield made
    finally:
        for client in made.values():
            await client.nc.close()


def _nats_settings(**env: str) -> NatsSettings:
    return NatsSettings.read(EnvReader(env))


CONV = ConversationRef(APP, "mallory")


async def test_gateway_may_only_append_received_messages(
    clients: dict[str, Client], secured_nats: SecuredNats
) -> None:
    gateway = clients["gateway"]
    ack = await gateway.js.publish(f"{CONV.root}.in", b"{}")
    assert ack.stream == topology.CONVERSATION_STREAM
    await gateway.refused(
        lambda: gateway.js.publish(f"{CONV.root}.llm.reply", b"{}"), f"{CONV.root}.llm.reply"
    )
    # The server logs it too (what the end-to-end test asserts never happens there).
    await until(
        lambda: any(
            "user:gateway" in line and f"{CONV.root}.llm.reply" in line
            for line in secured_nats.violations()
        ),
        timeout=5,
        what="the violation in the server's log",
    )
    await gateway.refused(
        lambda: gateway.js.publish(f"{CONV.root}.send.done", b"{}"), f"{CONV.root}.send.done"
    )
    await gateway.refused(lambda: gateway.js.publish("wecombot.dlq.llm", b"{}"), "wecombot.dlq.llm")
    await gateway.refused(
        lambda: gateway.nc.request(topology.TOKEN_GET, b'{"app":"x"}', timeout=1),
        topology.TOKEN_GET,
    )
    await gateway.refused(
        lambda: gateway.nc.request("$JS.API.CONSUMER.MSG.NEXT.WECOMBOT.llm", b"{}", timeout=1),
        "$JS.API.CONSUMER.MSG.NEXT.WECOMBOT.llm",
    )
    await gateway.refused(
        lambda: gateway.js.get_msg(topology.CONVERSATION_STREAM, seq=1, direct=True),
        "$JS.API.DIRECT.GET.WECOMBOT",
    )


async def test_llm_appends_only_to_its_branch_and_never_asks_for_tokens(
    clients: dict[str, Client],
) -> None:
    llm = clients["llm"]
    ack = await llm.js.publish(f"{CONV.root}.llm.reply", b"{}")
    assert ack.stream == topology.CONVERSATION_STREAM
    await llm.refused(lambda: llm.js.publish(f"{CONV.root}.in", b"{}"), f"{CONV.root}.in")
    await llm.refused(
        lambda: llm.js.publish(f"{CONV.root}.send.part", b"{}"), f"{CONV.root}.send.part"
    )
    await llm.refused(
        lambda: llm.nc.request(topology.TOKEN_GET, b'{"app":"x"}', timeout=1), topology.TOKEN_GET
    )
    await llm.refused(lambda: llm.js.publish("wecombot.dlq.sender", b"{}"), "wecombot.dlq.sender")
    # Another service's work queue is not the llm's to take.
    await llm.refused(
        lambda: llm.nc.request("$JS.API.CONSUMER.MSG.NEXT.WECOMBOT.sender", b"{}", timeout=1),
        "$JS.API.CONSUMER.MSG.NEXT.WECOMBOT.sender",
    )


async def test_sender_appends_only_deliveries_and_cannot_read_the_token_bucket(
    clients: dict[str, Client],
) -> None:
    sender = clients["sender"]
    ack = await sender.js.publish(f"{CONV.root}.send.done", b"{}")
    assert ack.stream == topology.CONVERSATION_STREAM
    await sender.refused(
        lambda: sender.js.publish(f"{CONV.root}.llm.reply", b"{}"), f"{CONV.root}.llm.reply"
    )
    bucket = f"KV_{topology.TOKEN_BUCKET}"
    await sender.refused(
        lambda: sender.js.key_value(topology.TOKEN_BUCKET), f"$JS.API.STREAM.INFO.{bucket}"
    )
    await sender.refused(
        lambda: sender.js.get_msg(bucket, subject=f"$KV.{topology.TOKEN_BUCKET}.{APP}.token"),
        f"$JS.API.STREAM.MSG.GET.{bucket}",
    )
    await sender.refused(
        lambda: sender.nc.subscribe(f"$KV.{topology.TOKEN_BUCKET}.>"),
        f"$KV.{topology.TOKEN_BUCKET}.>",
    )
    await sender.refused(
        lambda: sender.js.publish(f"$KV.{topology.TOKEN_BUCKET}.{APP}.token", b"forged"),
        f"$KV.{topology.TOKEN_BUCKET}.{APP}.token",
    )


async def test_only_the_token_service_answers_and_touches_the_bucket(
    clients: dict[str, Client],
) -> None:
    token = clients["token"]
    kv = await token.js.create_key_value(topology.token_bucket(replicas=1))
    await kv.put(f"{APP}.token", b"{}")
    assert (await kv.get(f"{APP}.token")).value == b"{}"
    await token.refused(lambda: token.js.publish(f"{CONV.root}.in", b"{}"), f"{CONV.root}.in")
    # It answers requests, but cannot write to anyone's inbox uninvited.
    await token.refused(
        lambda: token.nc.publish("_INBOX.wecombot-sender.stolen", b"{}"),
        "_INBOX.wecombot-sender.stolen",
    )
    await token.refused(
        lambda: token.nc.request(topology.TOKEN_GET, b'{"app":"x"}', timeout=1),
        topology.TOKEN_GET,
    )


@pytest.mark.parametrize("thief", ["gateway", "llm", "token"])
async def test_nobody_reads_another_services_replies(
    clients: dict[str, Client], thief: str
) -> None:
    client = clients[thief]
    # The token service's answers to the sender carry access_tokens.
    await client.refused(
        lambda: client.nc.subscribe("_INBOX.wecombot-sender.>"), "_INBOX.wecombot-sender.>"
    )
    await client.refused(lambda: client.nc.subscribe("_INBOX.>"), "_INBOX.>")
    await client.refused(lambda: client.nc.subscribe(">"), ">")


@pytest.mark.parametrize("user", ["gateway", "llm", "sender"])
async def test_services_may_create_but_not_change_or_delete_the_log(
    clients: dict[str, Client], user: str
) -> None:
    client = clients[user]
    log_stream = topology.CONVERSATION_STREAM
    shrunk = replace(
        topology.conversation_stream(replicas=1, duplicate_window_s=900, max_age_s=3600),
        max_msgs=1,
    )
    await client.refused(
        lambda: client.js.update_stream(shrunk), f"$JS.API.STREAM.UPDATE.{log_stream}"
    )
    await client.refused(
        lambda: client.js.purge_stream(log_stream), f"$JS.API.STREAM.PURGE.{log_stream}"
    )
    await client.refused(
        lambda: client.js.delete_stream(log_stream), f"$JS.API.STREAM.DELETE.{log_stream}"
    )
    # A service whose settings differ from the stream cannot impose them either: the
    # update it asks for is refused (not waited out: the request would only time out).
    await client.refused(
        lambda: bus.ensure_topology(client.js, _nats_settings(WECOMBOT_HISTORY_MAX_AGE="7200")),
        f"$JS.API.STREAM.UPDATE.{log_stream}",
    )


async def test_setup_user_updates_the_streams_and_nothing_else(
    clients: dict[str, Client], secured_nats: SecuredNats
) -> None:
    settings = setup_command.SetupSettings.from_env(
        {
            "NATS_URL": secured_nats.url,
            "NATS_USER": "setup",
            "NATS_PASSWORD": secured_nats.passwords["setup"],
            "WECOMBOT_HISTORY_MAX_AGE": "7200",
        }
    )
    assert await setup_command.run_setup(settings, asyncio.Event())
    info = await clients["gateway"].js.stream_info(topology.CONVERSATION_STREAM)
    config: StreamConfig = info.config
    assert config.max_age == 7200
    setup = clients["setup"]
    await setup.refused(lambda: setup.js.publish(f"{CONV.root}.in", b"{}"), f"{CONV.root}.in")
    await setup.refused(
        lambda: setup.js.delete_stream(topology.CONVERSATION_STREAM),
        "$JS.API.STREAM.DELETE.WECOMBOT",
    )


async def test_every_start_meets_a_stream_capped_over_half_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single nats-server reserves a capped stream's max_bytes again when asked to
    create the stream it holds (err_code 10047): with a cap over half its store (the
    dev overlay's 1024 MiB of a 2 Gi volume's ≈ 1.5 GiB), every start after the first
    was refused, setup and every service exiting 2. Each user, as auth.conf allows it."""
    passwords = {user: "p" + secrets.token_hex(24) for user in USERS}
    for user, password in passwords.items():
        monkeypatch.setenv(f"WECOMBOT_NATS_{user.upper()}_PASSWORD", password)
    (tmp_path / "auth.conf").write_text(AUTH_CONF.read_text())
    conf = tmp_path / "nats.conf"
    conf.write_text('include "auth.conf"\njetstream { max_file_store: 100MiB }\n')
    log_file = tmp_path / "nats.log"
    server = EmbeddedNats(tmp_path / "nats", config_file=conf, log_file=log_file)
    server.start()
    try:
        for user in ("setup", "setup", "gateway", "llm", "sender"):
            settings = _nats_settings(
                NATS_URL=server.url,
                NATS_USER=user,
                NATS_PASSWORD=passwords[user],
                WECOMBOT_HISTORY_MAX_MB="60",
            )
            nc = await bus.connect(settings, f"wecombot-{user}")
            try:
                await bus.ensure_topology(nc.jetstream(timeout=10.0), settings)
            finally:
                await nc.close()
        admin = await nats.connect(server.url, user="admin", password=passwords["admin"])
        try:
            held = await admin.jetstream().stream_info(topology.CONVERSATION_STREAM)
        finally:
            await admin.close()
        assert held.config.max_bytes == 60 * 2**20
        assert not [line for line in log_file.read_text().splitlines() if VIOLATION.search(line)]
    finally:
        server.stop()


async def test_wrong_password_and_unknown_user_are_refused(secured_nats: SecuredNats) -> None:
    for user, password in (("gateway", "not-the-password"), ("root", "root")):
        with pytest.raises(nats.errors.Error):
            await nats.connect(
                secured_nats.url,
                user=user,
                password=password,
                max_reconnect_attempts=0,
                allow_reconnect=False,
                connect_timeout=2,
            )
    with pytest.raises(nats.errors.Error):
        await nats.connect(
            secured_nats.url, max_reconnect_attempts=0, allow_reconnect=False, connect_timeout=2
        )
