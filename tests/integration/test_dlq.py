"""``wecombot dlq`` against a real nats-server, on dead letters parked by the real worker.

Two work consumers (named as the services' are) give up on messages the ways services
do: an event that does not decode, a permanent refusal, and a transient failure that
outlasted max_deliver. The command then lists and shows them, as text and JSON, both
in-process and as the ``wecombot`` process operators run.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy

from tests.conftest import SERVICE_PASSWORD, SERVICE_USER, NatsHandle, free_port
from tests.lagging import LaggingFollower
from tests.waiting import eventually, until
from wecombot import dlq
from wecombot.dlq import _with_states, read_dead_letters, replay, run, standing
from wecombot_common import topology
from wecombot_common.bus import append_event, ensure_topology
from wecombot_common.embedded import EmbeddedNats, nats_server_binary
from wecombot_common.errors import PermanentError
from wecombot_common.events import (
    DeliveryFailed,
    MessageReceived,
    ReplyDelivered,
    ReplyGenerated,
    ReplyRequeued,
    TextPayload,
    decode_event,
    derived_id,
    encode_event,
    failure_of_round,
)
from wecombot_common.settings import EnvReader, NatsSettings
from wecombot_common.worker import (
    DLQ_CONSUMER,
    DLQ_DELIVERIES,
    DLQ_REASON,
    DLQ_STREAM_SEQ,
    DLQ_SUBJECT,
    Ack,
    Delivery,
    Handler,
    Nak,
    Outcome,
    PullWorker,
)

pytestmark = pytest.mark.integration

APP = "ww1-1000002"


def _reply(user: str, text: str) -> ReplyGenerated:
    return ReplyGenerated(app=APP, conversation=user, correlation_id=text, text=text)


def _received(msg_id: str) -> MessageReceived:
    return MessageReceived(
        app=APP,
        conversation="wang.wu",
        correlation_id=msg_id,
        msg_type="text",
        msg_id=msg_id,
        from_user="wang.wu",
        to_user="ww1",
        agent_id=1000002,
        create_time=1_700_000_000,
        payload=TextPayload(content="你好"),
    )


def _settings(url: str) -> NatsSettings:
    return NatsSettings.read(EnvReader({"NATS_URL": url}))


async def _work(js: JetStreamContext, name: str, filter_subject: str, handler: Handler) -> None:
    config = topology.work_consumer(name, filter_subject, ack_wait_s=5, max_ack_pending=100)
    stop = asyncio.Event()
    worker = PullWorker(js, config, handler, max_deliver=2, fetch_timeout_s=0.2)
    await worker.ensure_consumer()
    task = asyncio.create_task(worker.run(stop))

    async def settled() -> bool:
        info = await js.consumer_info(topology.CONVERSATION_STREAM, name)
        return bool(info.num_pending == 0 and info.num_ack_pending == 0)

    await until(settled, timeout=15.0, what=f"{name} to have nothing pending or unacked")
    stop.set()
    await task


@pytest.fixture
async def dead(js: JetStreamContext) -> JetStreamContext:
    """Three dead letters: llm (undecodable), sender (refused), sender (gave up). A
    reason in Chinese, as WeCom's own words are: nats-py reads a non-ASCII header of a
    stream message as an email Header object (the listing crashed on it)."""
    await ensure_topology(js, _settings("nats://127.0.0.1:4222"))
    await js.publish(f"{topology.PREFIX}.conv.{APP}.wang~2Ewu.in", b"\xffnot an event")
    await append_event(js, _reply("li.si", "refused for good"))
    await append_event(js, _reply("zhang.san", "keeps failing"))
    await append_event(js, _reply("ok.user", "fine"))

    async def never(d: Delivery) -> Outcome:
        raise AssertionError("an undecodable event never reaches a handler")

    async def sender(d: Delivery) -> Outcome:
        if d.event.conversation == "li.si":
            raise PermanentError("SendRejected: recipient left (成员已离职) (errcode 81013)")
        if d.event.conversation == "zhang.san":
            return Nak(0, "WeCom answered HTTP 502")
        return Ack()

    await _work(js, topology.LLM_CONSUMER, topology.RECEIVED_FILTER, never)
    await _work(js, topology.SENDER_CONSUMER, topology.OUTCOME_FILTER, sender)
    info = await js.stream_info(topology.DEAD_LETTER_STREAM)
    assert info.state.messages == 3
    return js


async def _dlq(url: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await run(_settings(url), argv, out, err)
    return code, out.getvalue(), err.getvalue()


async def test_a_user_the_broker_refuses_is_told_so(
    nats_with_a_service_user: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a service's user, dlq waited its 10 s and said 'TimeoutError: nats: timeout'."""
    monkeypatch.setattr(dlq, "_TIMEOUT_S", 2.0)
    settings = NatsSettings.read(
        EnvReader(
            {
                "NATS_URL": nats_with_a_service_user,
                "NATS_USER": SERVICE_USER,
                "NATS_PASSWORD": SERVICE_PASSWORD,
            }
        )
    )
    out, err = io.StringIO(), io.StringIO()
    assert await run(settings, [], out, err) == 1
    said = err.getvalue()
    assert said.startswith(
        f"wecombot dlq: NATS at {nats_with_a_service_user} refused the user {SERVICE_USER!r} "
    ), said
    assert "admin credentials" in said


async def test_list_as_json_has_time_consumer_reason_subject_and_sequence(
    nats_server: NatsHandle, dead: JetStreamContext
) -> None:
    started = datetime.now(UTC)
    code, out, err = await _dlq(nats_server.url, "--json")
    assert (code, err) == (0, "")
    letters = json.loads(out)
    assert [(d["seq"], d["consumer"], d["user"]) for d in letters] == [
        (1, "llm", "wang.wu"),
        (2, "sender", "li.si"),
        (3, "sender", "zhang.san"),
    ]
    undecodable, refused, gave_up = letters
    assert "undecodable event" in undecodable["reason"]
    assert undecodable["subject"] == f"wecombot.conv.{APP}.wang~2Ewu.in"
    assert undecodable["stream_seq"] == 1 and undecodable["deliveries"] == 1
    assert (
        refused["reason"]
        == "PermanentError: SendRejected: recipient left (成员已离职) (errcode 81013)"
    )
    assert refused["subject"] == f"wecombot.conv.{APP}.li~2Esi.llm.reply"
    assert refused["stream_seq"] == 2 and refused["app"] == APP
    assert gave_up["reason"] == "gave up after 2: WeCom answered HTTP 502"
    assert (gave_up["stream_seq"], gave_up["deliveries"]) == (3, 2)
    for d in letters:
        assert started - timedelta(minutes=1) < datetime.fromisoformat(d["time"])


