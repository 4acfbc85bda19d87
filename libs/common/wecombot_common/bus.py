"""NATS adapters shared by the services: connect, create the topology, append, read.

The event log is JetStream; these helpers translate nats-py's errors into wecombot's
(:class:`AppendUnavailable` is "retry later", :class:`ConcurrencyConflict` means "someone
else wrote first: reload and decide again").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
import nats
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.client import ServerVersion
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from . import topology
from .errors import ConfigError, PermanentError, TransientError
from .events import Event, EventDecodeError, decode_event, encode_event
from .logs import LogSampler
from .runtime import fail, unless_stopped
from .settings import NatsSettings, without_credentials
from .topology import ConversationRef, subject_for

__all__ = [
    "AppendUnavailable",
    "Appended",
    "ConcurrencyConflict",
    "EventTooLarge",
    "PipelinedAppender",
    "SettledFloor",
    "StoredEvent",
    "ack_floor",
    "append_event",
    "connect",
    "connect_when_ready",
    "ensure_stream",
    "ensure_topology",
    "max_payload",
    "message_size",
    "read_conversation",
    "reconnect_counter",
    "server_too_old",
]

log = structlog.get_logger(__name__)
T = TypeVar("T")

WRONG_LAST_SEQUENCE = 10071
# A JetStream API error that retrying cannot fix: the server was asked for what its
# configuration cannot give, and answers so until one or the other changes. Only this
# one is certain; 10008 (a cluster without a meta leader yet), 10023 (insufficient
# resources) or 10005 (no suitable peers, a node down) may pass, and are retried.
REPLICAS_NOT_SUPPORTED = 10074  # "replicas > 1 not supported in non-clustered mode"
# "insufficient storage resources available": a stream's max_bytes is reserved in the
# server's store (max_file_store: the NATS Helm chart sets the volume's size; nats-server's
# default is 75 % of the disk free at its start, the stream's own use counted back); a
# cap above it is refused at every create and update.
# Only a cap can ask for it: a stream without one reserves nothing.
STORAGE_EXCEEDED = 10047
# nats-py's outgoing buffer (its default, set explicitly by :func:`connect`). A publish
# that would take it past this waits inside nats-py until the socket takes the data,
# however long that is; :class:`PipelinedAppender` refuses such an append instead.
PENDING_BYTES = 2 * 1024 * 1024
ERROR_LOG_PERIOD_S = 30.0  # nats.error: one line per kind of error in this long
# Clients our own code closes (:func:`disconnect`, :func:`close_quietly`): any other
# close is nats-py giving up on the connection.
_CLOSED_BY_US: weakref.WeakSet[NATS] = weakref.WeakSet()
# Conditional appends scope their expected sequence to a branch of the conversation with
# ``Nats-Expected-Last-Subject-Sequence-Subject``, which nats-server has since 2.11.0
# (nats-io/nats-server#5281). An older one ignores the header and checks the sequence
# against the publish subject alone: every append after the first of a branch on
# another subject is refused as a conflict, again and again (no reply is ever recorded).
MIN_SERVER_VERSION = (2, 11, 0)


class AppendUnavailable(TransientError):
    """JetStream did not confirm the append (broker down, no quorum, a refusal…).

    ``maybe_stored``: the append went out and no answer came, so it may be in the log
    (a retry meets its ``Nats-Msg-Id``); False when it was refused or never sent.
    """

    def __init__(self, reason: str, *, maybe_stored: bool = False) -> None:
        super().__init__(reason)
        self.maybe_stored = maybe_stored


class EventTooLarge(PermanentError):
    """The event, with its headers, is over the broker's ``max_payload`` (1 MiB by
    default): no retry can store it. nats-py checks the payload alone, and a message
    its headers take over the limit makes the server close the connection."""


class ConcurrencyConflict(TransientError):
    """The expected last sequence was stale: another writer appended first."""


@dataclass(frozen=True, slots=True)
class Appended:
    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class StoredEvent:
    seq: int
    event: Event


async def connect(
    settings: NatsSettings,
    name: str,
    *,
    error_log_period_s: float = ERROR_LOG_PERIOD_S,
    on_lost: Callable[[str], None] | None = None,
    **options: object,
) -> NATS:
    """Connect with endless reconnects and a client name (shown in server monitoring)::

    nc = await connect(settings.nats, "wecombot-gateway")

    Reconnects are endless, but nats-py closes a client for good on an ``-ERR`` from the
    broker on a live connection (a payload over a ``max_payload`` lowered since it
    connected, a control line too long…): nothing it does again will ever succeed.
    With ``on_lost``, that is ``nats.closed`` (an error) and ``on_lost(reason)``; a close
    by :func:`disconnect` or :func:`close_quietly` is not.

    nats-py reports each failed attempt, twice a second, for as long as NATS stays away:
    ``nats.error`` is written once per kind of error every ``error_log_period_s`` (the
    next one says how many were not, ``suppressed``), and the line that says the client
    is connected again counts the rest (``errors_not_logged``).
    """
    log_ = log.bind(client=name)
    servers = without_credentials(settings.url)  # NATS_URL may carry a password
    errors = LogSampler(burst=1, period_s=error_log_period_s)

    async def on_error(exc: Exception) -> None:
        suppressed = errors.take((type(exc), str(exc)))
        if suppressed is None:
            return
        # Named: a wrong NATS_URL shows only as "connection refused" otherwise (the
        # first connection is tried again without end too: a pod may start before NATS).
        extra = {"suppressed": suppressed} if suppressed else {}
        log_.warning("nats.error", error=str(exc), nats_url=servers, **extra)

    client: list[NATS] = []

    async def on_disconnect() -> None:
        # A drain or close on shutdown disconnects too: that one is not news.
        if client and (client[0].is_closed or client[0].is_draining):
            return
        log_.warning("nats.disconnected")

    async def on_reconnect() -> None:
        log_.info("nats.reconnected", **_untold(errors))  # the next outage's first is written

    async def on_closed() -> None:
        if on_lost is None or not client or client[0] in _CLOSED_BY_US:
            return
        error = client[0].last_error
        reason = f"{type(error).__name__}: {error}" if error else "closed by nats-py"
        log_.error("nats.closed", error=reason, nats_url=servers)
        on_lost(f"the NATS connection was closed for good ({reason})")

    kwargs: dict[str, object] = {
        "servers": [s.strip() for s in settings.url.split(",")],
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 5,
        "allow_reconnect": True,
        "drain_timeout": 10,
        "error_cb": on_error,
        "disconnected_cb": on_disconnect,
        "reconnected_cb": on_reconnect,
        "closed_cb": on_closed,
        # Replies (JetStream API, PubAcks, token answers) come to an inbox of this client
        # alone, so NATS permissions can keep every service from reading another's.
        "inbox_prefix": topology.inbox_prefix(name),
        "pending_size": PENDING_BYTES,
    }
    if settings.user is not None and settings.password is not None:
        kwargs["user"] = settings.user
        kwargs["password"] = settings.password.reveal()
    if settings.creds is not None:
        kwargs["user_credentials"] = str(settings.creds)
    kwargs.update(options)
    nc = await nats.connect(**kwargs)  # type: ignore[arg-type]
    client.append(nc)
    if untold := _untold(errors):  # it took attempts: say how many more failed
        log_.info("nats.connected", **untold)
    return nc


def _untold(errors: LogSampler) -> dict[str, int]:
    untold = errors.reset()
    return {"errors_not_logged": untold} if untold else {}


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or update it to ``config``; safe to run from every replica.

    A single nats-server reserves a capped stream's ``max_bytes`` again when asked to
    create the stream it already holds, and refuses a cap over half its store although
    the stream has it (err_code 10047; an update does not, checked on 2.15): every start
    after the first was refused. Then the stream is looked at: as configured, nothing
    is asked; otherwise it is updated (which may be refused for the cap, for good).
    """
    try:
        await js.add_stream(config)
    except nats.js.errors.APIError as exc:
        if exc.err_code == STORAGE_EXCEEDED and config.max_bytes and config.name:
            try:
                held = await js.stream_info(config.name)
            except nats.js.errors.NotFoundError:
                raise exc from None  # not there: the cap is beyond the store
            if _as_configured(held.config, config):
                return
        elif exc.err_code != 10058:  # stream name already in use with a different config
            raise
        await js.update_stream(config)


