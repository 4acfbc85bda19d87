"""Subjects: a UserID becomes one subject token, reversibly, whatever it contains."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js.api import AckPolicy, DeliverPolicy

from wecombot_common.events import MessageReceived, PartDelivered, ReplyGenerated, TextPayload
from wecombot_common.topology import (
    CONVERSATION_SUBJECTS,
    RECEIVED_FILTER,
    TOKEN_GET,
    TOKEN_INVALIDATE,
    ConversationRef,
    dead_letter_stream,
    decode_token,
    encode_token,
    subject_for,
    work_consumer,
)

USERID = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_\-@.]{0,63}", fullmatch=True)


@given(USERID)
def test_userids_round_trip_into_one_token(userid: str) -> None:
    token = encode_token(userid)
    assert decode_token(token) == userid
    assert not set(token) & set(".*> \t")


@given(st.text(min_size=1))
def test_any_text_round_trips(text: str) -> None:
    token = encode_token(text)
    assert decode_token(token) == text
    assert not set(token) & set(".*> \t\r\n")


def test_distinct_users_get_distinct_subjects() -> None:
    assert encode_token("a.b") != encode_token("a~2Eb")
    assert encode_token("a.b") != encode_token("a_b")


def test_empty_token_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        encode_token("")


def test_each_writer_has_its_branch() -> None:
    common = {"app": "ww1-1", "conversation": "zhang.san", "correlation_id": "1"}
    received = MessageReceived(
        **common, msg_type="text", msg_id="1", from_user="zhang.san", to_user="ww1",
        agent_id=1, create_time=1, payload=TextPayload(content="hi"),
    )  # fmt: skip
    reply = ReplyGenerated(**common, text="x")
    part = PartDelivered(**common, reply_id="r", index=0, total=1, wecom_msgid="m")
    conv = ConversationRef("ww1-1", "zhang.san")
    assert subject_for(received) == f"{conv.root}.in"
    assert subject_for(reply).startswith(conv.llm_branch[:-1])
    assert subject_for(part).startswith(conv.sender_branch[:-1])
    assert conv.root == "wecombot.conv.ww1-1.zhang~2Esan"


def test_request_reply_subjects_lie_outside_the_stream() -> None:
    prefix = CONVERSATION_SUBJECTS.removesuffix(">")
    for subject in (TOKEN_GET, TOKEN_INVALIDATE):
        assert not subject.startswith(prefix)


def test_a_work_consumer_redelivers_without_limit_from_the_first_message() -> None:
    """JetStream's own max_deliver drops a message silently: the worker counts instead."""
    config = work_consumer("llm", RECEIVED_FILTER, ack_wait_s=30, max_ack_pending=64)
    assert (config.max_deliver, config.deliver_policy) == (-1, DeliverPolicy.ALL)
    assert (config.ack_policy, config.ack_wait, config.durable_name) == (
        AckPolicy.EXPLICIT,
        30,
        "llm",
    )


def test_the_dead_letter_window_drops_a_repeat_for_two_hours_or_the_streams_age() -> None:
    assert dead_letter_stream(replicas=1, max_age_s=86_400).duplicate_window == 7260
    assert dead_letter_stream(replicas=1, max_age_s=3600).duplicate_window == 3600
