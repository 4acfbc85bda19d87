"""The llm service's pure logic, its model adapters, and its handler over fakes."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import httpx
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from tests.fakes import APP, FakeLog, received, reply_to
from tests.waiting import until
from wecombot_common import metrics
from wecombot_common.bus import (
    StoredEvent,
)
from wecombot_common.errors import ConfigError
from wecombot_common.events import (
    ConversationReset,
    DeliveryFailed,
    Event,
    ImagePayload,
    LinkPayload,
    LocationPayload,
    MessageReceived,
    PartDelivered,
    Payload,
    ReplyFailed,
    ReplyGenerated,
    ReplyRequeued,
    TextPayload,
    UnknownPayload,
    VideoPayload,
    VoicePayload,
    WeComEventPayload,
    decode_event,
    derived_id,
    encode_event,
)
from wecombot_common.proxy import httpx_proxy
from wecombot_common.settings import EnvReader
from wecombot_common.worker import Ack, Delivery, HandBack, Nak, Slot
from wecombot_llm.commands import HELP_TEXT, RESET_TEXT, Command, parse_command
from wecombot_llm.conversation import Blocked, Conversation, Done, Go, fold, plan
from wecombot_llm.decide import (
    CUT_OFF_NOTE,
    EMPTY_TEXT,
    MAX_ANSWER_BYTES,
    REFUSAL_TEXT,
    TOO_LONG_NOTE,
    AskModel,
    Reply,
    answer,
    decide,
    failed,
    requires_outcome,
)
from wecombot_llm.gate import Gate, GatePolicy, Verdict
from wecombot_llm.handler import HandlerConfig, LlmHandler, _locked
from wecombot_llm.model import (
    Completion,
    ModelRejected,
    ModelUnavailable,
    OfflineModel,
)
from wecombot_llm.prompt import ChatMessage, Turn, build_prompt, estimate_tokens
from wecombot_llm.retry import is_retryable_status, next_delay, parse_retry_after, retry_after_of
from wecombot_llm.settings import LlmSettings, ModelSettings, ReplyPolicy

USER = "zhang.san@corp"


def msg(
    text: str | None = None, *, payload: Payload | None = None, user: str = USER
) -> MessageReceived:
    return received(text, user=user, payload=payload)


def fail_of(m: MessageReceived) -> ReplyFailed:
    return ReplyFailed(
        app=APP,
        conversation=m.conversation,
        correlation_id=m.correlation_id,
        causation_id=m.event_id,
        reason="HTTP 500",
        attempts=3,
        text="sorry",
    )


def reset_of(m: MessageReceived) -> ConversationReset:
    return ConversationReset(
        app=APP,
        conversation=m.conversation,
        correlation_id=m.correlation_id,
        causation_id=m.event_id,
        text="cleared",
    )


def stored(*events: Event) -> list[StoredEvent]:
    return [StoredEvent(seq=i, event=e) for i, e in enumerate(events, start=1)]


def always(_: MessageReceived) -> bool:
    return True


# ---------------------------------------------------------------- the fold


def test_fold_pairs_answers_with_their_questions_since_the_last_reset() -> None:
    q1, q2, r, q3, q4, q5 = msg("q1"), msg("q2"), msg("/reset"), msg("q3"), msg("q4"), msg("q5")
    conv = fold(
        stored(
            q1,
            q2,
            reply_to(q2, "a2"),
            reply_to(q1, "a1"),  # answers match by causation, not position
            r,
            reset_of(r),
            q3,
            reply_to(q3, "a3"),
            q4,
            fail_of(q4),  # failed: not a turn
            q5,
        ),
        always,
    )
    assert list(conv.turns) == [Turn("q3", "a3")]
    assert set(conv.awaiting) == {q5.event_id}
    assert all(conv.is_settled(m.event_id) for m in (q1, q2, r, q3, q4))
    assert (conv.last_seq, conv.llm_last_seq) == (11, 10)


def test_an_operators_requeue_moves_the_llm_branch_and_answers_nothing() -> None:
    q1, q2 = msg("q1"), msg("q2")
    a1 = reply_to(q1, "a1")
    requeue = ReplyRequeued(
        app=APP,
        conversation=USER,
        correlation_id=q1.correlation_id,
        reply_id=a1.event_id,
        reason="wecombot dlq replay 3",
    )
    conv = fold(stored(q1, a1, requeue, q2), always)
    assert conv.llm_last_seq == 3, "the next outcome's expected sequence includes it"
    assert set(conv.awaiting) == {q2.event_id}
    assert list(conv.turns) == [Turn("q1", "a1")]


def test_fold_excludes_notices_and_ignores_replays_and_second_copies() -> None:
    help_, q = msg("/help"), msg("hi")
    events = stored(help_, reply_to(help_, HELP_TEXT, "notice"), q, reply_to(q, "hello"), q)
    conv = fold(events, always)
    for again in events:  # replaying what was applied changes nothing
        conv.apply(again)
    assert list(conv.turns) == [Turn("hi", "hello")]
    assert conv.awaiting == {}  # the second copy of q (seq 5) is already answered
    assert conv.last_seq == 5


def test_fold_keeps_the_first_copy_of_a_message_stored_twice() -> None:
    q = msg("hi")
    conv = fold(stored(q, q), always)
    assert conv.awaiting[q.event_id].seq == 1
    assert plan(conv, q.event_id, 2, settled_through=0) == Go()  # copies don't block
    assert plan(conv, q.event_id, 1, settled_through=0) == Go()


def test_fold_ignores_messages_that_need_no_outcome() -> None:
    event = msg(payload=WeComEventPayload(event="enter_agent"))
    conv = fold(stored(event), lambda m: requires_outcome(m))
    assert conv.awaiting == {}


def test_fold_keeps_a_bounded_number_of_turns() -> None:
    conv = Conversation(needs_outcome=always, keep_turns=2)
    events: list[Event] = []
    for k in range(5):
        q = msg(f"q{k}")
        a = reply_to(q, f"a{k}")
        events += [q, a, _delivery(PartDelivered, a, index=0, total=1, wecom_msgid="m")]
    for s in stored(*events):
        conv.apply(s)
    assert list(conv.turns) == [Turn("q3", "a3"), Turn("q4", "a4")]


def test_answers_not_known_delivered_are_kept_up_to_twice_the_turns() -> None:
    """One may yet prove unseen (a DeliveryFailed comes after the answer is kept): the
    ones read before it are kept meanwhile, and twice the turns bound them all."""
    conv = Conversation(needs_outcome=always, keep_turns=2)
    events: list[Event] = []
    for k in range(5):
        q = msg(f"q{k}")
        events += [q, reply_to(q, f"a{k}")]
    for s in stored(*events):
        conv.apply(s)
    assert [t.user for t in conv.turns] == ["q1", "q2", "q3", "q4"]
    assert len(conv.pending) == 4


def test_applying_the_last_event_again_changes_nothing() -> None:
    r, q = msg("/reset"), msg("q")
    events = stored(r, q, reply_to(q, "a"), reset_of(r))
    conv = fold(events, always)
    before = (list(conv.turns), conv.reset_from)
    conv.apply(events[-1])  # a re-read that starts at the last seq read
    assert (list(conv.turns), conv.reset_from) == before == ([Turn("q", "a")], 1)


def test_a_late_confirmation_of_an_older_reset_does_not_bring_back_what_a_newer_cleared() -> None:
    m1, q3, m5 = msg("/reset"), msg("q3"), msg("/reset")
    events = [
        StoredEvent(1, m1),
        StoredEvent(3, q3),
        StoredEvent(5, m5),
        StoredEvent(6, reset_of(m5)),
        StoredEvent(10, reset_of(m1)),  # answered out of order (a redelivery)
        StoredEvent(11, reply_to(q3, "a3")),
    ]
    conv = fold(events, always)
    assert list(conv.turns) == [] and conv.reset_from == 5


def test_only_the_latest_settled_messages_are_remembered() -> None:
    conv = Conversation(needs_outcome=always, remember=3)
    questions = [msg(f"q{i}") for i in range(5)]
    seq = 0
    for q in questions:
        conv.apply(StoredEvent(seq := seq + 1, q))
        conv.apply(StoredEvent(seq := seq + 1, reply_to(q, "a")))
    assert [conv.is_settled(q.event_id) for q in questions] == [False, False, True, True, True]


def test_a_message_settled_again_is_remembered_as_recent() -> None:
    conv = Conversation(needs_outcome=always, remember=2)
    q0, q1, q2 = msg("q0"), msg("q1"), msg("q2")
    for event in (q0, q1, reply_to(q0, "a"), reply_to(q1, "a"), reply_to(q0, "again")):
        conv.apply(StoredEvent(conv.last_seq + 1, event))  # a second outcome for q0: a race
    for event in (q2, reply_to(q2, "a")):
        conv.apply(StoredEvent(conv.last_seq + 1, event))
    assert [conv.is_settled(q.event_id) for q in (q0, q1, q2)] == [True, False, True]


def test_history_keeps_an_exchange_asked_exactly_at_the_age_limit() -> None:
    q = msg("q")
    conv = fold(stored(q, reply_to(q, "a")), always)
    asked_at = q.occurred_at.timestamp()
    assert conv.history(9, since=asked_at) == [Turn("q", "a")]
    assert conv.history(9, since=asked_at + 0.001) == []


def test_history_is_in_the_order_asked_and_before_the_message() -> None:
    """Answered out of order (a last delivery that did not wait), the exchanges still
    reach the prompt in the order the user asked them; a message's past is what was
    asked before it, never its own exchange."""
    q1, q2, q3 = msg("q1"), msg("q2"), msg("q3")
    conv = fold(stored(q1, q2, reply_to(q2, "a2"), reply_to(q1, "a1"), q3), always)
    assert conv.turns == [Turn("q2", "a2"), Turn("q1", "a1")]  # the order answered
    assert conv.history(5) == [Turn("q1", "a1"), Turn("q2", "a2")]
    assert conv.history(2) == [Turn("q1", "a1")]  # q2's past: q1 alone


def _delivery(
    kind: type[DeliveryFailed | PartDelivered | ReplyRequeued],
    reply: ReplyGenerated,
    **fields: object,
) -> DeliveryFailed | PartDelivered | ReplyRequeued:
    """What the sender (or an operator's replay) records of ``reply``'s delivery."""
    envelope = {
        "app": APP,
        "conversation": reply.conversation,
        "correlation_id": reply.correlation_id,
        "causation_id": reply.event_id,
        "reply_id": reply.event_id,
    }
    return kind(**envelope, **fields)  # type: ignore[arg-type]


def test_an_answer_the_user_never_saw_is_not_history() -> None:
    """WeCom refused an answer for good before any part reached the user (81013: outside
    the app's range until the admin fixed it; an outage past the sender's deliveries):
    the model was told it had said it, and answered the next message as if read. Still
    history: an answer not delivered yet, one with a part delivered, one requeued."""
    q1, q2, q3 = msg("q1"), msg("q2"), msg("q3")
    a1, a2 = reply_to(q1, "a1"), reply_to(q2, "a2")
    refused = _delivery(DeliveryFailed, a1, errcode=81013, reason="left", parts_delivered=0)
    events = [q1, a1, q2, a2, refused, q3]
    assert fold(stored(*events), always).history(6) == [Turn("q2", "a2")]
    partly = _delivery(DeliveryFailed, a1, errcode=-1, reason="busy", parts_delivered=1)
    assert fold(stored(q1, a1, partly, q3), always).history(4) == [Turn("q1", "a1")]
    assert fold(stored(q1, a1, q3), always).history(3) == [Turn("q1", "a1")]  # on its way
    requeued = _delivery(ReplyRequeued, a1, reason="replayed")
    again = fold(stored(q1, a1, refused, requeued, q3), always)
    assert again.history(5) == [Turn("q1", "a1")]
    # an earlier round's failure recorded after the requeue: hidden until a part is sent
    late = fold(stored(q1, a1, requeued, refused, q3), always)
    assert late.history(5) == []
    part = _delivery(PartDelivered, a1, index=0, total=1, wecom_msgid="m", start=0, end=2)
    late.apply(StoredEvent(6, part))
    assert late.history(7) == [Turn("q1", "a1")]


def test_answers_the_user_never_saw_do_not_take_the_place_of_ones_read() -> None:
    """The fold kept the last LLM_MAX_TURNS exchanges and then left the unseen out: the
    model got fewer turns than it could have, though the user had read older ones."""
    conv = Conversation(needs_outcome=always, keep_turns=2)
    events: list[Event] = []
    for k in range(4):
        q = msg(f"q{k}")
        a = reply_to(q, f"a{k}")
        if k < 2:
            seen = _delivery(PartDelivered, a, index=0, total=1, wecom_msgid="m")
        else:  # found unseen after it was kept
            seen = _delivery(DeliveryFailed, a, errcode=81013, reason="x", parts_delivered=0)
        events += [q, a, seen]
    for s in stored(*events, msg("q4")):
        conv.apply(s)
    assert conv.history(conv.last_seq) == [Turn("q0", "a0"), Turn("q1", "a1")]
    # a requeued answer delivered at last is read: the oldest read one goes
    a3 = events[-2]
    assert isinstance(a3, ReplyGenerated)
    requeued = _delivery(ReplyRequeued, a3, reason="replayed")
    part = _delivery(PartDelivered, a3, index=0, total=1, wecom_msgid="m")
    for event in (requeued, part):
        conv.apply(StoredEvent(conv.last_seq + 1, event))
    assert [t.user for t in conv.history(conv.last_seq + 1)] == ["q1", "q3"]


def test_an_unseen_answer_reset_or_dropped_from_the_turns_is_not_held() -> None:
    q1, q2 = msg("q1"), msg("q2")
    a1, a2 = reply_to(q1, "a1"), reply_to(q2, "a2")
    refused = _delivery(DeliveryFailed, a1, errcode=81013, reason="left", parts_delivered=0)
    conv = Conversation(needs_outcome=always, keep_turns=1)
    for event in (q1, a1, refused):
        conv.apply(StoredEvent(conv.last_seq + 1, event))
    assert conv.unseen == {a1.event_id}
    assert conv.pending == frozenset(), "unseen, no longer pending"
    part = _delivery(PartDelivered, a2, index=0, total=1, wecom_msgid="m")
    for event in (q2, a2, part):  # a1's exchange leaves the kept turns
        conv.apply(StoredEvent(conv.last_seq + 1, event))
    assert conv.unseen == conv.pending == frozenset()


def _read(k: int) -> list[Event]:
    """Exchange ``k``, its answer delivered whole."""
    q = msg(f"q{k}")
    a = reply_to(q, f"a{k}")
    return [q, a, _delivery(PartDelivered, a, index=0, total=1, wecom_msgid=f"m{k}")]


def test_a_requeued_answer_the_user_read_part_of_still_counts_as_read() -> None:
    """Replayed after a part reached the user, the answer is read already: were it not
    known delivered again (pending), an older exchange would be kept besides the
    ``keep_turns`` read ones, and the model given more turns than LLM_MAX_TURNS."""
    q1 = msg("q1")
    a1 = reply_to(q1, "a1")
    part = _delivery(PartDelivered, a1, index=0, total=2, wecom_msgid="m1")
    gave_up = _delivery(DeliveryFailed, a1, errcode=-1, reason="busy", parts_delivered=1)
    requeued = _delivery(ReplyRequeued, a1, reason="replayed")
    conv = Conversation(needs_outcome=always, keep_turns=2)
    for event in (*_read(0), q1, a1, part, gave_up, requeued, *_read(2)):
        conv.apply(StoredEvent(conv.last_seq + 1, event))
    assert conv.pending == frozenset()
    assert [t.user for t in conv.history(conv.last_seq + 1)] == ["q1", "q2"]


def test_a_requeued_unseen_answer_is_not_counted_read_until_a_part_is_delivered() -> None:
    """Requeued, an answer WeCom refused may be refused again: counted read meanwhile, a
    newer answer dropped an older read exchange, and when the requeued round failed too,
    the model had one turn fewer than the user read."""
    q2 = msg("q2")
    a2 = reply_to(q2, "a2")
    refused = _delivery(DeliveryFailed, a2, errcode=81013, reason="left", parts_delivered=0)
    requeued = _delivery(ReplyRequeued, a2, reason="replayed")
    q3 = msg("q3")
    conv = Conversation(needs_outcome=always, keep_turns=2)
    events = [*_read(0), *_read(1), q2, a2, refused, requeued, q3, reply_to(q3, "a3")]
    for event in (*events, refused):  # the requeued round refused as well
        conv.apply(StoredEvent(conv.last_seq + 1, event))
    assert [t.user for t in conv.history(conv.last_seq + 1)] == ["q0", "q1", "q3"]


def test_a_reset_forgets_the_answers_it_clears_delivered_or_not() -> None:
    """An answer cleared by a reset before any delivery event was held in ``pending``
    for good (nothing settles an id no longer kept): a conversation reset often grew."""
    r, q = msg("/reset"), msg("q")
    conv = Conversation(needs_outcome=always, keep_turns=2)
    for event in (q, reply_to(q, "a"), r, reset_of(r)):
        conv.apply(StoredEvent(conv.last_seq + 1, event))
    assert conv.turns == [] and conv.pending == frozenset()


def test_an_answer_is_cut_by_its_utf8_bytes_not_its_characters() -> None:
    """A Chinese answer is 3 bytes a character: one under MAX_ANSWER_BYTES characters but
    over it in bytes is cut all the same; one of exactly MAX_ANSWER_BYTES bytes is not."""
    q = msg("q")
    exact = "答" * (MAX_ANSWER_BYTES // 3) + "a" * (MAX_ANSWER_BYTES % 3)
    assert len(exact.encode()) == MAX_ANSWER_BYTES
    kept = answer(q, exact, model=None, prompt_tokens=None, completion_tokens=None)
    assert kept.text == exact
    over = exact + "a"
    cut = answer(q, over, model=None, prompt_tokens=None, completion_tokens=None, cut_off=True)
    assert cut.text == exact + TOO_LONG_NOTE
    chinese = "答" * (MAX_ANSWER_BYTES // 2)  # fewer characters than the limit, 1.5x its bytes
    text = answer(q, chinese, model=None, prompt_tokens=None, completion_tokens=None).text
    assert text.endswith(TOO_LONG_NOTE)
    assert len(text.removesuffix(TOO_LONG_NOTE).encode()) <= MAX_ANSWER_BYTES


@pytest.mark.parametrize(
    "text", [" \n\u3000 ", "\u200b\u200b", "\ufeff", " \u2060\u200d ", "\u200e", "\u00ad\u202a"]
)
def test_a_text_that_shows_nothing_is_answered_with_a_hint_not_sent_to_the_model(
    text: str,
) -> None:
    m = msg(text)
    action = decide(m, fold(stored(m), always), ReplyPolicy(), now=0.0)
    assert isinstance(action, Reply) and action.outcome.text == EMPTY_TEXT


def test_a_failure_reason_is_kept_short() -> None:
    reason = failed(msg("q"), "x" * 2000, 3, "sorry").reason
    assert reason == "x" * 500


# ---------------------------------------------------------------- planning


def test_plan_waits_for_an_earlier_unanswered_message() -> None:
    q1, q2 = msg("q1"), msg("q2")
    conv = fold(stored(q1, q2), always)
    assert plan(conv, q1.event_id, 1, settled_through=0) == Go()
    assert plan(conv, q2.event_id, 2, settled_through=0) == Blocked(q1.event_id, 1)
    assert plan(conv, q2.event_id, 2, settled_through=1) == Go()  # q1 settled: abandoned
    assert plan(conv, q2.event_id, 2, settled_through=0, ignore_order=True) == Go()
    conv.apply(StoredEvent(3, reply_to(q1, "a1")))
    assert plan(conv, q1.event_id, 1, settled_through=0) == Done()
    assert plan(conv, q2.event_id, 2, settled_through=0) == Go()


def test_plan_waits_while_its_own_message_is_not_visible_yet() -> None:
    q1 = msg("q1")
    conv = fold(stored(q1), always)
    assert plan(conv, "later", 2, settled_through=0) == Blocked("later", 0)


# ---------------------------------------------------------------- prompt


def test_prompt_keeps_the_last_turns_in_order() -> None:
    turns = [Turn(f"q{k}", f"a{k}") for k in range(5)]
    messages = build_prompt("sys", turns, "now", max_turns=2, max_tokens=8000)
    assert [(m.role, m.content) for m in messages] == [
        ("system", "sys"),
        ("user", "q3"),
        ("assistant", "a3"),
        ("user", "q4"),
        ("assistant", "a4"),
        ("user", "now"),
    ]
    assert build_prompt("sys", turns, "now", max_turns=0, max_tokens=8000) == [
        ChatMessage("system", "sys"),
        ChatMessage("user", "now"),
    ]


def test_token_estimate_counts_cjk_per_character_and_ascii_per_four() -> None:
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2
    assert estimate_tokens("你好世界") == 4
    assert estimate_tokens("こんにちは") == 5
    assert estimate_tokens("안녕") == 2
    assert estimate_tokens("你好 abcd") == 2 + 2  # 2 CJK + " abcd" (5 chars → 2)
    assert estimate_tokens("привет") == 12  # 2 bytes each: at most a token per byte
    assert estimate_tokens("👨\u200d👩\u200d👧") == 4 + 3 + 4 + 3 + 4  # emoji and joiners
    # the edges of the ranges: U+0080 is the first 2-byte character; a Hangul jamo and
    # an ideograph outside the BMP count as one token each
    assert [estimate_tokens(c) for c in ("\x80", "\u1100", "\U00020000")] == [2, 1, 1]


def test_token_estimate_counts_each_digit() -> None:
    """Qwen's tokenizers make each digit a token (OpenAI's a group of up to three): at a
    quarter token each, a table of figures was counted under half what it costs."""
    assert estimate_tokens("1234567890") == 10
    assert estimate_tokens("13800138000, 13900139000") == 22 + 1
    # 4 CJK, 14 digits, three spaces and a full stop, ¥ (2 bytes)
    assert estimate_tokens("订单 20240101 金额 ¥3999.00") == 4 + 14 + 1 + 2


def test_emoji_and_other_scripts_are_not_under_counted() -> None:
    """Each emoji is at least one token; at a quarter token each, 20 turns of 1,000 kept
    15 turns (≥ 30,000 tokens) under a budget of 8,000: the provider refused, and every
    later message got the apology until the user reset."""
    history = [Turn("😀" * 1000, "👍" * 1000)] * 20
    prompt = build_prompt("sys", history, "hi", max_turns=20, max_tokens=8000)
    assert sum(m.content.count("😀") + m.content.count("👍") for m in prompt) <= 8000
    cyrillic = [Turn("вопрос " * 200, "ответ " * 200)] * 20  # ≈ 1 token per 2-3 letters
    kept = build_prompt("sys", cyrillic, "hi", max_turns=20, max_tokens=8000)
    assert sum(len(m.content) for m in kept) // 3 <= 8000


@given(st.text(max_size=200))
def test_the_token_estimate_counts_each_character_by_its_kind(text: str) -> None:
    """1 per CJK character, 1 per ASCII digit, 1 per 4 other ASCII characters, 1 per
    UTF-8 byte of the rest."""

    def cjk(ch: str) -> bool:
        return any(
            lo <= ord(ch) <= hi
            for lo, hi in (
                (0x1100, 0x11FF),
                (0x2E80, 0x2FDF),
                (0x3000, 0x303F),
                (0x3040, 0x30FF),
                (0x3100, 0x31FF),
                (0x3400, 0x4DBF),
                (0x4E00, 0x9FFF),
                (0xAC00, 0xD7AF),
                (0xF900, 0xFAFF),
                (0xFF00, 0xFFEF),
                (0x20000, 0x3134F),
            )
        )

    digits = sum(1 for ch in text if ch in "0123456789")
    ascii_chars = sum(1 for ch in text if ch.isascii()) - digits
    other = sum(len(ch.encode("utf-8", "surrogatepass")) for ch in text if not ch.isascii())
    cjk_chars = sum(1 for ch in text if cjk(ch))
    other -= sum(len(ch.encode("utf-8", "surrogatepass")) for ch in text if cjk(ch))
    assert estimate_tokens(text) == cjk_chars + other + digits + (ascii_chars + 3) // 4


@pytest.mark.parametrize(
    ("unit", "turn_tokens"),
    [
        ("x" * 400, 2 * (4 + 100)),  # ASCII: 400 chars → 100 tokens, + 4 overhead each
        ("字" * 100, 2 * (4 + 100)),  # CJK: 100 chars → 100 tokens
    ],
)
def test_prompt_drops_oldest_turns_to_fit_the_token_budget(unit: str, turn_tokens: int) -> None:
    turns = [Turn(f"{chr(97 + k)}{unit}"[:-1], f"{chr(97 + k)}{unit}"[:-1]) for k in range(10)]
    fixed = (4 + estimate_tokens("sys")) + (4 + estimate_tokens("now"))
    budget = fixed + 3 * turn_tokens  # room for exactly three turns
    messages = build_prompt("sys", turns, "now", max_turns=20, max_tokens=budget)
    assert [m.content[0] for m in messages[1:-1:2]] == ["h", "i", "j"]
    messages = build_prompt("sys", turns, "now", max_turns=20, max_tokens=budget - 1)
    assert [m.content[0] for m in messages[1:-1:2]] == ["i", "j"]


def test_prompt_always_keeps_system_and_current_message() -> None:
    huge = "长" * 10_000
    messages = build_prompt("sys", [Turn("q", "a")], huge, max_turns=20, max_tokens=100)
    assert messages == [ChatMessage("system", "sys"), ChatMessage("user", huge)]


# ---------------------------------------------------------------- commands and decisions


@pytest.mark.parametrize(
    ("text", "command"),
    [
        ("/reset", Command.RESET),
        ("  /RESET\n", Command.RESET),
        ("／reset", Command.RESET),
        ("#清除记忆", Command.RESET),
        # a Chinese keyboard's full-width forms, a space, a final full stop
        ("＃清除记忆", Command.RESET),
        ("# 清除记忆", Command.RESET),
        ("/reset。", Command.RESET),
        ("／ＲＥＳＥＴ", Command.RESET),
        ("\u200b/help", Command.HELP),
        ("/help", Command.HELP),
        ("/reset now", None),
        ("please /help", None),
        ("hello", None),
    ],
)
def test_parse_command(text: str, command: Command | None) -> None:
    assert parse_command(text) is command


ALL_PAYLOADS: list[tuple[Payload, bool, bool]] = [
    # payload, needs an outcome, … when a welcome message is configured
    (TextPayload(content="hi"), True, True),
    (ImagePayload(pic_url="u", media_id="m"), True, True),
    (VoicePayload(media_id="m", format="amr"), True, True),
    (VideoPayload(media_id="m", thumb_media_id="t"), True, True),
    (LocationPayload(latitude=1.0, longitude=2.0, scale=15, label="here"), True, True),
    (LinkPayload(title="t", description="d", url="u", pic_url="p"), True, True),
    (UnknownPayload(msg_type="file"), True, True),
    (WeComEventPayload(event="enter_agent"), False, True),
    (WeComEventPayload(event="subscribe"), False, False),
    (WeComEventPayload(event="click", event_key="k"), False, False),
    # a custom-menu item whose key is a command runs it, as typed
    (WeComEventPayload(event="click", event_key="/reset"), True, True),
    (WeComEventPayload(event="click", event_key="#清除记忆"), True, True),
    (WeComEventPayload(event="click", event_key="/help"), True, True),
    (WeComEventPayload(event="click"), False, False),
    (WeComEventPayload(event="view", event_key="/help"), False, False),  # a link: its URL
]


@pytest.mark.parametrize(("payload", "plain", "welcome"), ALL_PAYLOADS)
def test_requires_outcome_for_every_payload_kind(
    payload: Payload, plain: bool, welcome: bool
) -> None:
    m = msg(payload=payload)
    assert requires_outcome(m) is plain
    assert requires_outcome(m, welcome=True) is welcome


@pytest.mark.parametrize(
    ("payload", "word"),
    [
        (ImagePayload(pic_url="u", media_id="m"), "图片"),
        (VoicePayload(media_id="m", format="amr"), "语音"),
        (VideoPayload(media_id="m", thumb_media_id="t"), "视频"),
        (LocationPayload(latitude=1.0, longitude=2.0, scale=15, label="x"), "位置"),
        (LinkPayload(title="t", description="d", url="u", pic_url="p"), "链接"),
        (UnknownPayload(msg_type="file"), "这类"),
    ],
)
def test_other_message_types_get_a_not_supported_notice(payload: Payload, word: str) -> None:
    m = msg(payload=payload)
    action = decide(m, Conversation(needs_outcome=always), ReplyPolicy(), now=0.0)
    assert isinstance(action, Reply)
    assert isinstance(action.outcome, ReplyGenerated)
    assert action.outcome.kind == "notice"
    assert word in action.outcome.text and "不支持" in action.outcome.text


def test_a_question_from_before_a_reset_answered_after_it_is_no_history() -> None:
    """Out of order (a replayed dead letter, a last delivery that did not wait), the
    answer to a question asked before /reset can land after it: the new conversation
    must not carry that exchange to the model."""
    secret, r, later = msg("my secret is 42"), msg("/reset"), msg("hello")
    conv = fold(
        stored(secret, r, reset_of(r), secret, reply_to(secret, "noted: 42"), later), always
    )
    assert list(conv.turns) == []
    # The other way round: asked after the reset, answered before it is recorded.
    conv = fold(stored(r, later, reply_to(later, "hi"), reset_of(r)), always)
    assert list(conv.turns) == [Turn("hello", "hi")]


def test_decisions_carry_the_deterministic_envelope() -> None:
    policy = ReplyPolicy(system_prompt="sys", welcome_message="welcome!")
    q0 = msg("q0")
    conv = fold(stored(q0, reply_to(q0, "a0")), always)
    for text, kind in (("/reset", ConversationReset), ("#清除记忆", ConversationReset)):
        m = msg(text)
        action = decide(m, conv, policy, now=0.0)
        assert isinstance(action, Reply) and isinstance(action.outcome, kind)
        assert action.outcome.event_id == derived_id(m.event_id, "outcome")
        assert action.outcome.causation_id == m.event_id
        assert action.outcome.correlation_id == m.correlation_id
    helped = decide(msg("/help"), conv, policy, now=0.0)
    assert isinstance(helped, Reply) and isinstance(helped.outcome, ReplyGenerated)
    assert (helped.outcome.kind, helped.outcome.text) == ("notice", HELP_TEXT)
    welcomed = decide(msg(payload=WeComEventPayload(event="enter_agent")), conv, policy, now=0.0)
    assert isinstance(welcomed, Reply) and welcomed.outcome.text == "welcome!"
    asked = decide(msg("q1"), conv, policy, now=0.0)
    assert isinstance(asked, AskModel)
    assert [m.content for m in asked.messages] == ["sys", "q0", "a0", "q1"]


# ---------------------------------------------------------------- retry policy


def test_retry_after_in_seconds_and_as_an_http_date() -> None:
    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("1") == 1.0
    assert parse_retry_after(" 2.5 ") == 2.5
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now=now) == 0.0  # past
    # "-0000" is RFC 5322 for "zone unknown": parsed without one, taken as UTC
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:30 -0000", now=now) == 30.0
    for bad in (None, "", "soon", "-1", "nan", "inf"):
        assert parse_retry_after(bad) is None
    assert retry_after_of({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_of({"retry-after-ms": "0", "retry-after": "9"}) == 0.0  # "at once"
    assert retry_after_of({"retry-after": "3"}) == 3.0
    assert retry_after_of({}) is None


def test_backoff_has_full_jitter_and_honours_retry_after() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        delay = next_delay(attempt, None, rng)
        assert 0 <= delay <= min(8.0, 0.5 * 2 ** (attempt - 1))
    assert next_delay(1, 3.0, rng) == 3.0

    class Highest(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    # a Retry-After shorter than the backoff does not shorten it (0: "at once")
    assert next_delay(4, 1.0, Highest()) == 4.0 and next_delay(4, 0.0, Highest()) == 4.0
    assert next_delay(9, None, Highest()) == 8.0  # capped

    class Lowest(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return a

    # full jitter: any wait from none at all, so replicas hit alike spread out
    assert [next_delay(n, None, Lowest()) for n in (1, 9)] == [0.0, 0.0]


@pytest.mark.parametrize(("status", "retryable"), [(408, True), (429, True), (500, True),
    (503, True), (400, False), (401, False), (404, False), (499, False)])  # fmt: skip
def test_which_statuses_are_retried(status: int, retryable: bool) -> None:
    assert is_retryable_status(status) is retryable


# ---------------------------------------------------------------- settings


def test_settings_defaults_and_offline_without_a_key() -> None:
    s = LlmSettings.from_env({})
    assert s.offline and s.model.api_key is None
    assert (s.model.base_url, s.model.model) == ("https://api.openai.com/v1", "gpt-4o-mini")
    assert (s.policy.max_turns, s.policy.max_context_tokens) == (20, 8000)
    assert (s.max_concurrency, s.health_port, s.max_deliver) == (64, 8081, 10)
    assert (s.ack_wait_s, s.order_wait_s, s.model.retry_budget_s) == (30.0, 60.0, 90.0)
    assert s.model.max_connections >= s.max_concurrency
    assert s.policy.welcome_message is None and s.policy.apology_message
    online = LlmSettings.from_env({"OPENAI_API_KEY": "sk-abc", "OPENAI_BASE_URL": "http://h/v1/"})
    assert not online.offline and online.model.base_url == "http://h/v1"
    assert "sk-abc" not in repr(online)


def test_the_default_prompt_asks_for_what_wecom_shows() -> None:
    """Text replies (the default) show Markdown as typed: the prompt that asked for
    "simple Markdown" put **, # and tables in front of every user."""
    text = LlmSettings.from_env({}).policy.system_prompt
    assert "Write plain text" in text and "simple Markdown" not in text
    markdown = LlmSettings.from_env({"SENDER_MESSAGE_TYPE": "Markdown"}).policy.system_prompt
    assert "Markdown WeCom renders" in markdown and markdown != text
    own = {"SENDER_MESSAGE_TYPE": "markdown", "LLM_SYSTEM_PROMPT": "Be brief."}
    assert LlmSettings.from_env(own).policy.system_prompt == "Be brief."