def _as_configured(held: StreamConfig, wanted: StreamConfig) -> bool:
    """Whether the stream's config has every field ``wanted`` sets, as sent on the wire
    (the server fills in the rest)."""
    have = held.as_dict()
    return all(have.get(name) == value for name, value in wanted.as_dict().items())


async def ensure_topology(js: JetStreamContext, settings: NatsSettings) -> None:
    """Create or update the streams every service relies on. Idempotent."""
    await ensure_stream(
        js,
        topology.conversation_stream(
            replicas=settings.stream_replicas,
            duplicate_window_s=settings.duplicate_window_s,
            max_age_s=settings.history_max_age_s,
            max_bytes=settings.history_max_bytes,
        ),
    )
    await ensure_stream(
        js,
        topology.dead_letter_stream(
            replicas=settings.stream_replicas, max_age_s=settings.history_max_age_s
        ),
    )


async def append_event(
    js: JetStreamContext,
    event: Event,
    *,
    msg_id: str | None = None,
    expect_last_seq: int | None = None,
    expect_scope: str | None = None,
    timeout: float = 5.0,
    as_read: bytes | None = None,
) -> Appended:
    """Append one event to its conversation subject and wait for the PubAck.

    ``as_read``: the event's bytes as they were read, appended instead of this build's
    encoding of ``event`` (a copy keeps the fields only a newer build knows).

    ``msg_id`` becomes ``Nats-Msg-Id`` (JetStream drops a repeat within the duplicate
    window and answers ``duplicate=True``). ``expect_last_seq``/``expect_scope`` make the
    append conditional on the last sequence of the subjects matching ``expect_scope``
    (0 = none yet): optimistic concurrency per conversation branch. A single nats-server
    checks the expectation first: a repeated ``msg_id`` sent with a stale expectation (a
    retry of an append that went in after all) raises ConcurrencyConflict, not a
    duplicate (tests/integration/test_llm_log_contract.py); a clustered stream checks
    the ``msg_id`` first and answers ``duplicate=True``. Callers handle both.

    Messages on the branch that are not events (corrupt, or from a newer version) are
    skipped by every fold, so the expected sequence never counts them: a conflict caused
    only by such messages is not a conflict, and the append goes after them (otherwise
    one of them would wedge the conversation for good).
    """
    headers: dict[str, str] = {}
    if msg_id is not None:
        headers["Nats-Msg-Id"] = msg_id
    if expect_last_seq is not None:
        headers["Nats-Expected-Last-Subject-Sequence"] = str(expect_last_seq)
        if expect_scope is not None:
            headers["Nats-Expected-Last-Subject-Sequence-Subject"] = expect_scope
    data = encode_event(event) if as_read is None else as_read
    try:
        return await _publish(js, event, data, headers, timeout)
    except ConcurrencyConflict:
        if expect_last_seq is None or expect_scope is None:
            raise
        tail = await _unreadable_tail(js, event, expect_scope, after_seq=expect_last_seq)
        if tail is None:
            raise
        log.warning(
            "event.appending_after_unreadable",
            scope=expect_scope,
            expected_seq=expect_last_seq,
            last_seq=tail,
        )
        headers["Nats-Expected-Last-Subject-Sequence"] = str(tail)
        return await _publish(js, event, data, headers, timeout)


