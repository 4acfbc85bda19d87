"""The NATS adapters against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import weakref
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from structlog.testing import capture_logs

from tests.conftest import NatsHandle, free_port
from tests.lagging import LaggingFollower
from tests.waiting import until
from wecombot_common import topology
from wecombot_common.bus import (
    ConcurrencyConflict,
    append_event,
    connect,
    connect_when_ready,
    ensure_topology,
    read_conversation,
)
from wecombot_common.embedded import EmbeddedNats
from wecombot_common.events import ConversationReset, Event, ReplyGenerated, encode_event
from wecombot_common.settings import EnvReader, NatsSettings
from wecombot_common.topology import ConversationRef, subject_for

pytestmark = pytest.mark.integration


def _settings() -> NatsSettings:
    return NatsSettings.read(EnvReader({}))


async def test_topology_is_idempotent_and_updates(js: JetStreamContext) -> None:
    await ensure_topology(js, _settings())
    await ensure_topology(js, _settings())
    info = await js.stream_info(topology.CONVERSATION_STREAM)
    assert info.config.duplicate_window == 900
    changed = NatsSettings.read(EnvReader({"WECOMBOT_DUPLICATE_WINDOW": "1200"}))
    await ensure_topology(js, changed)
    info = await js.stream_info(topology.CONVERSATION_STREAM)
    assert info.config.duplicate_window == 1200


async def test_append_dedupes_and_reads_back_in_order(js: JetStreamContext) -> None:
    await ensure_topology(js, _settings())
    conv = ConversationRef("ww1-1", "zhang.san@x")
    other = ConversationRef("ww1-1", "zhang")
    first = ReplyGenerated(app=conv.app, conversation=conv.user, correlation_id="m1", text="a")
    a1 = await append_event(js, first, msg_id="k1")
    again = await append_event(js, first, msg_id="k1")
    assert again.duplicate and again.seq == a1.seq
    await append_event(
        js, ReplyGenerated(app=other.app, conversation=other.user, correlation_id="m2", text="x")
    )
    second = ConversationReset(app=conv.app, conversation=conv.user, correlation_id="m3", text="r")
    await append_event(js, second)
    got = [s.event async for s in read_conversation(js, conv)]
    assert got == [first, second]
    later = [s.event async for s in read_conversation(js, conv, after_seq=a1.seq)]
    assert later == [second]


async def test_a_long_conversation_is_read_in_batches_not_a_request_per_event(
    nc: NATS, js: JetStreamContext
) -> None:
    """A cold read of a conversation asked the broker once per event, plus once for "not
    found" (20,000 events: 4.3 s); a catch-up read of one new event, twice."""
    await ensure_topology(js, _settings())
    conv = ConversationRef("ww1-1", "chen.liu")
    big = "长" * 2000  # 6 KB an event: about 170 fill a batch's bytes
    written = [
        ReplyGenerated(app=conv.app, conversation=conv.user, correlation_id=f"m{i}", text=t)
        for i, t in enumerate(["x"] * 300 + [big] * 250 + ["y"])
    ]
    for reply in written:
        await append_event(js, reply)
    await append_event(  # another user's, between: not read
        js, ReplyGenerated(app=conv.app, conversation="zhou", correlation_id="z", text="z")
    )
    api = f"$JS.API.DIRECT.GET.{topology.CONVERSATION_STREAM}"
    # The broker's requests, as any subscriber sees them: each copy is queued here before
    # its answer reaches the reader (one connection, in order), so a read that ended has
    # every request it made counted.
    watch = await nc.subscribe(api)

    async def asked() -> list[dict[str, object]]:
        return [json.loads((await watch.next_msg()).data) for _ in range(watch.pending_msgs)]

    try:
        read = [s async for s in read_conversation(js, conv)]
        assert [s.event for s in read] == written
        # 256 small; 44 small and the big ones up to a MiB; the rest
        requests = await asked()
        assert [r["seq"] for r in requests[:2]] == [1, read[256].seq], requests
        assert len(requests) == 3 and requests[2]["seq"] < read[256 + 256].seq, requests
        new = await append_event(
            js, ReplyGenerated(app=conv.app, conversation=conv.user, correlation_id="n", text="n")
        )
        later = [s async for s in read_conversation(js, conv, after_seq=read[-1].seq)]
        assert [s.seq for s in later] == [new.seq]
        assert len(await asked()) == 1  # the new event and the batch's end, in one answer
        assert [s async for s in read_conversation(js, conv, after_seq=new.seq)] == []
        assert len(await asked()) == 1
    finally:
        await watch.unsubscribe()


