"""The shared token state and the refresh lock, in the JetStream KV bucket TOKEN_BUCKET.

Two keys per app (the app key is letters, digits and '-', valid in a KV key)::

    <app>.token   AppState: the current token (wall-clock expiry) and the last failure
    <app>.lock    Lock: who is calling gettoken, and until when that claim holds

Every write is a compare-and-set on the key's revision, so replicas and restarts agree:
the lock is taken with ``create()`` (fails if held) or, once held past its time (as the
taker times it, :meth:`KvTokenStore.claim`), ``update(last=rev)`` (only one taker wins);
the state is written with ``update(last=rev)`` of the revision the writer decided on::

    kv = await open_token_bucket(js, replicas=1)
    store = KvTokenStore(kv, "ww1-1000002")
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from wecombot_common.runtime import cancel_until_done
from wecombot_common.tokens import ERROR_KINDS
from wecombot_common.topology import TOKEN_BUCKET, token_bucket

from .domain import AppState, Lock
from .errors import StoreUnavailable

__all__ = ["Claim", "KvTokenStore", "Snapshot", "TokenStore", "open_token_bucket"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

# A waiter re-reads the bucket at least this often, so a watcher silent after a
# reconnection (until the keeper's resync) only slows waiters down to polling; it never
# strands them.
POLL_S = 1.0
_STREAM_EXISTS = 10058  # "stream name already in use with a different configuration"
_CAS = (10071, 10164)  # wrong last sequence: a compare-and-set lost
_NO_STREAM = 10059  # "stream not found": the bucket was deleted

_encoder = msgspec.json.Encoder()
_state_decoder = msgspec.json.Decoder(AppState)
_lock_decoder = msgspec.json.Decoder(Lock)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state as read at ``revision`` (0: the key was never written)."""

    state: AppState | None
    revision: int


@dataclass(frozen=True, slots=True)
class Claim:
    """The outcome of trying to take the refresh lock."""

    revision: int | None  # ours, when we hold the lock
    held_by: Lock | None  # the live holder, when we do not
    seen: int  # the lock key's revision we saw
    # Not ours: how long before that lock may be taken over, as this replica times it.
    retry_in_s: float = 0.0


class TokenStore(Protocol):
    async def load(self) -> Snapshot: ...

    async def save(self, state: AppState, last: int) -> int | None: ...

    async def claim(self, holder: str, now: float, hold_s: float) -> Claim: ...

    async def release(self, revision: int) -> None: ...

    async def wait_for_change(self, after: int, timeout_s: float) -> None: ...

    async def restart_watch(self) -> None: ...


class BucketMissing(StoreUnavailable):
    """The bucket is gone (deleted by hand, or its storage lost)."""


async def open_token_bucket(js: JetStreamContext, *, replicas: int) -> KeyValue:
    """Create the bucket, or bring an existing one to our config. Safe from every replica."""
    config = token_bucket(replicas=replicas)
    try:
        return await js.create_key_value(config)
    except nats.js.errors.BadRequestError as exc:
        if exc.err_code != _STREAM_EXISTS:
            raise
    stream = f"KV_{TOKEN_BUCKET}"
    info = await js.stream_info(stream)
    wanted = dataclasses.replace(
        info.config,
        description=config.description,
        num_replicas=config.replicas,
        max_msgs_per_subject=config.history,
        # Made by hand (`nats kv add`), a bucket may republish every write to a plain
        # subject (every token, to anyone who may subscribe), or serve reads from any
        # replica (a follower behind its leader: a refresh done already, done again), or
        # drop its keys after a TTL (a token before it expires: one more gettoken; a
        # refresh lock still held: two at once).
        republish=None,
        allow_direct=False,
        max_age=config.ttl or 0.0,
    )
    if wanted != info.config:
        await js.update_stream(wanted)
    return await js.key_value(TOKEN_BUCKET)