@pytest.mark.parametrize("key", [None, "", "   "])
def test_a_required_api_key_refuses_the_offline_model(key: str | None) -> None:
    """The Kubernetes manifests set LLM_REQUIRE_API_KEY=true: a Secret made without the
    key (or with an empty one) must stop the llm, not start an echo of every message."""
    env = {"LLM_REQUIRE_API_KEY": "true"} | ({} if key is None else {"OPENAI_API_KEY": key})
    with pytest.raises(ConfigError, match=r"OPENAI_API_KEY is required .*LLM_REQUIRE_API_KEY"):
        LlmSettings.from_env(env)
    with_key = LlmSettings.from_env(env | {"OPENAI_API_KEY": "sk-abc"})
    assert not with_key.offline
    assert LlmSettings.from_env(env | {"LLM_REQUIRE_API_KEY": "FALSE"}).offline


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LLM_REQUIRE_API_KEY", "yes"),
        ("LLM_MAX_TURNS", "many"),
        ("LLM_MAX_CONTEXT_TOKENS", "-5"),
        ("LLM_MAX_CONCURRENCY", "0"),
        ("LLM_REQUEST_TIMEOUT", "abc"),
        ("LLM_RETRY_BUDGET", "-1"),
        ("LLM_TEMPERATURE", "7"),
        ("LLM_ACK_WAIT", "x"),
        ("LLM_MAX_DELIVER", "0"),
        ("LLM_ORDER_WAIT", "later"),
        ("OPENAI_BASE_URL", "ftp://example.com"),
        ("WECOMBOT_HEALTH_PORT", "70000"),
    ],
)
def test_settings_errors_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        LlmSettings.from_env({name: value})