async def test_many_cold_reads_at_once_keep_the_connection(nats_server: NatsHandle) -> None:
    """The llm reads a conversation for each message it handles, 64 at a time by default
    (LLM_MAX_CONCURRENCY): after a restart, all of them cold. The broker answers a batch
    without flow control, up to 1 MiB each: 64 of them at once were more than the 64 MiB
    it queues for a client ("Slow Consumer Detected: MaxPending of 67108864 Exceeded"),
    so it closed the connection, and every read on it (every append, ack…) failed."""
    dropped: list[str] = []

    async def on_disconnect() -> None:
        dropped.append("disconnected")

    async def on_error(exc: Exception) -> None:
        pass  # the connection reset, told by on_disconnect

    nc = await nats.connect(
        nats_server.url,
        disconnected_cb=on_disconnect,
        error_cb=on_error,
        max_reconnect_attempts=-1,
    )
    try:
        js = nc.jetstream()
        await ensure_topology(js, _settings())
        conv = ConversationRef("ww1-1", "chen.liu")
        written = [
            ReplyGenerated(
                app=conv.app, conversation=conv.user, correlation_id=f"m{i}", text="长" * 2000
            )
            for i in range(250)
        ]  # 6 KB an event, 1.5 MB in all: two batches
        await asyncio.gather(*(append_event(js, reply) for reply in written[:125]))
        for reply in written[125:]:
            await append_event(js, reply)

        async def cold_read() -> list[Event]:
            return [s.event async for s in read_conversation(js, conv)]

        reads = await asyncio.gather(*(cold_read() for _ in range(64)), return_exceptions=True)
        assert dropped == []
        assert all(read == written for read in reads), {repr(r)[:80] for r in reads}
    finally:
        await nc.close()


async def test_a_client_closed_is_not_kept_by_the_reads_it_made(nats_server: NatsHandle) -> None:
    """The batched reads of a connection are kept in a registry meant to hold its client
    weakly; they held the client themselves (and their subscription, which holds it too),
    so no client that ever read a conversation was freed: the console's, one per test…"""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_topology(js, _settings())
    conv = ConversationRef("ww1-1", "chen.liu")
    reply = ReplyGenerated(app=conv.app, conversation=conv.user, correlation_id="m", text="a")
    await append_event(js, reply)
    assert [s.event async for s in read_conversation(js, conv)] == [reply]
    await nc.close()
    client = weakref.ref(nc)
    del nc, js
    gc.collect()
    assert client() is None


async def test_a_read_short_of_its_reach_goes_on_from_the_leader(js: JetStreamContext) -> None:
    """A follower that has applied the log through the first event answers the direct
    reads: a read that knows the log holds the third goes on from the leader; one that
    knows nothing ends where the follower does; a reach the log no longer holds (aged
    out) ends after the leader's read, not in a loop."""
    await ensure_topology(js, _settings())
    conv = ConversationRef("ww1-1", "wang.wu")
    replies = [
        ReplyGenerated(app=conv.app, conversation=conv.user, correlation_id=f"m{i}", text=t)
        for i, t in enumerate("abc")
    ]
    seqs = [(await append_event(js, r)).seq for r in replies]
    follower = LaggingFollower(js, applied=seqs[0])  # type: ignore[arg-type]

    async def read(**kwargs: int) -> list[int]:
        return [s.seq async for s in read_conversation(follower, conv, **kwargs)]  # type: ignore[arg-type]

    assert await read() == seqs[:1] and follower.leader_reads == 0
    assert await read(reach=seqs[2]) == seqs and follower.leader_reads > 0
    follower.leader_reads = 0
    assert await read(after_seq=seqs[2], reach=seqs[2]) == [] and follower.leader_reads == 0
    assert await read(reach=seqs[2] + 5) == seqs


