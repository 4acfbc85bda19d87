"""One app's access_token: answered from memory, shared through KV, refreshed once.

How a request is answered (the rules are :func:`~.domain.decide`):

- memory holds a fresh token → answer it (no I/O: the hot path);
- the token is valid but inside TOKEN_REFRESH_MARGIN → answer it at once and start one
  background refresh;
- no valid token and backing off after a failure → answer that failure with retry_after;
- otherwise wait for the refresh. Within a process, callers share one in-flight task.
  Across replicas, the task re-reads the KV state, then takes the KV lock: the winner
  re-reads once more (someone may have just finished), calls gettoken and writes the
  result; the others wait for the state key to change, at most one refresh (as each
  times the lock on its own clock: pods' clocks need not agree), then take over a lock
  nobody released.

``invalidate(token)`` refreshes only while ``token`` is still the one in KV, so a burst
of 42001s from many senders costs one gettoken.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import secrets
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import get_args

import msgspec
import structlog

from wecombot_common.logs import register_secret
from wecombot_common.metrics import TOKEN_FETCHES
from wecombot_common.tokens import ErrorKind, TokenReply

from .domain import (
    Action,
    IssuedToken,
    Policy,
    after_failure,
    after_success,
    answer,
    bought_elsewhere,
    decide,
    fingerprint,
    refetch_held,
    reissued,
    replacing,
    usable_token,
    without_rejected,
)
from .errors import StoreUnavailable
from .source import TokenSource
from .store import Snapshot, TokenStore

__all__ = ["TokenKeeper"]

log = structlog.get_logger(__name__)

_RECHECK_S = 0.05  # past the time a lock may be held before claiming it again
# After a refresh that ended in an error (the bucket failing fast: a JetStream leader
# election answers at once), none is started behind an answer for this long: each get
# started one, with its KV request and its warning, at the rate of gets.
_PAUSE_AFTER_ABORT_S = 1.0

# Kinds of answer to a caller, never the result of a gettoken call.
_NOT_FETCH_RESULTS = frozenset(("unavailable", "unknown_app"))
# Every result's series at zero from the start: a counter's first sample is the baseline
# of rate() and increase(), so the first gettoken failure after a start did not count in
# the alert of docs/deploy.md.
for _result in ("ok", *(k for k in get_args(ErrorKind) if k not in _NOT_FETCH_RESULTS)):
    TOKEN_FETCHES.labels(_result)


class TokenKeeper:
    def __init__(
        self,
        app: str,
        source: TokenSource,
        store: TokenStore,
        policy: Policy,
        *,
        refresh_timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self._source = source
        self._store = store
        self._policy = dataclasses.replace(policy, started_at=clock())
        self._refresh_timeout_s = refresh_timeout_s
        self._clock = clock
        self._snapshot = Snapshot(None, 0)  # the newest state seen: loaded, written, watched
        # A token WeCom issued that the bucket would not take (token.save_failed), with
        # the revision it was to replace: see _read.
        self._unsaved: Snapshot | None = None
        self._inflight: dict[str | None, asyncio.Task[Snapshot]] = {}
        self._instance = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
        self._claims = itertools.count(1)
        self._refresh_paused_until = 0.0  # monotonic; see _PAUSE_AFTER_ABORT_S

    # ------------------------------------------------------------ the contract
    def answer_now(self, app: str) -> TokenReply | None:
        """The answer to ``get`` from memory, or None when the caller has to wait."""
        if app != self.app:
            return self._unknown_app(app)
        now = self._clock()
        state = self._snapshot.state
        action = decide(state, now, self._policy)
        if action is Action.FETCH:
            return None
        if action is Action.SERVE_AND_REFRESH:
            self._refresh_behind()
        return answer(state, now, self._policy)

    async def get(self, app: str) -> TokenReply:
        reply = self.answer_now(app)
        return reply if reply is not None else await self._resolve(None)

    async def invalidate(self, app: str, token: str) -> TokenReply:
        """``token`` was rejected by WeCom: refresh if it is still current, else answer
        the current one."""
        if app != self.app:
            return self._unknown_app(app)
        return await self._resolve(token)

    def adopt(self, snapshot: Snapshot) -> None:
        """Take a state read from or written to KV (or seen by the watcher) if newer."""
        if snapshot.revision < self._snapshot.revision:
            return
        if self._unsaved is not None:
            if snapshot.revision == self._unsaved.revision:
                return  # the state our unsaved token replaces: not back to it
            self._unsaved = None  # the bucket moved on
        if snapshot.state is not None and snapshot.state.token is not None:
            register_secret(snapshot.state.token.value, ephemeral=True)
        self._snapshot = snapshot

    async def close(self) -> None:
        """Stop refreshes still running (a lock left held is taken over after one refresh)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _unknown_app(self, app: str) -> TokenReply:
        return TokenReply(
            ok=False,
            kind="unknown_app",
            message=f"unknown app {app[:80]!r}: this token service holds {self.app!r} "
            "(check WECOM_CORP_ID and WECOM_AGENT_ID of both services)",
        )

    # ------------------------------------------------------------ waiting
    async def _resolve(self, rejected: str | None) -> TokenReply:
        # A crashed holder costs one refresh of waiting, then our own refresh: two at most.
        try:
            async with asyncio.timeout(2 * self._refresh_timeout_s):
                snapshot = await asyncio.shield(self._converging(rejected))
        except TimeoutError:
            snapshot = self._snapshot
        except StoreUnavailable as exc:
            return TokenReply(ok=False, kind="unavailable", message=str(exc))
        return answer(snapshot.state, self._clock(), self._policy, rejected)

    def _converging(self, rejected: str | None) -> asyncio.Task[Snapshot]:
        """The in-flight task for this goal, started if none runs (one per process)."""
        task = self._inflight.get(rejected)
        if task is None:
            task = asyncio.create_task(self._converge(rejected), name="token-refresh")
            self._inflight[rejected] = task
            task.add_done_callback(partial(self._finished, rejected))
        return task

    def _refresh_behind(self) -> None:
        """A refresh behind an answer already given, unless one was aborted just now."""
        if time.monotonic() >= self._refresh_paused_until:
            self._converging(None)

    def _finished(self, key: str | None, task: asyncio.Task[Snapshot]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._refresh_paused_until = time.monotonic() + _PAUSE_AFTER_ABORT_S
            log.warning("token.refresh_aborted", error=str(exc), error_type=type(exc).__name__)

    async def _converge(self, rejected: str | None) -> Snapshot:
        """Loop until the shared state answers the caller (a token or a failure)."""
        while True:
            snapshot = await self._read()
            if snapshot.revision < self._snapshot.revision:
                await self._start_over(snapshot)
            self.adopt(snapshot)
            now = self._clock()
            action = decide(snapshot.state, now, self._policy, rejected)
            if action is Action.FAIL and (
                retired := without_rejected(snapshot.state, now, self._policy, rejected)
            ):
                # No fetch before the backoff ends, but no serving what WeCom refuses
                # either: every get handed it out, and every send failed with it.
                revision = await self._store.save(retired, snapshot.revision)
                if revision is None:
                    continue  # the state moved on meanwhile: decide again
                log.warning(
                    "token.rejected_token_dropped",
                    app=self.app,
                    fingerprint=fingerprint(rejected or ""),
                    retry_after_s=round(max(0.0, retired.failure.retry_at - now), 3)
                    if retired.failure
                    else None,
                )
                snapshot = Snapshot(retired, revision)
                self.adopt(snapshot)
            if action in (Action.SERVE, Action.FAIL):
                if (held := refetch_held(snapshot.state, now, self._policy, rejected)) is not None:
                    log.warning(
                        "token.refetch_held",
                        app=self.app,
                        fingerprint=fingerprint(rejected or ""),
                        retry_after_s=round(held - now, 3),
                    )
                return snapshot
            if action is Action.SERVE_AND_REFRESH and rejected is not None:
                self._refresh_behind()  # the caller has its answer
                return snapshot
            holder = f"{self._instance}#{next(self._claims)}"
            claim = await self._store.claim(holder, now, self._refresh_timeout_s)
            if claim.revision is not None:
                try:
                    return await self._refresh(rejected)
                finally:
                    await self._store.release(claim.revision)
            # Another replica refreshes: wait for its write, or until its lock may be
            # taken over (timed by the store on this replica's clock).
            wait_s = min(claim.retry_in_s, self._refresh_timeout_s) + _RECHECK_S
            await self._store.wait_for_change(max(snapshot.revision, claim.seen), wait_s)

    async def resync(self) -> None:
        """Follow the bucket afresh after NATS reconnected. The watcher, an ordered
        consumer, goes silent across a broker restart until nats-py's heartbeat check
        resets it (15-20 s), and meanwhile this replica would answer from memory a token
        another one had replaced, even one WeCom rejected. StoreUnavailable while the
        bucket does not answer yet."""
        await self._store.restart_watch()
        snapshot = await self._read()
        if snapshot.revision < self._snapshot.revision:
            await self._start_over(snapshot)
        self.adopt(snapshot)

    async def _read(self) -> Snapshot:
        """The state in the bucket, with a token WeCom issued that it would not take
        (token.save_failed) written now, if the bucket has not moved on since. Adopted as
        it was read, the state that token replaced came back: the token a sender had
        reported rejected, served again to every get, and replaced by one more gettoken."""
        snapshot = await self._store.load()
        unsaved = self._unsaved
        if unsaved is None or snapshot.revision != unsaved.revision:
            return snapshot
        token = usable_token(unsaved.state, self._clock())
        if unsaved.state is None or token is None:
            self._unsaved = None  # expired meanwhile: the state read decides
            return snapshot
        revision = await self._store.save(unsaved.state, snapshot.revision)
        self._unsaved = None
        if revision is None:
            return await self._store.load()  # moved on after all: what is there now
        log.info("token.saved_late", app=self.app, fingerprint=fingerprint(token.value))
        return Snapshot(unsaved.state, revision)

    async def _start_over(self, snapshot: Snapshot) -> None:
        """A load from the bucket (its leader, never behind) went back in revisions: the
        bucket was made again (deleted by hand, its storage lost). What this replica
        remembers, the token it would still serve included, belongs to the old one."""
        log.warning(
            "token.bucket_recreated", seen_revision=self._snapshot.revision, now=snapshot.revision
        )
        self._snapshot = Snapshot(None, 0)
        self._unsaved = None
        with contextlib.suppress(StoreUnavailable):  # requests still re-read KV
            await self._store.restart_watch()

    async def _refresh(self, rejected: str | None) -> Snapshot:
        """Holding the lock: check again, call gettoken, write the outcome for everyone."""
        snapshot = await self._read()
        self.adopt(snapshot)
        action = decide(snapshot.state, self._clock(), self._policy, rejected)
        if action not in (Action.FETCH, Action.SERVE_AND_REFRESH):
            return snapshot  # another replica finished between our read and our claim
        outcome = await self._source.fetch()
        now = self._clock()
        reason = _reason(action, rejected, snapshot, now, self._policy)
        if isinstance(outcome, IssuedToken):
            register_secret(outcome.value, ephemeral=True)
            outcome = msgspec.structs.replace(outcome, credentials=self._policy.credentials)
            current = snapshot.state.token if snapshot.state is not None else None
            outcome = reissued(outcome, current)
            if current is not None and current.value == rejected:
                outcome = replacing(outcome, current, self._policy)
            TOKEN_FETCHES.labels("ok").inc()
            state = after_success(outcome)
            log.info(
                "token.fetched",
                app=self.app,
                reason=reason,
                fingerprint=fingerprint(outcome.value),
                expires_in_s=round(outcome.expires_at - now),
                rejected_in_a_row=outcome.rejected_in_a_row,
                reissued=outcome.reissued,
            )
        else:
            TOKEN_FETCHES.labels(outcome.kind).inc()
            state = after_failure(snapshot.state, outcome, now, self._policy, rejected)
            assert state.failure is not None
            log.warning(
                "token.fetch_failed",
                app=self.app,
                reason=reason,
                kind=outcome.kind,
                errcode=outcome.errcode,
                detail=outcome.message,
                attempts=state.failure.attempts,
                retry_after_s=round(state.failure.retry_at - now, 3),
            )
        try:
            revision = await self._store.save(state, snapshot.revision)
            if revision is None:
                # Our claim was taken over while we were slow and the taker wrote first.
                log.warning("token.save_conflict", app=self.app)
                latest = await self._store.load()
                won = usable_token(latest.state, now, rejected)
                if not isinstance(outcome, IssuedToken) or won is not None:
                    self.adopt(latest)
                    return latest
                # What won holds no token (a failure, say): ours goes on top of it.
                revision = await self._store.save(state, latest.revision)
                if revision is None:
                    latest = await self._store.load()
                    self.adopt(latest)
                    return latest
        except StoreUnavailable:
            if not isinstance(outcome, IssuedToken):
                raise
            # WeCom issued it: answer with it rather than fetch another for the next
            # caller. This replica writes it at its next read of the bucket (_read).
            log.warning("token.save_failed", app=self.app, fingerprint=fingerprint(outcome.value))
            held = Snapshot(state, snapshot.revision)
            self._unsaved = None
            self.adopt(held)
            self._unsaved = held
            return held
        saved = Snapshot(state, revision)
        self.adopt(saved)
        return saved


def _reason(
    action: Action, rejected: str | None, snapshot: Snapshot, now: float, policy: Policy
) -> str:
    token = snapshot.state.token if snapshot.state is not None else None
    if action is Action.SERVE_AND_REFRESH:
        if token is not None and bought_elsewhere(token, now, policy):
            return "credentials_changed"
        return "ahead"
    if rejected is not None:
        return "rejected"
    if token is None:
        return "missing"
    return "expired"
