"""The sender's pure parts: the fold over a conversation, errcode classes, settings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TypedDict

import pytest

from wecombot_common.bus import StoredEvent
from wecombot_common.errors import ConfigError, PermanentError, TransientError
from wecombot_common.events import (
    ConversationReset,
    DeliveryFailed,
    MessageReceived,
    PartDelivered,
    ReplyDelivered,
    ReplyFailed,
    ReplyGenerated,
    ReplyRequeued,
    TextPayload,
    derived_id,
)
from wecombot_sender.domain import (
    PACING_SLACK_S,
    RECENT_SENDS_KEPT,
    ConversationState,
    OutcomeState,
    fold,
    hourly_delay,
    layout,
    next_part,
    pending_before,
    rate_delay,
    record,
)
from wecombot_sender.errcodes import ErrorClass, classify, explain
from wecombot_sender.errors import SendRejected, SendRetryable, TokenRejected
from wecombot_sender.settings import SenderSettings
from wecombot_sender.split import split_text

APP = "ww1-1000002"
USER = "zhang.san"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


class Envelope(TypedDict):
    app: str
    conversation: str
    correlation_id: str


def env() -> Envelope:
    return {"app": APP, "conversation": USER, "correlation_id": "m1"}


def reply(text: str = "hi") -> ReplyGenerated:
    return ReplyGenerated(**env(), text=text)


def part(reply_id: str, index: int, msgid: str, at: datetime = T0) -> PartDelivered:
    return PartDelivered(
        **env(), reply_id=reply_id, index=index, total=3, wecom_msgid=msgid, occurred_at=at
    )


def received() -> MessageReceived:
    return MessageReceived(
        **env(),
        msg_type="text",
        msg_id="m1",
        from_user=USER,
        to_user="ww1",
        agent_id=1000002,
        create_time=1,
        payload=TextPayload(content="hello"),
    )


# ---------------------------------------------------------------- the fold


def test_fold_tracks_each_outcome_its_parts_and_the_cursors() -> None:
    r1, r2 = reply("one"), ReplyFailed(**env(), reason="model down", attempts=3, text="sorry")
    events = [
        StoredEvent(1, received()),
        StoredEvent(2, r1),
        StoredEvent(3, part(r1.event_id, 0, "w1")),
        StoredEvent(4, part(r1.event_id, 1, "w2")),
        StoredEvent(5, r2),
    ]
    state = fold(ConversationState(), events)
    assert state.last_seq == 5
    assert state.last_send_seq == 4
    one, two = state.outcome(r1.event_id), state.outcome(r2.event_id)
    assert (one.seq, dict(one.delivered), one.terminal) == (2, {0: "w1", 1: "w2"}, False)
    assert (two.seq, dict(two.delivered), two.terminal) == (5, {}, False)
    assert next_part(one) == 2
    assert next_part(two) == 0


def test_reply_delivered_and_delivery_failed_are_terminal() -> None:
    r1, r2 = reply("a"), ConversationReset(**env(), text="记忆已清除")
    done = ReplyDelivered(**env(), reply_id=r1.event_id, parts=1, wecom_msgids=["w1"])
    failed = DeliveryFailed(
        **env(), reply_id=r2.event_id, errcode=81013, reason="gone", parts_delivered=0
    )
    state = fold(
        ConversationState(),
        [StoredEvent(1, r1), StoredEvent(2, r2), StoredEvent(3, done), StoredEvent(4, failed)],
    )
    assert state.outcome(r1.event_id).terminal
    assert state.outcome(r2.event_id).terminal
    assert state.last_send_seq == 4


def test_the_fold_keeps_when_a_reply_ended_and_its_latest_send() -> None:
    """The duplicate check's window reaches back to a reply's latest recorded part, and
    counts another reply's failure only when it ended inside the window: parts recorded
    by replicas whose clocks differ need not come in the order of their times."""
    r1, r2 = reply("a"), reply("b")
    later, earlier = T0 + timedelta(seconds=30), T0 + timedelta(seconds=10)
    failed = DeliveryFailed(
        **env(), reply_id=r2.event_id, errcode=81013, reason="gone", parts_delivered=0,
        occurred_at=later,
    )  # fmt: skip
    events = [
        StoredEvent(1, r1),
        StoredEvent(2, part(r1.event_id, 0, "w0", at=later)),
        StoredEvent(3, part(r1.event_id, 1, "w1", at=earlier)),  # a replica behind
        StoredEvent(4, r2),
        StoredEvent(5, failed),
    ]
    state = fold(ConversationState(), events)
    assert state.outcome(r1.event_id).last_sent_at == later
    assert state.outcome(r2.event_id).ended_at == later
    assert state.outcome(r1.event_id).ended_at is None  # not finished


def test_a_requeue_reopens_a_failed_reply_until_its_round_ends() -> None:
    r1, later = reply("a"), reply("b")
    failed = DeliveryFailed(
        **env(), reply_id=r1.event_id, errcode=-1, reason="gave up", parts_delivered=1
    )
    requeue = ReplyRequeued(**env(), reply_id=r1.event_id, reason="wecombot dlq replay 1")
    events = [
        StoredEvent(1, r1),
        StoredEvent(2, part(r1.event_id, 0, "w1")),
        StoredEvent(3, failed),
        StoredEvent(4, later),
        StoredEvent(5, requeue),
    ]
    failed_state = fold(ConversationState(), events[:3]).outcome(r1.event_id)
    assert (failed_state.terminal, failed_state.failure) == (True, "gave up")
    state = fold(ConversationState(), events)
    one = state.outcome(r1.event_id)
    assert (one.terminal, one.requeued_by, one.delivered_by) == (False, requeue.event_id, 5)
    assert one.failure is None, "the new round has not failed"
    assert next_part(one) == 1, "resumes after the recorded part"
    assert state.last_send_seq == 3, "the requeue is on the llm branch"
    # The reply is pending again before the later one: it goes out first.
    assert [o.event_id for o in pending_before(state, 4)] == [r1.event_id]
    done = ReplyDelivered(**env(), reply_id=r1.event_id, parts=2, wecom_msgids=["w1", "w2"])
    finished = fold(state, [StoredEvent(6, done)]).outcome(r1.event_id)
    assert (finished.terminal, finished.failure) == (True, None)
    assert state.outcome(later.event_id).delivered_by == 4


def test_an_earlier_rounds_failure_recorded_after_a_requeue_ends_nothing() -> None:
    """Its delivery was still running when the reply was parked; its DeliveryFailed came
    after the operator's requeue. Taken as the new round's, it parked the reply again."""
    r1 = reply("a")
    requeue = ReplyRequeued(**env(), reply_id=r1.event_id, reason="wecombot dlq replay 1")

    def failure(*round_: str) -> DeliveryFailed:
        return DeliveryFailed(
            **{**env(), "event_id": derived_id(r1.event_id, "failed", *round_)},
            reply_id=r1.event_id,
            errcode=-1,
            reason="gave up",
            parts_delivered=0,
        )

    requeued = fold(ConversationState(), [StoredEvent(1, r1), StoredEvent(3, requeue)])
    stale = fold(requeued, [StoredEvent(4, failure())]).outcome(r1.event_id)
    assert (stale.terminal, stale.failure, stale.requeued_by) == (False, None, requeue.event_id)
    own = fold(requeued, [StoredEvent(4, failure(requeue.event_id))]).outcome(r1.event_id)
    assert (own.terminal, own.failure) == (True, "gave up")


def test_fold_is_incremental_idempotent_and_leaves_its_input_alone() -> None:
    r1 = reply()
    events = [StoredEvent(1, r1), StoredEvent(2, part(r1.event_id, 0, "w1"))]
    whole = fold(ConversationState(), events)
    stepwise = fold(fold(ConversationState(), events[:1]), events[1:])
    assert stepwise == whole
    assert fold(whole, events) == whole  # a re-read changes nothing
    empty = ConversationState()
    fold(empty, events)
    assert empty == ConversationState()


def test_the_first_part_recorded_wins() -> None:
    r1 = reply()
    state = fold(
        ConversationState(),
        [StoredEvent(1, r1), StoredEvent(2, part(r1.event_id, 0, "w1"))],
    )
    again = fold(state, [StoredEvent(3, part(r1.event_id, 0, "w-dup"))])
    assert dict(again.outcome(r1.event_id).delivered) == {0: "w1"}
    assert len(again.recent_sends) == 1


def test_the_newest_sends_are_kept_and_paced_from_the_right_one() -> None:
    """WeCom counts the last minute: the wait runs from the send ``per_minute`` back
    from the newest, and the fold keeps the newest RECENT_SENDS_KEPT, not the oldest."""
    t = T0
    three = (t, t + timedelta(seconds=10), t + timedelta(seconds=20))
    assert rate_delay(three, t + timedelta(seconds=30), per_minute=2) == 41.0  # 40 + slack
    r1 = reply()
    sends = [
        StoredEvent(i + 2, part(r1.event_id, i, f"w{i}", at=t + timedelta(seconds=i)))
        for i in range(70)
    ]
    state = fold(ConversationState(), [StoredEvent(1, r1), *sends])
    assert len(state.recent_sends) == RECENT_SENDS_KEPT
    assert state.recent_sends[-1] == t + timedelta(seconds=69)
    assert state.recent_sends[0] == t + timedelta(seconds=70 - RECENT_SENDS_KEPT)
    assert rate_delay(state.recent_sends, t + timedelta(seconds=70), per_minute=30) == 31.0
    assert state.outcome(r1.event_id).last_sent_at == t + timedelta(seconds=69)


def test_the_next_part_follows_the_highest_recorded() -> None:
    assert next_part(OutcomeState("r")) == 0
    assert next_part(OutcomeState("r", delivered={0: "w1"})) == 1
    assert next_part(OutcomeState("r", delivered={1: "w2"})) == 2  # never part 1 again


def test_the_parts_recorded_in_a_window_are_known_by_reply_and_index() -> None:
    r1, r2 = reply("one"), reply("two")
    state = fold(
        ConversationState(),
        [
            StoredEvent(1, r1),
            StoredEvent(2, part(r1.event_id, 0, "w1", at=T0)),
            StoredEvent(3, r2),
            StoredEvent(4, part(r2.event_id, 0, "w2", at=T0 + timedelta(seconds=30))),
        ],
    )
    recent = state.parts_since(T0 + timedelta(seconds=1))
    assert recent is not None and [(p.reply_id, p.index) for p in recent] == [(r2.event_id, 0)]
    assert len(state.parts_since(T0) or ()) == 2
    # Every part kept is in the window: older ones in it may have been forgotten.
    full = fold(
        state,
        [
            StoredEvent(10 + i, part(r2.event_id, i + 1, f"w{i}", at=T0 + timedelta(seconds=40)))
            for i in range(RECENT_SENDS_KEPT)
        ],
    )
    assert full.parts_since(T0 + timedelta(seconds=35)) is None
    assert full.parts_since(T0 + timedelta(seconds=40, microseconds=1)) == ()


def test_record_applies_an_own_append_without_moving_the_cursor() -> None:
    r1 = reply()
    state = fold(ConversationState(), [StoredEvent(4, r1)])
    mine = part(r1.event_id, 0, "w1")
    after = record(state, StoredEvent(9, mine))
    assert after.last_seq == 4  # events 5..8 (someone else's) are still read next time
    assert after.last_send_seq == 9
    assert dict(after.outcome(r1.event_id).delivered) == {0: "w1"}
    # the later catch-up meets our own event again, harmlessly
    assert fold(after, [StoredEvent(9, mine)]).outcome(r1.event_id) == after.outcome(r1.event_id)


def test_sends_of_an_outcome_that_aged_out_are_kept_without_a_seq() -> None:
    state = fold(ConversationState(), [StoredEvent(10, part("old-reply", 0, "w1"))])
    assert state.outcome("old-reply").seq is None
    assert pending_before(state, 100) == []


def test_pending_before_lists_unfinished_earlier_outcomes_in_order() -> None:
    r1, r2, r3, r4 = reply("1"), reply("2"), reply("3"), reply("4")
    done = ReplyDelivered(**env(), reply_id=r2.event_id, parts=1, wecom_msgids=["w"])
    state = fold(
        ConversationState(),
        [
            StoredEvent(1, r1),
            StoredEvent(2, r2),
            StoredEvent(3, done),
            StoredEvent(4, r3),
            StoredEvent(5, r4),
        ],
    )
    assert [o.event_id for o in pending_before(state, 5)] == [r1.event_id, r3.event_id]
    assert pending_before(state, 1) == []


def test_unknown_outcome_is_empty() -> None:
    state = ConversationState()
    assert state.outcome("nope").delivered == {}
    assert not state.outcome("nope").terminal


# ---------------------------------------------------------------- per-user rate


def test_rate_delay_keeps_a_minute_window() -> None:
    sends = tuple(T0 + timedelta(seconds=i) for i in range(30))
    assert rate_delay(sends[:29], T0 + timedelta(seconds=30), per_minute=30) == 0.0
    assert rate_delay(sends, T0 + timedelta(seconds=30), per_minute=30) == pytest.approx(31.0)
    assert rate_delay(sends, T0 + timedelta(seconds=61), per_minute=30) == 0.0
    assert rate_delay(sends, T0, per_minute=0) == 0.0
    # Sends recorded out of the order of their times (replicas' clocks differ): the
    # window is that of the latest ones in time, not of the last recorded.
    skewed = (T0 + timedelta(seconds=10), T0)
    assert rate_delay(skewed, T0 + timedelta(seconds=20), per_minute=1) == pytest.approx(51.0)


def test_a_replica_whose_clock_is_ahead_still_waits_out_the_recorders_minute() -> None:
    """The sends' times are the recording replicas' clocks: paced to the exact minute
    and hour, a replica whose clock was ahead by a few hundred ms sent the next message
    inside WeCom's minute (or hour), which WeCom drops without an error (path/90454)."""
    ahead = timedelta(milliseconds=500)  # this replica's clock, ahead of the recorder's
    recorded = tuple(T0 + timedelta(seconds=i) for i in range(30))  # the recorder's clock
    real_now = T0 + timedelta(seconds=59, milliseconds=800)  # still the first one's minute
    assert rate_delay(recorded, real_now + ahead, per_minute=30) == pytest.approx(0.7)
    # 1,000 sends in T0's minute, the last at its very end: WeCom counts it until an hour
    # after; 0.2 s before that, this replica reads 0.3 s past the minute's end + an hour.
    minute = int(T0.timestamp()) // 60
    real_now = T0 + timedelta(minutes=61) - timedelta(milliseconds=200)
    assert hourly_delay(((minute, 1000),), real_now + ahead, per_hour=1000) == pytest.approx(0.7)


