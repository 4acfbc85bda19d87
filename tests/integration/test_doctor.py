"""``wecombot doctor`` against real servers: a real nats-server (with and without
JetStream, with credentials), the simulated WeCom API with each gettoken error injected,
the real gateway for the callback check, and the simulated OpenAI API. No mocks."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.server
import io
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from aiohttp import web

from tests.cluster import NatsCluster
from tests.conftest import (
    SERVICE_PASSWORD,
    SERVICE_USER,
    NatsHandle,
    free_port,
    plain_nats_server,
)
from tests.integration.wecom_app import (
    AGENT,
    CORP,
    KEY,
    SECRET,
    TOKEN,
    running_gateway,
    wecom_env,
)
from tests.loopback import answer, raw_http, read_request
from tests.waiting import until
from wecombot.doctor import (
    Report,
    _not_public,
    check_callback,
    check_gettoken,
    check_model,
    check_nats,
    check_settings,
    diagnose,
    explain_gettoken_failure,
    main,
)
from wecombot_common import bus, logs
from wecombot_common.crypto import generate_encoding_aes_key, generate_token
from wecombot_common.http import LocalSite
from wecombot_common.settings import EnvReader, NatsSettings, WeComApiSettings
from wecombot_common.sim.openai_api import Fault, SimulatedOpenAIApi
from wecombot_common.sim.wecom_api import SimulatedWeComApi
from wecombot_token.domain import classify_errcode

pytestmark = pytest.mark.integration

TIMEOUT = 5.0


@pytest.fixture
async def wecom() -> AsyncIterator[SimulatedWeComApi]:
    async with SimulatedWeComApi(corp_id=CORP, secret=SECRET, agent_id=AGENT) as api:
        yield api


@pytest.fixture
async def model_api() -> AsyncIterator[SimulatedOpenAIApi]:
    async with SimulatedOpenAIApi(api_key="sk-sim", model="sim-model") as api:
        yield api


@pytest.fixture
async def gateway(nats_server: NatsHandle) -> AsyncIterator[str]:
    """The real gateway with this module's keys; yields its base URL."""
    async with running_gateway(nats_server.url) as base:
        yield base


# ---------------------------------------------------------------- settings


def test_settings_ok_when_every_service_accepts_them() -> None:
    finding = check_settings(wecom_env())
    assert finding.status == "ok"


def test_no_wecom_settings_is_explained_as_sandbox_mode() -> None:
    finding = check_settings({})
    assert finding.status == "fail"
    details = "\n".join(finding.details)
    assert "sandbox mode" in details
    assert "WECOM_CORP_ID is required" in details
    assert "我的企业" in details  # where to find it


def test_malformed_settings_are_named_with_where_to_find_them() -> None:
    env = wecom_env(WECOM_AGENT_ID="abc", WECOM_ENCODING_AES_KEY="too-short")
    finding = check_settings(env)
    assert finding.status == "fail"
    assert finding.summary == "2 problems in the settings"
    details = "\n".join(finding.details)
    assert "WECOM_AGENT_ID must be a number (the app's AgentId), got 'abc'" in details
    assert "(read by gateway, sender, token)" in details
    assert "WECOM_ENCODING_AES_KEY must be 43 characters, got 9 (read by gateway)" in details
    assert "EncodingAESKey (随机获取)" in details


def test_unusable_urls_keys_and_paths_are_named_without_showing_secrets() -> None:
    """What the services now refuse at start (exit 2), doctor names the same way: a
    password in a URL and the key are never printed."""
    env = wecom_env(
        "https://ww:S3cretPw@qyapi.weixin.qq.com",
        OPENAI_API_KEY="sk-Distinct1ve\u00e9",
        OPENAI_BASE_URL="http://[llm/v1",
        GATEWAY_CALLBACK_PATH="/%6detrics",
    )
    finding = check_settings(env)
    assert finding.status == "fail"
    assert finding.summary == "4 problems in the settings"
    details = "\n".join(finding.details)
    assert "WECOM_API_BASE must not hold user:password@" in details
    assert "OPENAI_API_KEY must be printable ASCII without spaces" in details
    assert "OPENAI_BASE_URL does not parse as a URL" in details
    assert "GATEWAY_CALLBACK_PATH must not hold '%'" in details
    assert "S3cret" not in details and "Distinct1ve" not in details


def test_the_event_loop_setting_is_checked_as_the_services_check_it() -> None:
    """WECOMBOT_EVENT_LOOP=foo was '[ ok ] settings' while every service refused to
    start with it (run_service reads it before their own settings)."""
    finding = check_settings(wecom_env(WECOMBOT_EVENT_LOOP="foo"))
    assert finding.status == "fail"
    details = "\n".join(finding.details)
    assert (
        "WECOMBOT_EVENT_LOOP must be one of auto|uvloop|asyncio, got 'foo' "
        "(read by gateway, llm, sender, token)"
    ) in details


def test_a_proxy_the_outbound_calls_cannot_use_is_a_settings_problem() -> None:
    # Not loopback URLs: those are called direct, whatever the proxy
    env = wecom_env(
        "https://qyapi.wecom.invalid", ALL_PROXY="socks5://egress.corp:1080", OPENAI_API_KEY="sk"
    )
    finding = check_settings(env)
    assert finding.status == "fail"
    details = "\n".join(finding.details)
    assert "(ALL_PROXY) is a socks5:// proxy; the model calls can use" in details
    assert "the WeCom API calls (gettoken, message/send) can use" in details
    assert "(read by sender, token)" in details
    assert "(read by llm)" in details