async def test_a_replica_that_does_not_batch_is_read_one_message_an_answer(
    nats_without_jetstream: str,
) -> None:
    """A replica before nats-server 2.11 (a rolling upgrade) ignores ``batch``: it answers
    one message, without a count of those pending and without an end of batch. Played
    here by a responder on the direct-get subject: every such read waited for an end
    that never came, and timed out."""
    conv = ConversationRef("ww1-1", "old.replica")
    stored = {
        seq: ReplyGenerated(
            app=conv.app, conversation=conv.user, correlation_id=f"m{seq}", text="x"
        )
        for seq in (3, 5, 8)
    }
    nc = await nats.connect(nats_without_jetstream)

    async def as_before_2_11(msg: Msg) -> None:
        asked = json.loads(msg.data)
        found = [seq for seq in sorted(stored) if seq >= asked["seq"]]
        if not found:
            await nc.publish(msg.reply, b"", headers={"Status": "404"})
            return
        event = stored[found[0]]
        headers = {"Nats-Sequence": str(found[0]), "Nats-Subject": subject_for(event)}
        await nc.publish(msg.reply, encode_event(event), headers=headers)

    try:
        await nc.subscribe(f"$JS.API.DIRECT.GET.{topology.CONVERSATION_STREAM}", cb=as_before_2_11)
        js = nc.jetstream(timeout=2)
        got = [s async for s in read_conversation(js, conv)]
        assert [(s.seq, s.event) for s in got] == sorted(stored.items())
    finally:
        await nc.close()


async def test_a_read_from_the_leader_asks_it_how_far_then_reads_in_batches(
    js: JetStreamContext,
) -> None:
    """A reader that knows the log holds more than it saw (a refused append, a sender's
    repeat delivery) asked the leader for each event in turn: as slow as a cold read was
    before the batches. Now the leader is asked once how far the conversation goes; what
    a lagging follower's batches do not show of that is read from the leader."""
    await ensure_topology(js, _settings())
    conv = ConversationRef("ww1-1", "sun.qi")
    replies = [
        ReplyGenerated(app=conv.app, conversation=conv.user, correlation_id=f"m{i}", text="a")
        for i in range(600)
    ]
    seqs = [(await append_event(js, r)).seq for r in replies]
    follower = LaggingFollower(js, applied=seqs[-1])  # type: ignore[arg-type]

    async def read(after_seq: int = 0) -> list[int]:
        got = read_conversation(follower, conv, after_seq=after_seq, direct=False)  # type: ignore[arg-type]
        return [s.seq async for s in got]

    assert await read() == seqs and follower.leader_reads == 1
    follower.leader_reads, follower.applied = 0, seqs[549]  # 50 events behind
    assert await read() == seqs and follower.leader_reads == 1 + 50 + 1  # last, each, end
    follower.leader_reads = 0
    assert await read(after_seq=seqs[-1]) == [] and follower.leader_reads == 1
    follower.leaderless = True  # electing a leader: the read fails, as a leader's would
    with pytest.raises(TimeoutError):
        await read()


async def test_expected_last_sequence_is_scoped_to_a_branch(js: JetStreamContext) -> None:
    await ensure_topology(js, _settings())
    conv = ConversationRef("ww1-1", "li.si")

    def reply(text: str) -> ReplyGenerated:
        return ReplyGenerated(app=conv.app, conversation=conv.user, correlation_id="c", text=text)

    a = await append_event(js, reply("1"), expect_last_seq=0, expect_scope=conv.llm_branch)
    await append_event(js, reply("2"), expect_last_seq=a.seq, expect_scope=conv.llm_branch)
    with pytest.raises(ConcurrencyConflict):
        await append_event(js, reply("3"), expect_last_seq=a.seq, expect_scope=conv.llm_branch)


async def test_a_broker_that_is_not_there_is_named_without_its_password() -> None:
    """The first connection is tried again without end (a pod may start before NATS);
    each failure must say which NATS_URL failed, or a wrong one reads only as
    "connection refused" forever."""
    port = free_port()
    url = f"nats://bot:hunter2@127.0.0.1:{port}"
    settings = NatsSettings.read(EnvReader({"NATS_URL": url}))

    def errors() -> list[dict[str, object]]:
        return [e for e in logs if e["event"] == "nats.error"]

    with capture_logs() as logs:
        connecting = asyncio.create_task(connect(settings, "wecombot-test"))
        try:
            await until(lambda: bool(errors()), timeout=10, what="a nats.error line")
        finally:
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connecting
    assert errors()[0]["nats_url"] == f"nats://127.0.0.1:{port}"
    assert "hunter2" not in repr(logs)