def test_the_fold_counts_sends_per_minute_for_the_last_hour() -> None:
    r1 = reply()
    minute = int(T0.timestamp()) // 60
    events = [StoredEvent(1, r1)]
    events += [
        StoredEvent(2 + i, part(r1.event_id, i, f"w{i}", at=T0 + timedelta(seconds=20 * i)))
        for i in range(5)
    ]
    state = fold(ConversationState(), events)
    assert state.sends_per_minute == ((minute, 3), (minute + 1, 2))
    again = fold(state, [StoredEvent(9, part(r1.event_id, 4, "w4", at=T0))])
    assert again.sends_per_minute == state.sends_per_minute, "a repeated part counts once"
    later = T0 + timedelta(minutes=62, seconds=30)
    late = record(state, StoredEvent(10, part(r1.event_id, 5, "w5", at=later)))
    assert late.sends_per_minute == ((minute + 1, 2), (minute + 62, 1)), "older minutes go"


def test_hourly_delay_waits_until_the_hour_has_room() -> None:
    minute = int(T0.timestamp()) // 60
    counts = ((minute, 600), (minute + 10, 400))
    at = T0 + timedelta(minutes=30)
    # 1,000 in the hour: the first minute's 600 leave it at its end plus an hour.
    slack = PACING_SLACK_S
    assert hourly_delay(counts, at, per_hour=1000) == pytest.approx(60 + 3600 - 30 * 60 + slack)
    assert hourly_delay(counts, at, per_hour=1001) == 0.0
    assert hourly_delay(counts, at, per_hour=0) == 0.0
    # Over the limit by more than the oldest minute: wait for the next one too.
    assert hourly_delay(counts, at, per_hour=300) == pytest.approx(11 * 60 + 3600 - 30 * 60 + slack)
    # Leaving the limit exactly is no room: wait until the hour is under it.
    full = ((minute, 1), (minute + 10, 3))
    assert hourly_delay(full, at, per_hour=3) == pytest.approx(11 * 60 + 3600 - 30 * 60 + slack)
    # An hour, a minute and the slack after a send, it no longer counts.
    later = T0 + timedelta(minutes=61, seconds=slack)
    assert hourly_delay(counts, later, per_hour=401) == 0.0
    assert hourly_delay(counts, later, per_hour=400) > 0
    # The first minute's sends count until that minute's end plus an hour, not sooner.
    assert hourly_delay(counts, T0 + timedelta(minutes=60, seconds=30), per_hour=1000) == (
        pytest.approx(30 + slack)
    )