async def test_a_proxy_that_is_not_a_url_is_named_not_quoted() -> None:
    """httpx raised InvalidURL when doctor built its client: a traceback, no report; and
    the value may hold a password."""
    env = wecom_env("https://qyapi.wecom.invalid", HTTPS_PROXY="http://u:s3cret@egress:31x8")
    finding = await check_gettoken(env, TIMEOUT)
    assert finding.status == "fail"
    assert finding.summary == (
        "the token service would not start: the environment's proxy for https:// URLs "
        "(HTTPS_PROXY) is not a URL the WeCom API calls (gettoken, message/send) can use: "
        "http://[user:password@]host:port expected"
    )
    assert "s3cret" not in "\n".join((finding.summary, *finding.details))
    assert "s3cret" not in "\n".join(check_settings(env).details)


async def test_gettoken_behind_a_proxy_the_token_service_refuses() -> None:
    """Doctor died with httpx's ImportError (socksio) and a traceback, no report."""
    env = wecom_env("https://qyapi.wecom.invalid", ALL_PROXY="socks5://127.0.0.1:1080")
    finding = await check_gettoken(env, TIMEOUT)
    assert finding.status == "fail"
    assert finding.summary.startswith("the token service would not start: ")
    assert "socks5:// proxy" in finding.summary


# ---------------------------------------------------------------- NATS


async def test_nats_reachable_with_jetstream(nats_server: NatsHandle) -> None:
    finding = await check_nats({"NATS_URL": nats_server.url}, TIMEOUT)
    assert finding.status == "ok", finding
    assert "JetStream enabled" in finding.summary
    assert re.search(r"\(server \d+\.\d+\.\d+, \d+ streams; ", finding.summary), finding.summary
    assert "not created yet" in finding.summary


async def test_nats_says_what_the_event_log_holds_against_its_cap(
    nats_server: NatsHandle,
) -> None:
    """Its size and its byte cap (WECOMBOT_HISTORY_MAX_MB), and a cap configured here
    that the stream does not have yet (setup has not applied it)."""
    env = {"NATS_URL": nats_server.url, "WECOMBOT_HISTORY_MAX_MB": "2"}
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await bus.ensure_topology(js, NatsSettings.read(EnvReader(env)))
        for i in range(3):
            await js.publish(f"wecombot.conv.app.u{i}.in", b"e" * 2**19)
    finally:
        await nc.close()
    capped = await check_nats(env, TIMEOUT)
    assert capped.status == "ok", capped
    assert re.search(
        r"stream WECOMBOT holds 3 events, 1\.5 MiB \(of its 2\.0 MiB cap\)\)$", capped.summary
    ), capped.summary
    assert not [d for d in capped.details if "WECOMBOT_HISTORY_MAX_MB" in d], capped.details
    other = await check_nats({**env, "WECOMBOT_HISTORY_MAX_MB": "0"}, TIMEOUT)
    assert other.status == "ok", other
    assert other.summary == capped.summary
    [said] = [d for d in other.details if "WECOMBOT_HISTORY_MAX_MB" in d]
    assert said.startswith("WECOMBOT_HISTORY_MAX_MB is 0 (no cap) here, not the stream's: ")
    assert "`wecombot setup` applies it" in said


async def test_nats_names_every_stream_setting_the_event_log_does_not_have_yet(
    nats_server: NatsHandle,
) -> None:
    """A new WECOMBOT_HISTORY_MAX_AGE or WECOMBOT_DUPLICATE_WINDOW that setup has not
    applied: the services wait, not ready (their NATS users may not change the stream),
    and doctor said nothing of it (only of the byte cap)."""
    nc = await nats.connect(nats_server.url)
    try:
        await bus.ensure_topology(nc.jetstream(), NatsSettings.read(EnvReader({})))
    finally:
        await nc.close()
    env = {"NATS_URL": nats_server.url}
    assert not (await check_nats(env, TIMEOUT)).details
    changed = {**env, "WECOMBOT_DUPLICATE_WINDOW": "600", "WECOMBOT_HISTORY_MAX_AGE": "604800"}
    finding = await check_nats(changed, TIMEOUT)
    assert finding.status == "ok", finding
    [said] = [d for d in finding.details if "not the stream's" in d]
    assert said.startswith(
        "WECOMBOT_DUPLICATE_WINDOW is 600 s and WECOMBOT_HISTORY_MAX_AGE is 604800 s here, "
        "not the stream's: `wecombot setup` applies them"
    ), said


async def test_an_event_log_that_does_not_answer_fails_the_check_not_doctor(
    nats_cluster: NatsCluster,
) -> None:
    """JetStream answers (a meta leader), but the stream WECOMBOT does not: its one
    replica's server is down (or its leader still being elected). Doctor, run because
    nothing answers, ended in a traceback (ServerError: stream is offline) and no
    report."""
    nc = await nats.connect(nats_cluster.urls)
    try:
        js = nc.jetstream()
        await bus.ensure_topology(js, NatsSettings.read(EnvReader({})))  # one replica
        held_by = (await js.stream_info("WECOMBOT")).cluster
    finally:
        await nc.close()
    assert held_by is not None and held_by.leader is not None
    node = int(held_by.leader.removeprefix("n"))
    nats_cluster.stop_node(node)
    url = nats_cluster.urls[(node + 1) % len(nats_cluster.urls)]

    async def jetstream_answers() -> bool:  # the other two elect a meta leader if need be
        async with contextlib.AsyncExitStack() as stack:
            client = await nats.connect(url)
            stack.push_async_callback(client.close)
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                await client.jetstream(timeout=1).account_info()
                return True
        return False

    await until(jetstream_answers, timeout=30, what="JetStream to answer without that node")
    finding = await check_nats({"NATS_URL": url}, TIMEOUT)
    assert finding.status == "fail", finding
    assert finding.summary == (
        f"{url} reachable, JetStream enabled, but the stream WECOMBOT does not answer "
        "(ServerError: stream is offline)"
    ), finding.summary
    assert "nats stream info WECOMBOT" in finding.details[0], finding.details


