"""``wecombot setup`` as the Kubernetes Job runs it: a process, its exit code and log.

0 once the streams match the settings; 1 when SIGTERM (the Job's deadline) comes before
NATS does; 2 for a bad setting, with the reason and nothing attempted, or for settings the
broker can never meet (replicas on a single server). A broker that may yet answer (its
JetStream off or starting, a cluster without its leader) is waited for, saying why.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import nats
import pytest

from tests.conftest import NatsHandle, free_port
from tests.waiting import until
from wecombot_common import topology

if TYPE_CHECKING:
    from tests.cluster import NatsCluster

pytestmark = pytest.mark.integration


def _setup(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``wecombot setup`` in the log's directory: the ./.env it reads is the test's, never
    the developer's; nor are the developer's own NATS_* or WECOMBOT_* settings inherited."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "WECOMBOT_"))}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "wecombot", "setup"],
            env={**inherited, "LOG_FORMAT": "json", **env},
            stdout=out,
            stderr=out,
            cwd=log.parent,
        )


def _exit_code(proc: subprocess.Popen[bytes], timeout: float) -> int:
    """The process's exit code; killed (and the test failed) if it runs past ``timeout``."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"wecombot setup still running after {timeout:g}s") from None


async def test_setup_creates_the_streams_and_exits_0(
    nats_server: NatsHandle, tmp_path: Path
) -> None:
    log = tmp_path / "setup.log"
    proc = _setup({"NATS_URL": nats_server.url, "WECOMBOT_HISTORY_MAX_AGE": "3600"}, log)
    assert await asyncio.to_thread(proc.wait, 60) == 0, log.read_text()
    assert '"setup.done"' in log.read_text()
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        conversation = await js.stream_info(topology.CONVERSATION_STREAM)
        assert conversation.config.max_age == 3600
        await js.stream_info(topology.DEAD_LETTER_STREAM)
    finally:
        await nc.close()


async def test_sigterm_before_nats_is_there_exits_1(tmp_path: Path) -> None:
    log = tmp_path / "setup.log"
    proc = _setup({"NATS_URL": f"nats://127.0.0.1:{free_port()}"}, log)
    await until(
        lambda: '"nats.connecting"' in log.read_text(), timeout=30, what="setup waiting for NATS"
    )
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 30) == 1, log.read_text()
    assert '"setup.stopped"' in log.read_text()


def test_a_bad_setting_exits_2_with_the_reason(tmp_path: Path) -> None:
    log = tmp_path / "setup.log"
    proc = _setup({"NATS_URL": "nats://127.0.0.1:9", "WECOMBOT_STREAM_REPLICAS": "two"}, log)
    assert proc.wait(60) == 2
    assert "WECOMBOT_STREAM_REPLICAS" in log.read_text()


async def test_dotenv_in_the_working_directory_fills_what_the_environment_leaves_unset(
    nats_server: NatsHandle, tmp_path: Path
) -> None:
    """As dev, doctor and dlq: a ``.env`` setting applies unless the environment sets it.
    Its NATS_URL, were it read over the environment's, points at nothing (setup would wait
    there until killed); NATS_URL stays in the environment so that setup, were ./.env
    ignored, never reaches for the default broker (4222, maybe another system's)."""
    (tmp_path / ".env").write_text(
        f"NATS_URL=nats://127.0.0.1:{free_port()}\nWECOMBOT_HISTORY_MAX_AGE=7200\n"
    )
    log = tmp_path / "setup.log"
    proc = _setup({"NATS_URL": nats_server.url}, log)
    assert await asyncio.to_thread(_exit_code, proc, 60) == 0, log.read_text()
    nc = await nats.connect(nats_server.url)
    try:
        conversation = await nc.jetstream().stream_info(topology.CONVERSATION_STREAM)
    finally:
        await nc.close()
    assert conversation.config.max_age == 7200  # from ./.env (the default is 30 days)


async def test_replicas_a_single_server_cannot_hold_exit_2_naming_the_setting(
    nats_server: NatsHandle, tmp_path: Path
) -> None:
    """JetStream refuses them for good (err_code 10074): the Job fails at once with the
    reason instead of retrying until its deadline."""
    log = tmp_path / "setup.log"
    proc = _setup({"NATS_URL": nats_server.url, "WECOMBOT_STREAM_REPLICAS": "3"}, log)
    assert await asyncio.to_thread(_exit_code, proc, 60) == 2, log.read_text()
    written = log.read_text()
    assert '"service.config_error"' in written
    assert f"WECOMBOT_STREAM_REPLICAS=3, but the NATS server at {nats_server.url} is not" in written
    assert "not clustered" in written and "set WECOMBOT_STREAM_REPLICAS=1" in written
    assert '"nats.not_ready"' not in written
    nc = await nats.connect(nats_server.url)
    try:
        assert (await nc.jetstream().account_info()).streams == 0
    finally:
        await nc.close()