# ---------------------------------------------------------------- errcodes


@pytest.mark.parametrize("code", [-1, 45009, 45011, 45033])
def test_busy_codes_are_retried(code: int) -> None:
    assert classify(code) is ErrorClass.RETRYABLE


@pytest.mark.parametrize("code", [40014, 42001, 41001])
def test_token_codes_refresh_the_token(code: int) -> None:
    assert classify(code) is ErrorClass.TOKEN


@pytest.mark.parametrize("code", [81013, 82001, 60020, 44004, 45002, 40003, 301002, 48002, 1])
def test_everything_else_is_permanent(code: int) -> None:
    assert classify(code) is ErrorClass.PERMANENT


def test_reasons_are_plain_words_with_the_code() -> None:
    assert explain(81013) == (
        "the recipient is not a member the app can reach (left, or outside its visible range)"
        " (errcode 81013)"
    )
    assert "trusted IPs" in explain(60020)
    assert explain(99999, "strange") == "WeCom refused the message (errcode 99999: strange)"
    assert explain(99999) == "WeCom refused the message (errcode 99999)"


def test_send_errors_sit_in_the_shared_tree() -> None:
    assert isinstance(SendRetryable(-1, "busy"), TransientError)
    assert isinstance(TokenRejected(42001, "expired"), TransientError)
    rejected = SendRejected(81013, "gone")
    assert isinstance(rejected, PermanentError)
    assert (rejected.errcode, rejected.reason, str(rejected)) == (81013, "gone", "gone")