async def test_a_broker_slow_to_answer_has_the_whole_timeout(nats_server: NatsHandle) -> None:
    """A single server slower to greet than a third of the timeout was "unreachable":
    each connection attempt had a third of it (`wecombot dev` refused a broker answering
    in 2 s of its documented 5)."""
    host, port = nats_server.url.removeprefix("nats://").rsplit(":", 1)

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(1.5)  # the broker's slowness: what is under test
        up_reader, up_writer = await asyncio.open_connection(host, int(port))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    proxy = await asyncio.start_server(slow, "127.0.0.1", 0)
    url = f"nats://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
    try:
        finding = await check_nats({"NATS_URL": url}, 3.0)
    finally:
        proxy.close()
    assert finding.status == "ok", finding


async def test_nats_unreachable() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    finding = await check_nats({"NATS_URL": url}, TIMEOUT)
    assert finding.status == "fail"
    assert finding.summary == f"cannot reach NATS at {url}: nothing listens at that address"
    assert "nats-server -js" in finding.details[0]


@pytest.fixture
def nats_with_password(tmp_path: Path) -> Iterator[str]:
    yield from plain_nats_server(
        tmp_path, "-js", "-sd", str(tmp_path / "js"), "--user", "bot", "--pass", "pw1"
    )


NATS_PASSWORD = "pw-in-the-url-0815"


@pytest.fixture
def nats_with_url_password(tmp_path: Path) -> Iterator[str]:
    yield from plain_nats_server(
        tmp_path, "-js", "-sd", str(tmp_path / "js"), "--user", "bot", "--pass", NATS_PASSWORD
    )


