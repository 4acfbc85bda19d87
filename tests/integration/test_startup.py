"""Every service serves /healthz (and /metrics) from the start: alive but not ready while
NATS is away, stoppable at once while waiting for it, and ready as soon as it arrives — so
Kubernetes never restart-loops a pod that is only waiting for the broker."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys

import httpx
import pytest

from tests.conftest import NatsHandle, free_port
from tests.e2e.harness import service
from tests.waiting import until
from wecombot_common.crypto import generate_encoding_aes_key

pytestmark = pytest.mark.integration


async def _status(url: str) -> int | None:
    try:
        async with httpx.AsyncClient(timeout=2) as client:
            return (await client.get(url)).status_code
    except httpx.TransportError:
        return None


@pytest.mark.parametrize("name", ["llm", "sender", "token"])
async def test_alive_before_nats_then_ready(name: str, nats_server: NatsHandle) -> None:
    nats_server.stop()
    port = free_port()
    env = {
        "NATS_URL": nats_server.url,
        "WECOMBOT_HEALTH_PORT": str(port),
        "WECOM_CORP_ID": "wwstartup",
        "WECOM_AGENT_ID": "1000002",
        "WECOM_SECRET": "startup-secret",
        "WECOM_TOKEN": "tok",
        "WECOM_ENCODING_AES_KEY": generate_encoding_aes_key(),
        "WECOM_API_BASE": "http://127.0.0.1:9",
    }
    load, serve = service(name)
    base = f"http://127.0.0.1:{port}"

    # 1. NATS away: alive, not ready; SIGTERM (stop) ends it at once.
    stop = asyncio.Event()
    task = asyncio.create_task(serve(load(env), stop))

    async def alive() -> bool:
        return await _status(f"{base}/healthz") == 200

    await until(alive, timeout=20, what=f"{name}'s /healthz")
    assert await _status(f"{base}/readyz") == 503
    stop.set()
    await asyncio.wait_for(task, 5)

    # 2. NATS arrives while the service waits: it becomes ready without a restart.
    stop = asyncio.Event()
    task = asyncio.create_task(serve(load(env), stop))
    await until(alive, timeout=20, what=f"{name}'s /healthz")
    await nats_server.start_after(3)

    async def ready() -> bool:
        return await _status(f"{base}/readyz") == 200

    try:
        await until(ready, timeout=30, what=f"{name}'s /readyz once NATS is there")
        # Prometheus scrapes the same port. Every metric module is imported in this one
        # process, so its scrape would list every wecombot_* family whichever service
        # runs; what a service's own process counts is checked on separate processes
        # (tests/e2e/test_secrets.py: token, sender; test_pipeline.py's two llm replicas).
        async with httpx.AsyncClient(timeout=2) as client:
            metrics = await client.get(f"{base}/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["server"] == "wecombot"  # not aiohttp's and Python's versions
        assert "# TYPE process_cpu_seconds_total counter" in metrics.text
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def _start_failing(name: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run service ``name`` with its WeCom settings and an unreachable NATS: it must stop
    on its own at start-up (a settings problem), and this returns how. The developer's
    own WeCom, model and llm settings are not inherited."""
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith(("WECOM_", "OPENAI_", "LLM_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "wecombot", name],
        env={
            **inherited,
            "NATS_URL": "nats://127.0.0.1:9",
            "WECOM_CORP_ID": "wwstartup",
            "WECOM_AGENT_ID": "1000002",
            "WECOM_SECRET": "startup-secret",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("name", ["llm", "sender", "token"])
def test_a_health_port_in_use_is_a_setting_problem(name: str) -> None:
    """Exit 2 naming the setting, as the gateway does for its port; it was a traceback and
    exit 1 (``make run`` with another program on 8081-8083)."""
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ran = _start_failing(name, WECOMBOT_HEALTH_PORT=str(port))
    assert ran.returncode == 2, ran.stderr
    assert "(WECOMBOT_HEALTH_HOST, WECOMBOT_HEALTH_PORT)" in ran.stderr, ran.stderr
    assert f"0.0.0.0:{port}" in ran.stderr
    assert "Traceback" not in ran.stderr


@pytest.mark.parametrize("name", ["llm", "sender", "token"])
def test_the_health_server_listens_where_it_is_told(name: str) -> None:
    """WECOMBOT_HEALTH_HOST is where each service's health server binds: an address this
    machine does not have (TEST-NET-1) cannot be bound, and the service says so."""
    ran = _start_failing(name, WECOMBOT_HEALTH_HOST="192.0.2.1", WECOMBOT_HEALTH_PORT="18089")
    assert ran.returncode == 2, ran.stderr
    assert "cannot listen on 192.0.2.1:18089 (WECOMBOT_HEALTH_HOST" in ran.stderr, ran.stderr
    assert "Traceback" not in ran.stderr


@pytest.mark.parametrize("name", ["llm", "sender", "token"])
def test_a_proxy_the_outbound_calls_cannot_use_is_a_setting_problem(name: str) -> None:
    """A socks5:// proxy (httpx needs socksio for one) was an ImportError and a traceback
    in the token service and the sender, exit 1 as soon as they had connected to NATS;
    the llm refused it only then too. Now each refuses it with its settings: exit 2."""
    ran = _start_failing(
        name,
        ALL_PROXY="socks5://egress.corp:1080",  # no other proxy variable: see conftest
        OPENAI_API_KEY="sk-startup",
        LLM_REQUIRE_API_KEY="true",
    )
    assert ran.returncode == 2, ran.stderr
    calls = "the model calls" if name == "llm" else "the WeCom API calls"
    assert "the environment's proxy for https:// URLs (ALL_PROXY) is a socks5:// proxy" in (
        ran.stderr
    ), ran.stderr
    assert calls in ran.stderr
    assert "Traceback" not in ran.stderr


@pytest.mark.parametrize("name", ["sender", "token"])
def test_replicas_a_single_server_cannot_hold_are_a_setting_problem(
    name: str, nats_server: NatsHandle
) -> None:
    """Exit 2 naming WECOMBOT_STREAM_REPLICAS, for the streams (sender) as for the token
    bucket (token): JetStream refuses them for good (err_code 10074), and each service
    retried without end, not ready, with back-off up to 15 s."""
    ran = _start_failing(
        name, NATS_URL=nats_server.url, WECOMBOT_STREAM_REPLICAS="3", WECOMBOT_HEALTH_PORT="0"
    )
    assert ran.returncode == 2, ran.stderr
    assert "WECOMBOT_STREAM_REPLICAS=3, but the NATS server at" in ran.stderr, ran.stderr
    assert "is not clustered" in ran.stderr
    assert "Traceback" not in ran.stderr


def test_a_settings_problem_is_a_json_line_as_every_other_refusal() -> None:
    """Found before logging is configured, it was plain text even with LOG_FORMAT=json
    (the default), where every other start-up refusal is a JSON line: a pod's log
    pipeline read it as garbage."""
    ran = _start_failing("sender", SENDER_MAX_DELIVER="0")
    assert ran.returncode == 2, ran.stderr
    [line] = ran.stderr.splitlines()
    said = json.loads(line)
    assert (said["event"], said["level"], said["service"]) == (
        "service.config_error",
        "error",
        "sender",
    )
    assert [p for p in said["problems"] if p.startswith("SENDER_MAX_DELIVER ")], said
    text = _start_failing("sender", SENDER_MAX_DELIVER="0", LOG_FORMAT="console")
    assert text.stderr.startswith("wecombot: invalid configuration:\n  - SENDER_MAX_DELIVER ")