# ---------------------------------------------------------------- settings


def test_settings_defaults_and_no_secret_needed() -> None:
    s = SenderSettings.from_env({"WECOM_CORP_ID": "ww1", "WECOM_AGENT_ID": "1000002"})
    assert s.wecom.app == APP
    assert not s.wecom.secret
    assert (s.health_port, s.max_concurrency, s.http_timeout_s) == (8082, 32, 10.0)
    assert (s.ack_wait_s, s.max_deliver, s.order_wait_s, s.retry_attempts) == (30.0, 20, 60.0, 4)
    assert s.per_user_per_minute == 30
    assert s.message_type == "text"


def test_pacing_is_refused_beyond_the_sends_a_conversation_remembers() -> None:
    """The fold keeps the last RECENT_SENDS_KEPT sends: a per-minute limit above that
    was never reached, so rate_delay paced nothing at all."""
    env = {"WECOM_CORP_ID": "ww1", "WECOM_AGENT_ID": "1000002"}
    limit = str(RECENT_SENDS_KEPT)
    assert SenderSettings.from_env({**env, "SENDER_PER_USER_PER_MINUTE": limit}).per_user_per_minute
    with pytest.raises(ConfigError, match="SENDER_PER_USER_PER_MINUTE"):
        SenderSettings.from_env({**env, "SENDER_PER_USER_PER_MINUTE": str(RECENT_SENDS_KEPT + 1)})
    now = datetime(2024, 1, 1, tzinfo=UTC)
    burst = tuple(now for _ in range(RECENT_SENDS_KEPT))
    assert rate_delay(burst, now, per_minute=RECENT_SENDS_KEPT) == 60.0 + PACING_SLACK_S  # paces