class KvTokenStore:
    """``reopen`` makes the bucket again when it is found missing (open_token_bucket):
    every replica may, and the first to do so wins; without it, the store stays
    unavailable until a restart."""

    def __init__(
        self, kv: KeyValue, app: str, reopen: Callable[[], Awaitable[KeyValue]] | None = None
    ) -> None:
        self._kv = kv
        self._reopen = reopen
        self._on_state: Callable[[Snapshot], None] | None = None
        self._token_key = f"{app}.token"
        self._lock_key = f"{app}.lock"
        self._pattern = f"{app}.*"
        self._seen = 0  # highest revision of our keys the watcher delivered
        self._changed = asyncio.Condition()
        self._watcher: Any = None
        self._restarting = asyncio.Lock()
        self._follower: asyncio.Task[None] | None = None
        # The lock revision last read, and when (this replica's monotonic clock).
        self._lock_seen: tuple[int, float] = (0, 0.0)

    # ------------------------------------------------------------ state
    async def load(self) -> Snapshot:
        try:
            return await self._load()
        except BucketMissing:
            if self._reopen is None:
                raise
            log.warning("token.bucket_missing", action="making it again")
            self._kv = await _guard(self._reopen())
            with contextlib.suppress(StoreUnavailable):  # requests still re-read KV
                await self.restart_watch()
            return await self._load()

    async def _load(self) -> Snapshot:
        try:
            entry = await _guard(self._kv.get(self._token_key))
        except nats.js.errors.KeyNotFoundError as exc:
            # nats-py says "no key" for "no stream" too; what it caught tells them apart.
            # A key deleted or purged by hand (`nats kv del`) is read through a
            # KeyDeletedError, an APIError without an err_code: reading it raised
            # AttributeError in every request, and no replica fetched a token again.
            cause = exc.__context__
            if _err_code(cause) == _NO_STREAM:
                raise BucketMissing("token bucket missing") from exc
            # A deleted key still has a revision (its delete marker) to write after.
            marker = getattr(exc, "entry", None)
            return Snapshot(None, int(getattr(marker, "revision", 0) or 0))
        return Snapshot(_decode_state(entry.value), int(entry.revision or 0))

    async def save(self, state: AppState, last: int) -> int | None:
        """Write ``state`` if the key is still at revision ``last``; None if it moved on."""
        try:
            revision = await _guard(self._kv.update(self._token_key, _encoder.encode(state), last))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        return int(revision)

    # ------------------------------------------------------------ lock
    async def claim(self, holder: str, now: float, hold_s: float) -> Claim:
        """Take the lock (create), or take over one held past ``hold_s`` (its holder
        crashed, or was cut off from NATS).

        How long a lock has been held is timed here, on this replica's own clock, from
        when it first read that revision of the lock: the deadline in it is the holder's
        wall clock, which another pod's need not match. Compared with this one's, a
        reader 20 s ahead took over a live lock (two gettokens), and a holder an hour
        ahead that died left every replica waiting for that hour. The deadline is kept
        for people reading the bucket (and for replicas of older builds)."""
        mine = _encoder.encode(Lock(holder=holder, deadline=now + hold_s))
        try:
            revision = await _guard(self._kv.create(self._lock_key, mine))
            return Claim(revision=int(revision), held_by=None, seen=int(revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        try:
            entry = await _guard(self._kv.get(self._lock_key))
        except nats.js.errors.KeyNotFoundError:
            return Claim(revision=None, held_by=None, seen=0)  # released meanwhile: retry
        seen = int(entry.revision or 0)
        current = _decode_lock(entry.value)
        held_for = self._held_for(seen)
        if current is not None and held_for < hold_s:
            return Claim(revision=None, held_by=current, seen=seen, retry_in_s=hold_s - held_for)
        try:
            revision = await _guard(self._kv.update(self._lock_key, mine, last=seen))
        except nats.js.errors.KeyWrongLastSequenceError:
            return Claim(revision=None, held_by=current, seen=seen)  # another taker won
        log.warning(
            "token.lock_taken_over",
            previous_holder=current.holder if current else None,
            held_for_s=round(held_for, 3),
        )
        return Claim(revision=int(revision), held_by=None, seen=int(revision))

    def _held_for(self, revision: int) -> float:
        """How long the lock has been at ``revision``, as far as this replica has seen:
        since it first read that revision (0 then)."""
        now = time.monotonic()
        if self._lock_seen[0] != revision:
            self._lock_seen = (revision, now)
        return now - self._lock_seen[1]

    async def release(self, revision: int) -> None:
        """Delete our lock, unless someone took it over (then it is theirs to release)."""
        try:
            await _guard(self._kv.delete(self._lock_key, last=revision))
        except nats.js.errors.APIError as exc:
            log.info("token.lock_lost", reason=str(exc.description))
        except StoreUnavailable as exc:
            log.warning("token.lock_release_failed", reason=str(exc))  # taken over in time

    # ------------------------------------------------------------ changes
    async def watch(self, on_state: Callable[[Snapshot], None]) -> None:
        """Follow both keys: ``on_state`` gets every new state; waiters wake on any change.
        A watch already running is stopped first: the start asks again after a refused
        watch, whose ``on_state`` a ``load`` that made the bucket again in between has
        already followed (``restart_watch``); two watchers would deliver every change
        twice, and ``close`` stop only one."""
        self._on_state = on_state
        await self.close()
        self._watcher = self._follower = None
        self._watcher = await _guard(self._kv.watch(self._pattern))
        self._follower = asyncio.create_task(self._follow(on_state), name="token-kv-watch")

    async def restart_watch(self) -> None:
        """Follow the bucket afresh: one made again from its start (the old watcher waits
        for sequences past the ones the deleted bucket had reached, so it would show
        nothing for long), or after a reconnection (the keeper's ``resync``).
        StoreUnavailable when the bucket does not answer: requests still re-read KV.
        One at a time: two at once would leave a watcher nobody stops."""
        async with self._restarting:
            await self.close()
            self._watcher = self._follower = None
            async with self._changed:
                self._seen = 0
            if self._on_state is not None:
                await self.watch(self._on_state)

    async def _follow(self, on_state: Callable[[Snapshot], None]) -> None:
        try:
            async for entry in self._watcher:
                if entry is None:  # "caught up" marker
                    continue
                revision = int(entry.revision or 0)
                if entry.key == self._token_key:
                    deleted = entry.operation is not None
                    on_state(Snapshot(None if deleted else _decode_state(entry.value), revision))
                async with self._changed:
                    self._seen = max(self._seen, revision)
                    self._changed.notify_all()
        except Exception as exc:  # waiters fall back to polling; requests re-read KV
            log.warning("token.watch_stopped", error=type(exc).__name__)

    async def wait_for_change(self, after: int, timeout_s: float) -> None:
        """Return when either key moved past revision ``after``, or after ``timeout_s``
        (at most POLL_S); the caller re-reads the bucket either way."""
        if timeout_s <= 0:
            return
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._seen > after), min(timeout_s, POLL_S)
                )

    async def close(self) -> None:
        if self._watcher is not None:
            with contextlib.suppress(Exception):
                await self._watcher.stop()
        if self._follower is not None:
            await cancel_until_done(self._follower)