async def test_errors_while_nats_stays_away_are_written_once_a_period_and_counted(
    tmp_path: Path,
) -> None:
    """nats-py reports every failed attempt, twice a second per client, for as long as
    NATS stays away: one line per kind of error a period, and the client, once
    connected, says how many more failed."""
    attempts = 0

    async def hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = NatsSettings.read(EnvReader({"NATS_URL": f"nats://127.0.0.1:{port}"}))
    broker = EmbeddedNats(tmp_path / "nats", port=port)
    with capture_logs() as logs:
        connecting = asyncio.create_task(
            connect(settings, "wecombot-test", error_log_period_s=3600)
        )
        try:
            await until(lambda: attempts >= 4, timeout=20, what="four attempts")
            server.close()
            await server.wait_closed()
            await asyncio.to_thread(broker.start)
            async with asyncio.timeout(30):
                nc = await connecting
            await nc.close()
        finally:
            connecting.cancel()
            await asyncio.to_thread(broker.stop)
    written = [e["error"] for e in logs if e["event"] == "nats.error"]
    assert len(written) == len(set(written)) < attempts, written
    connected = [e for e in logs if e["event"] == "nats.connected"]
    assert connected and connected[0]["errors_not_logged"] > 0


async def test_a_service_connects_with_nats_creds(tmp_path: Path) -> None:
    """NATS_CREDS (a .creds file: the user's JWT and nkey seed, as `nsc` writes it): nats-py
    signs in with the nkeys package, which was not installed: every service, setup and
    dlq failed with ModuleNotFoundError. (This broker asks for no credentials: what is
    checked is that the file is read and the connection made with it; checking the JWT
    is nats-server's business.)"""
    import os

    import nkeys  # a dependency: nats-py[nkeys]

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    creds = tmp_path / "user.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\n"
        "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.e30.c2ln\n"
        "------END NATS USER JWT------\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{seed}\n"
        "------END USER NKEY SEED------\n",
        encoding="utf-8",
    )
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    try:
        settings = NatsSettings.read(EnvReader({"NATS_URL": server.url, "NATS_CREDS": str(creds)}))
        nc = await connect(settings, "wecombot-creds")
        try:
            await ensure_topology(nc.jetstream(), settings)
            assert nc.is_connected
        finally:
            await nc.close()
    finally:
        server.stop()


async def test_a_service_whose_stream_settings_differ_waits_for_setup(tmp_path: Path) -> None:
    """Under deploy/nats/auth.conf only `setup` may update a stream: a service started with
    other stream settings (a rollout before the setup Job ran) waits, not ready, saying
    so. (Taken for wrong credentials, it exited 2: a crash loop at every such rollout.)"""
    conf = tmp_path / "auth.conf"
    conf.write_text(
        'authorization { users = [ { user: "setup", password: "pw-setup" }, '
        '{ user: "gateway", password: "pw-gw", '
        'permissions: { publish: { deny: ["$JS.API.STREAM.UPDATE.>"] } } } ] }\n',
        encoding="utf-8",
    )
    server = EmbeddedNats(tmp_path / "nats", config_file=conf)
    server.start()
    try:
        as_setup = NatsSettings.read(
            EnvReader({"NATS_URL": server.url, "NATS_USER": "setup", "NATS_PASSWORD": "pw-setup"})
        )
        nc = await connect(as_setup, "wecombot-setup")
        await ensure_topology(nc.jetstream(), as_setup)
        await nc.close()
        as_gateway = NatsSettings.read(
            EnvReader(
                {
                    "NATS_URL": server.url,
                    "NATS_USER": "gateway",
                    "NATS_PASSWORD": "pw-gw",
                    "WECOMBOT_DUPLICATE_WINDOW": "1200",  # the stream has 900
                }
            )
        )
        stop = asyncio.Event()
        with capture_logs() as logs:
            waiting = asyncio.create_task(
                connect_when_ready(
                    as_gateway,
                    "wecombot-gateway",
                    stop,
                    lambda js: ensure_topology(js, as_gateway),
                    first_retry_s=0.1,
                )
            )

            def said() -> bool:
                return any(
                    e["event"] == "nats.not_ready" and "waiting for `wecombot setup`" in e["error"]
                    for e in logs
                )

            await until(said, timeout=30, what="the service to say it waits for setup")
            stop.set()
            assert await waiting is None  # stopped while waiting, not refused
    finally:
        server.stop()