def test_replies_can_go_out_as_markdown() -> None:
    env = {"WECOM_CORP_ID": "ww1", "WECOM_AGENT_ID": "1000002"}
    assert SenderSettings.from_env({**env, "SENDER_MESSAGE_TYPE": "Markdown"}).message_type == (
        "markdown"
    )
    with pytest.raises(ConfigError, match=r"SENDER_MESSAGE_TYPE must be one of text\|markdown"):
        SenderSettings.from_env({**env, "SENDER_MESSAGE_TYPE": "html"})


def test_settings_name_every_bad_variable() -> None:
    with pytest.raises(ConfigError) as info:
        SenderSettings.from_env(
            {"WECOM_AGENT_ID": "x", "SENDER_MAX_CONCURRENCY": "0", "SENDER_HTTP_TIMEOUT": "soon"}
        )
    message = str(info.value)
    for name in (
        "WECOM_CORP_ID",
        "WECOM_AGENT_ID",
        "SENDER_MAX_CONCURRENCY",
        "SENDER_HTTP_TIMEOUT",
    ):
        assert name in message


# ---------------------------------------------------------------- layout: where to resume


def test_with_nothing_recorded_the_parts_are_this_builds_split() -> None:
    text = "第一段。\n\n" + "x" * 3000
    spans = layout(text, OutcomeState("r"))
    assert [text[s:e] for s, e in spans] == split_text(text)