async def test_list_as_a_table_and_filtered(
    nats_server: NatsHandle, dead: JetStreamContext
) -> None:
    code, out, _ = await _dlq(nats_server.url)
    assert code == 0
    head, columns, *rows, hint = out.splitlines()
    assert head == "3 dead letters in WECOMBOT_DLQ"
    assert columns.split() == [
        "SEQ", "TIME", "(UTC)", "CONSUMER", "STREAM", "SEQ", "DELIVERIES", "USER", "STATE",
        "REASON",
    ]  # fmt: skip
    assert [r.split()[:5:3] for r in rows] == [["1", "llm"], ["2", "sender"], ["3", "sender"]]
    # the user whole, not a subject clipped before it
    assert [r.split()[6:8] for r in rows] == [
        ["wang.wu", "unreadable"],
        ["li.si", "pending"],
        ["zhang.san", "pending"],
    ]
    assert "gave up after 2: WeCom answered HTTP 502" in rows[2]
    assert hint == "details: wecombot dlq show SEQ; to hand one back: wecombot dlq replay SEQ"

    code, out, _ = await _dlq(nats_server.url, "list", "--consumer", "sender", "--limit", "1")
    assert code == 0
    head, _, only, _ = out.splitlines()
    assert head == "3 dead letters in WECOMBOT_DLQ (showing 1 of consumer sender)"
    assert only.split()[0] == "3"  # the newest
    code, out, _ = await _dlq(nats_server.url, "--consumer", "llm", "--limit", "5")
    assert out.splitlines()[0] == "3 dead letters in WECOMBOT_DLQ (showing 1 of consumer llm)"


async def test_show_one_with_its_event_decoded_or_its_bytes(
    nats_server: NatsHandle, dead: JetStreamContext
) -> None:
    code, out, _ = await _dlq(nats_server.url, "show", "2")
    assert code == 0
    assert out.startswith("dead letter 2 in WECOMBOT_DLQ\n")
    assert (
        "  reason:     PermanentError: SendRejected: recipient left (成员已离职) (errcode 81013)"
        in out
    )
    assert "  user:       li.si" in out and '"text": "refused for good"' in out

    code, out, _ = await _dlq(nats_server.url, "show", "2", "--json")
    shown = json.loads(out)
    assert shown["event"]["type"] == "ReplyGenerated"
    assert shown["event"]["text"] == "refused for good" and "data" not in shown

    code, out, _ = await _dlq(nats_server.url, "--json", "show", "1")
    shown = json.loads(out)
    assert (code, shown["event"], shown["data"]) == (0, None, "\ufffdnot an event")
    code, out, _ = await _dlq(nats_server.url, "show", "1")
    assert "(not a wecombot event)" in out

    code, out, err = await _dlq(nats_server.url, "show", "99")
    assert (code, out, err) == (1, "", "wecombot dlq: no message 99 in WECOMBOT_DLQ\n")


async def test_an_empty_dlq_and_an_unreachable_broker(
    nats_server: NatsHandle, js: JetStreamContext
) -> None:
    await ensure_topology(js, _settings(nats_server.url))
    code, out, _ = await _dlq(nats_server.url)
    assert (code, out) == (0, "no dead letters in WECOMBOT_DLQ (0 in all)\n")
    assert await _dlq(nats_server.url, "--json") == (0, "[]\n", "")
    nats_server.stop()
    url = nats_server.url.replace("nats://", "nats://admin:pw-never-shown@")
    code, out, err = await _dlq(url)
    assert code == 1 and out == ""
    assert err.startswith("wecombot dlq: cannot reach NATS at nats://127.0.0.1:")
    assert ": nothing listens at that address\nStart nats-server with JetStream" in err
    assert "pw-never-shown" not in err and "admin" not in err


async def test_a_broker_without_jetstream_is_said_plainly(tmp_path: Path) -> None:
    server = subprocess.Popen(
        [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port := free_port())],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"nats://127.0.0.1:{port}"
        code, out, err = await eventually(
            lambda: _answered(url), timeout=10, what="nats-server without JetStream to answer"
        )
    finally:
        server.terminate()
        server.wait()
    assert (code, out) == (1, "")
    assert err.startswith(f"wecombot dlq: NATS at {url} answers, but JetStream is not enabled\n")


async def _answered(url: str) -> tuple[int, str, str] | None:
    """The command's answer, once it reaches the server (None while it cannot)."""
    answer = await _dlq(url)
    return None if "cannot reach NATS" in answer[2] else answer


async def test_no_dlq_stream_yet_is_said_plainly(nats_server: NatsHandle) -> None:
    """Before any service (or `wecombot setup`) has created the streams."""
    expected = (
        f"wecombot dlq: the stream WECOMBOT_DLQ does not exist at {nats_server.url}: the "
        "services make it when they start (or `wecombot setup`)\n"
    )
    for argv in ((), ("show", "1"), ("replay", "1")):
        assert await _dlq(nats_server.url, *argv) == (1, "", expected), argv


async def test_letters_with_their_log_deleted_say_so_not_gone(
    nats_server: NatsHandle, dead: JetStreamContext
) -> None:
    """With the stream WECOMBOT deleted, every letter read `gone` (aged out), and a
    replay refused each as "no longer in WECOMBOT (aged out ...)": the stream itself is
    missing, which is said, naming it."""
    await dead.delete_stream(topology.CONVERSATION_STREAM)
    missing = "the stream WECOMBOT does not exist: what became of the dead letters'"
    code, out, err = await _dlq(nats_server.url, "--json")
    assert code == 0
    assert [d["state"] for d in json.loads(out)] == ["unreadable", "?", "?"]
    assert err.startswith(f"wecombot dlq: {missing}"), err
    assert "(shown as ?): the services make it when they start" in err, err
    code, out, err = await _dlq(nats_server.url, "show", "3")
    assert code == 0 and "?" in out and missing in err, (out, err)
    for argv in (("replay", "3"), ("replay", "2", "3"), ("replay", "--pending")):
        code, out, err = await _dlq(nats_server.url, *argv)
        assert (code, out) == (1, ""), (argv, out)
        assert err == (
            f"wecombot dlq: {missing} messages and replies cannot be read, and none can be "
            f"replayed (at {nats_server.url}): the services make it when they start (or "
            "`wecombot setup`)\n"
        ), (argv, err)


async def test_each_consumers_letter_with_its_log_deleted_is_not_called_gone(
    nats_server: NatsHandle, js: JetStreamContext
) -> None:
    """A message the llm gave up on, a reply the sender did, WECOMBOT deleted since: each
    read `gone` (aged out); ``replay`` itself (public: the services' tests call it) refused
    each as aged out, where the stream is missing."""
    await ensure_topology(js, _settings(nats_server.url))
    await _park(js, _received("m-lost"), 1, topology.LLM_CONSUMER)
    await _park(js, _reply("li.si", "lost"), 2)
    await js.delete_stream(topology.CONVERSATION_STREAM)
    code, out, err = await _dlq(nats_server.url, "--json")
    assert code == 0 and [d["state"] for d in json.loads(out)] == ["?", "?"], (out, err)
    for seq in (1, 2):
        with pytest.raises(dlq.LogMissing):
            await replay(js, seq)


