"""`wecombot dev` (what `make run` starts) on a bare machine: no settings at all.

It must start its own nats-server, run in sandbox mode with the offline model, carry a
signed, encrypted callback all the way to (simulated) message/send, and stop cleanly
within 10 s on SIGTERM.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import socket
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.devprocess import DevProcess
from tests.waiting import until_sync
from wecombot_common.sim.callbacks import CallbackBuilder

pytestmark = pytest.mark.e2e


def _listening(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port`` (from /proc/net)."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    found.add(str(ipaddress.IPv4Address(raw[::-1])))
                else:  # four little-endian 32-bit words
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    found.add(str(ipaddress.IPv6Address(words)))
    return found


def test_dev_runs_the_whole_system_with_no_settings(tmp_path: Path) -> None:
    gateway_port = free_port()
    # 4222 taken (by us, or already by something else): the embedded broker takes a free
    # port, and dev says which NATS_URL the wecombot commands need. Held as a listener
    # with SO_REUSEADDR: a broker killed on 4222 by an earlier test leaves it in
    # TIME_WAIT, where a plain bind fails (and dev rightly finds the port free).
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with contextlib.suppress(OSError):
            taken.bind(("127.0.0.1", 4222))
            taken.listen()
        _run_the_sandbox(tmp_path, gateway_port)


def _run_the_sandbox(tmp_path: Path, gateway_port: int) -> None:
    # GATEWAY_CALLBACK_PATH exported empty: the default path, which dev said without it
    dev = DevProcess(
        tmp_path,
        GATEWAY_PORT=str(gateway_port),
        WECOMBOT_HEALTH_PORT="0",
        GATEWAY_CALLBACK_PATH="",
    )
    out = dev.out
    try:
        nats_url = out.wait_for(r"embedded nats-server at (nats://127\.0\.0\.1:\d+)").group(1)
        assert not nats_url.endswith(":4222")
        out.wait_for(rf"4222 was taken: .* need NATS_URL={re.escape(nats_url)} to reach")
        out.wait_for(r"SANDBOX MODE")
        out.wait_for(r"OFFLINE model")
        out.wait_for(
            rf"gateway callback URL: http://127\.0\.0\.1:{gateway_port}/wecom/callback\s*$"
        )
        out.wait_for(r"metrics: http://127\.0\.0\.1:\d+/metrics \(gateway; the others are off")
        sandbox = json.loads((tmp_path / "data" / "sandbox.json").read_text())
        wecom = CallbackBuilder(
            corp_id=sandbox["corp_id"],
            agent_id=sandbox["agent_id"],
            token=sandbox["token"],
            encoding_aes_key=sandbox["encoding_aes_key"],
        )
        url = f"http://127.0.0.1:{gateway_port}/wecom/callback"

        def ready() -> bool:  # the gateway may still be connecting: WeCom would retry too
            try:
                return httpx.get(f"http://127.0.0.1:{gateway_port}/readyz").status_code == 200
            except httpx.TransportError:
                return False

        until_sync(ready, timeout=30, what="the gateway ready", interval=0.1)
        # a sandbox is for this machine only: loopback, not every interface
        assert _listening(gateway_port) == {"127.0.0.1"}
        check = wecom.verify_url("1616140317555161061")
        assert httpx.get(url, params=check).text == "1616140317555161061"
        callback = wecom.text("zhang.san", "hello from the sandbox\nin two lines")
        response = httpx.post(
            url, params=callback.query, content=callback.body, headers={"Content-Type": "text/xml"}
        )
        assert response.status_code == 200
        assert response.text == ""
        # the reply on one line of the terminal, with its size
        out.wait_for(
            r"message/send → zhang\.san: .*hello from the sandbox in two lines.* \(\d+ B\)$",
            timeout=30,
        )
        metrics = httpx.get(f"http://127.0.0.1:{gateway_port}/metrics").text
        assert 'wecombot_gateway_callbacks_total{result="stored"} 1.0' in metrics
    finally:
        code = dev.stop(timeout=10)  # fails if it takes longer
    assert code == 0
    out.wait_for(r"\[dev\]\s+stopped")


@pytest.mark.parametrize("group_signal", [signal.SIGINT, signal.SIGHUP], ids=["ctrl-c", "hangup"])
def test_a_terminal_stops_every_service_before_the_nats_server(
    tmp_path: Path, group_signal: signal.Signals
) -> None:
    """A terminal's Ctrl-C (or closing it) signals the whole process group, the embedded
    nats-server included: the services must still drain against it, nothing be killed."""
    gateway_port = free_port()
    dev = DevProcess(tmp_path, GATEWAY_PORT=str(gateway_port), WECOMBOT_HEALTH_PORT="0")
    out = dev.out
    try:
        for started in ("gateway.ready", "llm.started", "sender.started", "token.started"):
            out.wait_for(rf'"{started}"')
    finally:
        code = dev.stop(timeout=15, group_signal=group_signal)
    assert code == 0, out.tail()
    for service in ("gateway", "llm", "sender", "token"):
        out.wait_for(rf'"{service}.stopped"', timeout=1)
    out.wait_for(r"\[dev\]\s+stopped", timeout=1)
    text = "".join(out.lines)
    assert "did not stop in time" not in text
    assert "exited with code" not in text
    assert "nats.disconnected" not in text, "a service lost NATS before it had stopped"


def _alive(pid: int) -> bool:
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())  # empty: a zombie
    except OSError:
        return False


def test_one_dev_per_data_dir_and_a_killed_ones_processes_are_stopped(tmp_path: Path) -> None:
    """The services and the nats-server run in sessions of their own (so Ctrl-C reaches
    only dev): a dev killed with SIGKILL left all of them running, and the next dev then
    ran a second nats-server on the same JetStream store and found its ports taken."""
    env = {
        "GATEWAY_PORT": str(free_port()),
        "WECOMBOT_HEALTH_PORT": "0",
        "WECOMBOT_CONSOLE_PORT": "0",
    }
    started: dict[str, int] = {}
    try:
        _killed_dev_then_another(tmp_path, env, started)
    finally:  # whatever happened, leave nothing running
        for pid in started.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _killed_dev_then_another(tmp_path: Path, env: dict[str, str], started: dict[str, int]) -> None:
    first = DevProcess(tmp_path, **env)
    try:
        first.out.wait_for(r'"gateway\.ready"')
        started |= _recorded(first)
        assert set(started) == {"nats-server", "token", "llm", "sender", "gateway"}

        second = DevProcess(tmp_path, **env)
        assert second.proc.wait(timeout=30) == 2
        second.out.wait_for(rf"another wecombot dev \(pid {first.proc.pid}\) runs with")
    finally:
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait()
    assert _alive(started["nats-server"]), "left running by the killed dev"

    third = DevProcess(tmp_path, **env)
    try:
        third.out.wait_for(r"a wecombot dev that was killed left these running; stopping them")
        third.out.wait_for(r'"gateway\.ready"')
        assert not any(_alive(pid) for pid in started.values())
        assert "exited with code" not in "".join(third.out.lines)
    finally:
        code = third.stop(timeout=15)
    assert code == 0, third.out.tail()
    assert not (tmp_path / "data" / "dev.pids").exists()


def _recorded(dev: DevProcess) -> dict[str, int]:
    """The processes ``dev`` started, as it wrote them down: lines "pid start-time name"."""
    lines = (dev.data_dir / "dev.pids").read_text().splitlines()
    return {name: int(pid) for pid, _, name in (line.split(" ", 2) for line in lines)}


def test_a_nats_url_nothing_answers_stops_start_up_naming_it(tmp_path: Path) -> None:
    """A broker of the user's (NATS_URL) that is not there: every service and the
    console waited for it without end, saying only "connection refused" twice a second,
    and Ctrl-C did not stop dev. It is checked first, as doctor does."""
    port = free_port()
    dev = DevProcess(tmp_path, NATS_URL=f"nats://127.0.0.1:{port}", GATEWAY_PORT=str(free_port()))
    assert dev.ended() == 2, dev.out.tail()
    dev.out.wait_for(
        rf"cannot reach NATS at nats://127\.0\.0\.1:{port}: nothing listens at that address "
        r"\(NATS_URL\)",
        timeout=5,
    )
    dev.out.wait_for(r"\[dev\]\s+stopped", timeout=5)
    assert not any(line.startswith(("[gateway]", "[llm]", "[console]")) for line in dev.out.lines)


def test_a_stop_while_start_up_waits_for_the_broker_ends_it(tmp_path: Path) -> None:
    """A broker that takes the connection and never answers: start-up waits for it (up
    to its check's deadline). Ctrl-C then must end dev at once."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(30)
        port = silent.getsockname()[1]
        dev = DevProcess(tmp_path, NATS_URL=f"nats://127.0.0.1:{port}")
        connection, _ = silent.accept()  # dev is at its broker check: in start-up
        with connection:
            code = dev.stop(timeout=3, group_signal=signal.SIGINT)
    assert code == 0, dev.out.tail()
    dev.out.wait_for(r"\[dev\]\s+stopped", timeout=1)
    assert "cannot reach NATS" not in "".join(dev.out.lines)


def test_dev_stops_when_its_nats_server_dies(tmp_path: Path) -> None:
    """Every service needs the broker: with the embedded one gone, dev kept running,
    its services logging connection errors ten times a second, and said nothing."""
    env = {"GATEWAY_PORT": str(free_port()), "WECOMBOT_HEALTH_PORT": "0"}
    dev = DevProcess(tmp_path, WECOMBOT_CONSOLE_PORT="0", **env)
    try:
        dev.out.wait_for(r'"gateway\.ready"')
        os.kill(_recorded(dev)["nats-server"], signal.SIGKILL)
    except BaseException:
        dev.stop()
        raise
    assert dev.ended() == 1, dev.out.tail()
    dev.out.wait_for(r"the embedded nats-server exited \(code -9\); its log: ", timeout=5)
    dev.out.wait_for(r"\[dev\]\s+stopped", timeout=5)
    assert "exited with code -15" not in "".join(dev.out.lines)


def test_a_bad_setting_of_any_service_stops_dev_before_anything_starts(tmp_path: Path) -> None:
    """Every service's settings are checked first (each one's own loader): a bad one
    was said by the first service that read it, after the broker and the console had
    started, and the others then reported exit codes as if they had crashed."""
    # (a GATEWAY_PORT out of range among them: the check for a taken port came first, and
    # ended in an OverflowError traceback)
    dev = DevProcess(tmp_path, LOG_LEVEL="verbose", SENDER_MAX_DELIVER="0", GATEWAY_PORT="99999")
    assert dev.ended() == 2, dev.out.tail()
    dev.out.wait_for(r"\[dev\]\s+3 problems in the settings", timeout=5)
    dev.out.wait_for(r"GATEWAY_PORT must be an integer between 1 and 65535", timeout=5)
    dev.out.wait_for(r"LOG_LEVEL .*\(read by gateway, llm, sender, token\)", timeout=5)
    dev.out.wait_for(r"SENDER_MAX_DELIVER .*\(read by sender\)", timeout=5)
    text = "".join(dev.out.lines)
    assert "embedded nats-server" not in text and "exited with code" not in text


def test_a_gateway_port_another_program_holds_stops_dev_before_anything_starts(
    tmp_path: Path,
) -> None:
    """The callback URL was printed, then the gateway could not listen and dev stopped
    everything it had started: said first now, with the setting to change."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        dev = DevProcess(tmp_path, GATEWAY_PORT=str(port), WECOMBOT_HEALTH_PORT="0")
        assert dev.ended() == 2, dev.out.tail()
    dev.out.wait_for(rf"GATEWAY_PORT={port} is taken by another program", timeout=5)
    text = "".join(dev.out.lines)
    assert "embedded nats-server" not in text and "callback URL" not in text
    assert not (tmp_path / "data" / "sandbox.json").exists(), "the sandbox's keys made first"


def test_a_sandbox_file_that_holds_no_app_is_said_and_dev_stops(tmp_path: Path) -> None:
    """sandbox.json cut short (a full disk while it was written, a hand edit): every
    ``make run`` ended in a JSONDecodeError traceback naming no file."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sandbox.json").write_text('{"corp_id": "wwsandbox1', encoding="utf-8")
    dev = DevProcess(tmp_path, WECOMBOT_HEALTH_PORT="0")
    assert dev.ended() == 2, dev.out.tail()
    dev.out.wait_for(
        r"sandbox\.json holds no sandbox app \(JSONDecodeError: .*remove it", timeout=5
    )
    text = "".join(dev.out.lines)
    assert "Traceback" not in text and "embedded nats-server" not in text


def test_a_console_port_another_program_holds_stops_dev_before_anything_starts(
    tmp_path: Path,
) -> None:
    """An explicit WECOMBOT_CONSOLE_PORT that is taken was found once the embedded
    broker had started, which was then stopped again: said first now. (And a misspelt
    name in ./.env is said, where it did nothing in silence.)"""
    (tmp_path / ".env").write_text("LLM_MAX_CONCURENCY=8\n")
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        dev = DevProcess(
            tmp_path,
            WECOMBOT_CONSOLE_PORT=str(port),
            GATEWAY_PORT=str(free_port()),
            WECOMBOT_HEALTH_PORT="0",
        )
        assert dev.ended() == 2, dev.out.tail()
    dev.out.wait_for(
        rf"the console cannot listen on 127\.0\.0\.1:{port} \(taken by another program\)",
        timeout=5,
    )
    assert "embedded nats-server" not in "".join(dev.out.lines)
    dev.out.wait_for(
        r"\./\.env sets LLM_MAX_CONCURENCY, which is no setting \(LLM_MAX_CONCURRENCY\?\)",
        timeout=5,
    )
