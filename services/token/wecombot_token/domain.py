"""The token service's pure decisions: no I/O, no clock, no randomness.

Everything here takes ``now`` (wall-clock epoch seconds, shared by every replica through
the KV bucket) and returns values, so the rules can be tested exhaustively::

    >>> policy = Policy(refresh_margin_s=300, min_backoff_s=1, max_backoff_s=300)
    >>> token = IssuedToken(value="t0k3n-abc", fetched_at=0.0, expires_at=7200.0)
    >>> decide(AppState(token=token), now=100.0, policy=policy)
    <Action.SERVE: 'serve'>
    >>> decide(AppState(token=token), now=7000.0, policy=policy)
    <Action.SERVE_AND_REFRESH: 'serve_and_refresh'>

WeCom's gettoken and its error codes: https://developer.work.weixin.qq.com/document/path/91039
(global error codes: path/90313).
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass

import msgspec

from wecombot_common.tokens import TRANSIENT_KINDS, ErrorKind, TokenReply

__all__ = [
    "Action",
    "AppState",
    "Failure",
    "IssuedToken",
    "LastFailure",
    "Lock",
    "Policy",
    "after_failure",
    "after_success",
    "answer",
    "backing_off",
    "backoff_delay",
    "bought_elsewhere",
    "classify_errcode",
    "credentials_of",
    "decide",
    "fingerprint",
    "http_failure",
    "issued",
    "network_failure",
    "refetch_at",
    "refetch_held",
    "reissued",
    "replacing",
    "restart_skips",
    "usable_token",
    "without_rejected",
]

# Exponents beyond this would overflow a float long before the cap applies.
_MAX_DOUBLINGS = 32
# A refusal met by a replica that had just started holds the replicas started after it
# this long at most (a crash loop calls gettoken once a minute, not at every start).
RESTART_RETRY_S = 60.0
# Two answers about one token's expiry differ by their trips' times (at most
# TOKEN_HTTP_TIMEOUT, 12 s) and expires_in's rounding to whole seconds: one later by less
# than this is the same expiry, not a token WeCom renewed (``reissued``).
SAME_EXPIRY_SLACK_S = 30.0


class IssuedToken(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An access_token as WeCom issued it, with wall-clock times (shared by replicas)."""

    value: str
    fetched_at: float
    expires_at: float
    # Fetched because WeCom rejected the token before it: how many were rejected in a row,
    # each soon after its own fetch (0: fetched for another reason). See ``refetch_at``.
    rejected_in_a_row: int = 0
    # Policy.credentials of the replica that bought it ("": before they were kept). See
    # ``bought_elsewhere``.
    credentials: str = ""
    # gettoken answered this very token again, its expiry no later: see ``reissued``.
    reissued: bool = False

    def refresh_at(self, margin_s: float) -> float:
        """When to start refreshing ahead: ``margin_s`` before expiry, but never in the
        first half of the token's life, so a margin longer than the lifetime WeCom grants
        cannot turn every request into a refresh. Never for a token gettoken answered
        again (``reissued``): asked before it expires, WeCom gives it again."""
        if self.reissued:
            return self.expires_at
        half_life = self.fetched_at + (self.expires_at - self.fetched_at) / 2
        return max(self.expires_at - margin_s, half_life)


class Failure(msgspec.Struct, frozen=True, kw_only=True):
    """Why gettoken failed, in the terms the token contract (TokenReply) speaks."""

    kind: ErrorKind
    message: str
    errcode: int | None = None
    errmsg: str | None = None  # WeCom's own words with ``errcode``, as it sent them

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT_KINDS


class LastFailure(msgspec.Struct, frozen=True, kw_only=True):
    """The latest failure and the backoff it started: nobody calls WeCom before retry_at."""

    failure: Failure
    attempts: int
    retry_at: float
    # Policy.credentials when it failed: a backoff started with other credentials (a
    # WECOM_SECRET or corp id fixed since) does not hold back the ones in use now
    credentials: str = ""
    # When it failed (0: before this was kept): a refusal from before a replica started
    # does not hold that replica back (see ``backing_off``)
    failed_at: float = 0.0
    # The gettoken that failed skipped this backoff because its replica had just started
    by_restart: bool = False