def test_a_recorded_span_is_where_the_rest_begins_whatever_this_build_would_cut() -> None:
    text = "x" * 1500 + " \u0301" + "y" * 2000
    outcome = OutcomeState("r", delivered={0: "w0"}, spans={0: (0, 1501)})
    spans = layout(text, outcome)
    assert spans == [(0, 1501), (1501, len(text))]
    later = OutcomeState("r", delivered={0: "w0", 1: "w1"}, spans={1: (1501, 1800)})
    assert layout(text, later)[:2] == [(1501, 1501), (1501, 1800)]  # earlier ones: unused
    assert "".join(text[s:e] for s, e in layout(text, later)[1:]) == text[1501:]


def test_whitespace_left_out_of_the_parts_is_left_out_of_their_spans() -> None:
    """A part of only whitespace is not sent (WeCom refuses empty content, 44004): the
    spans skip it, and a reply resumed after the part before it starts after it."""
    text = "a" * 2000 + " " * 5000 + "b" * 100
    spans = layout(text, OutcomeState("r"))
    assert [text[s:e] for s, e in spans] == split_text(text)
    assert all(not text[s:e].isspace() for s, e in spans)
    assert len(spans) == 2 and spans[-1][1] == len(text)
    resumed = OutcomeState("r", delivered={0: "w0"}, spans={0: spans[0]})
    assert layout(text, resumed) == spans
    moved = OutcomeState("r", delivered={0: "w0"}, spans={0: (0, 1900)})  # another build's
    rest = layout(text, moved)[1:]
    assert rest[0][0] == 1900 and rest[-1][1] == len(text)
    assert all(not text[s:e].isspace() for s, e in rest)


def test_a_part_recorded_without_its_span_is_resumed_by_index() -> None:
    text = "x" * 5000
    outcome = OutcomeState("r", delivered={0: "w0"})  # an older sender's record
    assert [text[s:e] for s, e in layout(text, outcome)] == split_text(text)
    broken = OutcomeState("r", delivered={0: "w0"}, spans={0: (0, 6000)})  # not this text
    assert [text[s:e] for s, e in layout(text, broken)] == split_text(text)


def test_a_reply_resumed_by_the_build_that_split_it_keeps_its_parts() -> None:
    """Split again from the end of its last recorded part, a reply cut inside a code
    block (over the limit) is cut elsewhere after it: the part re-sent would not be the
    one an earlier attempt may have got accepted unrecorded, WeCom's duplicate check
    would not drop the repeat, and the user would get the overlap twice."""
    code = "".join(f"echo line {i}\n" for i in range(300))
    prose = "".join(f"Step {i} explains it. " for i in range(150))
    text = f"Here is the script:\n\n```\n{code}```\n\n{prose}\n\n```\nls\n```\n" + "Done. " * 300
    whole = layout(text, OutcomeState("r"))
    assert len(whole) > 3
    for last in range(len(whole) - 1):
        recorded = dict.fromkeys(range(last + 1), "w")
        outcome = OutcomeState("r", delivered=recorded, spans={last: whole[last]})
        assert layout(text, outcome) == whole, last


def test_the_fold_keeps_each_parts_span() -> None:
    reply = ReplyGenerated(app="ww1-2", conversation="u", correlation_id="m", text="abcdef")
    part = PartDelivered(
        app="ww1-2",
        conversation="u",
        correlation_id="m",
        reply_id=reply.event_id,
        index=0,
        total=2,
        wecom_msgid="w1",
        start=0,
        end=3,
    )
    state = fold(ConversationState(), [StoredEvent(7, reply), StoredEvent(9, part)])
    assert state.outcome(reply.event_id).spans == {0: (0, 3)}
    assert layout(reply.text, state.outcome(reply.event_id)) == [(0, 3), (3, 6)]
