"""The llm's ConversationLog port: the same assertions against JetStreamLog on a real
nats-server and against tests.fakes.FakeLog, so the fake the handler's unit tests stand
on cannot drift from the log the llm really writes to."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats.js.errors
import pytest
from nats.js import JetStreamContext

from tests.conftest import NatsHandle
from tests.fakes import APP, FakeLog, received, reply_to
from tests.lagging import LaggingFollower
from wecombot_common import bus, topology
from wecombot_common.bus import Appended, AppendUnavailable, ConcurrencyConflict
from wecombot_common.events import (
    Event,
    PartDelivered,
)
from wecombot_common.settings import EnvReader, NatsSettings
from wecombot_common.topology import ConversationRef
from wecombot_llm.decide import outcome_msg_id
from wecombot_llm.store import ConversationLog, JetStreamLog

pytestmark = pytest.mark.integration


@dataclass
class Subject:
    """A ConversationLog, how another writer (gateway, sender) appends to the same
    log, and how to take the log away."""

    log: ConversationLog
    write: Callable[[Event], Awaitable[int]]
    outage: Callable[[], None]
    expire: Callable[[int], Awaitable[None]]  # drop everything up to a seq (max age)
    # the log as read through a stream follower that has applied it through a seq
    follower: Callable[[int], ConversationLog]


@pytest.fixture(params=["jetstream", "fake"])
async def subject(
    request: pytest.FixtureRequest, nats_server: NatsHandle, js: JetStreamContext
) -> Subject:
    if request.param == "fake":
        fake = FakeLog()

        async def add(event: Event) -> int:
            return fake.add(event)

        async def expire_fake(through_seq: int) -> None:
            fake.expire(through_seq)

        def lagging_fake(applied: int) -> ConversationLog:
            fake.follower_at = applied
            return fake

        return Subject(
            fake, add, lambda: setattr(fake, "unavailable", 1), expire_fake, lagging_fake
        )
    await bus.ensure_topology(js, NatsSettings.read(EnvReader({})))

    async def append(event: Event) -> int:
        return (await bus.append_event(js, event, timeout=5)).seq

    async def expire(through_seq: int) -> None:
        for seq in range(1, through_seq + 1):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_msg(topology.CONVERSATION_STREAM, seq)

    def lagging(applied: int) -> ConversationLog:
        follower = LaggingFollower(js, applied)
        return JetStreamLog(follower, consumer=topology.LLM_CONSUMER)  # type: ignore[arg-type]

    return Subject(
        JetStreamLog(js, consumer=topology.LLM_CONSUMER),
        append,
        nats_server.stop,
        expire,
        lagging,
    )


async def history(log: ConversationLog, conv: ConversationRef, after_seq: int = 0) -> list[Event]:
    return [stored.event async for stored in log.read(conv, after_seq=after_seq)]


async def test_a_read_a_lagging_follower_ends_short_of_its_reach_goes_on_from_the_leader(
    subject: Subject,
) -> None:
    conv, other = ConversationRef(APP, "wang.wu"), ConversationRef(APP, "li.si")
    seqs = [await subject.write(received(t, user=conv.user)) for t in "ab"]
    await subject.write(received("elsewhere", user=other.user))
    seqs.append(await subject.write(received("c", user=conv.user)))
    log = subject.follower(seqs[0])

    async def read(**kwargs: int | bool) -> list[int]:
        return [s.seq async for s in log.read(conv, **kwargs)]  # type: ignore[arg-type]

    assert await read(after_seq=0) == seqs[:1]  # what the follower has, nothing more
    assert await read(after_seq=0, reach=seqs[2]) == seqs
    assert await read(after_seq=0, reach=seqs[1]) == seqs  # the rest: all the leader has
    assert await read(after_seq=seqs[0], reach=seqs[0]) == []  # nothing owed past it
    assert await read(after_seq=0, reach=seqs[2] + 9) == seqs  # gone: ends, no loop
    assert await read(after_seq=0, direct=False) == seqs


async def test_appends_are_read_back_in_order_per_conversation(subject: Subject) -> None:
    log, conv, other = subject.log, ConversationRef(APP, "zhang.san"), ConversationRef(APP, "li.si")
    assert await history(log, conv) == []
    question = received("你好", user=conv.user)
    first = await subject.write(question)
    await subject.write(received("someone else", user=other.user))
    reply = reply_to(question, "您好")
    appended = await log.append(
        reply, msg_id=outcome_msg_id(question), expect_last_seq=0, expect_scope=conv.llm_branch
    )
    assert appended.duplicate is False and appended.seq > first
    assert await history(log, conv) == [question, reply]
    assert await history(log, conv, after_seq=first) == [reply]
    assert await history(log, conv, after_seq=appended.seq) == []
    assert [e.conversation for e in await history(log, other)] == [other.user]


async def test_a_repeated_msg_id_is_a_conflict_if_stale_and_a_duplicate_if_current(
    subject: Subject,
) -> None:
    """nats-server checks the expected sequence first: a replica that answered the same
    message from an older view (or retries an append whose PubAck it lost) is told of a
    conflict, re-reads and finds the outcome; nothing new is stored either way."""
    log, conv = subject.log, ConversationRef(APP, "zhang.san")
    question = received("hi", user=conv.user)
    await subject.write(question)
    reply = reply_to(question, "hello")
    key = outcome_msg_id(question)
    stored = await log.append(reply, msg_id=key, expect_last_seq=0, expect_scope=conv.llm_branch)
    with pytest.raises(ConcurrencyConflict):
        await log.append(reply, msg_id=key, expect_last_seq=0, expect_scope=conv.llm_branch)
    again = await log.append(
        reply, msg_id=key, expect_last_seq=stored.seq, expect_scope=conv.llm_branch
    )
    assert again == Appended(seq=stored.seq, duplicate=True)
    assert await history(log, conv) == [question, reply]


async def test_the_expectation_is_scoped_to_the_llm_branch(subject: Subject) -> None:
    log, conv = subject.log, ConversationRef(APP, "zhang.san")
    q1, q2 = received("one", user=conv.user), received("two", user=conv.user)
    await subject.write(q1)
    a1 = await log.append(
        reply_to(q1, "1"),
        msg_id=outcome_msg_id(q1),
        expect_last_seq=0,
        expect_scope=conv.llm_branch,
    )
    # Other writers' events (a new question, a delivered part) do not move the llm's
    # branch: the next outcome still expects the llm's own last sequence.
    await subject.write(q2)
    await subject.write(
        PartDelivered(
            app=APP,
            conversation=conv.user,
            correlation_id=q1.correlation_id,
            causation_id=q1.event_id,
            reply_id="r1",
            index=0,
            total=1,
            wecom_msgid="m1",
        )
    )
    a2 = await log.append(
        reply_to(q2, "2"),
        msg_id=outcome_msg_id(q2),
        expect_last_seq=a1.seq,
        expect_scope=conv.llm_branch,
    )
    assert a2.duplicate is False and a2.seq > a1.seq


async def test_a_stale_expectation_with_a_new_msg_id_is_a_conflict(subject: Subject) -> None:
    log, conv = subject.log, ConversationRef(APP, "zhang.san")
    q1, q2 = received("one", user=conv.user), received("two", user=conv.user)
    await subject.write(q1)
    await subject.write(q2)
    a1 = reply_to(q1, "1")
    await log.append(a1, msg_id=outcome_msg_id(q1), expect_last_seq=0, expect_scope=conv.llm_branch)
    with pytest.raises(ConcurrencyConflict):
        await log.append(
            reply_to(q2, "2"),
            msg_id=outcome_msg_id(q2),
            expect_last_seq=0,
            expect_scope=conv.llm_branch,
        )
    assert await history(log, conv) == [q1, q2, a1]


async def test_an_outcome_gone_from_the_log_is_a_stale_expectation(subject: Subject) -> None:
    """What the llm's rebuild stands on: once the stream drops the last outcome (its max
    age), expecting that outcome's seq is a conflict that no re-read resolves, and the
    branch as it now is (nothing) is what an append must expect."""
    log, conv = subject.log, ConversationRef(APP, "zhang.san")
    q1 = received("one", user=conv.user)
    await subject.write(q1)
    a1 = await log.append(
        reply_to(q1, "1"),
        msg_id=outcome_msg_id(q1),
        expect_last_seq=0,
        expect_scope=conv.llm_branch,
    )
    await subject.expire(a1.seq)
    q2 = received("two", user=conv.user)
    await subject.write(q2)
    assert await history(log, conv) == [q2]
    a2 = reply_to(q2, "2")
    with pytest.raises(ConcurrencyConflict):
        await log.append(
            a2, msg_id=outcome_msg_id(q2), expect_last_seq=a1.seq, expect_scope=conv.llm_branch
        )
    await log.append(a2, msg_id=outcome_msg_id(q2), expect_last_seq=0, expect_scope=conv.llm_branch)
    assert await history(log, conv) == [q2, a2]


async def test_nothing_is_settled_before_the_consumer_settles_anything(subject: Subject) -> None:
    assert await subject.log.settled_through() == 0


async def test_an_append_the_log_cannot_confirm_is_unavailable(subject: Subject) -> None:
    conv = ConversationRef(APP, "zhang.san")
    question = received("hi", user=conv.user)
    await subject.write(question)
    subject.outage()
    with pytest.raises(AppendUnavailable):
        await subject.log.append(
            reply_to(question, "hello"),
            msg_id=outcome_msg_id(question),
            expect_last_seq=0,
            expect_scope=conv.llm_branch,
        )
