"""The whole way on the real broker: WeCom callback → gateway → MessageReceived → llm →
outcome → sender → WeCom message/send, with the token service over request-reply.

Everything is real and on loopback: nats-server, the four services, a simulated WeCom
API and a simulated OpenAI-compatible model.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NatsHandle, free_port
from tests.e2e.harness import AGENT_ID, CORP_ID, Stack, sample_key, samples_of
from tests.waiting import until
from wecombot_common import topology
from wecombot_common.bus import read_conversation
from wecombot_common.events import MessageReceived, ReplyDelivered, ReplyGenerated, encode_event
from wecombot_common.sim.openai_api import Fault
from wecombot_common.topology import ConversationRef

pytestmark = pytest.mark.e2e
APP = f"{CORP_ID}-{AGENT_ID}"


@pytest.fixture
async def stack(nats_server: NatsHandle, tmp_path: Path) -> AsyncIterator[Stack]:
    async with Stack(nats_server.url, tmp_path) as s:
        await s.start_in_process("token", "llm", "sender", "gateway")
        yield s


def _turns(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages if m["role"] != "system"]


async def test_multi_turn_context_for_several_users(stack: Stack) -> None:
    users = ["zhang.san", "li.si@corp", "wang_wu-1"]
    for round_ in (1, 2, 3):
        for user in users:
            await stack.say(user, f"{user} message {round_}")
        for user in users:
            await stack.wait_replies(user, round_)
    for user in users:
        assert stack.replies(user) == [f"echo: {user} message {i}" for i in (1, 2, 3)]
        last = next(
            r
            for r in reversed(stack.model.chat_requests)
            if r.last_user_text == f"{user} message 3"
        )
        assert _turns(last.messages) == [
            ("user", f"{user} message 1"),
            ("assistant", f"echo: {user} message 1"),
            ("user", f"{user} message 2"),
            ("assistant", f"echo: {user} message 2"),
            ("user", f"{user} message 3"),
        ]
    assert stack.wecom.gettoken_calls == 1


async def test_fifty_users_at_once(stack: Stack) -> None:
    users = [f"user.{i:02d}@corp" for i in range(50)]
    await asyncio.gather(*(stack.say(u, f"hi from {u}") for u in users))
    for user in users:
        assert await stack.wait_replies(user, 1) == [f"echo: hi from {user}"]
    assert stack.wecom.gettoken_calls == 1
    assert not any(m.truncated for m in stack.wecom.sent)


async def test_wecom_retry_of_the_same_msgid_gets_one_reply(stack: Stack, js: Any) -> None:
    callback = stack.client.text("retry.user", "are you there?")
    responses = await asyncio.gather(*(stack.post(callback) for _ in range(3)))
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert (await stack.post(callback)).status_code == 200  # a late retry, after the first
    await stack.wait_replies("retry.user", 1)
    await stack.say("retry.user", "second")  # a later message proves the pipeline moved on
    await stack.wait_replies("retry.user", 2)
    assert stack.replies("retry.user") == ["echo: are you there?", "echo: second"]
    conv = ConversationRef(APP, "retry.user")
    received = [
        s.event async for s in read_conversation(js, conv) if isinstance(s.event, MessageReceived)
    ]
    assert [e.msg_id for e in received].count(callback.msg_id) == 1


async def test_long_reply_is_split_into_parts_that_join_exactly(stack: Stack, js: Any) -> None:
    paragraph = "微信企业号的回复需要被拆分。" * 20 + " Mixed ASCII text, with punctuation!" * 4
    long_reply = "\n\n".join(f"{i}. {paragraph}" for i in range(8))
    assert len(long_reply.encode()) > 3 * 2048
    stack.model.reply = lambda messages: long_reply
    await stack.say("long.reader", "tell me everything")
    await until(
        lambda: "".join(stack.replies("long.reader")) == long_reply, timeout=20, what="all parts"
    )
    parts = stack.replies("long.reader")
    assert len(parts) >= 4
    assert all(len(p.encode()) <= 2048 for p in parts)
    assert not any(m.truncated for m in stack.wecom.sent)
    conv = ConversationRef(APP, "long.reader")
    generated = [
        s.event async for s in read_conversation(js, conv) if isinstance(s.event, ReplyGenerated)
    ]
    assert [e.text for e in generated] == [long_reply]


async def test_expired_token_is_refreshed_once(stack: Stack) -> None:
    await stack.say("night.owl", "evening")
    await stack.wait_replies("night.owl", 1)
    stack.wecom.expire_tokens()  # a quiet night: WeCom now answers 42001
    await asyncio.gather(*(stack.say(f"morning.{i}", "good morning") for i in range(5)))
    for i in range(5):
        await stack.wait_replies(f"morning.{i}", 1)
    assert stack.wecom.gettoken_calls == 2


async def test_transient_wecom_and_llm_failures_are_survived(stack: Stack) -> None:
    stack.model.fail_next(Fault.rate_limited(retry_after="1"))
    stack.model.fail_next(Fault.server_error(502))
    stack.wecom.fail_sends(-1, times=2)
    stack.wecom.fail_sends_http(502)
    stack.wecom.fail_sends(45009)
    await stack.say("unlucky", "does this survive?")
    assert await stack.wait_replies("unlucky", 1, timeout=60) == ["echo: does this survive?"]
    assert len(stack.model.chat_requests) == 3  # 429, 502, then the answer


async def test_reset_starts_a_fresh_context(stack: Stack) -> None:
    await stack.say("forgetful", "my name is Bob")
    await stack.wait_replies("forgetful", 1)
    await stack.say("forgetful", "/reset")
    await stack.wait_replies("forgetful", 2)
    await stack.say("forgetful", "what is my name?")
    replies = await stack.wait_replies("forgetful", 3)
    assert replies[0] == "echo: my name is Bob"
    assert replies[2] == "echo: what is my name?"
    last = stack.model.chat_requests[-1]
    assert _turns(last.messages) == [("user", "what is my name?")]
    assert len(stack.model.chat_requests) == 2  # /reset never reached the model


async def test_separate_processes_two_llm_replicas_keep_order_without_duplicates(
    nats_server: NatsHandle, tmp_path: Path, js: Any
) -> None:
    rng = random.Random(7)
    async with Stack(nats_server.url, tmp_path) as stack:
        stack.model.latency_s = lambda: rng.uniform(0.0, 0.25)
        stack.start_process("token")
        llm_ports = [free_port(), free_port()]
        for port in llm_ports:
            stack.start_process("llm", LLM_MAX_CONCURRENCY="8", WECOMBOT_HEALTH_PORT=str(port))
        stack.start_process("sender")
        stack.start_process("gateway")
        await stack.wait_ready(timeout=30)
        users = [f"proc.user{i}@corp" for i in range(12)]
        for round_ in (1, 2, 3):  # three messages per user in well under a second
            await asyncio.gather(*(stack.say(u, f"{u} #{round_}") for u in users))
        for user in users:
            await stack.wait_replies(user, 3, timeout=60)
        for user in users:
            assert stack.replies(user) == [f"echo: {user} #{i}" for i in (1, 2, 3)]
            third = next(r for r in stack.model.chat_requests if r.last_user_text == f"{user} #3")
            assert _turns(third.messages)[:-1] == [
                ("user", f"{user} #1"),
                ("assistant", f"echo: {user} #1"),
                ("user", f"{user} #2"),
                ("assistant", f"echo: {user} #2"),
            ]
        assert len(stack.model.chat_requests) == 36  # no message answered twice
        assert stack.wecom.gettoken_calls == 1
        conv = ConversationRef(APP, users[0])
        delivered = [
            s.event
            async for s in read_conversation(js, conv)
            if isinstance(s.event, ReplyDelivered)
        ]
        assert len(delivered) == 3
        # Both replicas took work (the shared durable consumer spreads it).
        llm_logs = [s.log_path.read_text() for s in stack.services if s.name == "llm"]  # type: ignore[union-attr]
        answered = [log.count('"llm.outcome_appended"') for log in llm_logs]
        assert sum(answered) == 36
        assert all(n > 0 for n in answered), answered
        # ... and each replica's own /metrics says so, as an operator's Prometheus sees it.
        counted = [await _answers_counted(stack, port) for port in llm_ports]
        assert counted == answered
        info = await js.consumer_info(topology.CONVERSATION_STREAM, topology.LLM_CONSUMER)
        assert info.num_ack_pending == 0


async def _answers_counted(stack: Stack, port: int) -> int:
    """``wecombot_llm_outcomes_total{outcome="ReplyGenerated"}`` of one llm process."""
    response = await stack.http.get(f"http://127.0.0.1:{port}/metrics")
    key = sample_key("wecombot_llm_outcomes_total", outcome="ReplyGenerated")
    return int(samples_of(response.text).get(key, 0))


async def test_an_event_filed_on_the_wrong_branch_does_not_wedge_its_conversation(
    stack: Stack, js: Any
) -> None:
    """A reply's body on the gateway's branch (its NATS user may publish there; a faulty
    build, a hand-made append) was taken for a reply by every read: the llm's appends
    for that user were refused as stale ever after, each message dead-lettered as
    "concurrent appends kept winning". It is dead-lettered itself and read past."""
    conv = ConversationRef(APP, "wedge.user")
    stray = ReplyGenerated(app=APP, conversation="wedge.user", correlation_id="x", text="stray")
    await js.publish(f"{conv.root}.in", encode_event(stray))
    await stack.say("wedge.user", "still there?")
    await stack.wait_replies("wedge.user", 1)
    await stack.say("wedge.user", "and now?")
    await stack.wait_replies("wedge.user", 2)
    assert stack.replies("wedge.user") == ["echo: still there?", "echo: and now?"]

    async def parked() -> bool:
        info = await js.stream_info(topology.DEAD_LETTER_STREAM)
        return int(info.state.messages) == 1

    await until(parked, timeout=20, what="the misfiled reply dead-lettered")
    letter = await js.get_msg(topology.DEAD_LETTER_STREAM, 1)
    assert "a ReplyGenerated filed on" in (letter.headers or {})["Wecombot-Dlq-Reason"]
