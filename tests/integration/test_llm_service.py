"""The llm service in-process against a real nats-server and the simulated model API.

Received messages are appended with bus.append_event, as the gateway does; outcomes are
read back from the stream. Waiting is always for a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import nats.js.errors
import pytest
from nats.js import JetStreamContext

from tests.waiting import eventually, until
from wecombot.dlq import replay
from wecombot_common import topology
from wecombot_common.bus import append_event, ensure_topology, read_conversation
from wecombot_common.events import (
    ConversationReset,
    ImagePayload,
    MessageReceived,
    Outcome,
    Payload,
    ReplyFailed,
    ReplyGenerated,
    TextPayload,
    WeComEventPayload,
    derived_id,
)
from wecombot_common.settings import EnvReader, NatsSettings
from wecombot_common.sim.openai_api import Fault, SimulatedOpenAIApi
from wecombot_common.topology import ConversationRef
from wecombot_common.worker import Ack, Delivery, Nak, PullWorker
from wecombot_common.worker import Outcome as WorkOutcome
from wecombot_llm.handler import HandlerConfig, LlmHandler
from wecombot_llm.main import serve
from wecombot_llm.model import OfflineModel
from wecombot_llm.settings import LlmSettings, ReplyPolicy
from wecombot_llm.store import JetStreamLog

pytestmark = pytest.mark.integration

APP = "ww1436e0e65a779aee-1000002"
KEY = "sk-test-2f1c9a7e"
SYSTEM = "You are the wecombot test assistant."
APOLOGY = "抱歉，模型暂时不可用。"


class NatsHandle(Protocol):
    """The part of the ``nats_server`` fixture these tests use."""

    @property
    def url(self) -> str: ...


# ---------------------------------------------------------------- helpers


def received(user: str, text: str | None = None, payload: Payload | None = None) -> MessageReceived:
    body = payload if payload is not None else TextPayload(content=text or "")
    msg_id = str(random.getrandbits(63))
    is_event = isinstance(body, WeComEventPayload)
    kind = "event" if is_event else "image" if isinstance(body, ImagePayload) else "text"
    return MessageReceived(
        app=APP,
        conversation=user,
        correlation_id=msg_id,
        msg_type=kind,
        msg_id=None if is_event else msg_id,
        from_user=user,
        to_user="ww1436e0e65a779aee",
        agent_id=1000002,
        create_time=int(time.time()),
        payload=body,
    )


def llm_env(nats: NatsHandle, api: SimulatedOpenAIApi, **extra: str) -> dict[str, str]:
    return {
        "NATS_URL": nats.url,
        "WECOMBOT_HEALTH_PORT": "0",
        "LOG_LEVEL": os.environ.get("WECOMBOT_TEST_LOG_LEVEL", "warning"),
        "OPENAI_API_KEY": KEY,
        "OPENAI_BASE_URL": api.base_url,
        "OPENAI_MODEL": "test-model",
        "LLM_SYSTEM_PROMPT": SYSTEM,
        "LLM_APOLOGY_MESSAGE": APOLOGY,
        "LLM_REQUEST_TIMEOUT": "10",
        "LLM_RETRY_BUDGET": "5",
        **extra,
    }


@dataclass
class Instance:
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)


@asynccontextmanager
async def running(env: dict[str, str]) -> AsyncIterator[Instance]:
    stop = asyncio.Event()
    instance = Instance(stop, asyncio.create_task(serve(LlmSettings.from_env(env), stop)))
    try:
        yield instance
    finally:
        if not instance.task.done():
            await instance.shutdown()
        else:
            instance.task.result()  # surface a crash


OUTCOMES = (ReplyGenerated, ReplyFailed, ConversationReset)


async def outcomes(js: JetStreamContext, user: str) -> list[Outcome]:
    """The llm outcomes of one conversation, in stream order."""
    conv = ConversationRef(APP, user)
    return [s.event async for s in read_conversation(js, conv) if isinstance(s.event, OUTCOMES)]


async def wait_outcomes(js: JetStreamContext, user: str, count: int) -> list[Outcome]:
    found: list[Outcome] = []

    async def check() -> list[Outcome] | None:
        found[:] = await outcomes(js, user)
        return list(found) if len(found) >= count else None

    return await eventually(
        check, timeout=15, what=lambda: f"{count} outcomes for {user}, have {found}"
    )


async def wait_settled(js: JetStreamContext) -> None:
    """Until the llm consumer has settled (acked or dead-lettered) every received message.

    The ack floor, not num_pending: a consumer counts newly stored messages
    asynchronously, so "nothing pending" can be read just before it knows of them.
    """
    last_in = await js.get_last_msg(topology.CONVERSATION_STREAM, topology.RECEIVED_FILTER)
    assert last_in.seq is not None
    through: int = last_in.seq

    async def check() -> bool:
        try:
            info = await js.consumer_info(topology.CONVERSATION_STREAM, topology.LLM_CONSUMER)
        except nats.js.errors.NotFoundError:
            return False
        floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        return bool(floor >= through and info.num_ack_pending == 0)

    await until(check, timeout=15, what=f"the llm consumer settled through seq {through}")


def expected_context(questions: list[str]) -> list[dict[str, str]]:
    """What the model must receive for the last question, after echo answers."""
    messages = [{"role": "system", "content": SYSTEM}]
    for q in questions[:-1]:
        messages += [
            {"role": "user", "content": q},
            {"role": "assistant", "content": f"echo: {q}"},
        ]
    return [*messages, {"role": "user", "content": questions[-1]}]


@pytest.fixture
async def api() -> AsyncIterator[SimulatedOpenAIApi]:
    async with SimulatedOpenAIApi(api_key=KEY) as sim:
        yield sim


@pytest.fixture
async def stream(js: JetStreamContext) -> JetStreamContext:
    await ensure_topology(js, NatsSettings.read(EnvReader({})))
    return js


async def send(js: JetStreamContext, *messages: MessageReceived) -> None:
    for m in messages:
        await append_event(js, m, msg_id=f"in:{m.event_id}")


# ---------------------------------------------------------------- conversations


async def test_multi_turn_context_per_user(
    nats_server: NatsHandle, stream: JetStreamContext, api: SimulatedOpenAIApi
) -> None:
    users = ["zhang.san@corp", "li.si"]
    questions = {u: [f"{u} q{k}" for k in range(1, 4)] for u in users}
    sent = {u: [received(u, q) for q in questions[u]] for u in users}
    async with running(llm_env(nats_server, api)):
        await asyncio.gather(*(send(stream, *sent[u]) for u in users))
        for user in users:
            got = await wait_outcomes(stream, user, 3)
            assert [e.text for e in got] == [f"echo: {q}" for q in questions[user]]
            for event, message in zip(got, sent[user], strict=True):
                assert isinstance(event, ReplyGenerated)
                assert event.kind == "answer"
                assert event.model == "test-model"
                assert event.event_id == derived_id(message.event_id, "outcome")
                assert event.causation_id == message.event_id
                assert event.correlation_id == message.correlation_id
    bodies = {r.last_user_text: r for r in api.chat_requests}
    assert len(api.chat_requests) == 6
    for user in users:
        for k in range(1, 4):
            request = bodies[f"{user} q{k}"]
            assert request.messages == expected_context(questions[user][:k])
            assert request.body["model"] == "test-model"
            assert request.headers["authorization"] == f"Bearer {KEY}"


async def test_one_users_burst_does_not_hold_up_another_user(
    nats_server: NatsHandle, stream: JetStreamContext, api: SimulatedOpenAIApi
) -> None:
    """Quick messages of one user wait for their first answer without taking the llm's
    slots (they did: with LLM_MAX_CONCURRENCY=2, "busy 1" waiting for "busy 0", held at
    the model, kept everyone else's messages unfetched until it was answered)."""
    release = asyncio.Event()

    async def reply(messages: list[dict[str, Any]]) -> str:
        text = str(messages[-1]["content"])
        if text == "busy 0":
            await release.wait()
        return f"echo: {text}"

    api.reply = reply
    async with running(llm_env(nats_server, api, LLM_MAX_CONCURRENCY="2")):
        await send(stream, *[received("busy", f"busy {i}") for i in range(4)])
        await api.wait_for_requests(1)
        await send(stream, received("other", "hello"))
        (answer,) = await wait_outcomes(stream, "other", 1)
        assert isinstance(answer, ReplyGenerated) and answer.text == "echo: hello"
        assert [r.last_user_text for r in api.chat_requests] == ["busy 0", "hello"]
        release.set()
        got = await wait_outcomes(stream, "busy", 4)
        assert [e.text for e in got if isinstance(e, ReplyGenerated)] == [
            f"echo: busy {i}" for i in range(4)
        ]
        assert [r.last_user_text for r in api.chat_requests][2:] == [f"busy {i}" for i in (1, 2, 3)]


async def test_reset_starts_a_fresh_context(
    nats_server: NatsHandle, stream: JetStreamContext, api: SimulatedOpenAIApi
) -> None:
    user = "wang.wu"
    async with running(llm_env(nats_server, api)):
        await send(stream, received(user, "remember 42"), received(user, "/reset"))
        await send(stream, received(user, "what did I ask you to remember?"))
        got = await wait_outcomes(stream, user, 3)
    assert isinstance(got[1], ConversationReset)
    assert "清除" in got[1].text
    assert [r.messages for r in api.chat_requests] == [
        expected_context(["remember 42"]),
        expected_context(["what did I ask you to remember?"]),
    ]


async def test_a_menu_item_keyed_reset_starts_a_fresh_context(
    nats_server: NatsHandle, stream: JetStreamContext, api: SimulatedOpenAIApi
) -> None:
    """A custom-menu item (type click) with the key /reset: the click got nothing, and
    the memory stayed."""
    user = "menu.user"
    click = WeComEventPayload(event="click", event_key="/reset")
    async with running(llm_env(nats_server, api)):
        await send(stream, received(user, "remember 42"), received(user, payload=click))
        await send(stream, received(user, "what did I ask you to remember?"))
        got = await wait_outcomes(stream, user, 3)
    assert isinstance(got[1], ConversationReset)
    assert [r.messages for r in api.chat_requests] == [
        expected_context(["remember 42"]),
        expected_context(["what did I ask you to remember?"]),
    ]


async def test_help_image_and_events_need_no_model(
    nats_server: NatsHandle, stream: JetStreamContext, api: SimulatedOpenAIApi
) -> None:
    user = "zhao.liu"
    image = ImagePayload(pic_url="https://example.com/a.png", media_id="MEDIA")
    enter = WeComEventPayload(event="enter_agent")
    async with running(llm_env(nats_server, api)):
        await send(
            stream,
            received(user, payload=enter),
            received(user, "/help"),
            received(user, payload=image),
        )
        await wait_settled(stream)
        got = await outcomes(stream, user)
    assert len(got) == 2  # nothing for enter_agent without a welcome message
    assert all(isinstance(e, ReplyGenerated) and e.kind == "notice" for e in got)
    assert "/reset" in got[0].text
    assert "图片" in got[1].text
    assert api.chat_requests == []


async def test_welcome_on_enter_agent_when_configured(
    nats_server: NatsHandle, stream: JetStreamContext, api: SimulatedOpenAIApi
) -> None:
    user = "new.comer"
    env = llm_env(nats_server, api, LLM_WELCOME_MESSAGE="欢迎使用 wecombot！")
    async with running(env):
        await send(
            stream,
            received(user, payload=WeComEventPayload(event="subscribe")),
            received(user, payload=WeComEventPayload(event="enter_agent")),
            received(user, payload=WeComEventPayload(event="enter_agent")),  # opened again
        )
        await wait_settled(stream)
        got = await outcomes(stream, user)
    assert len(got) == 1  # once a day
    assert isinstance(got[0], ReplyGenerated)
    assert (got[0].kind, got[0].text) == ("notice", "欢迎使用 wecombot！")
    assert api.chat_requests == []


# ---------------------------------------------------------------- model failures


async def test_rate_limit_is_retried_after_retry_after(
    nats_server: NatsHandle, stream: JetStreamContext, api: SimulatedOpenAIApi
) -> None:
    api.fail_next(Fault.rate_limited(retry_after="1"))
    async with running(llm_env(nats_server, api)):
        await send(stream, received("a.b", "hello"))
        got = await wait_outcomes(stream, "a.b", 1)
    assert isinstance(got[0], ReplyGenerated)
    assert got[0].text == "echo: hello"
    first, second = api.chat_requests
    assert second.at - first.at >= 0.95  # Retry-After: 1 was honoured
    assert second.messages == first.messages


async def test_persistent_server_errors_become_the_apology(
    nats_server: NatsHandle, stream: JetStreamContext, api: SimulatedOpenAIApi
) -> None:
    api.fail_always(Fault.server_error(500))
    async with running(llm_env(nats_server, api, LLM_RETRY_BUDGET="1")):
        await send(stream, received("c.d", "hello"))
        got = await wait_outcomes(stream, "c.d", 1)
        await wait_settled(stream)
    failed = got[0]
    assert isinstance(failed, ReplyFailed)
    assert failed.text == APOLOGY
    assert "HTTP 500" in failed.reason
    assert failed.attempts == len(api.chat_requests) >= 2
    assert KEY not in failed.reason


# ---------------------------------------------------------------- exactly once


async def test_a_message_stored_twice_gets_one_outcome(
    nats_server: NatsHandle, stream: JetStreamContext, api: SimulatedOpenAIApi
) -> None:
    message = received("dup@corp", "once please")
    await append_event(stream, message)  # no msg_id: JetStream stores both copies
    await append_event(stream, message)
    async with running(llm_env(nats_server, api)):
        await wait_outcomes(stream, "dup@corp", 1)
        await wait_settled(stream)
        got = await outcomes(stream, "dup@corp")
    assert [e.causation_id for e in got] == [message.event_id]
    assert len(api.chat_requests) == 1


async def test_a_message_the_llm_gave_up_on_is_replayed_and_answered_once(
    nats_server: NatsHandle, stream: JetStreamContext, api: SimulatedOpenAIApi
) -> None:
    lost = received("lost.user", "are you there?")
    await send(stream, lost)
    # The llm's consumer gives up on it the way the llm does (here: a failure that
    # outlasts max_deliver), through the same worker: it is parked in the DLQ.
    config = topology.work_consumer(
        topology.LLM_CONSUMER,
        topology.RECEIVED_FILTER,
        ack_wait_s=5,
        max_ack_pending=100,
    )

    async def failing(d: Delivery) -> WorkOutcome:
        return Nak(0, "the outcome could not be appended")

    stop = asyncio.Event()
    worker = PullWorker(stream, config, failing, max_deliver=2, fetch_timeout_s=0.2)
    task = asyncio.create_task(worker.run(stop))

    async def parked() -> bool:
        info = await stream.stream_info(topology.DEAD_LETTER_STREAM)
        return bool(info.state.messages == 1)

    await until(parked, timeout=15, what="the message in the DLQ")
    stop.set()
    await task
    dead_seq = (await stream.stream_info(topology.DEAD_LETTER_STREAM)).state.last_seq

    async with running(llm_env(nats_server, api)):
        later = received("lost.user", "and now?")
        await send(stream, later)
        await wait_outcomes(stream, "lost.user", 1)  # the later one is not held back
        done, said = await replay(stream, dead_seq)
        assert done, said
        assert "appended again" in said
        answered = await wait_outcomes(stream, "lost.user", 2)
        assert [o.causation_id for o in answered] == [later.event_id, lost.event_id]
        assert isinstance(answered[1], ReplyGenerated)
        assert answered[1].text == "echo: are you there?"
        again, said = await replay(stream, dead_seq)
        assert not again and "has its ReplyGenerated" in said, said
        await wait_settled(stream)
    assert len(await outcomes(stream, "lost.user")) == 2
    assert len(api.chat_requests) == 2


async def test_two_replicas_keep_each_users_order_and_context(
    nats_server: NatsHandle, stream: JetStreamContext
) -> None:
    jitter = random.Random(20240601)
    users = [f"user{i}.x@corp" for i in range(5)]
    questions = {u: [f"{u} says {k}" for k in range(1, 4)] for u in users}
    sent = {u: [received(u, q) for q in questions[u]] for u in users}

    def latency() -> float:
        return jitter.uniform(0.02, 0.3)

    # One simulated model per replica, to see that both did part of the work.
    async with (
        SimulatedOpenAIApi(api_key=KEY, latency_s=latency) as sim_a,
        SimulatedOpenAIApi(api_key=KEY, latency_s=latency) as sim_b,
        running(llm_env(nats_server, sim_a, LLM_MAX_CONCURRENCY="4")),
        running(llm_env(nats_server, sim_b, LLM_MAX_CONCURRENCY="4")),
    ):
        await asyncio.gather(*(send(stream, *sent[u]) for u in users))
        for user in users:
            await wait_outcomes(stream, user, 3)
        await wait_settled(stream)
        results = {u: await outcomes(stream, u) for u in users}
    assert sim_a.chat_requests and sim_b.chat_requests
    requests = sim_a.chat_requests + sim_b.chat_requests
    for user in users:
        got = results[user]
        assert [e.causation_id for e in got] == [m.event_id for m in sent[user]]
        assert [e.text for e in got] == [f"echo: {q}" for q in questions[user]]
        for k, question in enumerate(questions[user], start=1):
            asked = [r for r in requests if r.last_user_text == question]
            assert asked, question
            for request in asked:
                assert request.messages == expected_context(questions[user][:k])


async def test_graceful_stop_hands_the_message_to_the_other_replica(
    nats_server: NatsHandle, stream: JetStreamContext, api: SimulatedOpenAIApi
) -> None:
    api.fail_next(Fault.hanging())  # the first model call never answers
    message = received("hand.over", "are you there?")
    async with running(llm_env(nats_server, api, LLM_SHUTDOWN_GRACE="0.2")) as first:
        await send(stream, message)
        await api.wait_for_requests(1)
        async with running(llm_env(nats_server, api)):
            await first.shutdown()  # mid-call: the message is handed back
            got = await wait_outcomes(stream, "hand.over", 1)
            await wait_settled(stream)
            assert len(await outcomes(stream, "hand.over")) == 1
    assert isinstance(got[0], ReplyGenerated)
    assert got[0].causation_id == message.event_id
    assert got[0].text == "echo: are you there?"
    assert len(api.chat_requests) == 2


# ---------------------------------------------------------------- flood control, allowlist


def sent_at(message: MessageReceived, create_time: int) -> MessageReceived:
    """The same message with another WeCom CreateTime (the flood gate's only clock)."""
    return msgspec.structs.replace(message, create_time=create_time)


async def test_flood_control_holds_across_replicas_and_restarts(
    nats_server: NatsHandle, stream: JetStreamContext, api: SimulatedOpenAIApi
) -> None:
    """The rate is counted from the conversation's events: a replica that never saw the
    earlier messages, and two replicas at once, keep it exactly."""
    user, other = "flood.er@corp", "burst.y"
    now = int(time.time())
    env = llm_env(nats_server, api, LLM_USER_RATE_PER_MINUTE="3", LLM_MAX_CONCURRENCY="4")
    first = [sent_at(received(user, f"q{i}"), now) for i in range(3)]
    more = [sent_at(received(user, f"q{i}"), now + 10) for i in range(3, 6)]
    async with running(env) as replica_a:
        await send(stream, *first)
        await wait_outcomes(stream, user, 3)
        async with running(env):  # replica B takes over; A stops
            await replica_a.shutdown()
            await send(stream, *more)
            await wait_settled(stream)
    got = await outcomes(stream, user)
    assert [e.causation_id for e in got] == [m.event_id for m in [*first, more[0]]]
    assert [e.kind for e in got if isinstance(e, ReplyGenerated)] == ["answer"] * 3 + ["notice"]
    assert "3" in got[3].text
    assert len(api.chat_requests) == 3

    # Two fresh replicas at once: another user's burst, and the first user a minute later.
    burst = [sent_at(received(other, f"b{i}"), now) for i in range(8)]
    calm = sent_at(received(user, "calm again"), now + 61)
    still = sent_at(received(user, "still flooding"), now + 30)
    async with running(env), running(env):
        await send(stream, still, calm, *burst)
        await wait_settled(stream)
    got = await outcomes(stream, user)
    assert [e.causation_id for e in got[4:]] == [calm.event_id]  # `still`: told already
    assert got[4].text == "echo: calm again"
    burst_outcomes = await outcomes(stream, other)
    assert [e.causation_id for e in burst_outcomes] == [m.event_id for m in burst[:4]]
    assert [e.kind for e in burst_outcomes if isinstance(e, ReplyGenerated)] == [
        "answer", "answer", "answer", "notice",
    ]  # fmt: skip
    assert len(api.chat_requests) == 3 + 1 + 3


async def test_only_allowed_users_reach_the_model(
    nats_server: NatsHandle, stream: JetStreamContext, api: SimulatedOpenAIApi
) -> None:
    env = llm_env(nats_server, api, LLM_ALLOWED_USERS="boss@corp, Zhang.San")
    outsider = [received("intruder", f"let me in {i}") for i in range(3)]
    async with running(env), running(env):
        await send(stream, received("zhang.san", "hello"), *outsider)
        await wait_settled(stream)
    [answer] = await outcomes(stream, "zhang.san")
    assert isinstance(answer, ReplyGenerated) and answer.text == "echo: hello"
    [refusal] = await outcomes(stream, "intruder")  # one refusal, then silence
    assert isinstance(refusal, ReplyGenerated) and refusal.kind == "notice"
    assert refusal.causation_id == outsider[0].event_id and "权限" in refusal.text
    assert [r.last_user_text for r in api.chat_requests] == ["hello"]


@pytest.mark.parametrize("order_wait", [0.0, 0.5])
async def test_an_order_wait_under_a_second_still_passes_a_settled_earlier_message(
    js: JetStreamContext, order_wait: float
) -> None:
    """The consumer's ack floor (past a dead-lettered earlier message) was first asked
    after a second of waiting: with LLM_ORDER_WAIT under that, never, and the next
    message of that user was nak'ed at every delivery but its last."""
    await ensure_topology(js, NatsSettings.read(EnvReader({})))
    config = topology.work_consumer(
        topology.LLM_CONSUMER, topology.RECEIVED_FILTER, ack_wait_s=30, max_ack_pending=100
    )
    await js.add_consumer(topology.CONVERSATION_STREAM, config)
    first, second = received("floor.user", "first"), received("floor.user", "second")
    await append_event(js, first, msg_id=f"in:{first.event_id}")
    sub = await js.pull_subscribe_bind(topology.LLM_CONSUMER, topology.CONVERSATION_STREAM)
    [msg] = await sub.fetch(1, timeout=5)
    await msg.term()  # as the worker does once it has dead-lettered a message
    at = (await append_event(js, second, msg_id=f"in:{second.event_id}")).seq
    log = JetStreamLog(js, consumer=topology.LLM_CONSUMER)

    async def settled() -> bool:
        return (await log.settled_through() or 0) >= at - 1

    await until(settled, timeout=10, what="the first message settled")
    handler = LlmHandler(
        log, OfflineModel(), HandlerConfig(policy=ReplyPolicy(), order_wait_s=order_wait)
    )
    assert await handler.handle(second, stream_seq=at, num_delivered=1) == Ack()
    [answer] = await outcomes(js, "floor.user")
    assert isinstance(answer, ReplyGenerated) and "second" in answer.text
