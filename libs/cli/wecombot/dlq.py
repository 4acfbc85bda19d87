"""``wecombot dlq``: the dead-lettered messages, for operators.

::

    wecombot dlq [--consumer NAME] [--state STATE] [--limit N] [--json]
                                            the newest dead letters (in that state)
    wecombot dlq show SEQ [--json]          one, with its event decoded
    wecombot dlq replay SEQ [SEQ ...]       hand those back, in the log's order
    wecombot dlq replay --pending [--consumer NAME] [--limit N]
                                            hand back every letter still pending
                                            (the first N of them in the log's order)

A message a service can never handle (an undecodable event, a reply WeCom always refuses,
a failure that outlasted ``max_deliver``) is copied to the stream ``WECOMBOT_DLQ``
(subject ``wecombot.dlq.<consumer>``) with why, and terminated in its work queue, so it
never blocks the conversation behind it (``wecombot_common.worker``). This command shows
them: when, which consumer gave up, the user, what became of it since (``standing``:
``pending`` still needs a replay; ``answered``, ``delivered`` or ``requeued`` was handled;
a letter stays listed for ``WECOMBOT_HISTORY_MAX_AGE`` all the same; ``--state pending``
lists only those still to replay), the reason, the
original stream sequence (still in ``WECOMBOT`` until ``WECOMBOT_HISTORY_MAX_AGE``), and
the number of deliveries (``--json`` adds the original subject; ``show`` gives one with
it and its event). Example::

    $ wecombot dlq
    2 dead letters in WECOMBOT_DLQ
    SEQ  TIME (UTC)           CONSUMER  STREAM SEQ  DELIVERIES  USER       STATE      REASON
      1  2026-11-28 23:23:11  sender            26           1  zhang.san  delivered  SendRe…
      2  2026-11-28 23:40:02  sender            31           5  li.si      pending    gave u…
    details: wecombot dlq show SEQ; to hand one back: wecombot dlq replay SEQ

``replay`` hands a dead letter back to its consumer:

- a received message the llm gave up on (its outcome could not be appended, or its
  handler crashed, for all its deliveries): the message is appended again, and the llm
  answers the copy as another delivery of the same event; refused when the message has
  its outcome since;
- a reply the sender gave up on (a WeCom outage that outlasted its deliveries, a token
  error since fixed), or a parked ``ReplyRequeued`` (a replay whose round failed too):
  it appends a ``ReplyRequeued`` for the reply, and the sender delivers the reply again
  after its last recorded part (its sends ask WeCom's duplicate check); refused for a
  reply delivered since, one requeued by another replay, and one no longer in
  ``WECOMBOT`` (the dead letter outlives it: the sender delivers from the log's copy).

The same replay run again (its answer lost, another operator) is recognised and says
so, never appending twice; an undecodable event is refused (replaying cannot mend it).
An append that got no answer is reported as such, exit 1: it may be stored, and running
the same replay again tells. ``replay --pending`` (after a WeCom outage, say) replays
every letter whose state is ``pending``, in the order of their events in ``WECOMBOT``
(not of their parking), so each user's messages are answered, and replies delivered, in
the order they came; several SEQs are replayed in that order too. ``--limit N`` replays
only the first N of them in that order (a few first, to see that the cause is gone; the
same command run again takes the next N), and says how many are left. Each gets a line
(its SEQ first), then a count; exit 1 when one was refused, or when a letter's state could
not be read (left out, said on stderr). A NATS failure stops the batch
where it met it, said with the count so far: the same command run again goes on (a
replay made is recognised). ``--json`` is for list and show (the newest ``--limit``
letters, 50 by default; the table says how many there are in all).

Listing and showing read (STREAM.INFO and STREAM.MSG.GET on ``WECOMBOT_DLQ``, and each
letter's conversation in ``WECOMBOT`` for its state); ``replay`` also appends to it.
Without ``WECOMBOT`` (deleted), the states are ``?``, the stream named as missing on
stderr, and ``replay`` refuses at once (exit 1), where each letter read ``gone``.
Run it with the NATS admin credentials (``NATS_USER``/``NATS_PASSWORD`` or
``NATS_CREDS``, and ``NATS_URL``; a ``.env`` in the working directory is read for those
not set, as ``dev`` and ``doctor`` do).
Exit codes: 0 done (an empty DLQ included), 1 NATS unreachable, no such message, or a
replay refused, 2 bad arguments or settings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections import Counter, deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from email.header import Header, decode_header
from pathlib import Path
from typing import Any, TextIO

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import RawStreamMsg, StreamInfo

from wecombot_common import topology
from wecombot_common.bus import (
    AppendUnavailable,
    ConcurrencyConflict,
    EventTooLarge,
    StoredEvent,
    append_event,
    read_conversation,
)
from wecombot_common.errors import ConfigError
from wecombot_common.events import (
    DeliveryFailed,
    Event,
    EventDecodeError,
    MessageReceived,
    NewerEventError,
    Outcome,
    PartDelivered,
    ReplyDelivered,
    ReplyRequeued,
    WeComEventPayload,
    decode_event,
    failure_of_round,
)
from wecombot_common.logs import configure_logging
from wecombot_common.settings import EnvReader, LogSettings, NatsSettings
from wecombot_common.topology import ConversationRef
from wecombot_common.worker import (
    DLQ_CONSUMER,
    DLQ_DELIVERIES,
    DLQ_REASON,
    DLQ_STREAM_SEQ,
    DLQ_SUBJECT,
)

from .shared import (
    clip,
    connect_once,
    nats_unreachable,
    no_jetstream,
    permission_refused,
    read_dotenv,
    without_credentials,
)

__all__ = [
    "ACCEPTS_ARGS",
    "DeadLetter",
    "LogMissing",
    "main",
    "read_dead_letter",
    "read_dead_letters",
    "replay",
    "run",
    "standing",
]

ACCEPTS_ARGS = True
CLIENT_NAME = "wecombot-dlq"
_TIMEOUT_S = 10.0
_REASON_WIDTH = 60
_SUBJECT_WIDTH = 44
_MAX_SEQ = 2**64 - 1  # a stream sequence is a uint64
_NO_MESSAGE = 10037  # JetStream's "no message found"; 10059 is "stream not found"
_SUBJECT_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a consumer name that is one subject token
_STATE_READS = 16  # letters whose state is read at once
_LIST_LIMIT = 50  # letters listed when --limit is not given
_MAKE_STREAMS = ": the services make it when they start (or `wecombot setup`)"
STATES = (
    "pending", "answered", "delivered", "requeued", "gone", "newer", "unreadable", "misfiled"
)  # fmt: skip


class LogMissing(Exception):
    """The stream WECOMBOT does not exist (deleted): what became of a letter's message or
    reply cannot be read, and is not "gone" (aged out), as a read of it would say."""

    def __init__(self) -> None:
        super().__init__(
            f"the stream {topology.CONVERSATION_STREAM} does not exist: what became of the "
            "dead letters' messages and replies cannot be read, and none can be replayed"
        )


async def _confirm_log(js: JetStreamContext) -> None:
    """LogMissing when WECOMBOT does not exist. A conversation read from it answers
    nothing then, as for a conversation whose events all aged out: asked before a letter
    is called gone, not on every read."""
    try:
        await js.stream_info(topology.CONVERSATION_STREAM)
    except nats.js.errors.NotFoundError:
        raise LogMissing from None


@dataclass(frozen=True)
class DeadLetter:
    """One message of the DLQ stream, as the worker parked it."""

    seq: int
    time: datetime | None
    consumer: str
    reason: str
    subject: str
    stream_seq: int | None
    deliveries: int | None
    data: bytes
    state: str | None = None  # standing(), when it was asked

    @classmethod
    def of(cls, raw: RawStreamMsg) -> DeadLetter:
        headers = {name: _header_text(value) for name, value in (raw.headers or {}).items()}
        subject = raw.subject or ""
        return cls(
            seq=raw.seq or 0,
            time=raw.time,
            consumer=headers.get(DLQ_CONSUMER) or subject.rpartition(".")[2],
            reason=headers.get(DLQ_REASON, ""),
            subject=headers.get(DLQ_SUBJECT, ""),
            stream_seq=_int(headers.get(DLQ_STREAM_SEQ)),
            deliveries=_int(headers.get(DLQ_DELIVERIES)),
            data=raw.data or b"",
        )

    @property
    def conversation(self) -> tuple[str, str] | None:
        """(app, user) from the original subject ``wecombot.conv.<app>.<user>.…``."""
        parts = self.subject.split(".")
        if len(parts) < 5 or parts[:2] != [topology.PREFIX, "conv"]:
            return None
        try:
            return topology.decode_token(parts[2]), topology.decode_token(parts[3])
        except (ValueError, UnicodeDecodeError):
            return None

    def misfiled(self, parked: Event) -> bool:
        """Whether the event was filed on a subject other than its own (the worker parks
        such an event before it is handled). A letter of an older build, without its
        original subject, is not."""
        return bool(self.subject) and self.subject != topology.subject_for(parked)

    def event(self) -> Any:
        """The parked event as plain JSON data, or None when it does not decode."""
        try:
            return msgspec.to_builtins(decode_event(self.data))
        except EventDecodeError:
            return None

    def as_json(self, *, with_event: bool = False) -> dict[str, Any]:
        conv = self.conversation
        out: dict[str, Any] = {
            "seq": self.seq,
            "time": self.time.isoformat() if self.time is not None else None,
            "consumer": self.consumer,
            "reason": self.reason,
            "subject": self.subject,
            "stream_seq": self.stream_seq,
            "deliveries": self.deliveries,
            "app": conv[0] if conv else None,
            "user": conv[1] if conv else None,
        }
        if self.state is not None:
            out["state"] = self.state
        if with_event:
            event = self.event()
            out["event"] = event
            if event is None:  # undecodable: show what it was, safely
                out["data"] = self.data.decode("utf-8", "replace")
        return out


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.isdigit() else None


# ---------------------------------------------------------------- reading


async def read_dead_letters(
    js: JetStreamContext, *, consumer: str | None = None, limit: int = 50
) -> tuple[int, list[DeadLetter]]:
    """The DLQ's size and its newest ``limit`` letters (of ``consumer``), oldest first.

    Reads backwards from the last sequence, one message per request: a DLQ is small, and
    the newest letters are what an operator looks at first. One consumer's letters, when
    they are few among the others', are read forwards by their subject instead (only
    theirs: scanning back through everyone else's would cost more).
    """
    info = await js.stream_info(topology.DEAD_LETTER_STREAM)
    total = int(info.state.messages)
    if consumer is not None and total and _SUBJECT_TOKEN.fullmatch(consumer):
        subject = f"{topology.PREFIX}.dlq.{consumer}"
        mine = await _letters_on(js, subject)
        if mine * mine <= limit * total:  # ≈ what a scan back would read to find `limit`
            return total, await _read_forward(js, info, subject, limit)
    found: list[DeadLetter] = []
    if limit > 0:
        async for letter in _newest_first(js, info):
            if consumer is None or letter.consumer == consumer:
                found.append(letter)
                if len(found) == limit:
                    break
    return total, found[::-1]


async def read_in_state(
    js: JetStreamContext,
    state: str,
    *,
    consumer: str | None = None,
    limit: int | None = 50,
    err: TextIO | None = None,
    unread: list[DeadLetter] | None = None,
) -> tuple[int, list[DeadLetter]]:
    """The DLQ's size and its newest ``limit`` letters (all: None) of ``consumer`` whose
    ``standing`` is ``state``, oldest first, each with its state. A letter whose state
    could not be read is in none: said on ``err``, and added to ``unread``.

    Every letter's state is read until ``limit`` are found, newest first, so a listing of
    the few still pending among thousands handled costs the newest ones' histories; with
    no limit (``replay --pending``), the whole DLQ's, oldest first.
    """
    info = await js.stream_info(topology.DEAD_LETTER_STREAM)
    total = int(info.state.messages)
    found: list[DeadLetter] = []
    batch: list[DeadLetter] = []
    if limit is not None:
        letters = _newest_first(js, info)
    elif consumer is not None and _SUBJECT_TOKEN.fullmatch(consumer):
        letters = _oldest_first(js, info, f"{topology.PREFIX}.dlq.{consumer}")
    else:
        letters = _oldest_first(js, info, f"{topology.PREFIX}.dlq.>")

    async def sift() -> None:
        read = await _with_states(js, batch, err, unknown="left out")
        found.extend(d for d in read if d.state == state)
        if unread is not None:
            unread.extend(d for d in read if d.state == "?")
        batch.clear()

    async for letter in letters:
        if consumer is not None and letter.consumer != consumer:
            continue
        batch.append(letter)
        if len(batch) == _STATE_READS:
            await sift()
            if limit is not None and len(found) >= limit:
                break
    await sift()
    if limit is None:
        return total, found
    return total, found[:limit][::-1]


async def _newest_first(js: JetStreamContext, info: StreamInfo) -> AsyncIterator[DeadLetter]:
    seq = int(info.state.last_seq)
    while seq >= max(int(info.state.first_seq), 1) and info.state.messages:
        seq -= 1
        try:
            raw = await js.get_msg(topology.DEAD_LETTER_STREAM, seq + 1)
        except nats.js.errors.NotFoundError:  # aged out or deleted meanwhile
            continue
        yield DeadLetter.of(raw)


async def _oldest_first(
    js: JetStreamContext, info: StreamInfo, subject: str
) -> AsyncIterator[DeadLetter]:
    seq = int(info.state.first_seq)
    while info.state.messages:  # "next message" reads: gaps (deleted letters) skipped
        try:
            raw = await js.get_msg(topology.DEAD_LETTER_STREAM, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return
        assert raw.seq is not None
        seq = raw.seq + 1
        yield DeadLetter.of(raw)


async def _letters_on(js: JetStreamContext, subject: str) -> int:
    info = await js.stream_info(topology.DEAD_LETTER_STREAM, subjects_filter=subject)
    return int((info.state.subjects or {}).get(subject, 0))


async def _read_forward(
    js: JetStreamContext, info: StreamInfo, subject: str, limit: int
) -> list[DeadLetter]:
    """The newest ``limit`` letters on ``subject``, read oldest first by subject."""
    newest: deque[DeadLetter] = deque(maxlen=max(limit, 0))
    if limit > 0:
        async for letter in _oldest_first(js, info, subject):
            newest.append(letter)
    return list(newest)


async def read_dead_letter(js: JetStreamContext, seq: int) -> DeadLetter | None:
    """Dead letter ``seq`` (None: no such message; NotFoundError: no such stream)."""
    try:
        return DeadLetter.of(await js.get_msg(topology.DEAD_LETTER_STREAM, seq))
    except nats.js.errors.NotFoundError as exc:
        if exc.err_code == _NO_MESSAGE:
            return None
        raise


async def replay(js: JetStreamContext, seq: int) -> tuple[bool, str]:
    """Hand dead letter ``seq`` back to its consumer; (done, what happened)."""
    letter = await read_dead_letter(js, seq)
    if letter is None:
        return False, f"no message {seq} in {topology.DEAD_LETTER_STREAM}"
    if letter.consumer not in (topology.LLM_CONSUMER, topology.SENDER_CONSUMER):
        return False, (
            f"dead letter {seq} is the {letter.consumer}'s: only the llm's and the sender's "
            "can be replayed"
        )
    try:
        parked = decode_event(letter.data)
    except NewerEventError as exc:
        return False, (
            f"dead letter {seq} was written by a newer build ({exc}): replay it with that "
            "build's wecombot, once its replicas run"
        )
    except EventDecodeError:
        return False, f"dead letter {seq} is not a wecombot event: replaying cannot mend it"
    if letter.misfiled(parked):
        # Appended again, it would go on its own subject: answered, or delivered, to the
        # user its body names, whom the subject it was filed on did not.
        return False, (
            f"dead letter {seq} is a {type(parked).__name__} filed on {letter.subject!r}, "
            f"which is not its own subject ({topology.subject_for(parked)!r}): written by "
            "hand or by a faulty build, it is not replayed"
        )
    if letter.consumer == topology.LLM_CONSUMER:
        return await _redeliver(js, seq, parked, letter)
    return await _requeue(js, seq, parked)


async def _redeliver(
    js: JetStreamContext, seq: int, parked: Event, letter: DeadLetter
) -> tuple[bool, str]:
    """Append a received message the llm gave up on once more, unless it has its outcome.

    The copy is the parked bytes as they are (the letter's), fields this build does not
    know included. The llm takes it as another delivery of the same event (same event_id): it
    answers it once, in its turn among the user's messages still waiting (one sent after
    the copy, while an earlier one is unanswered, may be answered first), and a second
    copy of an answered message gets nothing.
    """
    if not isinstance(parked, MessageReceived):
        return False, f"dead letter {seq} is a {type(parked).__name__}, not a received message"
    history = await _message_history(js, parked, letter.stream_seq)
    stored = history.outcome
    if stored is not None:
        return False, (
            f"message {parked.correlation_id} from {parked.conversation} has its "
            f"{type(stored.event).__name__} (seq {stored.seq}); nothing to replay"
        )
    if history.copy is not None:
        # Appended again already, by this letter's replay or an earlier letter's: the llm
        # has the copy (answered, silenced, or parked again as a letter of its own). A
        # second copy, once the first's Nats-Msg-Id left the duplicate window, would wait
        # in the llm for nothing, or be answered beside the first.
        return True, (
            f"dead letter {seq} was replayed already: message {parked.correlation_id} from "
            f"{parked.conversation} is in the log again at seq {history.copy}"
        )
    if not history.present:
        await _confirm_log(js)
        # Dropped with its conversation's oldest events (WECOMBOT_HISTORY_MAX_AGE or
        # _MAX_MB), its outcome may have gone before it: appended again, it was answered
        # a second time.
        return False, (
            f"message {parked.correlation_id} from {parked.conversation} has left "
            f"{topology.CONVERSATION_STREAM} (WECOMBOT_HISTORY_MAX_AGE or "
            "WECOMBOT_HISTORY_MAX_MB), and whether it was answered with it: not replayed"
        )
    # One copy per dead letter: replaying this letter twice appends once, and the letter
    # of a copy that failed again can be replayed in its turn.
    try:
        appended = await append_event(
            js, parked, msg_id=f"redeliver:{parked.event_id}:{seq}", as_read=letter.data
        )
    except EventTooLarge as exc:
        # append_event refuses it before sending: sent, the broker (which counts the
        # headers, where nats-py checks the body alone) answered -ERR, nats-py closed the
        # connection, and the replay said "no answer, run it again", which met the same.
        return False, (
            f"message {parked.correlation_id} from {parked.conversation} cannot be appended "
            f"again: {exc}. Not replayed (was max_payload lowered since it was stored? "
            "With it raised again, the letter can be replayed)"
        )
    if appended.duplicate:
        return True, (
            f"dead letter {seq} was replayed already: message {parked.correlation_id} from "
            f"{parked.conversation} is in the log again at seq {appended.seq}"
        )
    if isinstance(parked.payload, WeComEventPayload):
        return True, (
            f"event {parked.payload.event} from {parked.conversation} appended again (seq "
            f"{appended.seq}); the llm answers an event only with a welcome message set "
            "(LLM_WELCOME_MESSAGE, for enter_agent), or a menu click whose key is a command"
        )
    return True, (
        f"message {parked.correlation_id} from {parked.conversation} appended again "
        f"(seq {appended.seq}); the llm answers it"
    )


@dataclass
class _MessageHistory:
    """What the log says of a received message: whether it is still there, where a
    replay appended it again, and its outcome."""

    present: bool = False
    copy: int | None = None  # the seq of the first copy a replay appended
    outcome: StoredEvent | None = None


async def _message_history(
    js: JetStreamContext, parked: MessageReceived, at: int | None
) -> _MessageHistory:
    """The history of the message a llm's dead letter holds, stored at seq ``at`` (if
    known). The oldest events go first: a message still there has its outcome there too,
    if it has one."""
    history = _MessageHistory()
    # from the leader: a follower's direct read may lag (bus.read_conversation); from the
    # message on: its outcome comes after it
    leader_read = read_conversation(
        js, ConversationRef.of(parked), after_seq=_before(at), direct=False
    )
    async for stored in leader_read:
        event = stored.event
        if isinstance(event, MessageReceived) and event.event_id == parked.event_id:
            # The parked message is the one at `at`; the same event again later is a
            # copy a replay appended (WeCom's retries of it were deduplicated by the
            # gateway). Where `at` is not known, the first one found is the parked one.
            if stored.seq == at if at else not history.present:
                history.present = True
            elif history.copy is None:
                history.copy = stored.seq
        elif isinstance(event, Outcome) and event.causation_id == parked.event_id:
            history.outcome = stored
            break
    return history


_Settled = DeliveryFailed | ReplyDelivered | ReplyRequeued


@dataclass
class _ReplyHistory:
    """What the log says of a reply: whether it is still there, its last two rounds'
    ends (failed, delivered, requeued), its requeues, and the parts delivered."""

    reply_id: str
    present: bool = False
    last: _Settled | None = None
    before_last: _Settled | None = None
    requeues: list[str] = field(default_factory=list)  # their event_ids, in log order
    parts: set[int] = field(default_factory=set)

    def requeued_after(self, parked: Event) -> bool:
        """Whether a replay handed the reply back after ``parked`` was parked: after the
        reply's first round, any requeue; after a requeue's round, a later one."""
        if isinstance(parked, ReplyRequeued) and parked.event_id in self.requeues:
            return self.requeues[-1] != parked.event_id
        return bool(self.requeues)


async def _reply_history(
    js: JetStreamContext, parked: Event, at: int | None
) -> _ReplyHistory | None:
    """The history of the reply a sender's dead letter holds (None: it holds no reply);
    ``at``: where the parked event is stored, if known."""
    if isinstance(parked, Outcome):
        history = _ReplyHistory(parked.event_id)
        after = _before(at)  # the reply itself, and what became of it after
    elif isinstance(parked, ReplyRequeued):
        history = _ReplyHistory(parked.reply_id)
        after = 0  # the reply is before the requeue
    else:
        return None
    # from the leader: a follower's direct read may lag (bus.read_conversation)
    conversation = ConversationRef.of(parked)
    requeued_by = ""  # the round under way: the last requeue's
    async for stored in read_conversation(js, conversation, after_seq=after, direct=False):
        event = stored.event
        if isinstance(event, Outcome) and event.event_id == history.reply_id:
            history.present = True
        if isinstance(event, _Settled) and event.reply_id == history.reply_id:
            if (
                isinstance(event, DeliveryFailed)
                and requeued_by
                and event.event_id != failure_of_round(history.reply_id, requeued_by)
            ):
                continue  # an earlier round's, recorded late: the sender goes on too
            if isinstance(event, ReplyRequeued):
                requeued_by = event.event_id
                history.requeues.append(event.event_id)
            history.before_last, history.last = history.last, event
        elif isinstance(event, PartDelivered) and event.reply_id == history.reply_id:
            history.parts.add(event.index)
    return history


def _before(seq: int | None) -> int:
    return seq - 1 if seq else 0


async def standing(js: JetStreamContext, letter: DeadLetter) -> str:
    """What became of a dead letter since it was parked, read from the log:

    - ``pending``: nothing; ``replay`` hands it back;
    - ``answered``: the llm's message has its outcome (a replay, or a retry by WeCom);
    - ``delivered``: the sender's reply was delivered since;
    - ``requeued``: handed back by a replay, its consumer has it: the message is in the
      log again (the llm answers the copy, or silences it: a rate or an allowlist), the
      reply is requeued (the sender delivers it); a copy or a requeue that fails again
      is a letter of its own;
    - ``gone``: the message or reply left WECOMBOT (WECOMBOT_HISTORY_MAX_AGE or _MAX_MB, a
      purge), and what became of it with it: not replayed;
    - ``newer``: a newer build's event: replayed by that build's wecombot;
    - ``unreadable``: not a wecombot event: replaying cannot mend it;
    - ``misfiled``: filed on a subject other than its own (by hand, a faulty build): not
      replayed;
    - ``?``: its conversation could not be read (said on stderr by the listing), or
      WECOMBOT does not exist (LogMissing: not ``gone``, which a read of it would say);
    - ``""``: a consumer whose letters are not replayed.

    A letter stays in WECOMBOT_DLQ once handled (for WECOMBOT_HISTORY_MAX_AGE): this
    tells which still need a hand. Each is read from its parked event on, so a listing
    costs the letters' own histories, not their conversations' whole.
    """
    if letter.consumer not in (topology.LLM_CONSUMER, topology.SENDER_CONSUMER):
        return ""
    try:
        parked = decode_event(letter.data)
    except NewerEventError:
        return "newer"
    except EventDecodeError:
        return "unreadable"
    if letter.misfiled(parked):
        return "misfiled"
    if letter.consumer == topology.LLM_CONSUMER:
        if not isinstance(parked, MessageReceived):
            return "unreadable"
        message = await _message_history(js, parked, letter.stream_seq)
        if message.outcome is not None:
            return "answered"
        if message.copy is not None:
            return "requeued"
        if message.present:
            return "pending"
        await _confirm_log(js)
        return "gone"
    history = await _reply_history(js, parked, letter.stream_seq)
    if history is None:
        return "unreadable"
    if not history.present:
        await _confirm_log(js)
        return "gone"
    if isinstance(history.last, ReplyDelivered):
        return "delivered"
    if history.requeued_after(parked):
        # Even when that requeue's round failed too: its own letter (the parked
        # ReplyRequeued) is the pending one, as a failed copy's is for the llm.
        return "requeued"
    return "pending"


async def _requeue(js: JetStreamContext, seq: int, parked: Event) -> tuple[bool, str]:
    """Requeue a reply the sender gave up on (or a requeue whose round failed too)."""
    history = await _reply_history(js, parked, None)
    if history is None:
        return False, f"dead letter {seq} is a {type(parked).__name__}, not a reply"
    reply_id, last, before_last = history.reply_id, history.last, history.before_last
    if not history.present:
        await _confirm_log(js)
        # The dead letter outlives it (written later, kept as long): a requeue would only
        # be parked again by the sender, which delivers from the log's copy.
        return False, (
            f"reply {reply_id} to {parked.conversation} is no longer in "
            f"{topology.CONVERSATION_STREAM} (aged out after WECOMBOT_HISTORY_MAX_AGE, dropped "
            "past WECOMBOT_HISTORY_MAX_MB, or purged): nothing to deliver"
        )
    if isinstance(last, ReplyDelivered):
        return False, f"reply {reply_id} was delivered since; nothing to replay"
    if isinstance(last, ReplyRequeued) and last.event_id != parked.event_id:
        if last.causation_id == _cause(reply_id, before_last, parked):
            # This very replay, run before (its answer lost, or by another operator).
            return True, (
                f"dead letter {seq} was replayed already: reply {reply_id} to "
                f"{parked.conversation} is requeued ({last.reason})"
            )
        return False, f"reply {reply_id} is already requeued ({last.reason})"
    cause = _cause(reply_id, last, parked)
    requeue = ReplyRequeued(
        app=parked.app,
        conversation=parked.conversation,
        correlation_id=parked.correlation_id,
        causation_id=cause,
        reply_id=reply_id,
        reason=f"wecombot dlq replay {seq}",
    )
    appended = await append_event(js, requeue, msg_id=f"requeue:{cause}")
    if appended.duplicate:
        return True, (
            f"dead letter {seq} was replayed already: reply {reply_id} to "
            f"{parked.conversation} is requeued (seq {appended.seq})"
        )
    return True, (
        f"reply {reply_id} to {parked.conversation} requeued (seq {appended.seq}); the "
        f"sender delivers it again after the {len(history.parts)} part(s) recorded"
    )


async def _in_log_order(js: JetStreamContext, letters: Sequence[DeadLetter]) -> list[int]:
    """The letters' SEQs in their events' order in WECOMBOT (then their own): each copy
    or requeue is appended after the one before, so a user's messages are answered, and
    replies delivered, in the order they came, whichever was parked first.

    A letter's place is its event's, but that of a parked ``ReplyRequeued`` is its
    reply's (the sender delivers a requeue in the reply's place in the user's order),
    and that of a parked copy of a message is the first copy's (the llm's fold keeps a
    message in its first place): read from the log for a user with more than one letter
    in the batch (the others' order does not matter)."""
    users = Counter(d.conversation for d in letters)
    places = {
        d.seq: await _place(js, d)
        for d in letters
        if d.conversation is not None and users[d.conversation] > 1
    }

    def place(d: DeadLetter) -> int:
        return places.get(d.seq) or d.stream_seq or _MAX_SEQ

    return [d.seq for d in sorted(letters, key=lambda d: (place(d), d.seq))]


async def _place(js: JetStreamContext, letter: DeadLetter) -> int | None:
    """Where a letter's message or reply stands in its user's order: the first copy of
    a received message, the reply of a parked requeue (None: not known)."""
    try:
        parked = decode_event(letter.data)
    except EventDecodeError:
        return None
    conversation = ConversationRef.of(parked)
    if isinstance(parked, MessageReceived):
        wanted, branch = parked.event_id, topology.subject_for(parked)
    elif isinstance(parked, ReplyRequeued):
        wanted, branch = parked.reply_id, conversation.llm_branch
    else:
        return letter.stream_seq
    async for stored in read_conversation(js, conversation, branch=branch, direct=False):
        if letter.stream_seq is not None and stored.seq >= letter.stream_seq:
            break
        if stored.event.event_id == wanted:  # a message's copies share its event_id
            return stored.seq
    return letter.stream_seq


async def _replay_all(js: JetStreamContext, seqs: Sequence[int], out: TextIO, err: TextIO) -> int:
    """Replay the letters ``seqs`` in that order, a line each (prefixed with its SEQ),
    then a count. Exit 1 when one was refused. A failure of NATS or of an append stops
    there (the next ones would meet it too): said with the count so far, then raised for
    ``run`` to report; the same command run again recognises the replays made."""
    refused = 0
    for done_so_far, seq in enumerate(seqs):
        try:
            done, said = await replay(js, seq)
        except BaseException:
            err.write(
                f"wecombot dlq: stopped at dead letter {seq}, {done_so_far - refused} of "
                f"{len(seqs)} replayed before it (run the same command again to go on: a "
                "replay made is recognised, never doubled); why:\n"
            )
            raise
        if done:
            out.write(f"{seq}: {said}\n")
        else:
            refused += 1
            err.write(f"wecombot dlq: {seq}: {said}\n")
    plural = "s" if len(seqs) != 1 else ""
    out.write(
        f"{len(seqs) - refused} of {len(seqs)} dead letter{plural} replayed"
        + (f", {refused} refused (said on stderr)\n" if refused else "\n")
    )
    return 1 if refused else 0


def _cause(reply_id: str, last: Event | None, parked: Event) -> str:
    """What a requeue of this round answers: the round's DeliveryFailed; or the reply, or
    the parked requeue itself, when the round was parked without one (its last delivery
    ended without an outcome)."""
    if isinstance(last, DeliveryFailed) or (
        isinstance(last, ReplyRequeued) and last.event_id == parked.event_id
    ):
        return last.event_id
    return reply_id


def _header_text(value: object) -> str:
    """A header of a stream message as text. nats-py reads those headers with the email
    parser, which gives a non-ASCII value (a reason in WeCom's words: 企业可信IP) as a
    Header object holding the raw bytes; they are UTF-8, as the worker wrote them."""
    if isinstance(value, Header):
        return "".join(
            part.decode("utf-8", "replace") if isinstance(part, bytes) else part
            for part, _ in decode_header(value)
        )
    return str(value)


# ---------------------------------------------------------------- rendering


def render_table(
    total: int, letters: Sequence[DeadLetter], consumer: str | None, state: str | None = None
) -> str:
    kind = f" {state}" if state else ""
    which = f" of consumer {consumer}" if consumer else ""
    if not letters:
        return f"no{kind} dead letters{which} in {topology.DEAD_LETTER_STREAM} ({total} in all)\n"
    shown = "" if len(letters) == total else f" (showing {len(letters)}{kind}{which})"
    rows = [
        ("SEQ", "TIME (UTC)", "CONSUMER", "STREAM SEQ", "DELIVERIES", "USER", "STATE", "REASON")
    ]
    for d in letters:
        when = d.time.strftime("%Y-%m-%d %H:%M:%S") if d.time else "?"
        rows.append(
            (
                str(d.seq),
                when,
                d.consumer,
                "" if d.stream_seq is None else str(d.stream_seq),
                "" if d.deliveries is None else str(d.deliveries),
                _user(d),
                d.state or "",
                clip(d.reason, _REASON_WIDTH),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right = {0, 3, 4}  # numbers
    plural = "s" if total != 1 else ""
    lines = [f"{total} dead letter{plural} in {topology.DEAD_LETTER_STREAM}{shown}"]
    for row in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.append("details: wecombot dlq show SEQ; to hand one back: wecombot dlq replay SEQ")
    return "\n".join(lines) + "\n"


def _user(letter: DeadLetter) -> str:
    """The WeCom user of the conversation (a UserID is at most 64 characters: shown
    whole); a subject that names none, clipped (``show`` has it all)."""
    conv = letter.conversation
    return conv[1] if conv else clip(letter.subject, _SUBJECT_WIDTH)


def render_one(letter: DeadLetter) -> str:
    fields = letter.as_json(with_event=True)
    lines = [f"dead letter {letter.seq} in {topology.DEAD_LETTER_STREAM}"]
    names = ("time", "consumer", "deliveries", "subject", "stream_seq", "app", "user", "state")
    for name in names:
        value = fields.get(name)
        if value not in (None, ""):
            lines.append(f"  {name + ':':<12}{value}")
    lines.append(f"  {'reason:':<12}{letter.reason}")
    if fields["event"] is not None:
        lines.append("  event:")
        body = json.dumps(fields["event"], ensure_ascii=False, indent=2)
        lines.extend("    " + line for line in body.splitlines())
    else:
        lines.append(f"  {'data:':<12}{fields['data']!r}  (not a wecombot event)")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wecombot dlq",
        description=(
            "List the dead-lettered messages (WECOMBOT_DLQ), show one, or hand one back "
            "to its consumer (the llm answers the message, the sender delivers the reply)."
        ),
    )
    _options(parser, listing=True, defaults=True)
    sub = parser.add_subparsers(dest="action", metavar="{list,show,replay}")
    # Options repeat after the action; SUPPRESS keeps a subparser from resetting them.
    _options(sub.add_parser("list", help="the newest dead letters (the default)"), listing=True)
    show = sub.add_parser("show", help="one dead letter, with its event decoded")
    show.add_argument(
        "seq", type=positive_int, help="its sequence in WECOMBOT_DLQ (the SEQ column)"
    )
    _options(show, listing=False)
    again = sub.add_parser(
        "replay",
        help="hand them back: the llm answers the message, the sender delivers the reply",
    )
    again.add_argument(
        "seq",
        type=positive_int,
        nargs="*",
        help="their sequences in WECOMBOT_DLQ (the SEQ column), replayed in the log's order",
    )
    again.add_argument(
        "--pending",
        action="store_true",
        help="every letter whose state is pending (of --consumer), in the log's order",
    )
    again.add_argument(
        "--consumer",
        default=argparse.SUPPRESS,
        choices=(topology.LLM_CONSUMER, topology.SENDER_CONSUMER),
        help="with --pending: only this consumer's",
    )
    again.add_argument(
        "--limit",
        type=positive_int,
        default=argparse.SUPPRESS,
        help="with --pending: at most N, the first in the log's order (run again for more)",
    )
    return parser


def positive_int(text: str) -> int:
    """An argparse type: a whole number from 1 (a stream sequence, a count)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not 1 or more")
    if value > _MAX_SEQ:
        raise argparse.ArgumentTypeError(f"{text} is beyond any stream sequence")
    return value


def _options(p: argparse.ArgumentParser, *, listing: bool, defaults: bool = False) -> None:
    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    p.add_argument("--json", action="store_true", default=default(False), help="JSON output")
    if listing:
        p.add_argument(
            "--consumer",
            default=default(None),
            choices=(topology.LLM_CONSUMER, topology.SENDER_CONSUMER),
            help="only this consumer's",
        )
        p.add_argument(
            "--limit",
            type=positive_int,
            default=default(None),
            help=f"at most N, the newest (default {_LIST_LIMIT})",
        )
        p.add_argument(
            "--state",
            default=default(None),
            choices=STATES,
            help="only the letters in this state (pending: those still to replay)",
        )


async def run(
    settings: NatsSettings, argv: Sequence[str], out: TextIO, err: TextIO | None = None
) -> int:
    """The command, given its NATS settings and arguments; writes to ``out``."""
    err = err or sys.stderr
    args = _parser().parse_args(list(argv))
    if (misuse := _misused(args)) is not None:
        err.write(f"wecombot dlq: {misuse}\n")
        return 2
    url = without_credentials(settings.url)
    errors: list[Exception] = []

    async def remember(exc: Exception) -> None:  # reported once, as the command's answer
        errors.append(exc)

    try:
        async with asyncio.timeout(_TIMEOUT_S):
            nc = await connect_once(
                settings, CLIENT_NAME, connect_timeout_s=_TIMEOUT_S / 2, error_cb=remember
            )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        summary, advice = nats_unreachable(url, errors[-1] if errors else exc)
        err.write(f"wecombot dlq: {summary}\n{advice}\n")
        return 1
    try:
        return await _act(nc.jetstream(timeout=_TIMEOUT_S), args, out, err)
    except nats.js.errors.NotFoundError:
        err.write(
            f"wecombot dlq: the stream {topology.DEAD_LETTER_STREAM} does not exist at {url}"
            f"{_MAKE_STREAMS}\n"
        )
        return 1
    except LogMissing as exc:
        err.write(f"wecombot dlq: {exc} (at {url}){_MAKE_STREAMS}\n")
        return 1
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
        summary, advice = no_jetstream(url)
        err.write(f"wecombot dlq: {summary}\n{advice}\n")
        return 1
    except (TimeoutError, nats.errors.Error) as exc:
        if (refused := permission_refused(url, errors, settings.user)) is not None:
            summary, advice = refused
            err.write(f"wecombot dlq: {summary}\n{advice}\n")
            return 1
        err.write(f"wecombot dlq: {type(exc).__name__}: {exc}\n")
        return 1
    except (AppendUnavailable, ConcurrencyConflict) as exc:  # replay's append
        if not (isinstance(exc, AppendUnavailable) and exc.maybe_stored):
            # Of this letter's append: a batch said how many were replayed before it.
            err.write(f"wecombot dlq: the log refused the append (nothing appended): {exc}\n")
            return 1
        # No PubAck: stored or not, nobody can tell.
        err.write(
            f"wecombot dlq: the replay's append got no answer ({exc}): it may or may not "
            "be stored. Run the same replay again: a repeat is recognised, never doubled\n"
        )
        return 1
    finally:
        await nc.close()


def _misused(args: argparse.Namespace) -> str | None:
    """Why these arguments make no command (exit 2), if they do not."""
    if args.action == "show":  # the listing's options, given before the action
        for option in ("state", "consumer", "limit"):
            if getattr(args, option) is not None:
                return f"--{option} is for list; SEQ names the letter already"
        return None
    if args.action != "replay":
        return None
    if args.json:
        return "--json is for list and show; replay answers in words"
    if args.state is not None:
        return "--state is for list; replay --pending replays those pending"
    if args.pending and args.seq:
        return "replay either the letters named (SEQ ...) or --pending, not both"
    if not args.pending and not args.seq:
        return "replay what? name the letters (SEQ ...), or --pending for all still pending"
    if args.consumer is not None and not args.pending:
        return "--consumer is for list and replay --pending; SEQ names the letter already"
    if args.limit is not None and not args.pending:
        return "--limit is for list and replay --pending; SEQ names the letters already"
    return None


async def _act(js: JetStreamContext, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    if args.action == "replay":
        # Both streams at once: without WECOMBOT, each letter was refused as gone.
        await js.stream_info(topology.DEAD_LETTER_STREAM)
        await _confirm_log(js)
        if args.pending:
            unread: list[DeadLetter] = []
            _, letters = await read_in_state(
                js, "pending", consumer=args.consumer, limit=None, err=err, unread=unread
            )
            if not letters:
                which = f" of consumer {args.consumer}" if args.consumer else ""
                out.write(f"no pending dead letters{which} in {topology.DEAD_LETTER_STREAM}\n")
                code = 0
            else:
                ordered = await _in_log_order(js, letters)
                code = await _replay_all(js, ordered[: args.limit], out, err)
                if args.limit is not None and len(ordered) > args.limit:
                    left = len(ordered) - args.limit
                    out.write(
                        f"{left} more pending, left for later (--limit {args.limit}): run the "
                        "same command again for the next ones\n"
                    )
            if unread:  # left out, maybe pending: not all that is pending was replayed
                err.write(
                    f"wecombot dlq: {len(unread)} dead letter(s) not replayed, their state "
                    "unknown: run the same command again\n"
                )
                return 1
            return code
        if len(set(args.seq)) > 1:
            named = [await read_dead_letter(js, seq) for seq in sorted(set(args.seq))]
            missing = sorted(set(args.seq) - {d.seq for d in named if d is not None})
            found = [d for d in named if d is not None]
            return await _replay_all(js, missing + await _in_log_order(js, found), out, err)
        done, said = await replay(js, args.seq[0])
        (out if done else err).write(("" if done else "wecombot dlq: ") + said + "\n")
        return 0 if done else 1
    if args.state is not None:
        total, letters = await read_in_state(
            js, args.state, consumer=args.consumer, limit=args.limit or _LIST_LIMIT, err=err
        )
        if args.json:
            out.write(json.dumps([d.as_json() for d in letters], ensure_ascii=False) + "\n")
        else:
            out.write(render_table(total, letters, args.consumer, args.state))
        return 0
    if args.action == "show":
        letter = await read_dead_letter(js, args.seq)
        if letter is None:
            err.write(f"wecombot dlq: no message {args.seq} in {topology.DEAD_LETTER_STREAM}\n")
            return 1
        [letter] = await _with_states(js, [letter], err)
        if args.json:
            out.write(json.dumps(letter.as_json(with_event=True), ensure_ascii=False) + "\n")
        else:
            out.write(render_one(letter))
        return 0
    limit = args.limit or _LIST_LIMIT
    total, letters = await read_dead_letters(js, consumer=args.consumer, limit=limit)
    letters = await _with_states(js, letters, err)
    if args.json:
        out.write(json.dumps([d.as_json() for d in letters], ensure_ascii=False) + "\n")
    else:
        out.write(render_table(total, letters, args.consumer))
    return 0


async def _with_states(
    js: JetStreamContext,
    letters: Sequence[DeadLetter],
    err: TextIO | None,
    *,
    unknown: str = "shown as ?",
) -> list[DeadLetter]:
    """The letters with their ``standing``, read ``_STATE_READS`` at a time (each is a
    few round trips to the stream leader, waiting on nothing else); one whose
    conversation cannot be read is shown all the same, its state ``?`` (said once on
    ``err``, with what becomes of it: ``unknown``)."""
    unread: list[str] = []
    missing: list[LogMissing] = []
    reads = asyncio.Semaphore(_STATE_READS)

    async def with_state(letter: DeadLetter) -> DeadLetter:
        async with reads:
            try:
                state = await standing(js, letter)
            except (TimeoutError, nats.errors.Error) as exc:
                state = "?"
                unread.append(f"{letter.seq} ({type(exc).__name__})")
            except LogMissing as exc:
                state = "?"
                missing.append(exc)
        return replace(letter, state=state)

    out = list(await asyncio.gather(*(with_state(d) for d in letters)))
    unread.sort(key=lambda said: int(said.partition(" ")[0]))
    if unread and err is not None:
        err.write(
            f"wecombot dlq: the state of dead letter {', '.join(unread)} could not be read "
            f"from {topology.CONVERSATION_STREAM}: {unknown}\n"
        )
    if missing and err is not None:
        err.write(f"wecombot dlq: {missing[0]} ({unknown}){_MAKE_STREAMS}\n")
    return out


def main(environ: Mapping[str, str], argv: Sequence[str] = ()) -> int:
    """Entry point of ``wecombot dlq``."""
    try:  # --help and bad arguments first, whatever the settings
        _parser().parse_args(list(argv))
    except SystemExit as exc:  # argparse: --help (0) or bad arguments (2)
        return int(exc.code or 0)
    environ = dict(environ)
    read_dotenv(Path(".env"), environ)  # as dev and doctor do: values not set already
    env = EnvReader(environ)
    try:
        settings = NatsSettings.read(env)
        log = LogSettings.read(env)
        env.raise_if_invalid()
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    # Log lines (a NATS error, say) go to stderr, redacted: stdout is the answer.
    configure_logging(replace(log, level="error"), service="dlq", secrets=settings.secrets)
    return asyncio.run(run(settings, argv, sys.stdout))