def test_a_password_in_nats_url_is_never_printed(
    nats_with_url_password: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole command's output, for a NATS_URL with the password accepted, refused,
    and with nothing listening."""
    monkeypatch.chdir(tmp_path)  # no ./.env of the developer's
    host = nats_with_url_password.removeprefix("nats://")
    urls = {
        "ok": f"nats://bot:{NATS_PASSWORD}@{host}",
        "refused": f"nats://bot:{NATS_PASSWORD}x@{host}",
        "unreachable": f"nats://bot:{NATS_PASSWORD}@127.0.0.1:{free_port()}",
    }
    for expected, url in urls.items():
        out = io.StringIO()
        main(wecom_env(NATS_URL=url), ["--timeout", "3"], out=out)
        printed = out.getvalue()
        nats_line = next(line for line in printed.splitlines() if " nats " in line)
        assert ("[ ok ]" in nats_line) == (expected == "ok"), printed
        assert NATS_PASSWORD not in printed, printed
        assert f"nats://{url.rpartition('@')[2]}" in printed


async def test_a_user_the_broker_refuses_jetstream_is_told_so(
    nats_with_a_service_user: str,
) -> None:
    """A service's user (doctor.md says to run doctor where the services run) was told
    'did not answer a JetStream request (TimeoutError)': the broker had refused it."""
    env = {
        "NATS_URL": nats_with_a_service_user,
        "NATS_USER": SERVICE_USER,
        "NATS_PASSWORD": SERVICE_PASSWORD,
    }
    finding = await check_nats(env, 2.0)
    assert finding.status == "fail"
    assert finding.summary == (
        f"NATS at {nats_with_a_service_user} refused the user {SERVICE_USER!r} requests to "
        "the JetStream API and replies on its inbox"
    ), finding.summary
    assert "admin credentials" in finding.details[0]
    assert SERVICE_PASSWORD not in finding.summary


async def test_nats_without_jetstream(nats_without_jetstream: str) -> None:
    finding = await check_nats({"NATS_URL": nats_without_jetstream}, TIMEOUT)
    assert finding.status == "fail"
    assert "JetStream is not enabled" in finding.summary
    assert "-js" in finding.details[0]


async def test_nats_credentials(nats_with_password: str) -> None:
    refused = await check_nats(
        {"NATS_URL": nats_with_password, "NATS_USER": "bot", "NATS_PASSWORD": "wrong"}, TIMEOUT
    )
    assert refused.status == "fail"
    assert "refused the credentials" in refused.summary
    assert "NATS_USER and NATS_PASSWORD" in refused.details[0]
    accepted = await check_nats(
        {"NATS_URL": nats_with_password, "NATS_USER": "bot", "NATS_PASSWORD": "pw1"}, TIMEOUT
    )
    assert accepted.status == "ok", accepted


# ---------------------------------------------------------------- gettoken


async def test_gettoken_ok(wecom: SimulatedWeComApi) -> None:
    finding = await check_gettoken(wecom_env(wecom.base_url), TIMEOUT)
    assert finding.status == "ok", finding
    assert f"issued an access_token for {CORP} (valid 7200 s)" in finding.summary


async def test_gettoken_names_the_app_of_the_agent_id(wecom: SimulatedWeComApi) -> None:
    finding = await check_gettoken(wecom_env(wecom.base_url), TIMEOUT)
    assert finding.summary.endswith(f", app 'wecombot' (AgentId {AGENT})"), finding


async def test_an_agent_id_of_another_app_fails_though_its_secret_works(
    wecom: SimulatedWeComApi,
) -> None:
    """A wrong AgentId passed every check, then the gateway refused every message of the
    real app (403, for another app) and WeCom dropped them after its retries."""
    other = str(AGENT + 1)
    finding = await check_gettoken(wecom_env(wecom.base_url, WECOM_AGENT_ID=other), TIMEOUT)
    assert finding.status == "fail", finding
    assert finding.summary == (
        f"WECOM_AGENT_ID {other} is not the app of this WECOM_SECRET (agent/get: errcode 301002)"
    )
    assert "WrongRecipient" in finding.details[0]
    assert "errcode 301002: not allow operate another agent" in finding.details[1]


class _NoAgentGet(SimulatedWeComApi):
    """A front of WeCom's API that lets through only what the services call."""

    def routes(self) -> list[web.RouteDef]:
        return [r for r in super().routes() if not r.path.endswith("/agent/get")]


async def test_an_agent_id_that_cannot_be_checked_is_a_warning() -> None:
    async with _NoAgentGet(corp_id=CORP, secret=SECRET, agent_id=AGENT) as api:
        finding = await check_gettoken(wecom_env(api.base_url), TIMEOUT)
    assert finding.status == "warn", finding
    assert finding.summary.endswith(f"; WECOM_AGENT_ID {AGENT} could not be checked (HTTP 404)")


async def test_gettoken_bad_secret(wecom: SimulatedWeComApi) -> None:
    wecom.fail_gettoken(40001)
    finding = await check_gettoken(wecom_env(wecom.base_url), TIMEOUT)
    assert finding.status == "fail"
    assert finding.summary == "WeCom refused WECOM_SECRET (errcode 40001)"
    assert "Copy the app's Secret again" in finding.details[0]
    # and without injection: a wrong secret is refused the same way
    wrong = await check_gettoken(wecom_env(wecom.base_url, WECOM_SECRET="nope"), TIMEOUT)
    assert wrong.summary == finding.summary


async def test_gettoken_bad_corp_id(wecom: SimulatedWeComApi) -> None:
    wecom.fail_gettoken(40013)
    finding = await check_gettoken(wecom_env(wecom.base_url), TIMEOUT)
    assert finding.status == "fail"
    assert finding.summary == f"WeCom does not know the CorpID '{CORP}' (errcode 40013)"
    assert "企业ID" in finding.details[0]


async def test_gettoken_untrusted_ip_names_the_ip_wecom_saw(wecom: SimulatedWeComApi) -> None:
    wecom.fail_gettoken(60020)
    finding = await check_gettoken(wecom_env(wecom.base_url), TIMEOUT)
    assert finding.status == "fail"
    assert "(errcode 60020)" in finding.summary
    assert finding.details[0].startswith(
        "WeCom saw the request come from 127.0.0.1. Add 127.0.0.1 to the app's trusted IPs"
    )
    assert "企业可信IP" in finding.details[0]


def test_gettoken_untrusted_ip_without_the_ip_says_how_to_find_it() -> None:
    env = EnvReader(wecom_env())
    settings = WeComApiSettings.read(env)
    failure = classify_errcode(60020, "not allow to access from your ip")
    finding = explain_gettoken_failure(failure, settings)
    assert "WeCom did not say which IP it saw" in finding.details[0]
    assert "egress IP" in finding.details[0]


async def test_gettoken_other_errcodes(wecom: SimulatedWeComApi) -> None:
    wecom.fail_gettoken(45009)
    limited = await check_gettoken(wecom_env(wecom.base_url), TIMEOUT)
    assert "rate-limiting" in limited.summary
    wecom.fail_gettoken(40056)
    other = await check_gettoken(wecom_env(wecom.base_url), TIMEOUT)
    assert other.summary == "gettoken failed with errcode 40056"
    assert "devtool/query?e=40056" in other.details[1]


async def test_gettoken_wecom_unreachable_or_failing(wecom: SimulatedWeComApi) -> None:
    wecom.set_down(True)
    down = await check_gettoken(wecom_env(wecom.base_url), TIMEOUT)
    assert down.status == "fail"
    assert "no usable answer from WeCom" in down.summary
    assert "503" in down.details[0]
    closed = await check_gettoken(wecom_env(f"http://127.0.0.1:{free_port()}"), TIMEOUT)
    assert closed.status == "fail"
    assert "firewall" in closed.details[1]


@pytest.mark.parametrize(
    "api_base",
    ["http://[127.0.0.1/", "http://ww:S3cretPw@127.0.0.1:9", "http://127.0.0.1:port"],
)
async def test_gettoken_waits_for_a_usable_api_base(api_base: str) -> None:
    """urlsplit's ValueError escaped (doctor ended in a traceback), and a password in the
    URL was printed with the host ('ConnectError calling ww:…@127.0.0.1:9')."""
    finding = await check_gettoken(wecom_env(api_base), TIMEOUT)
    assert finding.status == "skip"
    # Only what is wrong: it named all four it reads, WECOM_SECRET fine or not.
    assert finding.summary == "fix WECOM_API_BASE first (see settings above)"


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "soon"])
def test_a_timeout_that_is_no_time_is_refused(
    timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to run every check with it and fail them all as network timeouts."""
    with pytest.raises(SystemExit) as exited:
        main(wecom_env(), ["--timeout", timeout], out=io.StringIO())
    assert exited.value.code == 2
    assert "is not a number of seconds" in capsys.readouterr().err


# ---------------------------------------------------------------- callback URL


async def test_callback_skipped_without_a_public_url() -> None:
    finding = await check_callback(wecom_env(), None, TIMEOUT)
    assert finding.status == "skip"
    assert "--public-url" in finding.summary


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[bad", "--public-url does not parse as a URL"),  # urlsplit raised before
        ("ftp://example.com/wecom/callback", "--public-url must be a URL starting with"),
        ("https://bot:S3cretPw@example.com/", "--public-url must not hold user:password@"),
    ],
)
async def test_callback_with_a_public_url_that_is_no_url(url: str, message: str) -> None:
    finding = await check_callback(wecom_env(), url, TIMEOUT)
    assert finding.status == "fail"
    assert message in finding.summary
    assert "S3cretPw" not in finding.summary


@pytest.mark.parametrize("wecom_settings", [True, False])
def test_a_public_url_setting_that_is_no_url_is_named_as_the_setting(
    wecom_settings: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WECOMBOT_PUBLIC_URL without its scheme was said to be a bad `--public-url`, an
    option the user never gave; and while a WeCom setting was missing it was not said at
    all (the check skipped, naming only the WeCom settings)."""
    monkeypatch.chdir(tmp_path)  # no ./.env of the developer's
    env = wecom_env() if wecom_settings else {}
    env |= {
        "WECOMBOT_PUBLIC_URL": "bot.example.com/wecom/callback",
        "NATS_URL": f"nats://127.0.0.1:{free_port()}",
    }
    out = io.StringIO()
    assert main(env, ["--timeout", "3"], out=out) == 1
    printed = " ".join(out.getvalue().split())
    assert (
        "[FAIL] callback WECOMBOT_PUBLIC_URL must be a URL starting with http:// or https://, "
        "got 'bot.example.com/wecom/callback'" in printed
    ), printed
    assert "--public-url must" not in printed, printed


async def test_callback_verified_by_the_real_gateway(gateway: str) -> None:
    """Verified, but on this machine: WeCom cannot call it (a first try said "Save this
    URL" for http://127.0.0.1)."""
    finding = await check_callback(wecom_env(), gateway, TIMEOUT)  # path appended
    assert finding.status == "warn", finding
    assert f"{gateway}/wecom/callback answered WeCom's URL verification" in finding.summary
    assert finding.details[0].startswith("But 127.0.0.1 is this machine: WeCom calls from")


@pytest.mark.parametrize(
    ("host", "said"),
    [
        ("localhost", "this machine"),
        ("127.0.0.2", "this machine"),
        ("::1", "this machine"),
        ("10.1.2.3", "a private address"),
        ("192.168.1.5", "a private address"),
        ("fe80::1", "a private address"),
        ("8.8.8.8", None),
        ("bot.example.com", None),
    ],
)
def test_hosts_wecom_cannot_reach(host: str, said: str | None) -> None:
    assert _not_public(host) == said


async def test_an_https_url_on_a_plain_http_port_is_said_to_be_that(gateway: str) -> None:
    """It was explained as an invalid certificate."""
    url = gateway.replace("http://", "https://") + "/wecom/callback"
    finding = await check_callback(wecom_env(), url, TIMEOUT)
    assert finding.status == "fail", finding
    assert finding.details[0].startswith("The port does not speak TLS")


async def test_callback_with_another_token(gateway: str) -> None:
    env = wecom_env(WECOM_TOKEN=generate_token())
    finding = await check_callback(env, f"{gateway}/wecom/callback", TIMEOUT)
    assert finding.status == "fail"
    assert "refused the signature (403)" in finding.summary
    assert "WECOM_TOKEN" in finding.details[0]


async def test_callback_with_another_aes_key(gateway: str) -> None:
    env = wecom_env(WECOM_ENCODING_AES_KEY=generate_encoding_aes_key())
    finding = await check_callback(env, gateway, TIMEOUT)
    assert finding.status == "fail"
    assert "could not decrypt the echo (400)" in finding.summary


async def test_callback_on_the_wrong_path(gateway: str) -> None:
    finding = await check_callback(wecom_env(), f"{gateway}/callback", TIMEOUT)
    assert finding.status == "fail"
    assert "nothing serves the callback" in finding.summary
    assert "GATEWAY_CALLBACK_PATH is /wecom/callback" in finding.details[0]


async def test_callback_answered_by_something_else() -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="<html>Welcome to nginx!</html>")

    app = web.Application()
    app.router.add_get("/wecom/callback", hello)
    site = await LocalSite.start(app, "127.0.0.1", 0)
    try:
        finding = await check_callback(wecom_env(), f"http://127.0.0.1:{site.port}", TIMEOUT)
    finally:
        await site.stop()
    assert finding.status == "fail"
    assert "something else answers" in finding.summary
    assert "Welcome to nginx" in finding.details[0]


