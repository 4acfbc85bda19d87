"""Shared fixtures: a real nats-server per test (file store in tmp_path, free ports).

With WECOMBOT_TEST_DOCKER=1 and a Docker engine answering, testcontainers' NatsContainer
is used instead; this machine has no engine, so the embedded binary is the default.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import nats
import pytest
from hypothesis import settings
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from tests.waiting import until, until_sync
from wecombot_common.embedded import EmbeddedNats, nats_server_binary

# Property tests have no deadline: timing is not what they test, and on a loaded machine
# (CI, a test run beside others) hypothesis' 200 ms per example failed them at random.
# One profile for every run, a whole suite or one file (test_crypto loaded its own for
# all: a file run alone ran with other settings than in the suite).
settings.register_profile("wecombot", max_examples=150, deadline=None)
settings.load_profile("wecombot")

if TYPE_CHECKING:
    from tests.cluster import NatsCluster


class NatsHandle:
    """What a test needs of the broker: its URL, and a way to stop and restart it."""

    def __init__(self, server: EmbeddedNats | None, url: str) -> None:
        self._server = server
        self._url = url

    @property
    def url(self) -> str:
        return self._url

    def stop(self) -> None:
        assert self._server is not None, "restart needs the embedded server"
        self._server.stop()

    def kill(self) -> None:
        assert self._server is not None, "kill needs the embedded server"
        self._server.kill()

    def pause(self) -> None:
        assert self._server is not None, "pause needs the embedded server"
        self._server.pause()

    def resume(self) -> None:
        assert self._server is not None, "resume needs the embedded server"
        self._server.resume()

    def start(self) -> None:
        assert self._server is not None
        self._server.start()

    async def turn_away(self, attempts: int = 3) -> None:
        """With the server stopped, until ``attempts`` connections were made to its port:
        each is closed at once, as a server that is not up yet would refuse it. A client
        that gave up after fewer attempts would never see the server come up."""
        host, port = self._url.removeprefix("nats://").rsplit(":", 1)
        turned = 0

        async def close(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal turned
            turned += 1
            writer.close()

        listener = await asyncio.start_server(close, host, int(port))
        try:
            await until(lambda: turned >= attempts, timeout=30, what=f"{attempts} attempts")
        finally:
            listener.close()
            await listener.wait_closed()

    async def start_after(self, attempts: int = 3) -> None:
        """Start the stopped server once clients tried to connect ``attempts`` times."""
        await self.turn_away(attempts)
        self.start()


def _docker_nats() -> Iterator[NatsHandle]:
    from testcontainers.community.nats import NatsContainer

    with NatsContainer(jetstream=True) as container:
        yield NatsHandle(None, container.nats_uri())


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsHandle]:
    if os.environ.get("WECOMBOT_TEST_DOCKER") == "1":
        yield from _docker_nats()
        return
    server = EmbeddedNats(tmp_path / "nats", log_file=tmp_path / "nats.log")
    server.start()
    try:
        yield NatsHandle(server, server.url)
    finally:
        server.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three nats-servers on loopback (tests/cluster.py), for what a replicated stream
    does otherwise than one server."""
    from tests.cluster import NatsCluster  # it imports free_port from here

    cluster = NatsCluster(tmp_path / "cluster")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
async def nc(nats_server: NatsHandle) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def js(nc: NATS) -> JetStreamContext:
    return nc.jetstream()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """A test that runs serve() or configure_logging points the root logger at its own
    captured stderr, closed once it ends: undo that, so no later test logs into it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@pytest.fixture(autouse=True)
def no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test, and every service a test starts (they inherit this environment), as
    on a machine without an egress proxy: a developer's own ``https_proxy`` or
    ``all_proxy`` changed what the proxy tests saw, and sent the tests' own HTTP clients
    to it. A test that wants a proxy sets it."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


def plain_nats_server(tmp: Path, *args: str) -> Iterator[str]:
    """A nats-server started with ``args`` alone (none: without JetStream), its URL."""
    port = free_port()
    proc = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def accepts() -> bool:
        assert proc.poll() is None, "nats-server exited"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    try:
        until_sync(accepts, timeout=15, what="nats-server accepting connections", interval=0.02)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def nats_without_jetstream(tmp_path: Path) -> Iterator[str]:
    yield from plain_nats_server(tmp_path)


SERVICE_USER, SERVICE_PASSWORD = "svc", "svc-pw-0815"


@pytest.fixture
def nats_with_a_service_user(tmp_path: Path) -> Iterator[str]:
    """A nats-server with JetStream whose one user has a service's kind of permissions
    (as deploy/nats/auth.conf gives the sender: its own consumer's next message, replies
    on its own inbox), so not those the operator commands need."""
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        "authorization { users = [ { "
        f'user: "{SERVICE_USER}", password: "{SERVICE_PASSWORD}", permissions: {{ '
        'publish: { allow: ["$JS.API.CONSUMER.MSG.NEXT.WECOMBOT.sender"] }, '
        'subscribe: { allow: ["_INBOX.wecombot-sender.>"] } } } ] }\n'
    )
    yield from plain_nats_server(tmp_path, "-c", str(conf))