class AppState(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What the KV bucket holds per app: the current token and/or the last failure."""

    token: IssuedToken | None = None
    failure: LastFailure | None = None


class Lock(msgspec.Struct, frozen=True, kw_only=True):
    """The cluster-wide refresh lock: who refreshes, and until when the claim holds on the
    holder's clock (for people and older builds: a taker times the lock on its own clock,
    KvTokenStore.claim)."""

    holder: str
    deadline: float


@dataclass(frozen=True, slots=True)
class Policy:
    refresh_margin_s: float
    min_backoff_s: float
    max_backoff_s: float
    credentials: str = ""  # a fingerprint of the corp id and secret (credentials_of)
    started_at: float = -math.inf  # when this replica started (wall clock)


def credentials_of(corp_id: str, secret: str) -> str:
    """A fingerprint telling one pair of gettoken credentials from another: 16 hex digits
    of a SHA-256, kept in the bucket with a failure (it reveals nothing of the secret)."""
    return hashlib.sha256(f"{corp_id}\0{secret}".encode()).hexdigest()[:16]


class Action(enum.Enum):
    SERVE = "serve"  # the token is fresh
    SERVE_AND_REFRESH = "serve_and_refresh"  # still valid but inside the margin
    FAIL = "fail"  # no valid token and backing off: answer the last failure
    FETCH = "fetch"  # no valid token: callers must wait for a gettoken


def usable_token(
    state: AppState | None, now: float, rejected: str | None = None
) -> IssuedToken | None:
    """The current token if it has not expired and is not the one a caller saw rejected."""
    if state is None or state.token is None:
        return None
    token = state.token
    if token.value == rejected or now >= token.expires_at:
        return None
    return token


def backing_off(state: AppState | None, now: float, policy: Policy) -> bool:
    """A failure's backoff holds, for the credentials it failed with (a record without
    them, from before they were kept, holds for any), except a refusal this replica's
    start skips (``restart_skips``)."""
    if state is None or state.failure is None or now >= state.failure.retry_at:
        return False
    last = state.failure
    if restart_skips(last, now, policy):
        return False
    failed_with, credentials = last.credentials, policy.credentials
    return not failed_with or not credentials or failed_with == credentials


def restart_skips(last: LastFailure, now: float, policy: Policy) -> bool:
    """A refusal (40001, 40013, 60020: not transient) recorded before this replica
    started does not hold it: restarting the token service is how an operator says it is
    fixed (the egress IP added to 企业可信IP), and the new replicas call gettoken at once
    instead of answering the refusal until its backoff, up to TOKEN_MAX_BACKOFF, is over.
    Their first failure holds them again. A refusal met that way (``by_restart``) holds
    the replicas started after it ``RESTART_RETRY_S`` at most: a pod in a crash loop costs
    a gettoken a minute, not one per start. A record without ``failed_at`` (written by an
    older build during a rollout) holds, as it did. ``failed_at`` is the writer's clock:
    one running behind makes its refusals look older, to be skipped a little sooner.

    >>> p = Policy(refresh_margin_s=300, min_backoff_s=1, max_backoff_s=300, started_at=100.0)
    >>> def refused(kind: ErrorKind, at: float, by_restart: bool = False) -> LastFailure:
    ...     return LastFailure(failure=Failure(kind=kind, message=""), attempts=1,
    ...                        retry_at=400.0, failed_at=at, by_restart=by_restart)
    >>> [restart_skips(refused(kind, at), 150.0, p) for kind, at in
    ...  (("untrusted_ip", 99.0), ("untrusted_ip", 100.0), ("rate_limited", 99.0),
    ...   ("untrusted_ip", 0.0))]
    [True, False, False, False]
    >>> [restart_skips(refused("untrusted_ip", 99.0, by_restart=True), now, p)
    ...  for now in (158.9, 159.0)]
    [False, True]
    """
    if last.failure.transient or not 0 < last.failed_at < policy.started_at:
        return False
    return not last.by_restart or now >= last.failed_at + RESTART_RETRY_S


def bought_elsewhere(token: IssuedToken, now: float, policy: Policy) -> bool:
    """``token`` was bought with other credentials (a WECOM_SECRET or CorpID changed
    since), at least TOKEN_MAX_BACKOFF ago: fetch one with ours, ahead, and serve it
    meanwhile.

    Keyed by the app alone, the token a wrong new Secret inherited served until it
    expired, up to 2 hours after the change, and then every send failed; the gettoken
    ahead tells at once (``token.fetch_failed``, ``bad_secret``), while the token still
    serves. The age bound keeps two sets of credentials in one rollout from replacing
    each other's token on every request: one gettoken per TOKEN_MAX_BACKOFF at most.

    >>> p = Policy(refresh_margin_s=300, min_backoff_s=1, max_backoff_s=300, credentials="new")
    >>> def token(by: str) -> IssuedToken:
    ...     return IssuedToken(value="t", fetched_at=0.0, expires_at=7200.0, credentials=by)
    >>> [bought_elsewhere(token(by), now, p) for by, now in
    ...  (("old", 300.0), ("old", 299.0), ("new", 300.0), ("", 300.0))]
    [True, False, False, False]
    """
    theirs, ours = token.credentials, policy.credentials
    if not theirs or not ours or theirs == ours:
        return False
    return now >= token.fetched_at + policy.max_backoff_s


def without_rejected(
    state: AppState | None, now: float, policy: Policy, rejected: str | None
) -> AppState | None:
    """The state to write when a caller reports the current token rejected while a
    failure's backoff holds (no fetch before it ends): the same, without that token, so
    that gets answer the failure with its retry_after rather than the token WeCom
    refuses. None when there is nothing to drop: another token is current, no backoff
    holds (a fetch replaces it), or it is a replacement rejected in turn, whose record
    paces the next fetch (``refetch_at``).

    >>> p = Policy(refresh_margin_s=300, min_backoff_s=1, max_backoff_s=300)
    >>> t = IssuedToken(value="t", fetched_at=0.0, expires_at=7200.0)
    >>> busy = LastFailure(failure=Failure(kind="network", message="busy"), attempts=1,
    ...                    retry_at=100.0)
    >>> without_rejected(AppState(token=t, failure=busy), 50.0, p, "t") == AppState(
    ...     failure=busy)
    True
    >>> [without_rejected(AppState(token=t, failure=busy), now, p, seen)
    ...  for now, seen in ((50.0, "other"), (100.0, "t"), (50.0, None))]
    [None, None, None]
    """
    if state is None or state.token is None or rejected is None:
        return None
    if state.token.value != rejected or state.token.rejected_in_a_row:
        return None
    if not backing_off(state, now, policy):
        return None
    return AppState(failure=state.failure)


def decide(
    state: AppState | None, now: float, policy: Policy, rejected: str | None = None
) -> Action:
    """What to do for a caller, given the shared state (``rejected``: invalidate's token)."""
    token = usable_token(state, now, rejected)
    waiting = backing_off(state, now, policy)
    if token is not None:
        if waiting:
            return Action.SERVE
        if now >= token.refresh_at(policy.refresh_margin_s) or bought_elsewhere(token, now, policy):
            return Action.SERVE_AND_REFRESH
        return Action.SERVE
    if waiting or refetch_held(state, now, policy, rejected) is not None:
        return Action.FAIL
    return Action.FETCH


def refetch_at(token: IssuedToken, policy: Policy) -> float:
    """When WeCom's rejection of ``token`` may make us fetch another.

    At once for a token that replaced none WeCom rejected. One that did may be rejected in
    turn (a WeCom that keeps refusing what its gettoken issues, or issues the token it
    refused again): then every send's 40014 would cost a gettoken, and calling gettoken
    often gets the caller rate-limited (path/91039). So the next fetch waits as after a
    failure, min·2ⁿ⁻¹ after this token's fetch (``TOKEN_MIN_BACKOFF``, capped at
    ``TOKEN_MAX_BACKOFF``), n the tokens rejected in a row.

    >>> p = Policy(refresh_margin_s=300, min_backoff_s=1, max_backoff_s=300)
    >>> [refetch_at(IssuedToken(value="t", fetched_at=100.0, expires_at=7300.0,
    ...                         rejected_in_a_row=n), p) for n in (0, 1, 2, 5)]
    [-inf, 101.0, 102.0, 116.0]
    """
    if token.rejected_in_a_row == 0:
        return -math.inf  # not the fetch time: another replica's clock may be behind it
    return token.fetched_at + backoff_delay(token.rejected_in_a_row, policy)


def refetch_held(
    state: AppState | None, now: float, policy: Policy, rejected: str | None
) -> float | None:
    """Until when a caller's report that ``rejected`` was refused fetches nothing (None:
    it may fetch now, or it names no current token)."""
    token = state.token if state is not None else None
    if rejected is None or token is None or token.value != rejected:
        return None
    until = refetch_at(token, policy)
    return until if now < until else None


def replacing(token: IssuedToken, rejected: IssuedToken, policy: Policy) -> IssuedToken:
    """``token``, fetched because WeCom rejected ``rejected``: the streak goes on while each
    token is replaced within twice TOKEN_MAX_BACKOFF of its fetch (the longest wait, and
    as long again; a token that served longer proved WeCom sound: its rejection starts a
    new streak).

    >>> p = Policy(refresh_margin_s=300, min_backoff_s=1, max_backoff_s=300)
    >>> def token(at: float, n: int = 0) -> IssuedToken:
    ...     return IssuedToken(value="t", fetched_at=at, expires_at=at + 7200, rejected_in_a_row=n)
    >>> [replacing(token(t), token(0, n), p).rejected_in_a_row for t, n in
    ...  ((5, 0), (5, 1), (5, 3), (599, 3), (600, 3))]
    [1, 2, 4, 4, 1]
    """
    streak = 1
    served_s = token.fetched_at - rejected.fetched_at
    if rejected.rejected_in_a_row and served_s < 2 * policy.max_backoff_s:
        streak = rejected.rejected_in_a_row + 1
    return msgspec.structs.replace(token, rejected_in_a_row=streak)


def reissued(token: IssuedToken, current: IssuedToken | None) -> IssuedToken:
    """``token`` as gettoken answered it, marked when it is ``current`` again with no later
    expiry (within ``SAME_EXPIRY_SLACK_S``).

    WeCom's gettoken may answer, while a token is valid, that same token with the life it
    has left (its older doc: 有效期内重复获取返回相同结果; path/91039 in
    ../shared/wecom/PROTOCOL.md says nothing either way). Each refresh ahead then found
    the token it had, its life shorter, in the second half of it at once: the next
    refresh came after half the time left, and so on, some ten gettokens before each
    expiry instead of one. Marked, it is served until it expires and fetched again then
    (``IssuedToken.refresh_at``), or when a caller reports it rejected.

    >>> current = IssuedToken(value="t", fetched_at=0.0, expires_at=7200.0)
    >>> def again(value: str, expires_at: float) -> bool:
    ...     answer = IssuedToken(value=value, fetched_at=6900.0, expires_at=expires_at)
    ...     return reissued(answer, current).reissued
    >>> [again("t", 7200.0), again("t", 7229.0), again("t", 14100.0), again("u", 7200.0)]
    [True, True, False, False]
    """
    if current is None or token.value != current.value:
        return token
    if token.expires_at >= current.expires_at + SAME_EXPIRY_SLACK_S:
        return token  # renewed: refreshed ahead again in its time
    return msgspec.structs.replace(token, reissued=True)


def backoff_delay(attempts: int, policy: Policy) -> float:
    """Exponential: min_backoff, doubling per consecutive failure, capped at max_backoff.

    >>> p = Policy(refresh_margin_s=300, min_backoff_s=1, max_backoff_s=300)
    >>> [backoff_delay(n, p) for n in (1, 2, 3, 9, 10)]
    [1.0, 2.0, 4.0, 256.0, 300.0]
    """
    doublings = min(max(attempts, 1) - 1, _MAX_DOUBLINGS)
    return float(min(policy.max_backoff_s, policy.min_backoff_s * 2**doublings))


def after_success(token: IssuedToken) -> AppState:
    """A new token clears the failure and so resets the backoff."""
    return AppState(token=token)


def after_failure(
    state: AppState | None,
    failure: Failure,
    now: float,
    policy: Policy,
    rejected: str | None = None,
) -> AppState:
    """Record a failed gettoken: keep a still-valid token (a refresh ahead failed), drop
    the one WeCom rejected, and back off longer for each consecutive failure."""
    previous = state.failure if state is not None else None
    attempts = previous.attempts + 1 if previous is not None else 1
    keep = usable_token(state, now, rejected)
    by_restart = (
        previous is not None and now < previous.retry_at and restart_skips(previous, now, policy)
    )
    return AppState(
        token=keep,
        failure=LastFailure(
            failure=failure,
            attempts=attempts,
            retry_at=now + backoff_delay(attempts, policy),
            credentials=policy.credentials,
            failed_at=now,
            by_restart=by_restart,
        ),
    )


def answer(
    state: AppState | None, now: float, policy: Policy, rejected: str | None = None
) -> TokenReply:
    """The reply a caller gets from the state as it stands."""
    token = usable_token(state, now, rejected)
    if token is not None:
        return TokenReply(ok=True, token=token.value, expires_at=token.expires_at)
    held = refetch_held(state, now, policy, rejected)
    if held is not None and not backing_off(state, now, policy):
        assert state is not None and state.token is not None
        return TokenReply(
            ok=False,
            kind="rate_limited",
            message=f"WeCom rejected {state.token.rejected_in_a_row + 1} access_tokens in a "
            "row, each soon after gettoken issued it; the next gettoken waits "
            "(TOKEN_MIN_BACKOFF, doubling, up to TOKEN_MAX_BACKOFF)",
            retry_after=round(held - now, 3),
        )
    last = state.failure if state is not None else None
    if last is not None and (last.failure.transient or backing_off(state, now, policy)):
        # (A permanent failure whose backoff is over, or that other credentials met, is
        # not the caller's answer: a refresh is due and may well pass, the secret fixed.
        # A caller hears it only when the refresh did not finish in time.)
        return TokenReply(
            ok=False,
            kind=last.failure.kind,
            errcode=last.failure.errcode,
            message=last.failure.message,
            retry_after=round(max(0.0, last.retry_at - now), 3),
        )
    return TokenReply(
        ok=False,
        kind="unavailable",
        message="no access_token yet: the refresh did not finish in time; retry shortly",
    )


def issued(value: str, expires_in: float, requested_at: float) -> IssuedToken:
    """Expiry counts from when we *asked*, so network delay only makes it earlier."""
    return IssuedToken(value=value, fetched_at=requested_at, expires_at=requested_at + expires_in)


# Error codes of gettoken, https://developer.work.weixin.qq.com/document/path/91039
# (their meaning: the global error code page, path/90313).
_BAD_SECRET = 40001
_BAD_CORP_ID = 40013
_RATE_LIMITED = 45009
_CONCURRENCY_LIMITED = 45033  # path/90313: too many calls at once; message/send retries it
_UNTRUSTED_IP = 60020
_SYSTEM_BUSY = -1


def classify_errcode(errcode: int, errmsg: str) -> Failure:
    """Map a gettoken errcode to the contract's error kind, with an operator's fix."""
    said = f"(WeCom errcode {errcode}: {errmsg})"
    if errcode == _BAD_SECRET:
        return Failure(
            kind="bad_secret",
            errcode=errcode,
            errmsg=errmsg,
            message="WECOM_SECRET is wrong: copy the app's Secret again from the WeCom "
            f"admin console {said}",
        )
    if errcode == _BAD_CORP_ID:
        return Failure(
            kind="bad_corp_id",
            errcode=errcode,
            errmsg=errmsg,
            message="WECOM_CORP_ID is wrong: copy the CorpID again from the WeCom admin "
            f"console (My Company > Company Info) {said}",
        )
    if errcode == _UNTRUSTED_IP:
        return Failure(
            kind="untrusted_ip",
            errcode=errcode,
            errmsg=errmsg,
            message="WeCom refused this server's IP: add this server's egress IP to the "
            "app's trusted IP list (企业可信IP) under the app's settings in the WeCom admin "
            f"console {said}",
        )
    if errcode in (_RATE_LIMITED, _CONCURRENCY_LIMITED):
        return Failure(
            kind="rate_limited",
            errcode=errcode,
            errmsg=errmsg,
            message=f"WeCom is rate-limiting gettoken; backing off {said}",
        )
    if errcode == _SYSTEM_BUSY:
        return Failure(
            kind="network", errcode=errcode, errmsg=errmsg, message=f"WeCom is busy {said}"
        )
    return Failure(
        kind="wecom_error", errcode=errcode, errmsg=errmsg, message=f"gettoken failed {said}"
    )


def http_failure(status: int) -> Failure:
    """A bare HTTP error (no WeCom JSON): 5xx is WeCom or a proxy failing (transient);
    429 is a rate limit; any other status means WECOM_API_BASE points somewhere wrong."""
    if status >= 500:
        return Failure(kind="network", message=f"WeCom answered HTTP {status}")
    if status == 429:
        return Failure(kind="rate_limited", message="WeCom answered HTTP 429")
    return Failure(
        kind="wecom_error",
        message=f"gettoken answered HTTP {status}: check WECOM_API_BASE",
    )


def network_failure(reason: str) -> Failure:
    return Failure(kind="network", message=f"cannot reach WeCom: {reason}")


def fingerprint(token: str) -> str:
    """A short, non-reversible name for a token, safe to log.

    >>> fingerprint("abc")
    'ba7816bf'
    """
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:8]