# ---------------------------------------------------------------- models


async def test_offline_model_echoes_deterministically() -> None:
    messages = build_prompt("sys", [Turn("a", "b")], "你好", max_turns=20, max_tokens=8000)
    done = await OfflineModel().complete(messages)
    assert done.text == "[offline model] you said: 你好 (context: 1 earlier turns)"
    assert done.model == "offline"


# ---------------------------------------------------------------- the handler, over fakes


class FakeModel:
    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.calls: list[list[str]] = []
        self.gate = gate

    async def complete(self, messages: Sequence[ChatMessage]) -> Completion:
        self.calls.append([m.content for m in messages])
        if self.gate is not None:
            await self.gate.wait()
        return Completion(text=f"echo: {messages[-1].content}", model="fake")


def handler(log: FakeLog, model: FakeModel, **config: float) -> LlmHandler:
    cfg = HandlerConfig(
        policy=ReplyPolicy(system_prompt="sys"),
        poll_first_s=0.005,
        poll_max_s=0.02,
        settled_check_after_s=0.0,
        **config,  # type: ignore[arg-type]
    )
    return LlmHandler(log, model, cfg)


async def test_handler_two_replicas_delivering_the_same_message_append_once() -> None:
    log, gate = FakeLog(), asyncio.Event()
    model = FakeModel(gate)
    q = msg("hello")
    seq = log.add(q)
    first = asyncio.create_task(handler(log, model).handle(q, stream_seq=seq, num_delivered=1))
    second = asyncio.create_task(handler(log, model).handle(q, stream_seq=seq, num_delivered=2))
    await until(lambda: len(model.calls) == 2, timeout=10, what="both replicas asking the model")
    gate.set()
    assert list(await asyncio.gather(first, second)) == [Ack(), Ack()]
    assert [o.causation_id for o in log.outcomes()] == [q.event_id]


