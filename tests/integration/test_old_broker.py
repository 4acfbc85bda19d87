"""A broker older than nats-server 2.11 is refused at start, naming its version.

wecombot's conditional appends scope their expected sequence to a conversation's branch
with ``Nats-Expected-Last-Subject-Sequence-Subject`` (nats-server 2.11.0 on); an older
server ignores the header and refuses every append after a branch's first, without end.
No such server ships with the tests, so a loopback one speaks just enough of the NATS
protocol (INFO, then PONG to PING) to announce itself as 2.10.22.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from tests.integration.test_startup import _start_failing
from tests.loopback import raw_http
from wecombot.doctor import check_nats
from wecombot_common.bus import connect_when_ready
from wecombot_common.errors import ConfigError
from wecombot_common.settings import EnvReader, NatsSettings

pytestmark = pytest.mark.integration


@pytest.fixture
async def old_broker() -> AsyncIterator[str]:
    info = {
        "server_id": "OLD",
        "version": "2.10.22",
        "proto": 1,
        "headers": True,
        "max_payload": 1048576,
        "jetstream": True,
    }

    async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"INFO " + json.dumps(info).encode() + b"\r\n")
        try:
            while line := await reader.readline():
                if line.startswith(b"PING"):
                    writer.write(b"PONG\r\n")
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async with raw_http(session) as url:  # a raw loopback server: here it speaks NATS
        yield "nats://" + url.removeprefix("http://")


async def test_connecting_to_a_broker_older_than_2_11_is_a_configuration_error(
    old_broker: str,
) -> None:
    settings = NatsSettings.read(EnvReader({"NATS_URL": old_broker}))
    prepared: list[object] = []

    async def prepare(js: object) -> None:
        prepared.append(js)

    with pytest.raises(ConfigError) as refused:
        await connect_when_ready(settings, "wecombot-test", asyncio.Event(), prepare)
    assert str(refused.value) == (
        "nats-server 2.10.22 is too old: wecombot needs 2.11.0 or later (its appends scope "
        "their expected sequence with Nats-Expected-Last-Subject-Sequence-Subject); "
        f"NATS_URL points at {old_broker}"
    )
    assert prepared == []  # nothing was created on it


async def test_a_service_started_against_it_exits_2_saying_why(old_broker: str) -> None:
    ran = await asyncio.to_thread(_start_failing, "sender", NATS_URL=old_broker)
    assert ran.returncode == 2, ran.stderr
    assert "nats-server 2.10.22 is too old" in ran.stderr + ran.stdout
    assert "Traceback" not in ran.stderr


async def test_doctor_fails_it(old_broker: str) -> None:
    finding = await check_nats({"NATS_URL": old_broker}, 5.0)
    assert finding.status == "fail"
    assert finding.summary.startswith(f"{old_broker}: nats-server 2.10.22 is too old")