async def _unreadable_tail(
    js: JetStreamContext, event: Event, scope: str, *, after_seq: int
) -> int | None:
    """The last sequence on ``scope`` if every message there after ``after_seq`` is not an
    event; None if one is (a real conflict), or if the log cannot tell now. Both read
    from the stream leader: a lagging follower's direct read would miss the very event
    that caused the conflict, and the append would go after it unseen."""
    try:
        last = await js.get_last_msg(topology.CONVERSATION_STREAM, scope)
        conversation = ConversationRef.of(event)
        branch = read_conversation(
            js, conversation, after_seq=after_seq, branch=scope, direct=False
        )
        async for _ in branch:
            return None  # a real event was appended after the expected sequence
    except (TimeoutError, nats.errors.Error):
        return None
    assert last.seq is not None
    return last.seq if last.seq > after_seq else None


async def _publish(
    js: JetStreamContext, event: Event, data: bytes, headers: dict[str, str], timeout: float
) -> Appended:
    limit = max_payload(js)
    if limit is not None and (size := message_size(data, headers)) > limit:
        raise EventTooLarge(
            f"the event is {size:,} bytes with its headers, over the broker's max_payload "
            f"({limit:,})"
        )
    try:
        ack = await js.publish(subject_for(event), data, timeout=timeout, headers=headers or None)
    except nats.js.errors.APIError as exc:
        raise _refusal(exc.err_code, exc.description) from exc
    except (TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise AppendUnavailable(
            f"no PubAck within {timeout:g}s: {type(exc).__name__}",
            maybe_stored=not isinstance(exc, nats.errors.NoRespondersError),
        ) from exc
    except nats.errors.MaxPayloadError as exc:
        raise EventTooLarge(
            f"the event is {len(data):,} bytes, over the broker's max_payload"
        ) from exc
    except nats.errors.Error as exc:
        raise AppendUnavailable(f"cannot publish: {exc}") from exc
    return Appended(seq=ack.seq, duplicate=bool(ack.duplicate))


def message_size(data: bytes, headers: Mapping[str, str] | None = None) -> int:
    """The bytes of a message the broker holds to its ``max_payload``: the body and the
    headers together, as nats-py sends them (``NATS/1.0``, a ``key: value`` line each, a
    blank line), and a few more.

    nats-py checks the body alone: a message within its headers' size of the limit goes
    out, the broker answers ``-ERR`` and nats-py closes the connection for good. Compare
    this with :func:`max_payload` before publishing instead:

    >>> message_size(b"x" * 100)
    100
    >>> message_size(b"x" * 100, {"Nats-Msg-Id": "ww1-2:42"})
    151
    >>> message_size(b"", {"Reason": "成员已离职"})  # UTF-8 bytes: WeCom's words, in a DLQ header
    53
    """
    if not headers:
        return len(data)
    lines = sum(len(k) + len(v.encode()) + 4 for k, v in headers.items())
    return len(data) + len("NATS/1.0\r\n\r\n") + lines + 16


def reconnect_counter(client: object) -> Callable[[], int] | None:
    """How many times ``client`` (a nats-py client) has connected again, as a function
    (nats-py counts one once its CONNECT is through); None when not known (a fake)."""
    stats = getattr(client, "stats", None)
    if not isinstance(stats, dict) or "reconnects" not in stats:
        return None
    return lambda: int(stats["reconnects"])


def max_payload(client: NATS | JetStreamContext | None) -> int | None:
    """The broker's ``max_payload`` as it told ``client`` (a connection, or a JetStream
    context on one) when it connected; None when not known (a fake).

    >>> max_payload(None) is None
    True
    """
    connection = getattr(client, "_nc", client)  # JetStreamContext keeps its connection
    limit = getattr(connection, "max_payload", None)
    return limit if isinstance(limit, int) else None


def _refusal(err_code: int | None, description: str | None) -> TransientError:
    """The error for a PubAck carrying an API error."""
    if err_code == WRONG_LAST_SEQUENCE:
        return ConcurrencyConflict(str(description))
    return AppendUnavailable(f"JetStream refused the append: {description}")


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int | None = None
    description: str | None = None


class _PubAck(msgspec.Struct):
    """``{"stream": "WECOMBOT", "seq": 5, "duplicate": true}`` or ``{"error": {...}}``."""

    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_decode_pub_ack = msgspec.json.Decoder(_PubAck).decode
_NO_RESPONDERS = "503"  # the status header of the server's answer when no stream listens


class PipelinedAppender:
    """:func:`append_event` for a hot path: PubAcks pipelined on one inbox subscription.

    ``js.publish`` makes every append a request of its own (a random token, a future, a
    ``wait_for`` timer, the PubAck's JSON into a dataclass). Here each append publishes
    with a reply subject ``<inbox>.<n>`` under one wildcard subscription, and the PubAck
    resolves the append's future: about a third less CPU per append inside a serving
    process (``make bench``, scenario 1, part by part: bare handler + ``js.publish``
    82–105 µs, + this 60–82 µs, the bare handler alone 36–40 µs). Same results and errors
    as :func:`append_event` with a ``msg_id`` (no conditional appends: the gateway has
    no use for them).

    The deadline is one timer per append that fails its future, not ``asyncio.timeout``
    (≈ 21k instructions less per append, 14 % of it). That only works because the
    publish itself never waits: nats-py's ``publish`` waits only when its outgoing buffer
    would pass ``pending_limit`` (a connected server not reading, a full socket), and
    such an append is refused at once instead, as AppendUnavailable.

    So is one while the client is away (reconnecting): nats-py would keep the publish in
    its buffer and send it once back, however late. The caller has answered 503 by then
    (WeCom retries, another replica stores the retry): past the duplicate window, the
    late copy was stored a second time, out of order::

    appender = await PipelinedAppender.start(nc)
    await appender.append(event, msg_id="ww1-2:42", timeout=2.0)
    # → Appended(seq=7, duplicate=False)
    """

    __slots__ = ("_inbox", "_limit", "_nc", "_next", "_sub", "_waiting")

    def __init__(self, nc: NATS, *, pending_limit: int = PENDING_BYTES) -> None:
        self._nc = nc
        self._limit = pending_limit  # the client's pending_size (connect's PENDING_BYTES)
        self._inbox = nc.new_inbox()  # under the client's inbox prefix: its permissions
        self._next = itertools.count()
        self._waiting: dict[str, asyncio.Future[_PubAck]] = {}
        self._sub: Subscription | None = None

    @classmethod
    async def start(cls, nc: NATS, *, pending_limit: int = PENDING_BYTES) -> PipelinedAppender:
        appender = cls(nc, pending_limit=pending_limit)
        appender._sub = await nc.subscribe(appender._inbox + ".*", cb=appender._on_ack)
        return appender

    async def append(self, event: Event, *, msg_id: str, timeout: float) -> Appended:
        """Append ``event`` once per ``msg_id`` and wait for the PubAck (AppendUnavailable
        when it does not come within ``timeout``, and at once while the client is away or
        when the data already waiting to be sent leaves no room for it)."""
        data = encode_event(event)
        size = len(data) + len(msg_id)
        if size + _HEADERS_OVERHEAD > self._nc.max_payload:
            raise EventTooLarge(
                f"the event is {size + _HEADERS_OVERHEAD:,} bytes with its headers, over the "
                f"broker's max_payload ({self._nc.max_payload:,})"
            )
        if not self._nc.is_connected:
            raise AppendUnavailable("NATS is away (reconnecting): nothing is sent meanwhile")
        pending = self._nc.pending_data_size
        if pending and pending + size + _COMMAND_OVERHEAD > self._limit:
            raise AppendUnavailable(f"NATS is not taking writes: {pending} bytes wait to be sent")
        token = str(next(self._next))
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_PubAck] = loop.create_future()
        self._waiting[token] = waiter
        deadline = loop.call_later(timeout, _no_pub_ack, waiter, timeout)
        try:
            await self._nc.publish(
                subject_for(event),
                data,
                reply=f"{self._inbox}.{token}",
                headers={"Nats-Msg-Id": msg_id},
            )
            ack = await waiter
        except nats.errors.Error as exc:
            raise AppendUnavailable(f"cannot publish: {exc}") from exc
        finally:
            deadline.cancel()
            self._waiting.pop(token, None)
        if ack.error is not None:
            raise _refusal(ack.error.err_code, ack.error.description)
        return Appended(seq=ack.seq, duplicate=ack.duplicate)

    @property
    def in_flight(self) -> int:
        """Appends published and waiting for their PubAck."""
        return len(self._waiting)

    async def close(self) -> None:
        """Stop listening for PubAcks; appends still waiting fail as AppendUnavailable."""
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(
                    AppendUnavailable("the appender was closed", maybe_stored=True)
                )
        if self._sub is not None:
            sub, self._sub = self._sub, None
            # Closed or draining: the subscription is gone with the connection anyway.
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _on_ack(self, msg: Msg) -> None:
        waiter = self._waiting.get(msg.subject.rpartition(".")[2])
        if waiter is None or waiter.done():
            return  # its append gave up (timeout): the event may be stored all the same
        headers = msg.headers
        if headers and headers.get("Status") == _NO_RESPONDERS:
            waiter.set_exception(AppendUnavailable("no stream answered the append (503)"))
            return
        try:
            waiter.set_result(_decode_pub_ack(msg.data))
        except msgspec.DecodeError as exc:
            waiter.set_exception(AppendUnavailable(f"unreadable PubAck: {exc}", maybe_stored=True))