async def test_handler_answers_in_order_with_every_earlier_turn() -> None:
    log, model = FakeLog(), FakeModel()
    q1, q2 = msg("q1"), msg("q2")
    s1, s2 = log.add(q1), log.add(q2)
    h = handler(log, model)
    later = asyncio.create_task(h.handle(q2, stream_seq=s2, num_delivered=1))
    # q2 has read the log a few times, and is still waiting
    await until(lambda: log.reads >= 3, timeout=10, what="q2 reading the log")
    assert not later.done() and model.calls == []
    assert await handler(log, model).handle(q1, stream_seq=s1, num_delivered=1) == Ack()
    assert await later == Ack()
    assert model.calls == [["sys", "q1"], ["sys", "q1", "echo: q1", "q2"]]
    assert await h.handle(q2, stream_seq=s2, num_delivered=2) == Ack()  # a redelivery
    assert len(log.outcomes()) == 2


async def test_handler_hands_back_after_the_order_wait_unless_last_delivery() -> None:
    log, model = FakeLog(), FakeModel()
    q1, q2 = msg("q1"), msg("q2")
    log.add(q1)
    s2 = log.add(q2)
    h = handler(log, model, order_wait_s=0.05)
    outcome = await h.handle(q2, stream_seq=s2, num_delivered=1)
    assert isinstance(outcome, Nak) and "seq 1" in outcome.reason
    outcome = await h.handle(q2, stream_seq=s2, num_delivered=2)
    assert isinstance(outcome, Nak)  # a redelivery, not the last: it still waits
    assert await h.handle(q2, stream_seq=s2, num_delivered=3, last_try=True) == Ack()
    assert model.calls == [["sys", "q2"]]


async def test_a_message_waiting_after_a_wake_up_polls_the_log_at_its_pace() -> None:
    """Woken by an answer appended here, a message that must wait again (for another
    earlier one) waits for the next change or its next poll, not reading the log
    back to back for all of its order wait."""
    log, model = FakeLog(), FakeModel()
    q1, q2, q3 = msg("q1"), msg("q2"), msg("q3")
    s1, _, s3 = log.add(q1), log.add(q2), log.add(q3)
    h = handler(log, model, order_wait_s=0.3)
    later = asyncio.create_task(h.handle(q3, stream_seq=s3, num_delivered=1))
    await until(lambda: log.reads >= 2, timeout=10, what="q3 waiting for q1")
    assert await h.handle(q1, stream_seq=s1, num_delivered=1) == Ack()  # wakes q3
    reads = log.reads
    outcome = await later  # still waiting for q2, delivered nowhere
    assert isinstance(outcome, Nak) and "seq 2" in outcome.reason
    assert log.reads - reads < 100, f"{log.reads - reads} reads in 0.3 s"


async def test_a_stopping_handler_hands_back_what_has_not_asked_the_model() -> None:
    """On SIGTERM a message waiting for an earlier one (answered by another replica, or
    here, with the model for a while) is handed back at once; it waited, and asked the
    model once its turn came, past the stop, a call the grace could cut and that the
    replica taking it over paid again (found by an ops review: 26 calls for 20)."""
    log, gate = FakeLog(), asyncio.Event()
    model = FakeModel(gate)
    config = HandlerConfig(policy=ReplyPolicy(system_prompt="sys"), poll_first_s=0.005)
    other_replica = LlmHandler(log, model, config)
    stopping = asyncio.Event()
    h = LlmHandler(log, model, config, stopping=stopping)
    q1, q2, q3 = msg("q1"), msg("q2"), msg("q3")
    s1, s2, s3 = log.add(q1), log.add(q2), log.add(q3)
    first = asyncio.create_task(other_replica.handle(q1, stream_seq=s1, num_delivered=1))
    await until(lambda: len(model.calls) == 1, timeout=10, what="q1 at the model")
    waiting = asyncio.create_task(h.handle(q2, stream_seq=s2, num_delivered=1))
    await until(lambda: log.reads >= 3, timeout=10, what="q2 waiting for q1's outcome")
    stopping.set()
    async with asyncio.timeout(5):
        handed_back = await waiting
    assert isinstance(handed_back, HandBack) and handed_back.delay_s == 0
    gate.set()
    assert await first == Ack()
    # q2's turn has come, but this replica is stopping; q3 still waits for q2.
    for m, seq in ((q2, s2), (q3, s3)):
        later = await h.handle(m, stream_seq=seq, num_delivered=2, stored_at=time.time())
        assert isinstance(later, HandBack) and later.delay_s == 0
    assert model.calls == [["sys", "q1"]]
    assert await other_replica.handle(q2, stream_seq=s2, num_delivered=3) == Ack()
    assert model.calls[-1] == ["sys", "q1", "echo: q1", "q2"]