async def test_setup_caps_the_event_log_and_lifts_the_cap(
    nats_server: NatsHandle, tmp_path: Path
) -> None:
    """``WECOMBOT_HISTORY_MAX_MB``: past it the oldest events go, as past the maximum
    age, and the appends go on (a full disk refuses them: every callback 503). Set to 0
    again, the cap is lifted from the stream, not left behind."""
    log = tmp_path / "setup.log"
    proc = _setup({"NATS_URL": nats_server.url, "WECOMBOT_HISTORY_MAX_MB": "1"}, log)
    assert await asyncio.to_thread(_exit_code, proc, 60) == 0, log.read_text()
    assert '"history_max_mb": 1' in log.read_text()
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        assert (await js.stream_info(topology.CONVERSATION_STREAM)).config.max_bytes == 2**20
        for i in range(40):  # 2.5 MiB
            await js.publish(f"{topology.PREFIX}.conv.app.u{i}.in", b"e" * 64 * 1024)
        state = (await js.stream_info(topology.CONVERSATION_STREAM)).state
        assert state.bytes <= 2**20 and state.last_seq == 40, state
        assert state.first_seq > 20, state  # the oldest went first
        proc = _setup({"NATS_URL": nats_server.url, "WECOMBOT_HISTORY_MAX_MB": "0"}, log)
        assert await asyncio.to_thread(_exit_code, proc, 60) == 0, log.read_text()
        lifted = await js.stream_info(topology.CONVERSATION_STREAM)
        assert lifted.config.max_bytes == -1, lifted.config
        assert lifted.state.messages == state.messages  # lifting it dropped nothing
    finally:
        await nc.close()


async def test_a_cap_the_store_cannot_reserve_exits_2_naming_the_setting(
    nats_server: NatsHandle, tmp_path: Path
) -> None:
    """JetStream reserves the cap in its store (by default 75 % of the free disk) and
    refuses a larger one at every attempt (err_code 10047): setup said only
    ``nats.not_ready`` until the Job's deadline."""
    log = tmp_path / "setup.log"
    huge = str(16 * 2**20)  # 16 TiB, the largest the setting takes
    proc = _setup({"NATS_URL": nats_server.url, "WECOMBOT_HISTORY_MAX_MB": huge}, log)
    assert await asyncio.to_thread(_exit_code, proc, 60) == 2, log.read_text()
    written = log.read_text()
    assert '"service.config_error"' in written and '"nats.not_ready"' not in written
    assert f"WECOMBOT_HISTORY_MAX_MB={huge}, but the NATS server at {nats_server.url}" in written
    assert "cannot reserve that much for the stream WECOMBOT" in written
    assert "insufficient storage resources available" in written


async def test_a_broker_without_jetstream_is_waited_for_saying_so(
    nats_without_jetstream: str, tmp_path: Path
) -> None:
    """JetStream may still be starting (recovering its store): waited for, as NATS is,
    and ``nats.not_ready`` says it does not answer (it said ``ServiceUnavailableError
    code=None … description='None'``)."""
    log = tmp_path / "setup.log"
    proc = _setup({"NATS_URL": nats_without_jetstream}, log)
    try:
        await until(
            lambda: "JetStream does not answer" in log.read_text(),
            timeout=30,
            what="setup to say JetStream does not answer",
        )
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(_exit_code, proc, 30) == 1, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    written = log.read_text()
    assert "not enabled on this server or for this account" in written
    assert "or still starting" in written and '"setup.stopped"' in written


async def test_a_cluster_without_its_leader_is_waited_for(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    """Replicas on one node of three, the other two away (no meta leader): not a
    configuration error, only not yet; done once the cluster is whole again."""
    nats_cluster.stop_node(1)
    nats_cluster.stop_node(2)
    log = tmp_path / "setup.log"
    proc = _setup({"NATS_URL": nats_cluster.urls[0], "WECOMBOT_STREAM_REPLICAS": "3"}, log)
    try:
        await until(
            lambda: '"nats.not_ready"' in log.read_text(),
            timeout=30,
            what="setup to wait for the cluster",
        )
        assert proc.poll() is None, log.read_text()
        nats_cluster.start_node(1)
        nats_cluster.start_node(2)
        assert await asyncio.to_thread(_exit_code, proc, 90) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert '"service.config_error"' not in log.read_text()


async def test_a_user_the_broker_refuses_exits_2_naming_the_credentials(tmp_path: Path) -> None:
    """Another service's credentials (the wrong Secret in the Job): the broker refuses the
    user the JetStream API, each request times out, and setup said `nats.not_ready
    TimeoutError` until the Job's deadline, as if JetStream were starting."""
    from wecombot_common.embedded import EmbeddedNats

    conf = tmp_path / "auth.conf"
    conf.write_text(
        'authorization { users = [ { user: "gateway", password: "pw-gw", '
        'permissions: { publish: { deny: ["$JS.API.>"] } } } ] }\n',
        encoding="utf-8",
    )
    server = EmbeddedNats(tmp_path / "nats", config_file=conf)
    server.start()
    try:
        log = tmp_path / "setup.log"
        env = {"NATS_URL": server.url, "NATS_USER": "gateway", "NATS_PASSWORD": "pw-gw"}
        proc = _setup(env, log)
        assert await asyncio.to_thread(_exit_code, proc, 60) == 2, log.read_text()
    finally:
        server.stop()
    written = log.read_text()
    assert '"service.config_error"' in written
    assert "the NATS server refuses the NATS user 'gateway' what this needs" in written
    assert "permissions violation for publish to" in written  # as nats-py writes it
    assert "pw-gw" not in written
