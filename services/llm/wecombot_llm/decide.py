"""What each received message gets: a fixed reply, a model call, or nothing. Pure::

    action = decide(received, conversation, policy, now=time.time())
    isinstance(action, AskModel)
    # → True

Every outcome (ReplyGenerated, ReplyFailed, ConversationReset) built here has the
deterministic event_id ``derived_id(received.event_id, "outcome")``: whoever appends the
outcome of a message, and however often, appends the same event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wecombot_common.events import (
    ConversationReset,
    ImagePayload,
    LinkPayload,
    LocationPayload,
    MessageReceived,
    Outcome,
    ReplyFailed,
    ReplyGenerated,
    TextPayload,
    UnknownPayload,
    VideoPayload,
    VoicePayload,
    WeComEventPayload,
    derived_id,
)
from wecombot_common.text import shows_nothing

from .commands import HELP_TEXT, RESET_TEXT, Command, menu_command, parse_command
from .conversation import Conversation
from .gate import Verdict
from .prompt import ChatMessage, build_prompt
from .settings import ReplyPolicy

__all__ = [
    "AskModel",
    "Reply",
    "answer",
    "decide",
    "failed",
    "flood_text",
    "outcome_id",
    "outcome_msg_id",
    "requires_outcome",
    "too_long",
    "unsupported_text",
]

EMPTY_TEXT = "请直接输入你的问题（发送 /help 查看可用命令）。"
# After an answer the provider cut off at its output limit (finish_reason "length"):
# the user sees where it stops, rather than a reply that ends mid-sentence.
CUT_OFF_NOTE = "\n\n（回答超出模型的输出长度上限，到此截断。回复“继续”可接着写。）"
# An answer over this many bytes (UTF-8) is cut, and says so: the event carrying it must
# fit NATS's max_payload (1 MB by default; a 1.2 MB answer could never be appended, and
# every delivery of its message failed until it was dead-lettered, the user told
# nothing), and WeCom shows it 2048 bytes a message, 30 messages a minute: 64 KiB is
# 32 messages already.
MAX_ANSWER_BYTES = 64 * 1024
TOO_LONG_NOTE = "\n\n（回答过长，到此截断。）"
REFUSAL_TEXT = "抱歉，你暂时没有使用此应用的权限。如需开通，请联系管理员。"


def flood_text(rate_per_minute: int) -> str:
    """The notice for a user over ``LLM_USER_RATE_PER_MINUTE`` (sent once per minute)."""
    return (
        f"你发送得有点快（每分钟最多回答 {rate_per_minute} 条），"
        "超出的消息不会被回答，请稍等再继续提问。"
    )


_KIND_NAMES: dict[type[Any], str] = {
    ImagePayload: "图片",
    VoicePayload: "语音",
    VideoPayload: "视频",
    LocationPayload: "位置",
    LinkPayload: "链接",
}


def unsupported_text(received: MessageReceived) -> str:
    kind = _KIND_NAMES.get(type(received.payload), "这类")
    return f"抱歉，暂时还不支持{kind}消息，请发送文字。"


def requires_outcome(received: MessageReceived, *, welcome: bool = False) -> bool:
    """Whether ``received`` gets exactly one outcome (a reply the user sees).

    Messages always do (text is answered, other types get a "not supported yet"
    notice); WeCom events do not, except ``enter_agent`` when a welcome is configured
    and a menu click whose key is a command (:func:`~.commands.menu_command`).

    The answer may change with a release or a setting for events already in the log
    (a welcome configured later): those before the consumer's ack floor were settled
    without an outcome, and wait for none (the handler's order wait).
    """
    payload = received.payload
    if isinstance(payload, WeComEventPayload):
        return (welcome and payload.event == "enter_agent") or menu_command(payload) is not None
    return isinstance(
        payload,
        TextPayload
        | ImagePayload
        | VoicePayload
        | VideoPayload
        | LocationPayload
        | LinkPayload
        | UnknownPayload,
    )


@dataclass(frozen=True, slots=True)
class Reply:
    """The outcome is known without the model."""

    outcome: Outcome


@dataclass(frozen=True, slots=True)
class AskModel:
    """Ask the model with these messages; ``answer``/``failed`` build the outcome."""

    messages: list[ChatMessage]


Action = Reply | AskModel


def decide(
    received: MessageReceived, conv: Conversation, policy: ReplyPolicy, *, now: float
) -> Action:
    """The action for a message that requires an outcome and is next in line.

    The gate's verdict (gate.py, taken when the fold applied the message) comes first:
    a user over the rate or not on the allowlist gets a notice, never the model. ``now``
    (epoch seconds) dates the history: turns older than ``policy.history_max_age_s``
    have left the stream, and leave the prompt too.
    """
    verdict = conv.verdict(received.event_id)
    if verdict is Verdict.FLOOD_NOTICE:
        return Reply(_notice(received, flood_text(policy.user_rate_per_minute)))
    if verdict is Verdict.REFUSAL_NOTICE:
        return Reply(_notice(received, REFUSAL_TEXT))
    payload = received.payload
    if isinstance(payload, WeComEventPayload):
        clicked = menu_command(payload)
        if clicked is not None:
            return _run(received, clicked)
        return Reply(_notice(received, policy.welcome_message or ""))
    if not isinstance(payload, TextPayload):
        return Reply(_notice(received, unsupported_text(received)))
    command = parse_command(payload.content)
    if command is not None:
        return _run(received, command)
    if shows_nothing(payload.content):  # zero-width spaces or a BOM alone too
        return Reply(_notice(received, EMPTY_TEXT))
    awaiting = conv.awaiting.get(received.event_id)
    seq = awaiting.seq if awaiting is not None else conv.last_seq + 1
    max_age = policy.history_max_age_s
    messages = build_prompt(
        policy.system_prompt,
        conv.history(seq, since=None if max_age is None else now - max_age),
        payload.content,
        max_turns=policy.max_turns,
        max_tokens=policy.max_context_tokens,
    )
    return AskModel(messages)


def _run(received: MessageReceived, command: Command) -> Reply:
    if command is Command.RESET:
        return Reply(ConversationReset(**_envelope(received), text=RESET_TEXT))
    return Reply(_notice(received, HELP_TEXT))


def answer(
    received: MessageReceived,
    text: str,
    *,
    model: str | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    cut_off: bool = False,
) -> ReplyGenerated:
    """The model's answer as the reply; ``cut_off``: the provider stopped it at its output
    limit. One over MAX_ANSWER_BYTES is cut there (at a character), with a note."""
    if too_long(text):
        text = text.encode()[:MAX_ANSWER_BYTES].decode("utf-8", "ignore") + TOO_LONG_NOTE
    elif cut_off:
        text += CUT_OFF_NOTE
    return ReplyGenerated(
        **_envelope(received),
        text=text,
        kind="answer",
        model=model,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


def too_long(text: str) -> bool:
    """Whether ``answer`` cuts ``text`` (MAX_ANSWER_BYTES; a code point is 4 bytes at
    most, so most answers are not encoded to know)."""
    return len(text) * 4 > MAX_ANSWER_BYTES and len(text.encode()) > MAX_ANSWER_BYTES


def failed(received: MessageReceived, reason: str, attempts: int, apology: str) -> ReplyFailed:
    return ReplyFailed(**_envelope(received), reason=reason[:500], attempts=attempts, text=apology)


def outcome_id(received: MessageReceived) -> str:
    return derived_id(received.event_id, "outcome")


def outcome_msg_id(received: MessageReceived) -> str:
    """The JetStream dedupe id of the outcome append."""
    return f"outcome:{received.event_id}"


def _notice(received: MessageReceived, text: str) -> ReplyGenerated:
    return ReplyGenerated(**_envelope(received), text=text, kind="notice")


def _envelope(received: MessageReceived) -> dict[str, Any]:
    return {
        "event_id": outcome_id(received),
        "app": received.app,
        "conversation": received.conversation,
        "causation_id": received.event_id,
        "correlation_id": received.correlation_id,
    }