async def test_a_delivery_back_for_the_lock_after_a_conflict_waits_without_its_slot() -> None:
    """After an append conflict a delivery takes its conversation's lock again, just as
    it released it to another delivery of the user, woken but not run yet: the lock
    said unlocked, the first waited for it holding its slot, the other held the lock
    waiting for a slot, and with another user's long call in the last slot neither
    moved until that call ended (found by review: here it never ends)."""
    slots, lock, gauge = asyncio.Semaphore(2), asyncio.Lock(), metrics.WORKER_WAITING.labels("t")
    other_user_done, second_round = asyncio.Event(), asyncio.Event()
    first_round = asyncio.Event()

    def delivery() -> Delivery:
        return Delivery(
            event=msg("q"), stream_seq=1, num_delivered=1, subject="s", msg=None,  # type: ignore[arg-type]
            slot=Slot(slots, gauge),
        )  # fmt: skip

    waiters: list[Slot] = []

    async def conflicting() -> None:
        await slots.acquire()
        d, rounds = delivery(), 0
        while True:
            async with _locked(lock, d.idle, contended=True):
                if rounds == 0:
                    rounds += 1
                    first_round.set()
                    await until(
                        lambda: bool(waiters) and waiters[0].waiting and slots.locked(),
                        timeout=5,
                        what="the other delivery waiting for the lock, its slot taken",
                    )
                    continue  # the append conflicted: again, under the lock
                second_round.set()
                break
        assert d.slot is not None
        d.slot.give_back()

    async def waiting() -> None:
        await first_round.wait()
        await slots.acquire()
        d = delivery()
        assert d.slot is not None
        waiters.append(d.slot)
        async with _locked(lock, d.idle, contended=True):
            pass
        assert d.slot is not None
        d.slot.give_back()

    async def other_user() -> None:  # a long model call in the slot the waiter gave up
        await first_round.wait()
        await slots.acquire()
        await second_round.wait()
        slots.release()
        other_user_done.set()

    async with asyncio.timeout(5):
        await asyncio.gather(conflicting(), waiting(), other_user())
    assert other_user_done.is_set()


async def test_handler_skips_an_earlier_message_the_consumer_settled() -> None:
    log, model = FakeLog(), FakeModel()
    q1, q2 = msg("q1"), msg("q2")
    log.add(q1)
    s2 = log.add(q2)
    log.settled = 1  # q1 was dead-lettered: nobody will answer it
    assert await handler(log, model).handle(q2, stream_seq=s2, num_delivered=1) == Ack()
    assert model.calls == [["sys", "q2"]]


async def test_a_floor_from_before_the_stream_was_made_again_is_read_again() -> None:
    """The floor a replica learned outlived the stream: recreated, its sequences start
    over, and every later message at or under that floor skipped its wait for an
    earlier one (answered out of order, without the earlier turn). The floor is read
    again before it lets an earlier message go."""
    log, model = FakeLog(), FakeModel()
    h = handler(log, model, settled_refresh_s=0.0, order_wait_s=0.05)
    x1, x2 = msg("x1", user="x"), msg("x2", user="x")
    log.add(x1)
    sx2 = log.add(x2)
    log.settled = sx2  # x1 was dead-lettered: the replica learns the floor, 2
    assert await h.handle(x2, stream_seq=sx2, num_delivered=1) == Ack()
    log.recreate()
    log.settled = 0  # a new consumer: nothing settled yet
    q1, q2 = msg("first"), msg("second")
    log.add(q1)
    s2 = log.add(q2)
    outcome = await h.handle(q2, stream_seq=s2, num_delivered=1)
    assert isinstance(outcome, Nak) and "seq 1" in outcome.reason
    assert ["sys", "second"] not in model.calls


async def test_a_message_a_lagging_follower_cannot_show_yet_is_read_from_the_leader() -> None:
    """The catch-up's direct reads come from a stream follower that has not applied the
    earlier answer nor this message: the handler must not wait for it to catch up (it
    handed the message back after its order wait), but read the rest from the leader."""
    log, model = FakeLog(), FakeModel()
    q1, q2 = msg("q1"), msg("q2")
    log.add(q1)
    log.add(reply_to(q1, "a1"))
    s2 = log.add(q2)
    log.follower_at = 1
    h = handler(log, model, order_wait_s=0.05)
    assert await h.handle(q2, stream_seq=s2, num_delivered=1) == Ack()
    assert model.calls == [["sys", "q1", "a1", "q2"]]
    assert log.leader_reads == 1


async def test_a_conflict_a_lagging_follower_cannot_explain_is_read_from_the_leader() -> None:
    """Another replica answered the message while this one asked the model; the follower
    answering the catch-up has the message, not that answer. The refused append must
    be followed by a read that shows it (not a rebuild and the same conflict again,
    until the delivery is handed back)."""
    log = FakeLog()
    q = msg("q")
    seq = log.add(q)
    log.follower_at = seq

    class _Racing(FakeModel):
        async def complete(self, messages: Sequence[ChatMessage]) -> Completion:
            log.add(reply_to(q, "theirs"))  # the other replica's answer lands meanwhile
            return await super().complete(messages)

    h = handler(log, _Racing())
    assert await h.handle(q, stream_seq=seq, num_delivered=2) == Ack()
    assert [o.text for o in log.outcomes() if isinstance(o, ReplyGenerated)] == ["theirs"]
    assert log.leader_reads == 1


async def test_handler_keeps_the_answer_when_the_append_fails() -> None:
    log, model = FakeLog(), FakeModel()
    q = msg("q")
    seq = log.add(q)
    log.unavailable = 1
    h = handler(log, model)
    assert isinstance(await h.handle(q, stream_seq=seq, num_delivered=1), Nak)
    assert await h.handle(q, stream_seq=seq, num_delivered=2) == Ack()
    assert len(model.calls) == 1  # the redelivery reused the computed answer
    assert [o.causation_id for o in log.outcomes()] == [q.event_id]


async def test_handler_rebuilds_a_conversation_whose_answer_aged_out_of_the_log() -> None:
    """The cached entry expects the llm branch to end at a1; once the stream's max age
    drops q1 and a1, that expectation can never match. It used to conflict on every
    try (the model asked again each time), dead-letter the message, and wedge every
    later message of the user until a restart."""
    log, model = FakeLog(), FakeModel()
    h = handler(log, model)
    q1 = msg("q1")
    s1 = log.add(q1)
    assert await h.handle(q1, stream_seq=s1, num_delivered=1) == Ack()
    assert await h.handle(q1, stream_seq=s1, num_delivered=2) == Ack()  # the entry reads a1
    log.settled = s1  # the consumer acked q1
    log.expire(through_seq=max(s.seq for _, s in log.events))  # q1 and a1 age out
    q2 = msg("q2")
    s2 = log.add(q2)
    assert await h.handle(q2, stream_seq=s2, num_delivered=1) == Ack()
    # Asked from the entry (q1 still in it), refused by the log, rebuilt, asked again:
    # the answer stored is the one without the turns the log no longer has.
    assert model.calls[1:] == [["sys", "q1", "echo: q1", "q2"], ["sys", "q2"]]
    assert [o.causation_id for o in log.outcomes()] == [q2.event_id]


async def test_an_earlier_message_answered_after_a_later_one_does_not_see_it() -> None:
    """E's model call is slow on one replica; L, on its last delivery, is answered on
    another without waiting. E's append then conflicts and E is asked again: its past is
    what was asked before it, not L's exchange placed before its own question."""
    log, gate = FakeLog(), asyncio.Event()
    slow, fast = FakeModel(gate), FakeModel()
    e, later = msg("E"), msg("L")
    se, sl = log.add(e), log.add(later)
    first = asyncio.create_task(handler(log, slow).handle(e, stream_seq=se, num_delivered=1))
    await until(lambda: slow.calls != [], timeout=10, what="E at the model")
    answered = await handler(log, fast).handle(
        later, stream_seq=sl, num_delivered=10, last_try=True
    )
    assert answered == Ack()
    slow.gate = None
    gate.set()
    assert await first == Ack()
    assert fast.calls == [["sys", "L"]]
    assert slow.calls == [["sys", "E"], ["sys", "E"]]  # asked again after the conflict
    assert {o.causation_id for o in log.outcomes()} == {e.event_id, later.event_id}


async def test_a_replayed_message_is_asked_with_its_own_past_only() -> None:
    """E was dead-lettered, L answered, then an operator replays E (a second copy, later
    in the log): E keeps its place, and L is not its history."""
    log, model = FakeLog(), FakeModel()
    e, later = msg("E"), msg("L")
    se, sl = log.add(e), log.add(later)
    log.settled = se
    assert await handler(log, model).handle(later, stream_seq=sl, num_delivered=1) == Ack()
    copy = log.add(e)
    assert await handler(log, model).handle(e, stream_seq=copy, num_delivered=1) == Ack()
    assert model.calls == [["sys", "L"], ["sys", "E"]]


async def test_turns_the_stream_has_aged_out_leave_the_prompt_of_a_cached_conversation() -> None:
    """The entry of an active conversation is never idle long enough to be rebuilt, so
    it kept turns WECOMBOT_HISTORY_MAX_AGE had dropped from the log: sent to the model
    again, and a prompt other replicas (reading the log) would not build."""
    log, model = FakeLog(), FakeModel()
    cfg = HandlerConfig(policy=ReplyPolicy(system_prompt="sys", history_max_age_s=3600))
    h = LlmHandler(log, model, cfg)
    now = datetime.now(UTC)
    for text, minutes_ago in (("old", 90), ("recent", 30), ("now", 0)):
        m = msgspec.structs.replace(msg(text), occurred_at=now - timedelta(minutes=minutes_ago))
        assert await h.handle(m, stream_seq=log.add(m), num_delivered=1) == Ack()
    assert model.calls[-1] == ["sys", "recent", "echo: recent", "now"]


async def test_a_message_behind_the_cached_sequence_is_answered_after_a_recreated_stream() -> None:
    """The stream was recreated (sequences from 1 again) while a replica kept its cache:
    a new message stored at a seq the entry had read past looked answered long ago and
    was acknowledged with no answer, silently, until the entry was dropped."""
    log, model = FakeLog(), FakeModel()
    h = handler(log, model)
    for text in ("q1", "q2", "q3"):
        m = msg(text)
        assert await h.handle(m, stream_seq=log.add(m), num_delivered=1) == Ack()
    log.recreate()
    q4 = msg("q4")
    assert await h.handle(q4, stream_seq=log.add(q4), num_delivered=1) == Ack()
    assert [o.causation_id for o in log.outcomes()] == [q4.event_id]
    assert model.calls[-1] == ["sys", "q4"]


async def test_no_message_is_lost_however_often_the_stream_is_recreated() -> None:
    """The fresh read for a message behind the cached sequence was made once per entry:
    a stream recreated a second time in the entry's life (or once, after a consumer's
    replay had used that read up) had its next message acknowledged with no answer."""
    log, model = FakeLog(), FakeModel()
    h = handler(log, model)
    asked = []
    for incarnation in range(3):
        for i in range(3 - incarnation):
            m = msg(f"q{incarnation}.{i}")
            asked.append(m)
            seq = log.add(m)
            outcome = await h.handle(
                m, stream_seq=seq, num_delivered=1, stored_at=log.stored_at[seq]
            )
            assert outcome == Ack()
        answered = {o.causation_id for o in log.outcomes()}
        assert answered == {m.event_id for m in asked[-(3 - incarnation) :]}
        log.recreate()
    assert [call[-1] for call in model.calls] == [
        f"q{n}.{i}" for n in range(3) for i in range(3 - n)
    ]


