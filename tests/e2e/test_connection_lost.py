"""A NATS client that nats-py closes for good stops its service with exit code 1.

nats-py reconnects without end after an outage, but an ``-ERR`` from the broker on a
live connection closes the client for good: nothing it does again can succeed. Left
running, the service answered nobody and its /healthz said ok, so Kubernetes never
restarted it. Here the broker's ``max_payload`` is lowered by a config reload (as an
operator may do on a running cluster): each service keeps the limit the broker told it
when it connected, its next larger append is refused with ``-ERR``, and nats-py closes.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ProcessService, Stack
from tests.waiting import until
from wecombot_common.embedded import EmbeddedNats

pytestmark = pytest.mark.e2e

LONG = "长" * 700  # 2,100 bytes of UTF-8: over the lowered limit once in an event


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedNats]:
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 1MB\n", encoding="utf-8")
    server = EmbeddedNats(tmp_path / "nats", config_file=conf, log_file=tmp_path / "nats.log")
    server.start()
    yield server
    server.stop()


async def _lower_max_payload(broker: EmbeddedNats) -> None:
    assert broker.config_file is not None and broker.process is not None
    assert broker.log_file is not None
    log = broker.log_file
    broker.config_file.write_text("max_payload: 1KB\n", encoding="utf-8")
    broker.process.send_signal(signal.SIGHUP)
    await until(
        lambda: "Reloaded: max_payload = 1024" in log.read_text(encoding="utf-8"),
        timeout=10,
        what="the broker to reload its configuration",
    )


async def _exit_code(service: ProcessService, timeout: float = 30.0) -> int:
    return await asyncio.to_thread(service.proc.wait, timeout)


async def _started(service: ProcessService, event: str) -> None:
    await until(
        lambda: event in [line["event"] for line in _lines(service)],
        timeout=30,
        what=f"{event} in {service.log_path.name}",
    )


def _lines(service: ProcessService) -> list[dict[str, object]]:
    lines = []
    for line in service.log_path.read_text(encoding="utf-8").splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


async def test_a_service_whose_connection_nats_py_closed_for_good_exits_1(
    broker: EmbeddedNats, tmp_path: Path
) -> None:
    async with Stack(nats_url=broker.url, workdir=tmp_path) as stack:
        stack.model.reply = lambda _: LONG  # the llm's ReplyGenerated: over 1 KB
        gateway = stack.start_process("gateway")
        llm = stack.start_process("llm")
        await stack.wait_ready()
        # Connected before the limit is lowered: one connecting after it is told the new
        # limit, and nats-py refuses the append itself (no -ERR, nothing closed).
        await _started(llm, "llm.started")
        await _lower_max_payload(broker)

        # A short message fits: stored, answered 200. The llm's append of the long
        # answer is refused, and the llm stops as failed.
        await stack.say("zhang.san", "hello")
        assert await _exit_code(llm) == 1
        llm_lines = _lines(llm)
        closed = [line for line in llm_lines if line["event"] == "nats.closed"]
        assert closed and "maximum payload" in str(closed[0]["error"]), llm_lines
        failed = [line for line in llm_lines if line["event"] == "service.failed"]
        assert failed and "closed for good" in str(failed[0]["reason"])
        assert llm_lines[-1]["event"] == "service.failed"  # it stopped as a stop does first
        assert "llm.stopped" in [line["event"] for line in llm_lines]

        # A long message: the gateway's append is refused; WeCom is not told 200 (it
        # retries the message to the gateway that replaces this one), and it exits 1.
        callback = stack.client.text("li.si", LONG)
        answer = await stack.post(callback)
        assert answer.status_code == 503, answer.text
        assert await _exit_code(gateway) == 1
        gateway_events = [line["event"] for line in _lines(gateway)]
        assert "nats.closed" in gateway_events
        assert gateway_events[-1] == "service.failed"


async def test_a_stop_by_signal_is_not_taken_for_a_lost_connection(
    broker: EmbeddedNats, tmp_path: Path
) -> None:
    async with Stack(nats_url=broker.url, workdir=tmp_path) as stack:
        gateway = stack.start_process("gateway")
        await stack.wait_ready()
        assert await gateway.terminate() == 0
        events = [line["event"] for line in _lines(gateway)]
        assert "gateway.stopped" in events
        assert "nats.closed" not in events and "service.failed" not in events


USERS = "authorization {{ users = [ {{ user: wecombot, password: {password} }} ] }}\n"


async def test_every_service_stops_as_failed_when_the_broker_revokes_its_user(
    tmp_path: Path,
) -> None:
    """A password rotated on the broker (a config reload) ends each live connection with
    ``-ERR 'Authorization Violation'``, which nats-py does not reconnect after."""
    conf = tmp_path / "nats.conf"
    conf.write_text(USERS.format(password="first"), encoding="utf-8")
    log = tmp_path / "nats.log"
    broker = EmbeddedNats(tmp_path / "nats", config_file=conf, log_file=log)
    broker.start()
    try:
        credentials = {"NATS_USER": "wecombot", "NATS_PASSWORD": "first"}
        async with Stack(broker.url, tmp_path, env_extra=credentials) as stack:
            started = {"gateway": "gateway.ready", "llm": "llm.started"}
            started |= {"sender": "sender.started", "token": "token.started"}
            services = {name: stack.start_process(name) for name in started}
            for name, line in started.items():
                await _started(services[name], line)
            conf.write_text(USERS.format(password="second"), encoding="utf-8")
            assert broker.process is not None
            broker.process.send_signal(signal.SIGHUP)
            for name, service in services.items():
                assert await _exit_code(service) == 1, name
                events = [line["event"] for line in _lines(service)]
                assert "nats.closed" in events, (name, events)
                assert events[-1] == "service.failed", (name, events[-5:])
    finally:
        broker.stop()