@pytest.fixture
def environment_dump() -> Iterator[tuple[str, dict[str, str]]]:
    """A page at the public URL that dumps its environment (another app's debug page),
    the secrets of a configuration of its own in it; one cut by doctor's clip at 160.
    Under /moved/, a redirect quoting one."""
    env = wecom_env(
        WECOM_SECRET=f"dumped-secret-{secrets.token_hex(8)}",
        OPENAI_API_KEY=f"sk-dumped-{secrets.token_hex(12)}",
        OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1",
    )
    shown = f"WECOM_SECRET={env['WECOM_SECRET']} OPENAI_API_KEY={env['OPENAI_API_KEY']} "
    cut = f"WECOM_ENCODING_AES_KEY={env['WECOM_ENCODING_AES_KEY']}"  # from 140, past 160
    page = shown + "-" * (140 - len(shown) - len("WECOM_ENCODING_AES_KEY=") - 1) + " " + cut
    assert page.index(env["WECOM_ENCODING_AES_KEY"]) == 140
    body = page.encode()

    class Dump(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/moved/"):  # the summary, wrapped at its hyphens
                self.send_response(302)
                self.send_header("Location", f"/login?from={env['OPENAI_API_KEY']}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Dump)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", env
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize("where", ["dump", "moved"])
def test_no_secret_of_the_configuration_is_printed_whatever_a_server_quotes(
    where: str,
    environment_dump: tuple[str, dict[str, str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """doctor redacted case by case: a page quoting the secrets (not WeCom's answer, not
    the provider's) was printed as it came, one cut by the clip could not be found, and
    one in a line the report wraps could be broken at its hyphens."""
    monkeypatch.chdir(tmp_path)  # no ./.env of the developer's
    base, env = environment_dump
    url = f"{base}/moved/wecom/callback" if where == "moved" else base
    out = io.StringIO()
    assert main(env, ["--public-url", url, "--timeout", "3"], out=out) == 1
    printed = " ".join(out.getvalue().split())  # as one line: the report wraps its details
    if where == "dump":
        assert "something else answers" in printed, printed
        assert "WECOM_SECRET=[REDACTED] OPENAI_API_KEY=[REDACTED] ---" in printed, printed
        assert "WECOM_ENCODING_AES_KEY=[REDACTED]'" in printed, printed
    else:
        assert "redirects to /login?from=[REDACTED]" in printed, printed
    for name in ("WECOM_SECRET", "OPENAI_API_KEY", "WECOM_ENCODING_AES_KEY"):
        assert env[name][:12] not in printed, (name, printed)


@pytest.fixture
def ollama(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """An in-cluster Ollama, as docs/providers.md sets one up: its Service named
    ``ollama`` (resolved here to the simulated API on loopback), and the placeholder key
    its docs give, ``ollama`` (it needs none, the clients want one). Its port."""
    resolve = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        named = host in ("ollama", b"ollama")  # anyio asks with the name IDNA-encoded
        return resolve("127.0.0.1" if named else host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    # doctor registers the environment's secrets for good: not for the next tests
    monkeypatch.setattr(logs, "_secrets", set(logs._secrets))
    monkeypatch.setattr(logs, "_registered", logs._registered)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    api = SimulatedOpenAIApi(api_key="ollama", model="qwen2.5:7b")
    try:
        asyncio.run_coroutine_threadsafe(api.start(), loop).result(10)
        yield api.port
        asyncio.run_coroutine_threadsafe(api.stop(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


def test_a_placeholder_key_in_a_url_doctor_shows_leaves_the_url_readable(
    ollama: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report redacts every secret of the environment from each line, so the base
    URL it checked came out as http://[REDACTED]:11434/v1 when the key is a placeholder
    that names the host (Ollama's 'ollama'). What doctor shows of the settings it
    checks is shown as set; the key is still redacted wherever something else quotes it."""
    monkeypatch.chdir(tmp_path)  # no ./.env of the developer's
    base_url = f"http://ollama:{ollama}/v1"
    env = wecom_env(OPENAI_API_KEY="ollama", OPENAI_BASE_URL=base_url, OPENAI_MODEL="qwen2.5:7b")
    out = io.StringIO()
    main(env, ["--timeout", "3"], out=out)
    [model] = [line for line in out.getvalue().splitlines() if " model " in line[:20]]
    assert f"{base_url} answers, and lists the model qwen2.5:7b" in model, out.getvalue()
    assert "[REDACTED]" not in model
    assert logs.redact("Authorization: key ollama") == "Authorization: key [REDACTED]"


async def test_callback_unreachable() -> None:
    url = f"http://127.0.0.1:{free_port()}/wecom/callback"
    finding = await check_callback(wecom_env(), url, TIMEOUT)
    assert finding.status == "fail"
    assert finding.summary.startswith(f"cannot reach {url}")


@pytest.mark.parametrize("path", ["/wecom\x01callback", "/%6detrics", "/wecom/../callback"])
async def test_callback_waits_for_a_path_the_gateway_accepts(path: str) -> None:
    """httpx's InvalidURL for a control character escaped the check; a path the gateway
    refuses at start is not one WeCom can be given."""
    url = f"http://127.0.0.1:{free_port()}"
    finding = await check_callback(wecom_env(GATEWAY_CALLBACK_PATH=path), url, TIMEOUT)
    assert finding.status == "skip"
    assert finding.summary == "fix GATEWAY_CALLBACK_PATH first (see settings above)"


# ---------------------------------------------------------------- model


async def test_model_offline_is_reported_not_failed() -> None:
    finding = await check_model({}, TIMEOUT)
    assert finding.status == "warn"
    assert "offline mode" in finding.summary
    assert "OFFLINE" in finding.summary


@pytest.mark.parametrize("key", [None, ""])
async def test_model_without_the_key_it_requires_fails(key: str | None) -> None:
    env = {"LLM_REQUIRE_API_KEY": "true"} | ({} if key is None else {"OPENAI_API_KEY": key})
    finding = await check_model(env, TIMEOUT)
    assert finding.status == "fail"
    assert "LLM_REQUIRE_API_KEY=true" in finding.summary
    settings = check_settings(wecom_env(**env))
    assert settings.status == "fail"
    assert any("OPENAI_API_KEY is required" in line for line in settings.details)


async def test_model_listed(model_api: SimulatedOpenAIApi) -> None:
    env = {
        "OPENAI_API_KEY": "sk-sim",
        "OPENAI_BASE_URL": model_api.base_url,
        "OPENAI_MODEL": "sim-model",
    }
    finding = await check_model(env, TIMEOUT)
    assert finding.status == "ok", finding
    assert "lists the model sim-model" in finding.summary
    assert model_api.chat_requests == []  # listing it was enough: no tokens spent


async def test_model_not_listed_is_tried_with_one_token(model_api: SimulatedOpenAIApi) -> None:
    env = {
        "OPENAI_API_KEY": "sk-sim",
        "OPENAI_BASE_URL": model_api.base_url,
        "OPENAI_MODEL": "deployed",
    }
    finding = await check_model(env, TIMEOUT)
    assert finding.status == "ok", finding
    assert "answered a one-token completion with deployed" in finding.summary
    assert model_api.chat_requests[-1].body["max_tokens"] == 1


async def test_a_model_the_provider_does_not_have_is_named_with_what_it_lists() -> None:
    """A typo in OPENAI_MODEL (the provider answers 404 model_not_found, as OpenAI does)."""
    async with SimulatedOpenAIApi(api_key="sk-sim", model="gpt-4o-mini", strict_model=True) as api:
        env = {"OPENAI_API_KEY": "sk-sim", "OPENAI_BASE_URL": api.base_url}
        finding = await check_model({**env, "OPENAI_MODEL": "gpt-4o-mni"}, TIMEOUT)
    assert finding.status == "fail", finding
    assert finding.summary.startswith(f"{api.base_url} has no model 'gpt-4o-mni' (404: ")
    assert "It lists: gpt-4o-mini." in " ".join(finding.details)


async def test_model_key_refused(model_api: SimulatedOpenAIApi) -> None:
    env = {"OPENAI_API_KEY": "sk-wrong", "OPENAI_BASE_URL": model_api.base_url}
    finding = await check_model(env, TIMEOUT)
    assert finding.status == "fail"
    assert "refused OPENAI_API_KEY (401: Incorrect API key provided.)" in finding.summary


async def test_model_failing_or_limited(model_api: SimulatedOpenAIApi) -> None:
    env = {"OPENAI_API_KEY": "sk-sim", "OPENAI_BASE_URL": model_api.base_url, "OPENAI_MODEL": "m"}
    model_api.fail_next(Fault.server_error(503))
    failing = await check_model(env, TIMEOUT)
    assert failing.status == "fail"
    assert "is failing (503" in failing.summary
    model_api.fail_next(Fault.rate_limited())
    limited = await check_model(env, TIMEOUT)
    assert "(429)" in limited.summary


async def test_model_unreachable() -> None:
    base = f"http://127.0.0.1:{free_port()}/v1"
    finding = await check_model({"OPENAI_API_KEY": "k", "OPENAI_BASE_URL": base}, TIMEOUT)
    assert finding.status == "fail"
    assert finding.summary.startswith(f"cannot reach {base}")


@pytest.mark.parametrize(
    "env",
    [
        {"OPENAI_API_KEY": "sk-Distinct1ve\u00e9"},
        {"OPENAI_API_KEY": "sk-sim", "OPENAI_BASE_URL": "http://[127.0.0.1/v1"},
        {"OPENAI_API_KEY": "sk-sim", "OPENAI_BASE_URL": "http://u:S3cretPw@127.0.0.1:9/v1"},
    ],
)
async def test_model_waits_for_a_usable_key_and_url(env: dict[str, str]) -> None:
    """UnicodeEncodeError (the key in a header) and urlsplit's ValueError escaped the
    check, and a password in the URL was printed ('cannot reach http://u:…@…')."""
    finding = await check_model(env, TIMEOUT)
    assert finding.status == "skip"
    wrong = "OPENAI_API_KEY" if "OPENAI_BASE_URL" not in env else "OPENAI_BASE_URL"
    assert finding.summary == f"fix {wrong} first (see settings above)"


async def test_model_behind_a_proxy_the_llm_refuses() -> None:
    """The llm refuses to start with a socks proxy for its calls: doctor says so too,
    from the settings it reads (./.env included), as the llm reads them. (Its settings
    problem made this check 'skip: fix the OPENAI_ settings first'.)"""
    base = "http://llm.invalid/v1"  # not loopback: that is called direct, whatever the proxy
    env = {"OPENAI_API_KEY": "sk-sim", "OPENAI_BASE_URL": base, "ALL_PROXY": "socks5://e:1080"}
    finding = await check_model(env, TIMEOUT)
    assert finding.status == "fail"
    assert finding.summary.startswith("the llm would not start:")
    assert "socks5:// proxy" in finding.summary
    assert "HTTPS_PROXY" in finding.details[0]


# ---------------------------------------------------------------- the whole report


async def test_a_good_configuration_passes(
    nats_server: NatsHandle,
    wecom: SimulatedWeComApi,
    gateway: str,
    model_api: SimulatedOpenAIApi,
) -> None:
    env = wecom_env(
        wecom.base_url,
        NATS_URL=nats_server.url,
        OPENAI_API_KEY="sk-sim",
        OPENAI_BASE_URL=model_api.base_url,
        OPENAI_MODEL="sim-model",
    )
    report = await diagnose(env, public_url=gateway, timeout_s=TIMEOUT)
    statuses = [f.status for f in report.findings]
    assert statuses == ["ok", "ok", "ok", "warn", "ok"], report.render()  # warn: on 127.0.0.1
    assert not report.failed
    rendered = report.render()
    # not "No problems found." under a warning that WeCom cannot reach the URL
    assert rendered.endswith("No check failed; 1 warning above."), rendered
    assert SECRET not in rendered and TOKEN not in rendered and KEY not in rendered


async def test_a_bad_configuration_fails_and_says_why(wecom: SimulatedWeComApi) -> None:
    wecom.fail_gettoken(60020)
    env = wecom_env(wecom.base_url, NATS_URL=f"nats://127.0.0.1:{free_port()}")
    report = await diagnose(env, timeout_s=TIMEOUT)
    assert report.failed
    statuses = {f.check: f.status for f in report.findings}
    assert statuses == {
        "settings": "ok",
        "nats": "fail",
        "gettoken": "fail",
        "callback": "skip",
        "model": "warn",
    }
    rendered = report.render()
    assert "[FAIL] gettoken  WeCom refused this machine's IP address (errcode 60020)" in rendered
    assert rendered.endswith("2 checks failed: fix them and run `wecombot doctor` again.")


def test_the_command_exits_non_zero_on_failure(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WECOM_", "OPENAI_", "NATS_"))}
    env.update(
        wecom_env(f"http://127.0.0.1:{free_port()}"), NATS_URL=f"nats://127.0.0.1:{free_port()}"
    )
    done = subprocess.run(
        [sys.executable, "-m", "wecombot", "doctor", "--timeout", "3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "[FAIL] nats" in done.stdout
    assert "[ ok ] settings" in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "wecombot", "doctor", "--no-such-flag"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "--no-such-flag" in bad.stderr
    # A name in ./.env that no setting has: said under settings, which pass all the same.
    (tmp_path / ".env").write_text("WECOM_CORPID=ww-typo\n")
    typo = subprocess.run(
        [sys.executable, "-m", "wecombot", "doctor", "--timeout", "3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    (tmp_path / ".env").unlink()
    assert "[warn] settings  every service accepts its settings" in typo.stdout
    assert "./.env sets WECOM_CORPID, which is no setting (WECOM_CORP_ID?)" in typo.stdout
    # With no WeCom settings the callback check is skipped: the argument is still judged.
    no_url = subprocess.run(
        [sys.executable, "-m", "wecombot", "doctor", "--public-url", "ftp://x/y"],
        cwd=tmp_path,
        env={k: v for k, v in env.items() if not k.startswith("WECOM_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert no_url.returncode == 2
    assert "argument --public-url: must be a URL starting with http:// or https://" in (
        no_url.stderr
    )
    assert not no_url.stdout  # no check ran


def test_report_render_wraps_and_indents() -> None:
    from wecombot.doctor import Finding

    report = Report([Finding("model", "warn", "short", ("a detail " * 20,))])
    lines = report.render().splitlines()
    assert lines[0] == "[warn] model     short"
    assert all(len(line) <= 100 for line in lines)
    assert lines[1].startswith(" " * 17 + "a detail")


def test_report_ends_with_what_it_found() -> None:
    """It said "No problems found." under a warning that WeCom cannot reach the URL."""
    from wecombot.doctor import Finding

    ok, warn = Finding("settings", "ok", "fine"), Finding("callback", "warn", "loopback")
    skip = Finding("gettoken", "skip", "fix WECOM_SECRET first")
    assert Report([ok, skip]).render().endswith("\nNo problems found.")
    assert Report([ok, warn]).render().endswith("\nNo check failed; 1 warning above.")
    two = Report([warn, ok, warn]).render()
    assert two.endswith("\nNo check failed; 2 warnings above.")
    failed = Report([Finding("nats", "fail", "down"), warn]).render()
    assert failed.endswith("\n1 check failed: fix it and run `wecombot doctor` again.")


class _QuotingAgentGet(SimulatedWeComApi):
    """A front of WeCom's API whose agent/get refusal quotes the request it refused."""

    def __init__(self, **kwargs: Any) -> None:
        self.quoted: list[str] = []  # the access_tokens it was sent
        super().__init__(**kwargs)

    def routes(self) -> list[web.RouteDef]:
        async def quoting(request: web.Request) -> web.Response:
            token = request.query.get("access_token", "")
            self.quoted.append(token)
            errmsg = f"not allow to access from your ip: {request.path_qs} (token {token})"
            return web.json_response({"errcode": 60020, "errmsg": errmsg})

        kept = [r for r in super().routes() if not r.path.endswith("/agent/get")]
        return [*kept, web.get("/cgi-bin/agent/get", quoting)]


async def test_an_agent_get_refusal_quoting_the_access_token_is_shown_without_it() -> None:
    async with _QuotingAgentGet(corp_id=CORP, secret=SECRET, agent_id=AGENT) as api:
        finding = await check_gettoken(wecom_env(api.base_url), TIMEOUT)
    assert finding.status == "fail", finding
    assert "not allow to access from your ip" in finding.details[1]
    shown = "\n".join((finding.summary, *finding.details))
    assert api.quoted and not any(token in shown for token in api.quoted)
    assert "[REDACTED]" in finding.details[1]


async def test_a_proxy_refusal_quoting_its_credentials_is_shown_without_them() -> None:
    """The llm cleans a proxy's 407 page of the proxy's password (its secrets are
    registered); doctor printed it, bare and as the Proxy-Authorization header's base64."""

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        quoted = next(
            line for line in head.decode().split("\r\n") if line.lower().startswith("proxy-auth")
        )
        body = f"denied: {quoted} (password Pr0xy-pa55word)".encode()
        await answer(writer, 407, body, "text/plain")
        writer.close()

    async with raw_http(refuse) as proxy:
        env = {
            "OPENAI_API_KEY": "sk-doctor-proxy-test",
            "OPENAI_BASE_URL": "http://model.example.invalid/v1",
            "HTTP_PROXY": proxy.replace("http://", "http://bot:Pr0xy-pa55word@"),
        }
        finding = await check_model(env, TIMEOUT)
    shown = "\n".join((finding.summary, *finding.details))
    assert "407" in shown and "denied" in shown, shown
    assert "Pr0xy-pa55word" not in shown
    assert base64.b64encode(b"bot:Pr0xy-pa55word").decode() not in shown