async def test_a_recent_message_a_fresh_read_cannot_place_is_read_for_once() -> None:
    """Stored a moment ago, read past, not remembered (remembering one settled message,
    and a later one settled since): the fresh read finds it no more than the cache did,
    and the handler must not read the log again and again."""
    log, model = FakeLog(), FakeModel()
    policy = ReplyPolicy(system_prompt="sys", user_rate_per_minute=0)
    h = LlmHandler(log, model, HandlerConfig(policy=policy, remember_answered=1))
    q1, q2 = msg("q1"), msg("q2")
    s1, s2 = log.add(q1), log.add(q2)
    for m, seq in ((q1, s1), (q2, s2)):
        assert await h.handle(m, stream_seq=seq, num_delivered=1) == Ack()
    log.reads = 0
    async with asyncio.timeout(5):
        redelivered = await h.handle(q1, stream_seq=s1, num_delivered=2, stored_at=time.time())
    assert redelivered == Ack()
    assert log.reads <= 3, "the log was read again and again"
    assert len(model.calls) == 2


async def test_messages_answered_long_ago_are_not_answered_again_nor_reread_each() -> None:
    """Redelivered past what the fold remembers settling (a consumer made again replays
    the stream from its start): one fresh read of the log finds them answered, once for
    the conversation, not once per message (that was quadratic in a long history)."""
    log, model = FakeLog(), FakeModel()
    policy = ReplyPolicy(system_prompt="sys", user_rate_per_minute=0)
    h = LlmHandler(log, model, HandlerConfig(policy=policy, remember_answered=1))
    asked = [msg(f"q{i}") for i in range(30)]
    an_hour_ago = time.time() - 3600
    seqs = [log.add(m, stored_at=an_hour_ago) for m in asked]
    for m, seq in zip(asked, seqs, strict=True):
        assert await h.handle(m, stream_seq=seq, num_delivered=1) == Ack()
    events = len(log.events)  # 30 messages, 30 answers
    log.events_read = 0
    for m, seq in zip(asked, seqs, strict=True):
        redelivered = await h.handle(m, stream_seq=seq, num_delivered=2, stored_at=an_hour_ago)
        assert redelivered == Ack()
    assert len(model.calls) == 30 and len(log.outcomes()) == 30
    assert log.events_read < 2 * events, "the conversation was read again per message"


async def test_an_answer_cut_off_at_the_output_limit_says_so() -> None:
    class CutOff:
        async def complete(self, messages: Sequence[ChatMessage]) -> Completion:
            return Completion(text="第一步：打开设置。第二步：点", finish_reason="length")

    log = FakeLog()
    q = msg("how?")
    h = LlmHandler(log, CutOff(), HandlerConfig(policy=ReplyPolicy()))
    with capture_logs() as logs:
        assert await h.handle(q, stream_seq=log.add(q), num_delivered=1) == Ack()
    [outcome] = log.outcomes()
    assert isinstance(outcome, ReplyGenerated) and outcome.kind == "answer"
    assert outcome.text == "第一步：打开设置。第二步：点" + CUT_OFF_NOTE
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["llm.answer_cut_off"]


async def test_an_answer_too_long_for_an_event_is_cut_and_says_so() -> None:
    """A 1.2 MB answer made an event over NATS's max_payload: every delivery of its
    message failed to append, until it was dead-lettered, and the user got nothing."""
    huge = "答案😀" * 200_000  # 2.2 MB in UTF-8, an emoji at each cut point

    class Verbose:
        async def complete(self, messages: Sequence[ChatMessage]) -> Completion:
            return Completion(text=huge, finish_reason="length")

    log = FakeLog()
    q = msg("tell me everything")
    h = LlmHandler(log, Verbose(), HandlerConfig(policy=ReplyPolicy()))
    with capture_logs() as logs:
        assert await h.handle(q, stream_seq=log.add(q), num_delivered=1) == Ack()
    [outcome] = log.outcomes()
    assert isinstance(outcome, ReplyGenerated) and outcome.text.endswith(TOO_LONG_NOTE)
    kept = outcome.text.removesuffix(TOO_LONG_NOTE)
    assert huge.startswith(kept) and MAX_ANSWER_BYTES - 4 < len(kept.encode()) <= MAX_ANSWER_BYTES
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["llm.answer_too_long"]


async def test_handler_ignores_events_that_need_no_outcome() -> None:
    log, model = FakeLog(), FakeModel()
    event = msg(payload=WeComEventPayload(event="subscribe"))
    seq = log.add(event)
    assert await handler(log, model).handle(event, stream_seq=seq, num_delivered=1) == Ack()
    assert log.outcomes() == []


async def test_handler_turns_a_model_failure_into_the_apology() -> None:
    class Broken:
        async def complete(self, messages: Sequence[ChatMessage]) -> Completion:
            raise ModelUnavailable("HTTP 503 (gave up after 4 attempts)", attempts=4)

    log = FakeLog()
    q = msg("q")
    seq = log.add(q)
    cfg = HandlerConfig(policy=ReplyPolicy(apology_message="sorry!"))
    assert await LlmHandler(log, Broken(), cfg).handle(q, stream_seq=seq, num_delivered=1) == Ack()
    (failed,) = log.outcomes()
    assert isinstance(failed, ReplyFailed)
    assert (failed.text, failed.attempts) == ("sorry!", 4)
    assert "HTTP 503" in failed.reason


@pytest.mark.parametrize(
    ("error", "level", "setting"),
    [
        (ModelRejected("HTTP 401: bad key", attempts=1, setting="OPENAI_API_KEY"), "error", True),
        (ModelRejected("HTTP 400: context too long", attempts=1), "warning", False),
        (ModelUnavailable("HTTP 503 (gave up after 4 attempts)", attempts=4), "warning", False),
    ],
    ids=["our key refused", "this request refused", "provider away"],
)
async def test_a_model_refusal_of_our_configuration_is_an_error_naming_the_setting(
    error: ModelRejected | ModelUnavailable, level: str, setting: bool
) -> None:
    """A refused key fails every message alike, each answered with the apology; the
    warning said "HTTP 401" and nothing of OPENAI_API_KEY."""

    class Refusing:
        async def complete(self, messages: Sequence[ChatMessage]) -> Completion:
            raise error

    log = FakeLog()
    q = msg("q")
    seq = log.add(q)
    llm = LlmHandler(log, Refusing(), HandlerConfig(policy=ReplyPolicy()))
    with capture_logs() as logs:
        await llm.handle(q, stream_seq=seq, num_delivered=1)
    [failed] = [e for e in logs if e["event"] == "llm.model_failed"]
    assert failed["log_level"] == level
    assert failed.get("setting") == ("OPENAI_API_KEY" if setting else None)


# ---------------------------------------------------------------- flood control, allowlist


def at(text: str, create_time: int, *, user: str = USER) -> MessageReceived:
    """A text message with its WeCom CreateTime (the gate's only clock)."""
    return msgspec.structs.replace(msg(text, user=user), create_time=create_time)


def verdicts(gate: Gate, times: list[int], *, user: str = USER) -> list[str]:
    return [gate.verdict(user, at=t, is_event=False).name for t in times]


@pytest.mark.parametrize(
    ("rate", "times", "expected"),
    [
        (3, [0, 1, 2, 3, 4, 5], "AAAFSS"),  # A admit, F flood notice, S silent
        # The window slides with the messages' own times: 60 s after the first, room again.
        (2, [0, 30, 59, 60, 61, 89, 91], "AAFASSA"),
        # At most one notice per window: the next one only 60 s after the last notice.
        (1, [0, 1, 30, 61, 62, 121], "AFSAFA"),
        (0, list(range(100)), "A" * 100),  # 0: flood control off
    ],
)
def test_gate_admits_the_rate_then_one_notice_then_silence(
    rate: int, times: list[int], expected: str
) -> None:
    got = verdicts(Gate(GatePolicy(rate_per_minute=rate)), times)
    assert "".join(v[0] for v in got) == expected


def test_gate_never_counts_events_and_notices_do_not_use_up_the_rate() -> None:
    gate = Gate(GatePolicy(rate_per_minute=1))
    assert [gate.verdict(USER, at=t, is_event=True).name for t in (0, 86_400)] == ["ADMIT"] * 2
    assert verdicts(gate, [0, 1, 2, 60]) == ["ADMIT", "FLOOD_NOTICE", "SILENT", "ADMIT"]


def test_a_menu_click_runs_its_command_as_typed_and_counts_as_a_message() -> None:
    """A click on a custom-menu item whose key is /reset or /help got nothing (events are
    not answered): it clears the memory or shows the help, each click, as typing it
    does, and counts against the user's rate as a message (the welcome goes once a day,
    a click that did so would answer once)."""
    q0, q1 = msg("q0"), msg("q1")
    click_reset = msg(payload=WeComEventPayload(event="click", event_key="/reset"))
    helps = [msg(payload=WeComEventPayload(event="click", event_key="/HELP")) for _ in range(2)]
    needs = lambda m: requires_outcome(m)  # noqa: E731 (no welcome configured)
    conv = fold(stored(q0, reply_to(q0, "a0"), click_reset, *helps), needs)
    assert set(conv.awaiting) == {click_reset.event_id, *(h.event_id for h in helps)}
    policy = ReplyPolicy()
    reset = decide(click_reset, conv, policy, now=0.0)
    assert isinstance(reset, Reply) and isinstance(reset.outcome, ConversationReset)
    assert reset.outcome.text == RESET_TEXT
    assert reset.outcome.event_id == derived_id(click_reset.event_id, "outcome")
    for h in helps:
        helped = decide(h, conv, policy, now=0.0)
        assert isinstance(helped, Reply) and isinstance(helped.outcome, ReplyGenerated)
        assert (helped.outcome.kind, helped.outcome.text) == ("notice", HELP_TEXT)
    after = fold(stored(q0, reply_to(q0, "a0"), click_reset, reset.outcome, q1), needs)
    asked = decide(q1, after, policy, now=0.0)
    assert isinstance(asked, AskModel)
    assert [m.content for m in asked.messages][-1:] == ["q1"]  # q0 forgotten
    assert "q0" not in [m.content for m in asked.messages]
    # Counted against the rate: the second of two clicks within the minute is told.
    flooded = fold(stored(*helps), needs, gate=GatePolicy(rate_per_minute=1))
    assert [flooded.verdict(h.event_id) for h in helps] == [Verdict.ADMIT, Verdict.FLOOD_NOTICE]


def test_the_welcome_goes_once_a_day_however_often_the_app_is_opened() -> None:
    """WeCom sends enter_agent each time a member opens the app: each got the welcome,
    a message against the member's limits, five in five minutes."""
    gate = Gate(GatePolicy(rate_per_minute=10))
    opened = [1000, 1060, 1200, 50_000, 1000 + 86_399, 1000 + 86_400, 90_000]
    got = [gate.verdict(USER, at=t, is_event=True).name for t in opened]
    assert got == ["ADMIT", "SILENT", "SILENT", "SILENT", "SILENT", "ADMIT", "SILENT"]
    event = WeComEventPayload(event="enter_agent")
    entries = [msgspec.structs.replace(msg(payload=event), create_time=t) for t in (0, 300)]
    conv = fold(stored(*entries), lambda m: requires_outcome(m, welcome=True))
    assert list(conv.awaiting) == [entries[0].event_id]
    assert conv.verdict(entries[1].event_id) is Verdict.SILENT