# The HPUB line and headers around an event's bytes and its message id: the subject
# (prefix, app, a UserID of at most 64 characters escaped), the reply inbox, the rest.
_COMMAND_OVERHEAD = 512
# The header block around the message id (``NATS/1.0``, ``Nats-Msg-Id: ``, the line
# ends): the server holds headers and payload together to its max_payload.
_HEADERS_OVERHEAD = 32


def _no_pub_ack(waiter: asyncio.Future[_PubAck], timeout: float) -> None:
    if not waiter.done():
        waiter.set_exception(AppendUnavailable(f"no PubAck within {timeout:g}s", maybe_stored=True))


async def ack_floor(
    js: JetStreamContext, consumer: str, *, stream: str = topology.CONVERSATION_STREAM
) -> int | None:
    """A stream seq at or below which ``consumer`` has settled every message
    (acknowledged, or terminated after dead-lettering); 0 while the consumer does not
    exist (nothing settled by it yet); None when it cannot be read."""
    try:
        info = await js.consumer_info(stream, consumer, timeout=2)
    except nats.js.errors.NotFoundError:
        return 0
    except (TimeoutError, nats.errors.Error) as exc:
        log.debug("consumer.ack_floor_unknown", consumer=consumer, error=str(exc))
        return None
    return (info.ack_floor.stream_seq or 0) if info.ack_floor is not None else 0