def _err_code(exc: BaseException | None) -> int | None:
    """JetStream's err_code of an API error; nats-py's key-value errors (deleted, not
    found…) are APIErrors made without one."""
    return getattr(exc, "err_code", None) if isinstance(exc, nats.js.errors.APIError) else None


async def _guard(call: Awaitable[T]) -> T:
    """Translate 'NATS did not answer' into StoreUnavailable; CAS and not-found pass."""
    try:
        return await call
    except nats.js.errors.KeyNotFoundError:
        raise
    except nats.js.errors.NoStreamResponseError as exc:  # a write found no stream
        raise BucketMissing("token bucket missing: no stream took the write") from exc
    except nats.js.errors.APIError as exc:
        code = _err_code(exc)
        if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError) or code in _CAS:
            raise
        said = getattr(exc, "description", None) or str(exc)  # key-value errors: none
        if code == _NO_STREAM:
            raise BucketMissing(f"token bucket missing: {said}") from exc
        raise StoreUnavailable(f"token bucket refused: {said}") from exc
    except (nats.errors.Error, TimeoutError) as exc:
        raise StoreUnavailable(f"token bucket unavailable: {type(exc).__name__}") from exc


def _decode_state(raw: bytes | None) -> AppState | None:
    try:
        return _state_decoder.decode(raw or b"")
    except msgspec.DecodeError:
        pass
    # A newer build's failure of a kind this one does not know (its ErrorKind grew),
    # written during a rolling upgrade or before a rollback: read as this build reads an
    # errcode it does not know (wecom_error), with its backoff. Read as nothing, the
    # state dropped the token beside it, still valid: an older replica called gettoken,
    # and wrote a failed one's failure over the token for every replica.
    try:
        return msgspec.convert(_kind_known_here(msgspec.json.decode(raw or b"")), AppState)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        log.warning("token.state_undecodable")  # the next refresh overwrites it
        return None


def _kind_known_here(state: Any) -> Any:
    """``state`` (the JSON of an AppState) with a failure kind this build does not know
    read as ``wecom_error``."""
    match state:
        case {"failure": {"failure": {"kind": str(kind)} as failure} as last} if (
            kind not in ERROR_KINDS
        ):
            return {**state, "failure": {**last, "failure": {**failure, "kind": "wecom_error"}}}
    return state


def _decode_lock(raw: bytes | None) -> Lock | None:
    try:
        return _lock_decoder.decode(raw or b"")
    except msgspec.DecodeError:
        return None  # treated as stale: the next claimant takes it over