def test_gate_memory_stays_small_after_a_createtime_from_the_future() -> None:
    """One skewed CreateTime kept as the newest stopped all pruning: the list grew with
    every message for the life of the conversation (and each verdict summed over it)."""
    gate = Gate(GatePolicy(rate_per_minute=2))
    gate.verdict(USER, at=99_999_999_999, is_event=False)
    times = [1_700_000_000 + 20 * i for i in range(20_000)]
    admitted = [at for at, v in zip(times, verdicts(gate, times), strict=True) if v == "ADMIT"]
    assert gate.remembered <= 2 * 10 * 3  # the memory of a few windows, not 20,001
    # ... and pruning forgets only what is out of the window: never 3 admitted in 60 s.
    assert len(admitted) > 1000
    assert all(b - a >= 60 for a, b in zip(admitted, admitted[2:], strict=False))


def test_gate_judges_a_message_ten_minutes_older_than_the_newest_exactly() -> None:
    """A WeCom retry after an outage arrives late: 590 s older than the newest, 20 s
    after one admitted. The memory had pruned that one (600 s from the newest)."""
    gate = Gate(GatePolicy(rate_per_minute=1))
    assert verdicts(gate, [10, 620, 30]) == ["ADMIT", "ADMIT", "FLOOD_NOTICE"]


def test_gate_windows_are_symmetric_for_a_message_older_than_the_last() -> None:
    """CreateTimes need not arrive in order: a message from a minute and more before the
    ones judged so far is judged by its own window, admitted and told as in order."""
    gate = Gate(GatePolicy(rate_per_minute=1))
    # 100 s before the admitted one: its own window is empty; then that window's flood
    # gets its own notice, 100 s before the later notice.
    assert verdicts(gate, [200, 201, 100, 101, 102]) == [
        "ADMIT", "FLOOD_NOTICE", "ADMIT", "FLOOD_NOTICE", "SILENT",
    ]  # fmt: skip
    day = 86_400
    welcome = Gate(GatePolicy())
    opened = [2 * day, 0, 10]  # a day before the welcome: welcomed that day too
    assert [welcome.verdict(USER, at=t, is_event=True).name for t in opened] == [
        "ADMIT", "ADMIT", "SILENT",
    ]  # fmt: skip


def test_gate_refuses_users_off_the_allowlist_once_a_day() -> None:
    policy = GatePolicy(rate_per_minute=10, allowed_users=frozenset({"boss@corp", "zhang.san"}))
    gate = Gate(policy)
    day = 86_400
    assert verdicts(gate, [0, 5, day - 1, day, day + 1], user="intruder") == [
        "REFUSAL_NOTICE", "SILENT", "SILENT", "REFUSAL_NOTICE", "SILENT",
    ]  # fmt: skip
    assert gate.verdict("intruder", at=day + 2, is_event=True) is Verdict.SILENT  # no welcome
    # An outsider opening the app gets no welcome, nor the refusal: their first message does.
    opened_first = Gate(policy)
    assert opened_first.verdict("intruder", at=0, is_event=True) is Verdict.SILENT
    assert verdicts(opened_first, [1], user="intruder") == ["REFUSAL_NOTICE"]
    assert policy.allows("Zhang.San") and policy.allows("BOSS@corp")  # WeCom: case-insensitive
    assert not policy.allows("zhang.sa") and GatePolicy().allows("anyone")


def gated_handler(log: FakeLog, model: FakeModel, **policy: object) -> LlmHandler:
    reply = ReplyPolicy(system_prompt="sys", **policy)  # type: ignore[arg-type]
    return LlmHandler(log, model, HandlerConfig(policy=reply, poll_first_s=0.005))


def test_the_fold_gives_each_message_its_verdict_in_stream_order() -> None:
    policy = GatePolicy(rate_per_minute=2)
    messages = [at(f"q{i}", 1000 + i) for i in range(5)]
    conv = fold(stored(*messages), always, gate=policy)
    ids = [m.event_id for m in messages]
    assert [conv.verdict(i).name for i in ids] == [
        "ADMIT", "ADMIT", "FLOOD_NOTICE", "SILENT", "SILENT",
    ]  # fmt: skip
    # Silenced messages are settled: they block nobody and are never answered.
    assert list(conv.awaiting) == ids[:3]
    assert plan(conv, ids[3], 4, settled_through=0) == Done()
    assert plan(conv, ids[4], 5, settled_through=0) == Done()
    assert plan(conv, ids[2], 3, settled_through=0) == Blocked(ids[0], 1)


def test_a_flood_notice_and_a_refusal_never_ask_the_model() -> None:
    flood = [at(f"q{i}", 7) for i in range(3)]
    conv = fold(stored(*flood), always, gate=GatePolicy(rate_per_minute=2))
    action = decide(flood[2], conv, ReplyPolicy(user_rate_per_minute=2), now=0.0)
    assert isinstance(action, Reply) and isinstance(action.outcome, ReplyGenerated)
    assert action.outcome.kind == "notice" and "2" in action.outcome.text
    assert action.outcome.event_id == derived_id(flood[2].event_id, "outcome")
    outsider = at("/help", 7, user="intruder")
    conv = fold(stored(outsider), always, gate=GatePolicy(allowed_users=frozenset({"boss"})))
    refusal = decide(outsider, conv, ReplyPolicy(), now=0.0)
    assert isinstance(refusal, Reply) and isinstance(refusal.outcome, ReplyGenerated)
    assert (refusal.outcome.kind, refusal.outcome.text) == ("notice", REFUSAL_TEXT)


@given(
    times=st.lists(st.integers(0, 500), max_size=40),  # within the gate's exact memory
    rate=st.integers(1, 5),
    cut=st.integers(0, 40),
)
def test_verdicts_are_the_same_however_the_log_is_read(
    times: list[int], rate: int, cut: int
) -> None:
    """A replica folding the whole log and one catching up in two reads (a cache that
    was filled earlier) reach the same verdicts; and no window ever admits more than
    the rate."""
    policy = GatePolicy(rate_per_minute=rate)
    events = stored(*(at(f"m{i}", t) for i, t in enumerate(times)))
    whole = fold(events, always, gate=policy)
    caught_up = fold(events[:cut], always, gate=policy)
    for s in events[cut:]:
        caught_up.apply(s)
    ids = [s.event.event_id for s in events]
    assert [whole.verdict(i) for i in ids] == [caught_up.verdict(i) for i in ids]
    admitted = [t for t, i in zip(times, ids, strict=True) if whole.verdict(i) is Verdict.ADMIT]
    for t in admitted:
        assert sum(1 for u in admitted if t <= u < t + 60) <= rate


async def test_handler_over_the_rate_answers_the_rate_then_one_notice_then_nothing() -> None:
    log, model = FakeLog(), FakeModel()
    messages = [at(f"q{i}", 1000) for i in range(6)]
    seqs = [log.add(m) for m in messages]
    h = gated_handler(log, model, user_rate_per_minute=3)
    for m, seq in zip(messages, seqs, strict=True):
        assert await h.handle(m, stream_seq=seq, num_delivered=1) == Ack()
    assert len(model.calls) == 3
    outcomes = log.outcomes()
    assert [o.causation_id for o in outcomes] == [m.event_id for m in messages[:4]]
    assert [o.kind for o in outcomes if isinstance(o, ReplyGenerated)] == ["answer"] * 3 + [
        "notice"
    ]
    # Another replica (a fresh cache) agrees: the silenced ones stay silent.
    other = gated_handler(log, model, user_rate_per_minute=3)
    assert await other.handle(messages[5], stream_seq=seqs[5], num_delivered=2) == Ack()
    assert len(log.outcomes()) == 4 and len(model.calls) == 3


async def test_handler_refuses_a_user_off_the_allowlist_without_the_model() -> None:
    log, model = FakeLog(), FakeModel()
    messages = [at(f"q{i}", 1000 + i, user="intruder") for i in range(3)]
    h = gated_handler(log, model, allowed_users=frozenset({"boss"}))
    for m in messages:
        assert await h.handle(m, stream_seq=log.add(m), num_delivered=1) == Ack()
    [refusal] = log.outcomes()
    assert isinstance(refusal, ReplyGenerated) and refusal.text == REFUSAL_TEXT
    assert model.calls == []


def test_settings_of_the_gate() -> None:
    default = LlmSettings.from_env({}).policy
    assert (default.user_rate_per_minute, default.allowed_users) == (10, None)
    assert default.gate == GatePolicy(rate_per_minute=10)
    policy = LlmSettings.from_env(
        {"LLM_USER_RATE_PER_MINUTE": "0", "LLM_ALLOWED_USERS": " Zhang.San, boss@corp ,"}
    ).policy
    assert policy.user_rate_per_minute == 0
    assert policy.allowed_users == frozenset({"zhang.san", "boss@corp"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LLM_USER_RATE_PER_MINUTE": "-1"}, "LLM_USER_RATE_PER_MINUTE"),
        ({"LLM_USER_RATE_PER_MINUTE": "ten"}, "LLM_USER_RATE_PER_MINUTE"),
        ({"LLM_ALLOWED_USERS": "ok.user, -bad"}, "LLM_ALLOWED_USERS"),
        ({"LLM_ALLOWED_USERS": " , "}, "LLM_ALLOWED_USERS names no UserID"),
    ],
)
def test_gate_settings_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LlmSettings.from_env(env)


# ---------------------------------------------------------------- proxy from the environment


def _model_proxy(url: str, **environ: str) -> httpx.Proxy | None:
    """The proxy the llm's model calls take, read with its settings from ``environ``."""
    env = EnvReader({"OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": url, **environ})
    model = ModelSettings.read(env, max_concurrency=1)
    env.raise_if_invalid()
    return httpx_proxy(model.proxy)


def test_the_model_proxy_follows_the_scheme_of_the_model_url() -> None:
    proxies = {"HTTPS_PROXY": "http://egress.corp:3128", "HTTP_PROXY": "http://plain.corp:3128"}
    https = _model_proxy("https://api.openai.com/v1", **proxies)
    plain = _model_proxy("http://vllm.internal:8000/v1", **proxies)
    assert https is not None and str(https.url) == "http://egress.corp:3128"
    assert plain is not None and str(plain.url) == "http://plain.corp:3128"


def test_the_model_proxy_falls_back_to_all_proxy_and_keeps_credentials_apart() -> None:
    proxy = _model_proxy("https://api.deepseek.com/v1", ALL_PROXY="http://user:pw@egress:3128")
    assert proxy is not None and proxy.auth == ("user", "pw")
    assert "pw" not in str(proxy.url)
    settings = ModelSettings.read(
        EnvReader({"OPENAI_API_KEY": "k", "ALL_PROXY": "http://user:pw@egress:3128"}),
        max_concurrency=1,
    )
    assert "pw" not in repr(settings)  # a Secret