def _wecombot(
    *argv: str, url: str | None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``wecombot dlq`` as a command; ``url=None``: no NATS setting in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    if url is not None:
        env["NATS_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "wecombot", "dlq", *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_wecombot_command(nats_server: NatsHandle, dead: JetStreamContext) -> None:
    listed = await asyncio.to_thread(_wecombot, "--json", url=nats_server.url)
    assert listed.returncode == 0, listed.stderr
    assert [d["consumer"] for d in json.loads(listed.stdout)] == ["llm", "sender", "sender"]
    shown = await asyncio.to_thread(_wecombot, "show", "3", url=nats_server.url)
    assert shown.returncode == 0 and "gave up after 2" in shown.stdout
    bad = await asyncio.to_thread(_wecombot, "show", "three", url=nats_server.url)
    assert bad.returncode == 2 and "'three' is not a whole number" in bad.stderr
    # 0 and -1 reached JetStream as requests it could not read (exit 1, its error code).
    for argv in (("show", "0"), ("replay", "-1"), ("--limit", "-3")):
        bad = await asyncio.to_thread(_wecombot, *argv, url=nats_server.url)
        assert bad.returncode == 2 and "is not 1 or more" in bad.stderr, (argv, bad.stderr)
    helped = await asyncio.to_thread(_wecombot, "--help", url=nats_server.url)
    assert helped.returncode == 0 and "--consumer" in helped.stdout, helped.stderr
    bad = await asyncio.to_thread(_wecombot, "--consumer", "token", url=nats_server.url)
    assert bad.returncode == 2 and "invalid choice: 'token'" in bad.stderr, bad.stderr


async def test_the_wecombot_command_reads_dot_env(
    nats_server: NatsHandle, dead: JetStreamContext, tmp_path: Path
) -> None:
    """As dev and doctor do: README's step 3 puts the settings in ./.env."""
    (tmp_path / ".env").write_text(f"NATS_URL={nats_server.url}\n")
    listed = await asyncio.to_thread(_wecombot, "--json", url=None, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)) == 3


async def test_one_consumers_newest_letters_are_found_however_they_mix_with_others(
    js: JetStreamContext,
) -> None:
    """Few letters among many: read forwards by their subject; many: scanned back. Both
    give the newest, oldest first."""
    await ensure_topology(js, _settings("nats://127.0.0.1:4222"))
    owners = ["sender", *["llm"] * 5, "sender", *["llm"] * 5, "sender", "llm", "llm"]
    for i, owner in enumerate(owners, start=1):
        await js.publish(
            f"{topology.PREFIX}.dlq.{owner}",
            b"{}",
            headers={DLQ_CONSUMER: owner, DLQ_REASON: f"letter {i}"},
        )
    total, letters = await read_dead_letters(js, consumer="sender", limit=2)
    assert (total, [d.seq for d in letters]) == (15, [7, 13])
    _, letters = await read_dead_letters(js, consumer="sender", limit=5)
    assert [d.seq for d in letters] == [1, 7, 13]
    assert [d.reason for d in letters] == ["letter 1", "letter 7", "letter 13"]
    _, letters = await read_dead_letters(js, consumer="llm", limit=3)
    assert [d.seq for d in letters] == [12, 14, 15]
    _, letters = await read_dead_letters(js, consumer="llm.*", limit=3)  # not a token
    assert letters == []


async def test_replay_refuses_what_it_cannot_requeue(
    nats_server: NatsHandle, dead: JetStreamContext
) -> None:
    code, out, err = await _dlq(nats_server.url, "replay", "1")
    assert (code, out) == (1, "")
    assert err == (
        "wecombot dlq: dead letter 1 is not a wecombot event: replaying cannot mend it\n"
    )
    code, _, err = await _dlq(nats_server.url, "replay", "99")
    assert (code, err) == (1, "wecombot dlq: no message 99 in WECOMBOT_DLQ\n")
    info = await dead.stream_info(topology.CONVERSATION_STREAM)
    assert info.state.messages == 4, "a refused replay appends nothing"
    # These workers park a reply without its DeliveryFailed, as the sender's worker does
    # when the reply's last delivery ended without an outcome: it is requeued all the
    # same, once.
    code, out, err = await _dlq(nats_server.url, "replay", "3")
    assert code == 0 and "requeued" in out and "after the 0 part(s) recorded" in out, err
    # The same replay again (its answer lost, or another operator): recognised, not
    # refused as someone else's requeue, and not appended twice.
    code, out, err = await _dlq(nats_server.url, "replay", "3")
    assert code == 0 and "dead letter 3 was replayed already" in out, err
    info = await dead.stream_info(topology.CONVERSATION_STREAM)
    assert info.state.messages == 5
    code, _, err = await _dlq(nats_server.url, "--json", "replay", "3")
    assert (code, err) == (
        2,
        "wecombot dlq: --json is for list and show; replay answers in words\n",
    )


async def test_a_misfiled_letter_says_so_and_is_not_replayed(
    nats_server: NatsHandle, js: JetStreamContext
) -> None:
    """A message for wang.wu filed on zhao.liu's subject (by hand, a faulty build) is
    parked by the worker before it is handled. Replayed, it was appended on its own
    subject and wang.wu was answered."""
    await ensure_topology(js, _settings(nats_server.url))
    filed_on = f"{topology.PREFIX}.conv.{APP}.zhao~2Eliu.in"
    await js.publish(filed_on, encode_event(_received("m-misfiled")))

    async def never(d: Delivery) -> Outcome:
        raise AssertionError("a misfiled event never reaches a handler")

    await _work(js, topology.LLM_CONSUMER, topology.RECEIVED_FILTER, never)
    code, out, err = await _dlq(nats_server.url, "--json")
    assert (code, err) == (0, "")
    [letter] = json.loads(out)
    assert (letter["state"], letter["subject"]) == ("misfiled", filed_on)
    code, out, err = await _dlq(nats_server.url, "replay", "1")
    assert (code, out) == (1, "")
    assert err == (
        f"wecombot dlq: dead letter 1 is a MessageReceived filed on '{filed_on}', which is "
        f"not its own subject ('{topology.PREFIX}.conv.{APP}.wang~2Ewu.in'): written by "
        "hand or by a faulty build, it is not replayed\n"
    )
    info = await js.stream_info(topology.CONVERSATION_STREAM)
    assert info.state.messages == 1, "nothing appended"


async def test_a_letter_handled_since_says_so_where_it_stays_listed(
    nats_server: NatsHandle, dead: JetStreamContext
) -> None:
    """A replayed letter stays in WECOMBOT_DLQ (for WECOMBOT_HISTORY_MAX_AGE) and was
    listed as before: an operator could not tell the handled ones from those still to
    replay."""

    async def states() -> list[str]:
        code, out, err = await _dlq(nats_server.url, "--json")
        assert (code, err) == (0, "")
        return [d["state"] for d in json.loads(out)]

    assert await states() == ["unreadable", "pending", "pending"]
    code, _, err = await _dlq(nats_server.url, "replay", "3")
    assert code == 0, err
    assert await states() == ["unreadable", "pending", "requeued"]
    # The sender delivers the requeued reply; the other reply went to a user since fixed.
    for seq in (2, 3):
        reply = decode_event((await dead.get_msg(topology.CONVERSATION_STREAM, seq)).data)
        assert isinstance(reply, ReplyGenerated)
        delivered = ReplyDelivered(
            app=APP,
            conversation=reply.conversation,
            correlation_id=reply.correlation_id,
            causation_id=reply.event_id,
            reply_id=reply.event_id,
            parts=1,
            wecom_msgids=["m1"],
        )
        await append_event(dead, delivered)
    assert await states() == ["unreadable", "delivered", "delivered"]
    code, out, _ = await _dlq(nats_server.url, "show", "2")
    assert (code, "  state:      delivered") == (0, out.splitlines()[8])

    await dead.purge_stream(topology.CONVERSATION_STREAM)  # as WECOMBOT_HISTORY_MAX_AGE would
    assert await states() == ["unreadable", "gone", "gone"]


async def test_a_letters_state_is_read_from_its_parked_event_on(
    nc: NATS, js: JetStreamContext
) -> None:
    """Each listed letter's state read its whole conversation, one request per event:
    50 letters of a user with 2,000 events took 25 s to list. And one conversation that
    could not be read failed the whole listing, which read only the DLQ before."""
    await ensure_topology(js, _settings("nats://127.0.0.1:4222"))
    for i in range(30):  # the user's history before the reply
        said = msgspec.structs.replace(_received(f"m{i}"), conversation="zhang.san")
        await append_event(js, said)
    await append_event(js, _reply("zhang.san", "refused"))

    async def refuse(d: Delivery) -> Outcome:
        raise PermanentError("SendRejected: recipient left (errcode 81013)")

    await _work(js, topology.SENDER_CONSUMER, topology.OUTCOME_FILTER, refuse)
    _, [letter] = await read_dead_letters(js)
    counted = LaggingFollower(js, applied=10**9)
    batches = await nc.subscribe(f"$JS.API.DIRECT.GET.{topology.CONVERSATION_STREAM}")
    assert await standing(counted, letter) == "pending"  # type: ignore[arg-type]
    assert counted.leader_reads == 1, "how far the conversation goes, from the leader"
    # then what follows the reply, in one batch (its copy queued before its answers came)
    [asked] = [json.loads((await batches.next_msg()).data) for _ in range(batches.pending_msgs)]
    assert asked["seq"] == letter.stream_seq, "not the 30 events before it"
    await batches.unsubscribe()

    electing = LaggingFollower(js, applied=10**9, leaderless=True)  # its reads time out
    err = io.StringIO()
    [shown] = await _with_states(electing, [letter], err)  # type: ignore[arg-type]
    assert shown.state == "?"
    assert err.getvalue() == (
        "wecombot dlq: the state of dead letter 1 (TimeoutError) could not be read from "
        "WECOMBOT: shown as ?\n"
    )


async def test_a_reply_no_longer_in_the_log_is_not_requeued(
    nats_server: NatsHandle, dead: JetStreamContext
) -> None:
    """The dead letter outlives its reply (written later, kept as long): the requeue was
    appended, reported done with exit 0, and parked again by the sender."""
    await dead.purge_stream(topology.CONVERSATION_STREAM)  # as WECOMBOT_HISTORY_MAX_AGE would
    code, out, err = await _dlq(nats_server.url, "replay", "3")
    assert (code, out) == (1, "")
    assert "is no longer in WECOMBOT (aged out after WECOMBOT_HISTORY_MAX_AGE, dropped" in err, err
    info = await dead.stream_info(topology.CONVERSATION_STREAM)
    assert info.state.messages == 0


async def test_a_replay_reads_the_log_from_the_leader(dead: JetStreamContext) -> None:
    """Its direct reads answered by a stream follower that had not applied the reply
    yet, the replay said the reply was "no longer in WECOMBOT" and requeued nothing."""
    follower = LaggingFollower(dead, applied=0)
    done, said = await replay(follower, 3)  # type: ignore[arg-type]
    assert done and "requeued" in said, said


async def test_each_llm_dead_letter_replays_once_and_a_failed_copy_again(
    js: JetStreamContext,
) -> None:
    """A replayed copy that fails again is parked as a new dead letter; replaying that
    one appended nothing before (the copy's Nats-Msg-Id was per message, not per letter,
    and the repeat fell in the duplicate window), while saying the llm would answer it."""
    await ensure_topology(js, _settings("nats://127.0.0.1:4222"))
    lost = _received("m77")
    await append_event(js, lost)

    async def conversation_length() -> int:
        info = await js.stream_info(topology.CONVERSATION_STREAM)
        return int(info.state.messages)

    await _work(js, topology.LLM_CONSUMER, topology.RECEIVED_FILTER, _unappendable)
    done, said = await replay(js, 1)
    assert done and "appended again (seq 2)" in said, said
    done, said = await replay(js, 1)
    assert done and "dead letter 1 was replayed already" in said, said
    assert await conversation_length() == 2

    await _work(js, topology.LLM_CONSUMER, topology.RECEIVED_FILTER, _unappendable)  # fails again
    letters = await js.stream_info(topology.DEAD_LETTER_STREAM)
    assert letters.state.messages == 2
    done, said = await replay(js, 2)
    assert done and "appended again (seq 3)" in said, said
    assert await conversation_length() == 3


async def test_a_replayed_message_keeps_what_only_a_newer_build_knows(
    js: JetStreamContext,
) -> None:
    """A copy re-encoded by this build would drop fields it does not know (a newer
    gateway's, parked by a replica of either build): the copy is the parked bytes. A
    letter of a type this build lacks is refused, saying which build can replay it."""
    await ensure_topology(js, _settings("nats://127.0.0.1:4222"))
    fields = msgspec.to_builtins(_received("m78"))
    fields["quoted_msg_id"] = "m70"
    fields["payload"]["mentions"] = ["li.si"]
    newer_fields = msgspec.json.encode(fields)
    subject = f"{topology.PREFIX}.conv.{APP}.wang~2Ewu.in"
    await js.publish(subject, newer_fields)
    await js.publish(
        subject, b'{"type":"MessageRecalled","version":1,"app":"' + APP.encode() + b'"}'
    )

    await _work(js, topology.LLM_CONSUMER, topology.RECEIVED_FILTER, _unappendable)
    letters = [await js.get_msg(topology.DEAD_LETTER_STREAM, seq) for seq in (1, 2)]
    newer_type = next(seq for seq, m in zip((1, 2), letters, strict=True) if b"Recalled" in m.data)
    kept = 3 - newer_type

    done, said = await replay(js, kept)
    assert done and "appended again (seq 3)" in said, said
    copy = await js.get_msg(topology.CONVERSATION_STREAM, 3)
    assert copy.data == newer_fields

    done, said = await replay(js, newer_type)
    assert not done
    assert f"dead letter {newer_type} was written by a newer build" in said
    assert "'MessageRecalled' (version 1) is unknown to this build" in said
    info = await js.stream_info(topology.CONVERSATION_STREAM)
    assert info.state.messages == 3


async def test_a_replay_the_log_refuses_says_so(
    nats_server: NatsHandle, dead: JetStreamContext
) -> None:
    sealed = await dead.stream_info(topology.CONVERSATION_STREAM)
    sealed.config.sealed = True  # no append is accepted any more
    await dead.update_stream(sealed.config)
    code, out, err = await _dlq(nats_server.url, "replay", "3")
    assert (code, out) == (1, "")
    assert err.startswith("wecombot dlq: the log refused the append (nothing appended): "), err


async def test_a_copy_over_the_brokers_max_payload_with_its_headers_is_refused(
    tmp_path: Path,
) -> None:
    """The broker holds a message's headers and body together to its max_payload, while
    nats-py checks the body alone: the copy of a message stored within its Nats-Msg-Id's
    size of the limit (lowered since, here by a reload) went out, the broker answered
    -ERR and nats-py closed the connection; the replay said only that it was lost."""
    limit = 1024
    conf = tmp_path / "nats.conf"
    conf.write_text("max_payload: 4KB\n", encoding="utf-8")
    broker = EmbeddedNats(tmp_path / "nats", config_file=conf, log_file=tmp_path / "nats.log")
    broker.start()
    try:
        nc = await nats.connect(broker.url)
        js = nc.jetstream()
        await ensure_topology(js, _settings(broker.url))
        message = msgspec.structs.replace(_received("m-big"), payload=TextPayload(content=""))
        pad = limit - 20 - len(encode_event(message))
        big = msgspec.structs.replace(message, payload=TextPayload(content="x" * pad))
        assert len(encode_event(big)) == limit - 20  # fits alone; not with a header
        await append_event(js, big)
        await _park(js, big, 1, topology.LLM_CONSUMER)
        await nc.close()

        conf.write_text(f"max_payload: {limit}\n", encoding="utf-8")
        assert broker.process is not None and broker.log_file is not None
        log = broker.log_file
        broker.process.send_signal(signal.SIGHUP)
        await until(
            lambda: f"Reloaded: max_payload = {limit}" in log.read_text(encoding="utf-8"),
            timeout=10,
            what="the broker to reload its configuration",
        )
        code, out, err = await _dlq(broker.url, "replay", "1")
        assert (code, out) == (1, ""), err
        assert err.startswith("wecombot dlq: message m-big from wang.wu cannot be appended "), err
        assert f"over the broker's max_payload ({limit:,}). Not replayed" in err, err
        code, out, err = await _dlq(broker.url, "replay", "--pending")
        assert code == 1 and "0 of 1 dead letter replayed, 1 refused" in out, (out, err)

        nc = await nats.connect(broker.url)
        info = await nc.jetstream().stream_info(topology.CONVERSATION_STREAM)
        assert info.state.messages == 1  # nothing appended
        await nc.close()
    finally:
        broker.stop()


async def test_a_message_that_left_the_log_is_gone_and_not_replayed(
    nats_server: NatsHandle, js: JetStreamContext
) -> None:
    """The letter outlives its message and the answer it got since (the oldest events go
    first, past WECOMBOT_HISTORY_MAX_MB or _MAX_AGE): it was listed `pending`, and a
    replay appended the message again, which the llm answered a second time."""
    await ensure_topology(js, _settings(nats_server.url))
    message = _received("m-aged")
    await append_event(js, message)

    async def give_up(d: Delivery) -> Outcome:
        raise PermanentError("the llm gave up")

    await _work(js, topology.LLM_CONSUMER, topology.RECEIVED_FILTER, give_up)

    async def states() -> list[str]:
        code, out, err = await _dlq(nats_server.url, "--json")
        assert (code, err) == (0, "")
        return [d["state"] for d in json.loads(out)]

    assert await states() == ["pending"]
    answered = ReplyGenerated(
        app=APP,
        conversation=message.conversation,
        correlation_id=message.correlation_id,
        causation_id=message.event_id,
        text="answered since (WeCom's retry)",
    )
    await append_event(js, answered)
    assert await states() == ["answered"]
    await js.purge_stream(topology.CONVERSATION_STREAM)  # both dropped, oldest first
    assert await states() == ["gone"]
    code, out, err = await _dlq(nats_server.url, "replay", "1")
    assert (code, out) == (1, "")
    assert "has left WECOMBOT (WECOMBOT_HISTORY_MAX_AGE or WECOMBOT_HISTORY_MAX_MB)" in err
    assert (await js.stream_info(topology.CONVERSATION_STREAM)).state.messages == 0


async def test_a_newer_builds_letter_is_listed_as_such_not_as_unreadable(
    nats_server: NatsHandle, js: JetStreamContext
) -> None:
    """Listed `unreadable` ("replaying cannot mend it"), while replaying it with the newer
    build is what mends it: an operator looking for what to replay passed it over."""
    await ensure_topology(js, _settings(nats_server.url))
    newer = b'{"type":"MessageEdited","version":1,"app":"ww1-1000002","conversation":"wang.wu"}'
    await js.publish(f"{topology.PREFIX}.conv.{APP}.wang~2Ewu.in", newer)

    async def never(d: Delivery) -> Outcome:
        raise AssertionError("a newer build's event never reaches this build's handler")

    await _work(js, topology.LLM_CONSUMER, topology.RECEIVED_FILTER, never)
    code, out, err = await _dlq(nats_server.url, "--json")
    assert (code, err) == (0, "")
    assert [d["state"] for d in json.loads(out)] == ["newer"]


async def test_an_earlier_rounds_failure_recorded_after_a_replay_changes_nothing(
    nats_server: NatsHandle, dead: JetStreamContext
) -> None:
    """The parked round's delivery was still running at the replay and recorded its
    DeliveryFailed after the requeue. The sender goes on with the requeued round, but the
    listing said `pending` again and a second replay started another round beside it."""
    code, _, err = await _dlq(nats_server.url, "replay", "3")
    assert code == 0, err
    reply = decode_event((await dead.get_msg(topology.CONVERSATION_STREAM, 3)).data)
    assert isinstance(reply, ReplyGenerated) and reply.conversation == "zhang.san"
    late = DeliveryFailed(
        event_id=derived_id(reply.event_id, "failed"),  # the parked round's own
        app=APP,
        conversation=reply.conversation,
        correlation_id=reply.correlation_id,
        causation_id=reply.event_id,
        reply_id=reply.event_id,
        errcode=-1,
        reason="gave up after 2 deliveries",
        parts_delivered=0,
    )
    await append_event(dead, late)
    code, out, err = await _dlq(nats_server.url, "--json")
    assert (code, err) == (0, "")
    assert [d["state"] for d in json.loads(out)] == ["unreadable", "pending", "requeued"]
    before = (await dead.stream_info(topology.CONVERSATION_STREAM)).state.messages
    code, out, err = await _dlq(nats_server.url, "replay", "3")
    assert (code, err) == (0, "")
    assert out.startswith("dead letter 3 was replayed already: reply ")
    assert out.endswith(" to zhang.san is requeued (wecombot dlq replay 3)\n")
    assert (await dead.stream_info(topology.CONVERSATION_STREAM)).state.messages == before


async def test_a_replayed_message_the_llm_does_not_answer_is_requeued_not_pending(
    nats_server: NatsHandle, js: JetStreamContext
) -> None:
    """A copy the llm silences (a rate, an allowlist) gets no outcome: the letter stayed
    `pending`, and a replay once the first copy's Nats-Msg-Id had left the duplicate
    window appended a second copy beside it."""
    await _parked_then_copied(js, nats_server.url, "m-silenced")
    code, out, err = await _dlq(nats_server.url, "--json")
    assert (code, err) == (0, "")
    assert [d["state"] for d in json.loads(out)] == ["requeued"]
    done, said = await replay(js, 1)
    assert done and said.endswith("from wang.wu is in the log again at seq 2"), said
    info = await js.stream_info(topology.CONVERSATION_STREAM)
    assert info.state.messages == 2


async def test_a_reply_whose_requeue_failed_too_is_pending_in_the_requeues_letter_only(
    nats_server: NatsHandle, dead: JetStreamContext
) -> None:
    """Both letters of one reply were listed `pending` (the reply's, and its failed
    requeue's), so `replay --pending` would count one reply twice."""
    code, _, err = await _dlq(nats_server.url, "replay", "3")
    assert code == 0, err
    reply = decode_event((await dead.get_msg(topology.CONVERSATION_STREAM, 3)).data)
    requeue = decode_event((await dead.get_msg(topology.CONVERSATION_STREAM, 5)).data)
    assert isinstance(reply, ReplyGenerated) and isinstance(requeue, ReplyRequeued)
    failed = DeliveryFailed(
        event_id=failure_of_round(reply.event_id, requeue.event_id),
        app=APP,
        conversation=reply.conversation,
        correlation_id=reply.correlation_id,
        causation_id=requeue.event_id,
        reply_id=reply.event_id,
        errcode=-1,
        reason="gave up after 2 deliveries",
        parts_delivered=0,
    )
    await append_event(dead, failed)

    async def sender(d: Delivery) -> Outcome:  # the requeue's round fails; it is parked
        return Nak(0, "WeCom answered HTTP 502")

    await _work(dead, topology.SENDER_CONSUMER, topology.OUTCOME_FILTER, sender)
    code, out, err = await _dlq(nats_server.url, "--json")
    assert (code, err) == (0, "")
    assert [(d["seq"], d["state"]) for d in json.loads(out)] == [
        (1, "unreadable"),
        (2, "pending"),
        (3, "requeued"),
        (4, "pending"),
    ]


async def test_list_only_the_letters_in_one_state(
    nats_server: NatsHandle, dead: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Among thousands handled, the few still to replay could only be found by reading
    the listing's STATE column, 50 at a time."""
    monkeypatch.setattr(dlq, "_STATE_READS", 2)  # states read two at a time: batches cross
    code, _, err = await _dlq(nats_server.url, "replay", "2")
    assert code == 0, err
    code, out, err = await _dlq(nats_server.url, "list", "--state", "pending")
    assert (code, err) == (0, "")
    head, _, only, _ = out.splitlines()
    assert head == "3 dead letters in WECOMBOT_DLQ (showing 1 pending)"
    assert only.split()[:1] + only.split()[6:8] == ["3", "zhang.san", "pending"]
    code, out, _ = await _dlq(nats_server.url, "--state", "unreadable", "--json")
    assert [(d["seq"], d["state"]) for d in json.loads(out)] == [(1, "unreadable")]
    code, out, _ = await _dlq(nats_server.url, "--state", "requeued", "--consumer", "llm")
    assert out == "no requeued dead letters of consumer llm in WECOMBOT_DLQ (3 in all)\n"
    code, out, _ = await _dlq(nats_server.url, "--state", "pending", "--state", "requeued")
    assert out.splitlines()[0] == "3 dead letters in WECOMBOT_DLQ (showing 1 requeued)"


async def test_replay_every_pending_letter_and_several_named(
    nats_server: NatsHandle, dead: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a WeCom outage, hundreds of replies are parked: each needed its own
    `wecombot dlq replay SEQ`."""
    monkeypatch.setattr(dlq, "_STATE_READS", 2)
    code, out, err = await _dlq(nats_server.url, "replay", "--pending", "--consumer", "llm")
    assert (code, out, err) == (0, "no pending dead letters of consumer llm in WECOMBOT_DLQ\n", "")
    code, out, err = await _dlq(nats_server.url, "replay", "--pending")
    assert (code, err) == (0, "")
    two, three, count = out.splitlines()
    assert two.startswith("2: reply ") and " to li.si requeued (seq 5)" in two
    assert three.startswith("3: reply ") and " to zhang.san requeued (seq 6)" in three
    assert count == "2 of 2 dead letters replayed"
    code, out, err = await _dlq(nats_server.url, "replay", "--pending")
    assert (code, out, err) == (0, "no pending dead letters in WECOMBOT_DLQ\n", "")

    code, out, err = await _dlq(nats_server.url, "replay", "3", "1", "3")  # oldest first, once
    assert code == 1
    assert (
        err == "wecombot dlq: 1: dead letter 1 is not a wecombot event: replaying cannot mend it\n"
    )
    three, count = out.splitlines()
    assert three.startswith("3: dead letter 3 was replayed already: reply "), three
    assert count == "1 of 2 dead letters replayed, 1 refused (said on stderr)"
    info = await dead.stream_info(topology.CONVERSATION_STREAM)
    assert info.state.messages == 6


async def test_a_batch_the_log_refuses_stops_and_says_where(
    nats_server: NatsHandle, dead: JetStreamContext
) -> None:
    sealed = await dead.stream_info(topology.CONVERSATION_STREAM)
    sealed.config.sealed = True  # no append is accepted any more
    await dead.update_stream(sealed.config)
    code, out, err = await _dlq(nats_server.url, "replay", "2", "3")
    assert (code, out) == (1, "")
    stopped, why = err.splitlines()
    assert stopped == (
        "wecombot dlq: stopped at dead letter 2, 0 of 2 replayed before it (run the same "
        "command again to go on: a replay made is recognised, never doubled); why:"
    )
    assert why.startswith("wecombot dlq: the log refused the append (nothing appended): ")


async def test_a_batch_the_log_refuses_midway_does_not_say_nothing_was_replayed(
    nats_server: NatsHandle, dead: JetStreamContext
) -> None:
    """The log full after the first requeue: the batch said "1 of 2 replayed before it",
    then "nothing replayed"."""
    full = await dead.stream_info(topology.CONVERSATION_STREAM)
    full.config.discard = DiscardPolicy.NEW
    full.config.max_msgs = full.state.messages + 1  # room for one append
    await dead.update_stream(full.config)
    code, out, err = await _dlq(nats_server.url, "replay", "2", "3")
    assert code == 1
    assert out.startswith("2: reply "), out
    stopped, why = err.splitlines()
    assert stopped.startswith("wecombot dlq: stopped at dead letter 3, 1 of 2 replayed before it")
    assert why.startswith("wecombot dlq: the log refused the append (nothing appended): "), why


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["replay"], "replay what? name the letters (SEQ ...), or --pending for all still pending"),
        (["replay", "3", "--pending"], "replay either the letters named (SEQ ...) or --pending"),
        (["replay", "3", "--consumer", "llm"], "--consumer is for list and replay --pending"),
        (["--state", "pending", "replay", "3"], "--state is for list; replay --pending replays"),
        (["--json", "replay", "--pending"], "--json is for list and show"),
        (["replay", "3", "--limit", "2"], "--limit is for list and replay --pending"),
        (["--limit", "2", "replay", "3", "4"], "--limit is for list and replay --pending"),
    ],
)
async def test_replay_arguments_that_make_no_command(argv: list[str], said: str) -> None:
    code, out, err = await _dlq("nats://127.0.0.1:1", *argv)  # refused before connecting
    assert (code, out) == (2, "")
    assert err.startswith(f"wecombot dlq: {said}"), err


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--state", "pending", "show", "3"], "--state is for list; SEQ names the letter already"),
        (["--consumer", "llm", "show", "3"], "--consumer is for list; SEQ names the letter"),
        (["--limit", "2", "show", "3"], "--limit is for list; SEQ names the letter already"),
    ],
)
async def test_show_arguments_that_make_no_command(
    nats_server: NatsHandle, dead: JetStreamContext, argv: list[str], said: str
) -> None:
    """The listing's options given before `show` (where the parser takes them): the
    pending letters were listed instead of letter 3, exit 0, or the option was ignored."""
    code, out, err = await _dlq(nats_server.url, *argv)
    assert (code, out) == (2, "")
    assert err.startswith(f"wecombot dlq: {said}"), err


async def test_a_batch_replays_in_the_order_of_the_log_not_of_the_parking(
    nats_server: NatsHandle, js: JetStreamContext
) -> None:
    """Two replies of one user parked the other way round (the first one's deliveries
    outlasted the second's): replayed by DLQ sequence, the second was requeued first, and
    the user would read the answers in the wrong order."""
    await ensure_topology(js, _settings(nats_server.url))
    first, second = _reply("li.si", "first"), _reply("li.si", "second")
    at = [(await append_event(js, reply)).seq for reply in (first, second)]
    for reply, seq in ((second, at[1]), (first, at[0])):  # as the worker parks them
        await _park(js, reply, seq)
    code, out, err = await _dlq(nats_server.url, "replay", "--pending")
    assert (code, err) == (0, "")
    assert [line.split(":")[0] for line in out.splitlines()[:2]] == ["2", "1"]
    code, out, err = await _dlq(nats_server.url, "replay", "1", "2")
    assert [line.split(":")[0] for line in out.splitlines()[:2]] == ["2", "1"]
    requeued = [
        decode_event((await js.get_msg(topology.CONVERSATION_STREAM, seq)).data) for seq in (3, 4)
    ]
    assert [r.reply_id for r in requeued if isinstance(r, ReplyRequeued)] == [
        first.event_id,
        second.event_id,
    ]


async def test_a_pending_batch_with_a_limit_replays_the_first_in_the_log_and_says_the_rest(
    nats_server: NatsHandle, js: JetStreamContext
) -> None:
    """After an outage with thousands parked, an operator replays a few first to see
    that the cause is gone: --limit was taken and ignored, and every letter went."""
    await ensure_topology(js, _settings(nats_server.url))
    replies = [_reply("li.si", f"answer {n}") for n in range(3)]
    at = [(await append_event(js, reply)).seq for reply in replies]
    for reply, seq in reversed(list(zip(replies, at, strict=True))):  # the last parked first
        await _park(js, reply, seq)
    code, out, err = await _dlq(nats_server.url, "replay", "--pending", "--limit", "2")
    assert (code, err) == (0, "")
    *lines, count, left = out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["3", "2"]  # the log's first two
    assert count == "2 of 2 dead letters replayed"
    assert left == (
        "1 more pending, left for later (--limit 2): run the same command again for the next ones"
    )
    code, out, err = await _dlq(nats_server.url, "--limit", "2", "replay", "--pending")
    assert (code, err) == (0, "")
    assert out.splitlines()[0].startswith("1: reply ")
    assert out.splitlines()[1:] == ["1 of 1 dead letter replayed"]
    requeued = [
        decode_event((await js.get_msg(topology.CONVERSATION_STREAM, seq)).data)
        for seq in (4, 5, 6)
    ]
    assert [r.reply_id for r in requeued if isinstance(r, ReplyRequeued)] == [
        reply.event_id for reply in replies
    ]


async def _unappendable(d: Delivery) -> Outcome:
    """An llm whose outcome append keeps failing: its message is parked at the last
    delivery (``_work``), with no outcome."""
    return Nak(0, "the outcome could not be appended")


async def _parked_then_copied(js: JetStreamContext, url: str, msg_id: str) -> None:
    """A message the llm gave up on (seq 1, parked: DLQ letter 1), then the copy a replay
    made of it (seq 2), its Nats-Msg-Id long forgotten by the stream."""
    await ensure_topology(js, _settings(url))
    message = _received(msg_id)
    await append_event(js, message)
    await _work(js, topology.LLM_CONSUMER, topology.RECEIVED_FILTER, _unappendable)
    await append_event(js, message, msg_id="redeliver:from-an-hour-ago")


async def _park(
    js: JetStreamContext,
    event: MessageReceived | ReplyGenerated | ReplyRequeued,
    seq: int,
    consumer: str = topology.SENDER_CONSUMER,
) -> None:
    """Park ``event`` (stored at ``seq``) as the consumer's worker does."""
    await js.publish(
        f"{topology.PREFIX}.dlq.{consumer}",
        encode_event(event),
        stream=topology.DEAD_LETTER_STREAM,
        headers={
            DLQ_REASON: "gave up after 20: the outcome could not be appended",
            DLQ_CONSUMER: consumer,
            DLQ_SUBJECT: topology.subject_for(event),
            DLQ_STREAM_SEQ: str(seq),
            DLQ_DELIVERIES: "20",
        },
    )


async def test_a_failed_requeue_is_replayed_in_its_replys_place_in_the_users_order(
    nats_server: NatsHandle, js: JetStreamContext
) -> None:
    """The sender delivers a requeue in its reply's place (its order_seq), so a batch
    must requeue a user's replies in the order of the replies, not of their requeues: a
    first reply whose requeue failed too (its letter: that ReplyRequeued, stored late)
    was requeued after the second reply, and the user read the answers the wrong way
    round."""
    await ensure_topology(js, _settings(nats_server.url))
    first, second = _reply("li.si", "first"), _reply("li.si", "second")
    at = [(await append_event(js, reply)).seq for reply in (first, second)]
    await _park(js, first, at[0])  # letter 1
    assert (await replay(js, 1))[0]  # the first reply requeued (seq 3)...
    requeue = decode_event((await js.get_msg(topology.CONVERSATION_STREAM, 3)).data or b"")
    assert isinstance(requeue, ReplyRequeued) and requeue.reply_id == first.event_id
    await _park(js, requeue, 3)  # ...and that round failed too: letter 2
    await _park(js, second, at[1])  # the second reply's: letter 3
    code, out, err = await _dlq(nats_server.url, "--json")
    assert [(d["seq"], d["state"]) for d in json.loads(out)] == [
        (1, "requeued"),
        (2, "pending"),
        (3, "pending"),
    ]
    code, out, err = await _dlq(nats_server.url, "replay", "--pending")
    assert (code, err) == (0, ""), err
    requeued = [
        decode_event((await js.get_msg(topology.CONVERSATION_STREAM, seq)).data or b"")
        for seq in (4, 5)
    ]
    assert [r.reply_id for r in requeued if isinstance(r, ReplyRequeued)] == [
        first.event_id,
        second.event_id,
    ]


async def test_a_failed_copy_is_replayed_in_its_messages_place_in_the_users_order(
    nats_server: NatsHandle, js: JetStreamContext
) -> None:
    """The llm keeps a message in its first copy's place (and answers a later message
    once the earlier one's delivery is over): a first message whose copy failed too (its
    letter: the copy, stored late) was appended again after the second message."""
    await ensure_topology(js, _settings(nats_server.url))
    first, second = _received("m-first"), _received("m-second")
    at = [(await append_event(js, message)).seq for message in (first, second)]
    await _park(js, first, at[0], topology.LLM_CONSUMER)  # letter 1
    assert (await replay(js, 1))[0]  # the first message appended again (seq 3)...
    await _park(js, first, 3, topology.LLM_CONSUMER)  # ...and parked again: letter 2
    await _park(js, second, at[1], topology.LLM_CONSUMER)  # the second one's: letter 3
    code, out, err = await _dlq(nats_server.url, "--json")
    assert [(d["seq"], d["state"]) for d in json.loads(out)] == [
        (1, "requeued"),
        (2, "pending"),
        (3, "pending"),
    ]
    code, out, err = await _dlq(nats_server.url, "replay", "--pending")
    assert (code, err) == (0, ""), err
    copies = [
        decode_event((await js.get_msg(topology.CONVERSATION_STREAM, seq)).data or b"")
        for seq in (4, 5)
    ]
    assert [c.correlation_id for c in copies] == ["m-first", "m-second"]


async def test_a_pending_batch_whose_states_could_not_all_be_read_says_so(
    nats_server: NatsHandle, dead: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A letter whose state could not be read (its conversation read timed out) was left
    out of `replay --pending` unsaid but for 'shown as ?', and the batch ended in
    "1 of 1 dead letter replayed", exit 0: a script took every pending letter for
    replayed."""
    real = dlq.standing

    async def flaky(js: JetStreamContext, letter: dlq.DeadLetter) -> str:
        if letter.seq == 3:
            raise TimeoutError
        return await real(js, letter)

    monkeypatch.setattr(dlq, "standing", flaky)
    code, out, err = await _dlq(nats_server.url, "replay", "--pending")
    assert out.splitlines()[-1] == "1 of 1 dead letter replayed", out
    assert code == 1
    assert "dead letter 3 (TimeoutError)" in err and "not replayed" in err, err


async def test_a_copy_whose_parked_message_left_the_log_is_still_known_as_a_copy(
    nats_server: NatsHandle, js: JetStreamContext
) -> None:
    """The parked message is the one at the letter's stream seq, not the first one read
    after it: with that one gone (aged out before its copy), the copy is no parked
    message to replay again."""
    await _parked_then_copied(js, nats_server.url, "m-aged-out")
    await js.purge_stream(topology.CONVERSATION_STREAM, seq=2)  # the parked one left
    code, out, err = await _dlq(nats_server.url, "--json")
    assert (code, err) == (0, "")
    assert [d["state"] for d in json.loads(out)] == ["requeued"]
    done, said = await replay(js, 1)
    assert done and said.endswith("from wang.wu is in the log again at seq 2"), said
    info = await js.stream_info(topology.CONVERSATION_STREAM)
    assert info.state.messages == 1


async def test_a_listing_in_one_state_keeps_the_newest_up_to_its_limit_oldest_first(
    nats_server: NatsHandle, dead: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dlq, "_STATE_READS", 2)
    code, out, err = await _dlq(nats_server.url, "--state", "pending", "--json")
    assert (code, err) == (0, "")
    assert [d["seq"] for d in json.loads(out)] == [2, 3]
    code, out, err = await _dlq(nats_server.url, "--state", "pending", "--limit", "1", "--json")
    assert (code, err) == (0, "")
    assert [d["seq"] for d in json.loads(out)] == [3]


async def test_a_batch_stopped_counts_only_the_letters_replayed_before_it(
    nats_server: NatsHandle, dead: JetStreamContext
) -> None:
    """A letter refused before the stop is not counted as replayed."""
    sealed = await dead.stream_info(topology.CONVERSATION_STREAM)
    sealed.config.sealed = True
    await dead.update_stream(sealed.config)
    code, out, err = await _dlq(nats_server.url, "replay", "1", "2", "3")
    assert (code, out) == (1, "")
    refused, stopped, _ = err.splitlines()
    assert refused.startswith("wecombot dlq: 1: dead letter 1 is not a wecombot event")
    assert stopped.startswith("wecombot dlq: stopped at dead letter 2, 0 of 3 replayed before it")