class SettledFloor:
    """A work consumer's ack floor as one process knows it: the latest read, read again
    at most every ``refresh_s`` (one ``consumer_info`` call, however many deliveries of
    the process are waiting on an earlier message; those that ask while it is on its
    way wait for its answer, not take the floor from before it). A read that fails
    keeps the floor; one that answers lower lowers it (the consumer or its stream was
    made again, and sequences start over: a floor kept from before would let every
    later message skip its wait for an earlier one until a restart).

    The llm and the sender use it the same way: an earlier message at or below the
    floor was acknowledged or dead-lettered, so nobody will handle it again and a later
    one of its conversation need not wait for it, even when it left no outcome in the
    log (see :class:`~wecombot_common.worker.PullWorker`)::

        settled = SettledFloor(lambda: ack_floor(js, "sender"), refresh_s=1.0)
        if blocker_seq <= await settled.refresh(): ...
    """

    __slots__ = ("_clock", "_pending", "_read", "_read_at", "_refresh_s", "through")

    def __init__(
        self,
        read: Callable[[], Awaitable[int | None]],
        *,
        refresh_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._read = read
        self._refresh_s = refresh_s
        self._clock = clock
        self._read_at = -math.inf
        self._pending: asyncio.Future[None] | None = None  # the read on its way
        self.through = 0  # the floor as last read

    async def refresh(self) -> int:
        """The floor, read again unless it was read within ``refresh_s``."""
        now = self._clock()
        if self._pending is None and now - self._read_at >= self._refresh_s:
            self._read_at = now
            self._pending = asyncio.ensure_future(self._read_once())
        if self._pending is not None:
            await asyncio.shield(self._pending)
        return self.through

    async def _read_once(self) -> None:
        try:
            value = await self._read()
            if value is not None:
                self.through = value
        finally:
            self._pending = None


async def read_conversation(
    js: JetStreamContext,
    conversation: ConversationRef,
    *,
    after_seq: int = 0,
    branch: str | None = None,
    direct: bool = True,
    reach: int = 0,
) -> AsyncIterator[StoredEvent]:
    """Yield a conversation's events after ``after_seq``, in stream order, up to now.

    Uses batched "next message by subject" direct gets (:class:`_DirectReads`): no
    consumer is created (a consumer per read caps a pipeline at tens of replies/s on 2
    cores), and a read costs one round trip per ``DIRECT_BATCH`` events, at least one.

    ``direct`` reads (the default) may be answered by any replica of a replicated stream
    (``allow_direct``), and a follower can lag its leader: such a read may end before
    the last append ("it is possible for a lookup after an update to not include the
    message that was just added", nats.js's DirectStreamAPI docs). Each message it does
    yield is the stream's own (a sequence is never reused). ``direct=False`` is for a
    reader that knows the log holds more than a read showed: it asks the stream leader
    (``$JS.API.STREAM.MSG.GET``), which has every acknowledged append, for the last
    message of the conversation, and reads up to it at least (``reach``, below). The
    leader's API has no batches: a get from it per event made such a read of a long
    conversation as slow as a cold read was before the batches.

    ``reach``: a seq of this conversation the log is known to hold (the event being
    handled). A direct read that ends before it was answered by a lagging follower: the
    rest is read from the leader (log ``conversation.read_lagged``). Still short of it
    after that, the event is gone (aged out, the stream purged or made again).
    """
    subject = branch or conversation.all_events
    seq = after_seq + 1
    if not direct:
        try:
            last = await js.get_last_msg(topology.CONVERSATION_STREAM, subject)
        except nats.js.errors.NotFoundError:
            return  # the leader holds nothing of it
        assert last.seq is not None
        if last.seq < seq:
            return
        reach, direct = max(reach, last.seq), True
    while True:
        found, more = await (
            _read_direct(js, subject, seq) if direct else _read_leader(js, subject, seq)
        )
        for stored_seq, stored_subject, data in found:
            seq = stored_seq + 1
            try:
                event = decode_event(data)
            except EventDecodeError as exc:
                # A foreign or corrupt message must not make the conversation unreadable;
                # the consumer that meets it dead-letters it with the reason.
                log.warning(
                    "event.undecodable", seq=stored_seq, subject=stored_subject, reason=str(exc)
                )
                continue
            if stored_subject != subject_for(event):
                # Filed on another conversation's or branch's subject (by hand, a faulty
                # build): not this conversation's history; dead-lettered by its consumer.
                log.warning("event.misfiled", seq=stored_seq, subject=stored_subject)
                continue
            yield StoredEvent(seq=stored_seq, event=event)
        if more:
            continue
        if direct and seq <= reach:
            log.info("conversation.read_lagged", read_to=seq - 1, reach=reach)
            direct = False
            continue
        return


# A stored message as a read gives it: its stream sequence, its subject, its data.
_Stored = tuple[int, str, bytes]
# A batched direct get (nats-server 2.11+) answers up to this many messages, and up to
# this many bytes of them (at least one message, whatever its size): a cold read of a
# long conversation holds at most one batch at a time.
DIRECT_BATCH = 256
DIRECT_BATCH_BYTES = 1024 * 1024
# Batches in flight on one connection, at most. The broker sends a batch without flow
# control and queues at most 64 MiB for a client (its max_pending): past that it closes
# the connection as a slow consumer ("Slow Consumer Detected: MaxPending of 67108864
# Exceeded"), every read, append and ack on it failing. 64 cold reads at once (the llm's
# LLM_MAX_CONCURRENCY after a restart) did that; 8 hold at most 8 × (1 MiB + one event).
DIRECT_BATCHES_IN_FLIGHT = 8


async def _read_leader(js: JetStreamContext, subject: str, seq: int) -> tuple[list[_Stored], bool]:
    """The next message on ``subject`` from ``seq``, from the stream leader
    (``$JS.API.STREAM.MSG.GET``, one message a request), and whether to read on."""
    try:
        raw = await js.get_msg(topology.CONVERSATION_STREAM, seq=seq, subject=subject, next=True)
    except nats.js.errors.NotFoundError:
        return [], False
    assert raw.seq is not None and raw.subject is not None
    return [(raw.seq, raw.subject, raw.data or b"")], True


async def _read_direct(js: JetStreamContext, subject: str, seq: int) -> tuple[list[_Stored], bool]:
    """The messages on ``subject`` from ``seq``, a batch of them, by a direct get that any
    replica may answer, and whether there are more."""
    nc = js._nc
    reads = _DIRECT_READS.get(nc)
    if reads is None:
        reads = _DIRECT_READS[nc] = _DirectReads(nc.new_inbox())
    return await reads.batch(
        nc, f"{js._prefix}.DIRECT.GET.{topology.CONVERSATION_STREAM}", subject, seq, js._timeout
    )


class _DirectReads:
    """Batched direct gets over one wildcard inbox subscription of a connection.

    nats-py's ``get_msg`` reads one message a request: a cold read of a conversation of
    20,000 events took 4.3 s, one round trip each, and every catch-up read two (the new
    event, then "not found"). A batched direct get (``batch``, ``max_bytes``) answers
    its messages, then a ``204 EOB`` status saying how many more there are
    (``Nats-Num-Pending``); nothing at all is ``404``. nats-py's request takes one
    answer per request, so each batch gets a reply subject ``<inbox>.<n>`` under one
    subscription, as :class:`PipelinedAppender` does for PubAcks.

    Kept by its client in ``_DIRECT_READS``, weakly: it holds no reference to the client
    (nor to the subscription, which does), or no client that ever read would be freed.
    """

    __slots__ = ("_inbox", "_next", "_reads", "_slots", "_started", "_subscribed")

    def __init__(self, inbox: str) -> None:
        self._inbox = inbox  # the client's new_inbox(), under its prefix: its permissions
        self._next = itertools.count()
        self._reads: dict[str, _Batch] = {}
        self._subscribed = False
        self._started = asyncio.Lock()
        self._slots = asyncio.Semaphore(DIRECT_BATCHES_IN_FLIGHT)

    async def batch(
        self, nc: NATS, api: str, subject: str, seq: int, timeout: float
    ) -> tuple[list[_Stored], bool]:
        loop = asyncio.get_running_loop()
        due = loop.time() + timeout  # waiting for a slot included
        # Every read comes here: a free slot is taken without a timeout's context manager.
        if self._slots.locked():
            try:
                async with asyncio.timeout_at(due):
                    await self._slots.acquire()
            except TimeoutError:
                raise nats.errors.TimeoutError from None
        else:
            await self._slots.acquire()
        try:
            return await self._batch(nc, api, subject, seq, due)
        finally:
            self._slots.release()

    async def _batch(
        self, nc: NATS, api: str, subject: str, seq: int, due: float
    ) -> tuple[list[_Stored], bool]:
        if not self._subscribed:
            async with self._started:
                if not self._subscribed:
                    await nc.subscribe(self._inbox + ".*", cb=self._on_msg)
                    self._subscribed = True
        token = str(next(self._next))
        loop = asyncio.get_running_loop()
        read = _Batch(loop.create_future())
        self._reads[token] = read
        deadline = loop.call_at(due, _no_batch_end, read.end)
        try:
            request = _BatchRequest(seq, subject, DIRECT_BATCH, DIRECT_BATCH_BYTES)
            await nc.publish(api, _batch_encoder.encode(request), reply=f"{self._inbox}.{token}")
            more = await read.end
        finally:
            deadline.cancel()
            self._reads.pop(token, None)
        return read.found, more

    async def _on_msg(self, msg: Msg) -> None:
        read = self._reads.get(msg.subject.rpartition(".")[2])
        if read is None or read.end.done():
            return  # its read gave up (timeout)
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None:
            read.found.append((int(headers["Nats-Sequence"]), headers["Nats-Subject"], msg.data))
            if "Nats-Num-Pending" not in headers:
                # A server that does not batch (before 2.11: a replica not upgraded yet in
                # a rolling upgrade) answers one message and no end: read on from it.
                read.end.set_result(True)
        elif status == _END_OF_BATCH:
            # How many more match after this batch (absent: read on while some came).
            pending = headers.get("Nats-Num-Pending")
            read.end.set_result(int(pending) > 0 if pending is not None else bool(read.found))
        elif status == _NOT_FOUND:
            read.end.set_result(False)
        elif status == _NO_RESPONDERS:
            read.end.set_exception(nats.errors.NoRespondersError())
        else:
            description = headers.get("Description", "")
            read.end.set_exception(
                nats.js.errors.APIError(code=int(status), description=description)
            )


@dataclass(slots=True)
class _Batch:
    end: asyncio.Future[bool]  # whether more messages match past this batch
    found: list[_Stored] = field(default_factory=list)


class _BatchRequest(msgspec.Struct, frozen=True):
    seq: int
    next_by_subj: str
    batch: int
    max_bytes: int


_batch_encoder = msgspec.json.Encoder()
_END_OF_BATCH = "204"
_NOT_FOUND = "404"
_DIRECT_READS: weakref.WeakKeyDictionary[NATS, _DirectReads] = weakref.WeakKeyDictionary()


def _no_batch_end(end: asyncio.Future[bool]) -> None:
    if not end.done():
        end.set_exception(nats.errors.TimeoutError())


async def disconnect(nc: NATS, name: str) -> None:
    """Drain ``nc`` (flush what is buffered, let subscriptions finish), or close it when it
    cannot drain (reconnecting, already closing). Never raises: a stopping service must
    stop cleanly, not report a crash::

        await disconnect(nc, "wecombot-llm")
    """
    if nc.is_closed:
        return
    _CLOSED_BY_US.add(nc)
    try:
        await nc.drain()
        return
    except (TimeoutError, nats.errors.Error, OSError, RuntimeError) as exc:
        # Reconnecting or closed: nothing buffered can be flushed anyway.
        log.warning("nats.drain_failed", client=name, error=f"{type(exc).__name__}: {exc}")
    await close_quietly(nc, name)


async def close_quietly(nc: NATS, name: str) -> None:
    """``nc.close()``, which raises half-way when called while nats-py reconnects with
    unsent data (it writes that data into the dead transport: ConnectionResetError on
    asyncio's loop, RuntimeError on uvloop's). The process is stopping: say so, go on."""
    _CLOSED_BY_US.add(nc)
    try:
        await nc.close()
    except (nats.errors.Error, OSError, RuntimeError) as exc:
        log.warning("nats.close_failed", client=name, error=f"{type(exc).__name__}: {exc}")


def server_too_old(version: ServerVersion) -> str | None:
    """Why a broker of ``version`` (``nc.connected_server_version``) cannot serve
    wecombot, or None.

    >>> server_too_old(ServerVersion("2.10.22")).split(":")[0]
    'nats-server 2.10.22 is too old'
    >>> server_too_old(ServerVersion("2.11.0")) is None
    True
    """
    try:
        found = (version.major, version.minor, version.patch)
    except ValueError:  # not a semantic version (a development build): let it be tried
        return None
    if found >= MIN_SERVER_VERSION:
        return None
    needed = ".".join(map(str, MIN_SERVER_VERSION))
    return (
        f"nats-server {'.'.join(map(str, found))} is too old: wecombot needs {needed} or "
        "later (its appends scope their expected sequence with "
        "Nats-Expected-Last-Subject-Sequence-Subject)"
    )


async def connect_when_ready(
    settings: NatsSettings,
    name: str,
    stop: asyncio.Event,
    prepare: Callable[[JetStreamContext], Awaitable[T]],
    *,
    first_retry_s: float = 0.5,
    max_retry_s: float = 15.0,
) -> tuple[NATS, T] | None:
    """Connect, then run ``prepare`` (create streams, buckets…) until it succeeds.

    nats-py keeps retrying an unreachable server by itself; ``prepare`` is retried with
    exponential backoff while JetStream is unavailable: no responders (not enabled on the
    server or the account, or still starting: ``nats.not_ready`` says both), a cluster
    electing its leader, a timeout. What no retry can fix raises ConfigError (exit 2),
    the connection closed: a server older than 2.11, ``WECOMBOT_STREAM_REPLICAS`` above
    1 on a server that is not clustered (err_code 10074), a ``WECOMBOT_HISTORY_MAX_MB``
    its store cannot reserve (err_code 10047), or a user the server refuses what
    ``prepare`` asks (permissions violation). Returns None if ``stop`` is set
    first, so a service waiting for its broker still stops at once on SIGTERM::

        ready = await connect_when_ready(s.nats, "wecombot-llm", stop,
                                         lambda js: ensure_topology(js, s.nats))
    """
    log_ = log.bind(client=name)
    log_.info("nats.connecting", nats_url=settings.url)
    # A client nats-py closes for good stops the service as failed (exit 1): left
    # running, it answered nobody with /healthz ok, so nothing ever restarted it.
    nc = await unless_stopped(
        connect(settings, name, on_lost=lambda reason: fail(stop, reason)),
        stop,
        discard=lambda late: close_quietly(late, name),
    )
    if nc is None:
        return None
    if (too_old := server_too_old(nc.connected_server_version)) is not None:
        await close_quietly(nc, name)
        raise ConfigError(f"{too_old}; NATS_URL points at {without_credentials(settings.url)}")
    js = nc.jetstream()
    delay = first_retry_s
    while True:
        seen = nc.last_error
        try:
            prepared = await prepare(js)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            refusal = nc.last_error if nc.last_error is not seen else None
            mismatch = _misconfigured(exc, settings) or _refused(refusal, settings)
            if mismatch is not None:
                await close_quietly(nc, name)
                raise ConfigError(mismatch) from exc
            log_.warning("nats.not_ready", error=_not_ready(exc, refusal), retry_in_s=delay)
        else:
            return nc, prepared
        if await unless_stopped(asyncio.sleep(delay, result=True), stop) is None:
            await close_quietly(nc, name)
            return None
        delay = min(delay * 2, max_retry_s)


# Refused a stream update (deploy/nats/auth.conf gives it to `setup` alone): a service
# whose stream settings differ from the stream's waits, not ready, for the setup Job.
_UPDATE_REFUSED = "$js.api.stream.update."


def _refused(error: Exception | None, settings: NatsSettings) -> str | None:
    """The broker refused this user what ``prepare`` asks (its ``-ERR`` reaches nats-py's
    last error, ``error`` here, and the request then times out): credentials no retry
    mends, or None. Waited for, setup said ``nats.not_ready TimeoutError`` until the
    Job's deadline. A refused stream update is waited for (:func:`_not_ready`)."""
    if error is None:
        return None
    said = str(error).lower()
    if "permissions violation" not in said or _UPDATE_REFUSED in said:
        return None
    who = f"the NATS user {settings.user!r}" if settings.user else "a connection without NATS_USER"
    return (
        f"the NATS server refuses {who} what this needs ({str(error).removeprefix('nats: ')}): "
        "NATS_USER and NATS_PASSWORD (or NATS_CREDS) of another service, or permissions "
        "other than deploy/nats/auth.conf's"
    )


def _misconfigured(exc: BaseException, settings: NatsSettings) -> str | None:
    """Why ``prepare`` can never succeed against this server, or None (retry): the
    message of the ConfigError that ends the wait."""
    if not isinstance(exc, nats.js.errors.APIError):
        return None
    if exc.err_code == STORAGE_EXCEEDED and settings.history_max_bytes is not None:
        return (
            f"WECOMBOT_HISTORY_MAX_MB={settings.history_max_bytes // 2**20}, but the NATS "
            f"server at {without_credentials(settings.url)} cannot reserve that much for "
            f"the stream {topology.CONVERSATION_STREAM} (JetStream: {exc.description}, "
            f"err_code {exc.err_code}): set a smaller cap, within the server's file store "
            "(max_file_store: the volume's size under the NATS Helm chart, by default 75 % "
            "of the disk free when the server started), or give the servers a larger volume"
        )
    if exc.err_code != REPLICAS_NOT_SUPPORTED:
        return None
    return (
        f"WECOMBOT_STREAM_REPLICAS={settings.stream_replicas}, but the NATS server at "
        f"{without_credentials(settings.url)} is not clustered (JetStream: "
        f"{exc.description}, err_code {exc.err_code}): set WECOMBOT_STREAM_REPLICAS=1, or "
        f"point NATS_URL at a JetStream cluster of {settings.stream_replicas} servers or more"
    )


def _not_ready(exc: BaseException, refusal: Exception | None = None) -> str:
    """``exc`` for the ``nats.not_ready`` line. A JetStream request no one answered (a 503
    status without a body: no responders on ``$JS.API``; nats-py raises it without a
    code or a description), and a stream update this user may not make (``refusal``, the
    broker's ``-ERR``; the request then times out) are said in words."""
    if refusal is not None and _UPDATE_REFUSED in str(refusal).lower():
        return (
            "the stream's settings differ from these, and this NATS user may not change "
            "them (STREAM.UPDATE): waiting for `wecombot setup` to apply them"
        )
    if isinstance(exc, nats.errors.NoRespondersError) or (
        isinstance(exc, nats.js.errors.ServiceUnavailableError) and exc.err_code is None
    ):
        return (
            "JetStream does not answer (no responders on $JS.API): it is not enabled on "
            "this server or for this account (nats-server -js), or still starting"
        )
    return f"{type(exc).__name__}: {exc}"