def test_no_proxy_and_no_setting_mean_a_direct_connection() -> None:
    assert _model_proxy("https://api.openai.com/v1") is None
    proxies = {"HTTPS_PROXY": "http://egress.corp:3128", "NO_PROXY": "localhost,.internal"}
    assert _model_proxy("https://vllm.internal/v1", **proxies) is None
    assert _model_proxy("https://api.openai.com/v1", **proxies) is not None
    assert _model_proxy("http://127.0.0.1:11434/v1", **proxies) is None  # a local Ollama


def test_the_model_proxy_without_a_scheme_is_http() -> None:
    proxy = _model_proxy("https://api.openai.com/v1", HTTPS_PROXY="egress.corp:3128")
    assert proxy is not None and str(proxy.url) == "http://egress.corp:3128"


def test_a_proxy_the_model_calls_cannot_use_is_refused_with_the_settings() -> None:
    with pytest.raises(ConfigError, match="socks5:// proxy") as info:
        _model_proxy("https://api.openai.com/v1", ALL_PROXY="socks5://user:secret-pw@e:1080")
    assert "secret-pw" not in str(info.value)
    offline = EnvReader({"ALL_PROXY": "socks5://egress:1080"})
    ModelSettings.read(offline, max_concurrency=1)
    assert offline.problems == []  # the offline model calls nothing


def _conversation_of(
    turns: int, chars: int, *, keep: int = 1000, refused: bool = False
) -> Conversation:
    """``refused``: WeCom refused each answer for good, no part delivered (``unseen``)."""
    conv = Conversation(needs_outcome=always, keep_turns=keep)
    seq = 0
    for i in range(turns):
        m = msg(f"{'问' * chars}{i}")
        conv.apply(StoredEvent(seq := seq + 1, m))
        answer = reply_to(m, "答" * chars)
        conv.apply(StoredEvent(seq := seq + 1, answer))
        if refused:
            gone = _delivery(DeliveryFailed, answer, errcode=81013, reason="x", parts_delivered=0)
            # as a read yields it: decoded from the log, its reply_id a string of its own
            conv.apply(StoredEvent(seq := seq + 1, decode_event(encode_event(gone))))
    return conv


def test_the_cache_keeps_to_its_byte_budget_dropping_the_least_recently_used() -> None:
    """Bounded by count alone, 10,000 conversations of 20 long turns (≈ 40 KB each) took
    a replica to ≈ 400 MiB, past its pod's limit."""
    from wecombot_common.topology import ConversationRef
    from wecombot_llm.cache import ConversationCache

    size = _conversation_of(20, 600).approx_bytes()
    assert 30_000 < size < 80_000
    cache = ConversationCache(
        lambda: _conversation_of(20, 600), capacity=10_000, max_bytes=int(size * 3.5)
    )
    convs = [ConversationRef("ww1-1", f"user{i}") for i in range(6)]
    held = cache.get(convs[0])
    with held.handling("in use"):
        for conv in convs[1:]:
            cache.get(conv)
            cache.used(conv)
        cache.used(convs[0])
        assert cache.bytes <= size * 3.5
        assert len(cache) == 3  # the one in use, and the two most recently used
        assert cache.get(convs[0]) is held  # in use: never dropped
    kept = cache.get(convs[5])
    cache.used(convs[5])
    assert cache.get(convs[5]) is kept
    assert cache.bytes == sum(e.size for e in [held, kept, cache.get(convs[4])])


def test_the_cache_counts_what_many_small_conversations_really_hold() -> None:
    """Counted by their folds alone, 5,000 one-message users held 1.34 times the budget:
    the entry around each fold (its lock, counters, key) was not counted."""
    import tracemalloc

    from wecombot_common.topology import ConversationRef
    from wecombot_llm.cache import ConversationCache

    cache = ConversationCache(lambda: _conversation_of(0, 0), capacity=100_000, max_bytes=None)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(5000):
            conv = ConversationRef("ww1-1", f"user{i}")
            cache.get(conv)
            cache.used(conv)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert 0.85 < cache.bytes / held < 1.25, (cache.bytes, held)


@pytest.mark.parametrize(
    ("turns", "waiting", "chars", "keep", "refused"),
    [
        (0, 0, 0, 20, False),
        (1, 0, 5, 20, False),
        (20, 0, 5, 20, False),
        (20, 0, 3000, 20, False),
        (5, 20, 300, 20, False),
        (0, 100, 30, 20, False),
        (1200, 3, 30, 20, False),
        (3000, 0, 30, 20, False),  # settled at its cap of 1,000 long enough to grow
        (20, 0, 5, 20, True),  # every answer refused for good: all unseen
        (20, 0, 300, 20, True),
        (400, 0, 5, 400, True),
    ],
)
def test_a_conversation_counts_what_it_holds(
    turns: int, waiting: int, chars: int, keep: int, refused: bool
) -> None:
    """The llm cache's byte budget (LLM_CACHE_MB) is kept by these counts. A fixed size
    per settled id counted a conversation past 1,500 messages 10 % under what it held,
    and a short one 20 % over. One whose answers were all refused (``unseen``) was
    counted 11-16 % under: the set kept its own copy of each reply's id, uncounted."""
    import gc
    import tracemalloc

    def build() -> Conversation:
        conv = _conversation_of(turns, chars, keep=keep, refused=refused)
        seq = conv.last_seq
        for i in range(waiting):
            conv.apply(StoredEvent(seq := seq + 1, msg(f"{'问' * chars}w{i}")))
        return conv

    copies = 10 if turns < 1000 else 2  # what one-off allocations add is spread out
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        convs = [build() for _ in range(copies)]
        gc.collect()
        held = (tracemalloc.get_traced_memory()[0] - before) / copies
    finally:
        tracemalloc.stop()
    assert all(len(conv.awaiting) == waiting for conv in convs)
    counted = convs[0].approx_bytes()
    assert 0.94 < counted / held < 1.06, (counted, held)


def test_a_cached_conversation_idle_past_max_idle_is_rebuilt_from_the_log() -> None:
    """Kept forever, its turns outlived the stream's retention: the replica holding it
    prompted with exchanges a restarted replica (rebuilding from the log) no longer had."""
    from wecombot_common.topology import ConversationRef
    from wecombot_llm.cache import ConversationCache

    now = [0.0]
    cache = ConversationCache(
        lambda: Conversation(needs_outcome=always),
        capacity=10,
        max_idle_s=3600.0,
        clock=lambda: now[0],
    )
    conv = ConversationRef("ww1-1", "idle.user")
    first = cache.get(conv)
    now[0] = 3000.0
    assert cache.get(conv) is first  # used again within the hour: the same entry
    now[0] = 3000.0 + 3601.0
    with first.handling("busy"):
        assert cache.get(conv) is first  # in use: never dropped
    now[0] = 3000.0 + 3601.0 + 3601.0
    assert cache.get(conv) is not first  # idle past max_idle: rebuilt from the log


def test_the_cache_drops_the_conversation_used_least_recently_not_the_first_cached() -> None:
    """A user who writes all day keeps their conversation: one read more recently
    than another outlives it, however long ago it was first cached."""
    from wecombot_common.topology import ConversationRef
    from wecombot_llm.cache import ConversationCache

    cache = ConversationCache(lambda: _conversation_of(0, 0), capacity=2, max_bytes=None)
    busy, quiet, new = (ConversationRef("ww1-1", u) for u in ("busy", "quiet", "new"))
    kept = cache.get(busy)
    cache.used(busy)
    dropped = cache.get(quiet)
    cache.used(quiet)
    assert cache.get(busy) is kept  # used again: now the most recent
    cache.used(busy)
    cache.get(new)
    cache.used(new)
    assert cache.get(busy) is kept
    assert cache.get(quiet) is not dropped


def test_a_miss_in_a_full_cache_drops_the_oldest_idle_entry_without_copying_the_cache() -> None:
    """Each miss of a full cache copied every entry to find its victim: 10,000 tuples
    that lived long enough to reach the oldest GC generation, so full collections ran
    every few misses (the llm's CPU per message 2.6 → 11.7 ms once 10,000 users wrote)."""
    import tracemalloc

    from wecombot_common.topology import ConversationRef
    from wecombot_llm.cache import ConversationCache

    cache = ConversationCache(lambda: _conversation_of(0, 0), capacity=10_000, max_bytes=None)
    convs = [ConversationRef("ww1-1", f"user{i}") for i in range(10_001)]
    for conv in convs[:10_000]:
        cache.get(conv)
        cache.used(conv)
    busy = cache.get(convs[0])
    second = cache.get(convs[1])
    for conv in convs[1:10_000]:
        cache.get(conv)  # convs[0] the oldest again, then convs[1]
    with busy.handling("in use"):
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            cache.get(convs[10_000])
            peak = tracemalloc.get_traced_memory()[1] - before
        finally:
            tracemalloc.stop()
        assert len(cache) == 10_000
        assert cache.get(convs[0]) is busy  # in use: stays
    assert cache.get(convs[1]) is not second  # the oldest idle one went
    assert peak < 50_000, f"{peak} bytes allocated to evict one entry"


async def test_an_answer_kept_for_a_redelivery_another_replica_answered_is_let_go() -> None:
    """An outcome whose append the broker did not confirm is kept for the redelivery;
    once the llm branch has moved on, it can never be reused (it is only while the
    branch is where it was decided). Kept all the same until the conversation left the
    cache, uncounted in LLM_CACHE_MB: up to 64 KiB an answer, for each message a broker
    outage caught at its append and another replica then answered."""
    from wecombot_common.topology import ConversationRef

    log, model = FakeLog(), FakeModel()
    here, other = handler(log, model), handler(log, model)
    q1 = msg("q1")
    s1 = log.add(q1)
    log.unavailable = 1
    assert isinstance(await here.handle(q1, stream_seq=s1, num_delivered=1), Nak)
    entry = here.cache.get(ConversationRef.of(q1))
    assert list(entry.prepared) == [q1.event_id]  # kept for a redelivery here
    assert await other.handle(q1, stream_seq=s1, num_delivered=2) == Ack()
    q2 = msg("q2")
    s2 = log.add(q2)
    assert await here.handle(q2, stream_seq=s2, num_delivered=1) == Ack()
    assert entry.prepared == {}
    assert [o.causation_id for o in log.outcomes()] == [q1.event_id, q2.event_id]


def test_the_llm_caches_byte_budget_binds_not_a_count() -> None:
    """At 10,000 conversations the count bound first (at 24 of 64 MiB in a soak of 7,400
    users): each one past it was read whole again at its next message."""
    from wecombot_common.topology import ConversationRef
    from wecombot_llm.cache import ConversationCache
    from wecombot_llm.handler import HandlerConfig

    config = HandlerConfig(policy=ReplyPolicy())
    cache = ConversationCache(
        lambda: _conversation_of(0, 0),
        capacity=config.cache_capacity,
        max_bytes=config.cache_bytes,
    )
    for i in range(15_000):
        conv = ConversationRef("ww1-1", f"user{i}")
        cache.get(conv)
        cache.used(conv)
    assert len(cache) == 15_000, len(cache)
