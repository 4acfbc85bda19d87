"""Subjects, streams, consumers and buckets: the whole NATS layout in one place.

One stream, ``WECOMBOT``, holds every conversation event. Each conversation (the
aggregate: one WeCom app and one UserID) owns a subject tree, and each writer owns a
branch of it, so optimistic concurrency can be scoped per writer::

    wecombot.conv.<app>.<user>.in             MessageReceived          (gateway)
    wecombot.conv.<app>.<user>.llm.<kind>     ReplyGenerated|ReplyFailed|ConversationReset (llm)
    wecombot.conv.<app>.<user>.llm.requeue    ReplyRequeued            (an operator: dlq replay)
    wecombot.conv.<app>.<user>.send.<kind>    PartDelivered|ReplyDelivered|DeliveryFailed (sender)

``<user>`` is the UserID made into one subject token by :func:`encode_token`.
Request-reply subjects (``wecombot.svc.…``) lie outside the stream on purpose: a core
request on a captured subject would be answered by JetStream with a PubAck.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from .events import (
    ConversationReset,
    DeliveryFailed,
    Event,
    MessageReceived,
    PartDelivered,
    ReplyDelivered,
    ReplyFailed,
    ReplyGenerated,
    ReplyRequeued,
)

__all__ = [
    "CONVERSATION_STREAM",
    "DEAD_LETTER_STREAM",
    "LLM_CONSUMER",
    "SENDER_CONSUMER",
    "TOKEN_BUCKET",
    "TOKEN_GET",
    "TOKEN_INVALIDATE",
    "TOKEN_SERVICE",
    "ConversationRef",
    "decode_token",
    "encode_token",
    "inbox_prefix",
    "subject_for",
]

PREFIX: Final = "wecombot"
CONVERSATION_STREAM: Final = "WECOMBOT"
CONVERSATION_SUBJECTS: Final = f"{PREFIX}.conv.>"
DEAD_LETTER_STREAM: Final = "WECOMBOT_DLQ"
DEAD_LETTER_SUBJECTS: Final = f"{PREFIX}.dlq.>"

RECEIVED_FILTER: Final = f"{PREFIX}.conv.*.*.in"
OUTCOME_FILTER: Final = f"{PREFIX}.conv.*.*.llm.>"
LLM_CONSUMER: Final = "llm"
SENDER_CONSUMER: Final = "sender"

TOKEN_SERVICE: Final = "wecombot-token"  # noqa: S105
TOKEN_GET: Final = f"{PREFIX}.svc.token.get"
TOKEN_INVALIDATE: Final = f"{PREFIX}.svc.token.invalidate"
TOKEN_QUEUE: Final = "token"  # noqa: S105
TOKEN_BUCKET: Final = "wecombot_tokens"  # noqa: S105

_SUFFIX: Final[dict[type[Event], str]] = {
    MessageReceived: "in",
    ReplyGenerated: "llm.reply",
    ReplyFailed: "llm.failed",
    ConversationReset: "llm.reset",
    ReplyRequeued: "llm.requeue",  # by an operator: the sender consumes the llm branch
    PartDelivered: "send.part",
    ReplyDelivered: "send.done",
    DeliveryFailed: "send.failed",
}

# Safe in a token and kept readable; everything else (notably '.', the token separator)
# becomes ~XX. '~' itself is escaped, so the mapping is reversible.
_NOT_PLAIN = re.compile(r"[^A-Za-z0-9_\-@]+")
_ESCAPE = re.compile(r"~([0-9A-F]{2})")


def encode_token(value: str) -> str:
    """Encode any text (a WeCom UserID, say) into one NATS subject token, reversibly.

    >>> encode_token("zhang.san@corp")
    'zhang~2Esan@corp'
    >>> decode_token(encode_token("a.b~c*>")) == "a.b~c*>"
    True
    """
    if not value:
        raise ValueError("cannot encode an empty subject token")
    return _NOT_PLAIN.sub(_escape, value)


def _escape(run: re.Match[str]) -> str:
    return "".join(f"~{b:02X}" for b in run.group().encode("utf-8"))


def decode_token(token: str) -> str:
    """Inverse of :func:`encode_token`."""
    raw = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "~":
            raw.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(token[i].encode("ascii"))
            i += 1
    return raw.decode("utf-8")


# UserID: 1-64 bytes of letters, digits and _-@. ; first a letter or digit
# (创建成员, https://developer.work.weixin.qq.com/document/path/90195).
_USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-@.]{0,63}")


def is_user_id(value: str) -> bool:
    """True for a valid WeCom UserID (a conversation is one user's).

    >>> is_user_id("zhang.san@corp"), is_user_id(".hidden"), is_user_id("a" * 65)
    (True, False, False)
    """
    return _USER_ID.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class ConversationRef:
    """One conversation: the aggregate whose events share a subject tree."""

    app: str
    user: str

    @property
    def root(self) -> str:
        return _root(self.app, self.user)

    @property
    def all_events(self) -> str:
        return f"{self.root}.>"

    @property
    def llm_branch(self) -> str:
        return f"{self.root}.llm.>"

    @property
    def sender_branch(self) -> str:
        return f"{self.root}.send.>"

    @classmethod
    def of(cls, event: Event) -> ConversationRef:
        return cls(event.app, event.conversation)


def inbox_prefix(client_name: str) -> str:
    """Reply subjects of one client: ``_INBOX.<client name>.…`` (its NATS user may read
    these and no others; see deploy/nats/auth.conf).

    >>> inbox_prefix("wecombot-sender")
    '_INBOX.wecombot-sender'
    """
    return f"_INBOX.{encode_token(client_name)}"


def subject_for(event: Event) -> str:
    """The subject an event is appended on."""
    return f"{_root(event.app, event.conversation)}.{_SUFFIX[type(event)]}"


@functools.lru_cache(maxsize=4096)
def _root(app: str, user: str) -> str:
    # Every append, read and consumer key of a conversation starts here: recently used
    # conversations are not escaped again (that showed in the gateway's profile).
    return f"{PREFIX}.conv.{encode_token(app)}.{encode_token(user)}"


def conversation_stream(
    *, replicas: int, duplicate_window_s: float, max_age_s: float, max_bytes: int | None = None
) -> StreamConfig:
    """The event log. File storage, limits retention: events are kept, not consumed.

    ``max_bytes`` (``WECOMBOT_HISTORY_MAX_MB``; None: no cap) caps what each server
    keeps of it: past it the oldest events are dropped, as ``max_age`` drops them, so a
    full stream never stops the gateway's appends (a full disk does: every callback 503).
    JetStream reserves the cap in its store at creation, and refuses one the store cannot
    hold (err_code 10047)."""
    return StreamConfig(
        name=CONVERSATION_STREAM,
        description="wecombot conversation events (event-sourced; one subject tree per user)",
        subjects=[CONVERSATION_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        num_replicas=replicas,
        # Covers WeCom's callback retries (3 retries within seconds; interval undocumented,
        # https://developer.work.weixin.qq.com/document/path/90238) with a wide margin.
        duplicate_window=duplicate_window_s,
        max_age=max_age_s,
        # None is sent as no field, which the server takes as no cap (-1): a cap removed
        # from the settings is removed from the stream by the update.
        max_bytes=max_bytes,
        allow_direct=True,
    )


# A message's dead letter may be written again when its term was lost: after the first
# delivery past the limit (handed back for one ack_wait) and the next, so up to two of
# the longest ack_wait (3600 s) plus the worker's retry later. Its Nats-Msg-Id must
# still be remembered then (the server's default window is 2 minutes).
DEAD_LETTER_DUPLICATE_WINDOW_S: Final = 2 * 3600 + 60


def dead_letter_stream(*, replicas: int, max_age_s: float) -> StreamConfig:
    return StreamConfig(
        name=DEAD_LETTER_STREAM,
        description="wecombot poison messages, with the reason, for operators",
        subjects=[DEAD_LETTER_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_age=max_age_s,
        duplicate_window=min(DEAD_LETTER_DUPLICATE_WINDOW_S, max_age_s),
    )


def work_consumer(
    name: str, filter_subject: str, *, ack_wait_s: float, max_ack_pending: int
) -> ConsumerConfig:
    """A durable pull consumer shared by every replica of one service.

    It redelivers without limit: the PullWorker counts deliveries and dead-letters a
    message past its ``max_deliver``, since JetStream's own limit drops it silently.
    """
    return ConsumerConfig(
        durable_name=name,
        description=f"wecombot {name} work queue",
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=-1,
        max_ack_pending=max_ack_pending,
        filter_subject=filter_subject,
    )


def token_bucket(*, replicas: int) -> KeyValueConfig:
    return KeyValueConfig(
        bucket=TOKEN_BUCKET,
        description="WeCom access_tokens per app, and the refresh lock (token service only)",
        history=1,
        storage=StorageType.FILE,
        replicas=replicas,
    )
