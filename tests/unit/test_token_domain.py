"""The token service's pure rules: freshness, error kinds, backoff, settings."""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import replace

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from wecombot_common import tokens
from wecombot_common.errors import ConfigError
from wecombot_token.domain import (
    Action,
    AppState,
    Failure,
    IssuedToken,
    LastFailure,
    Policy,
    after_failure,
    after_success,
    answer,
    backoff_delay,
    classify_errcode,
    credentials_of,
    decide,
    fingerprint,
    http_failure,
    network_failure,
    reissued,
    replacing,
    without_rejected,
)
from wecombot_token.settings import TokenSettings
from wecombot_token.source import interpret

POLICY = Policy(refresh_margin_s=300, min_backoff_s=1, max_backoff_s=300)
TOKEN = IssuedToken(value="access-token-1", fetched_at=1000.0, expires_at=8200.0)  # 7200 s


def state(token: IssuedToken | None = TOKEN, failure: LastFailure | None = None) -> AppState:
    return AppState(token=token, failure=failure)


def failed(retry_at: float) -> LastFailure:
    return LastFailure(failure=network_failure("down"), attempts=1, retry_at=retry_at)


# ---------------------------------------------------------------- freshness


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (1000.0, Action.SERVE),  # just fetched
        (7899.9, Action.SERVE),  # 300.1 s left
        (7900.0, Action.SERVE_AND_REFRESH),  # the margin starts
        (8199.9, Action.SERVE_AND_REFRESH),  # still valid, refresh behind the answer
        (8200.0, Action.FETCH),  # expired: callers must wait
        (9000.0, Action.FETCH),
    ],
)
def test_freshness_follows_the_margin(now: float, expected: Action) -> None:
    assert decide(state(), now, POLICY) is expected


def test_no_token_means_fetch() -> None:
    assert decide(None, 0.0, POLICY) is Action.FETCH
    assert decide(AppState(), 0.0, POLICY) is Action.FETCH


def test_a_margin_longer_than_the_lifetime_refreshes_at_half_life() -> None:
    short = IssuedToken(value="short-lived", fetched_at=100.0, expires_at=104.0)
    wide = Policy(refresh_margin_s=15, min_backoff_s=1, max_backoff_s=300)
    assert short.refresh_at(wide.refresh_margin_s) == 102.0
    assert decide(state(short), 101.9, wide) is Action.SERVE
    assert decide(state(short), 102.0, wide) is Action.SERVE_AND_REFRESH


def test_a_token_gettoken_answered_again_is_served_to_its_expiry_without_refreshing() -> None:
    # Refreshed ahead 300 s before expiry, WeCom answered the same token with 300 s left:
    # in the second half of that "new" life at once, it was refreshed again and again.
    again = reissued(IssuedToken(value=TOKEN.value, fetched_at=7900.0, expires_at=8200.0), TOKEN)
    assert again.reissued
    assert [decide(state(again), now, POLICY) for now in (7900.0, 8199.9, 8200.0)] == [
        Action.SERVE,
        Action.SERVE,
        Action.FETCH,
    ]
    assert decide(state(again), 7900.0, POLICY, rejected=TOKEN.value) is Action.FETCH
    raw = msgspec.json.encode(AppState(token=again))
    assert msgspec.json.decode(raw, type=AppState).token == again
    # Renewed (a later expiry), or another token: refreshed ahead as any.
    renewed = IssuedToken(value=TOKEN.value, fetched_at=7900.0, expires_at=15100.0)
    assert reissued(renewed, TOKEN) == renewed
    # Later by 30 s or more is renewed; by less, the trips' times and rounding.
    later = [msgspec.structs.replace(renewed, expires_at=8200.0 + s) for s in (29.9, 30.0)]
    assert [reissued(t, TOKEN).reissued for t in later] == [True, False]
    other = IssuedToken(value="access-token-2", fetched_at=7900.0, expires_at=8200.0)
    assert reissued(other, TOKEN) == other


def test_the_rejected_token_is_never_served_but_another_is() -> None:
    assert decide(state(), 2000.0, POLICY, rejected=TOKEN.value) is Action.FETCH
    assert decide(state(), 2000.0, POLICY, rejected="an-older-token") is Action.SERVE


def test_backing_off_answers_the_failure_or_keeps_the_valid_token() -> None:
    assert decide(state(None, failed(retry_at=50.0)), 40.0, POLICY) is Action.FAIL
    assert decide(state(None, failed(retry_at=50.0)), 50.0, POLICY) is Action.FETCH
    # A refresh ahead that failed: keep serving the valid token, no refresh until retry_at.
    assert decide(state(TOKEN, failed(retry_at=8000.0)), 7950.0, POLICY) is Action.SERVE
    assert decide(state(TOKEN, failed(retry_at=8000.0)), 8000.0, POLICY) is (
        Action.SERVE_AND_REFRESH
    )


@given(
    fetched=st.floats(0, 1e9),
    lifetime=st.floats(1, 10_000),
    margin=st.floats(0, 20_000),
    offset=st.floats(-10, 30_000),
)
def test_never_an_expired_token_and_never_a_refresh_in_the_first_half_life(
    fetched: float, lifetime: float, margin: float, offset: float
) -> None:
    token = IssuedToken(value="tok-prop", fetched_at=fetched, expires_at=fetched + lifetime)
    now = fetched + offset
    action = decide(state(token), now, Policy(margin, 1, 300))
    if action in (Action.SERVE, Action.SERVE_AND_REFRESH):
        assert now < token.expires_at
    if action is Action.SERVE_AND_REFRESH:
        assert now >= fetched + lifetime / 2


# ---------------------------------------------------------------- error kinds


@pytest.mark.parametrize(
    ("errcode", "kind", "transient", "hint"),
    [
        (40001, "bad_secret", False, "WECOM_SECRET is wrong"),
        (40013, "bad_corp_id", False, "WECOM_CORP_ID is wrong"),
        (60020, "untrusted_ip", False, "trusted IP list (企业可信IP)"),
        (45009, "rate_limited", True, "rate-limiting"),
        (45033, "rate_limited", True, "rate-limiting"),
        (-1, "network", True, "busy"),
        # one we do not know may pass: callers retry it, give up only as on any other
        (40056, "wecom_error", True, "gettoken failed"),
    ],
)
def test_errcodes_map_to_the_contracts_kinds(
    errcode: int, kind: str, transient: bool, hint: str
) -> None:
    failure = classify_errcode(errcode, "errmsg from WeCom, from ip: 203.0.113.7")
    assert failure.kind == kind
    assert failure.errcode == errcode
    assert failure.transient is transient
    assert hint in failure.message
    assert "from ip: 203.0.113.7" in failure.message  # WeCom's errmsg names the IP


@pytest.mark.parametrize(
    ("status", "kind"),
    [(500, "network"), (502, "network"), (503, "network"), (429, "rate_limited")],
)
def test_http_errors_are_transient(status: int, kind: str) -> None:
    failure = http_failure(status)
    assert (failure.kind, failure.transient) == (kind, True)


def test_other_http_statuses_point_at_the_api_base() -> None:
    failure = http_failure(404)
    assert failure.kind == "wecom_error" and "WECOM_API_BASE" in failure.message
    assert network_failure("ConnectError").transient


def test_gettoken_bodies_are_interpreted() -> None:
    ok = interpret(b'{"errcode":0,"errmsg":"ok","access_token":"abc-123","expires_in":7200}', 50.0)
    assert ok == IssuedToken(value="abc-123", fetched_at=50.0, expires_at=7250.0)
    refused = interpret(b'{"errcode":60020,"errmsg":"not allow, from ip: 1.2.3.4"}', 50.0)
    assert isinstance(refused, Failure) and refused.kind == "untrusted_ip"
    assert isinstance(interpret(b"<html>proxy</html>", 0.0), Failure)
    # no errcode at all, with a token: WeCom's success answer without its 0
    assert isinstance(interpret(b'{"access_token":"t0k","expires_in":7200}', 0.0), IssuedToken)
    busy = interpret(b'{"errcode":-1,"errmsg":"system busy"}', 0.0)
    assert isinstance(busy, Failure) and busy.errcode == -1 and "busy" in busy.message
    # errcode 0 with no usable token: retried (transient), as a body that is not JSON is,
    # whether expires_in is missing, zero or a string (it was permanent for the first
    # two: the sender dead-lettered the reply).
    for body in (
        b'{"errcode":0,"errmsg":"ok"}',
        b'{"errcode":0,"access_token":"abcdefgh"}',
        b'{"errcode":0,"access_token":"abcdefgh","expires_in":0}',
        b'{"errcode":0,"access_token":"abcdefgh","expires_in":"7200"}',
        b'{"errcode":0,"access_token":"","expires_in":7200}',
    ):
        glitch = interpret(body, 0.0)
        assert isinstance(glitch, Failure) and glitch.transient, (body, glitch)
        assert "abcdefgh" not in glitch.message


# ---------------------------------------------------------------- backoff


def test_backoff_doubles_up_to_the_cap() -> None:
    policy = Policy(refresh_margin_s=300, min_backoff_s=1, max_backoff_s=60)
    assert [backoff_delay(n, policy) for n in range(1, 9)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert backoff_delay(10_000, policy) == 60


def test_a_backoff_holds_only_for_the_credentials_that_failed() -> None:
    """A corrected WECOM_SECRET (or corp id) fetches at once: the backoff of the wrong one
    answered 'bad_secret' for up to TOKEN_MAX_BACKOFF after the fix, and the sender dead-
    lettered every reply meanwhile."""
    wrong = replace(POLICY, credentials=credentials_of("ww1", "wrong-secret"))
    fixed = replace(POLICY, credentials=credentials_of("ww1", "right-secret"))
    assert wrong.credentials != fixed.credentials and "secret" not in wrong.credentials
    refused = after_failure(None, classify_errcode(40001, "invalid secret"), 100.0, wrong)
    assert decide(refused, 100.5, wrong) is Action.FAIL
    assert decide(refused, 100.5, fixed) is Action.FETCH
    # A record from before credentials were kept holds for any, as it always did.
    assert refused.failure is not None
    legacy = AppState(failure=msgspec.structs.replace(refused.failure, credentials=""))
    assert decide(legacy, 100.5, fixed) is Action.FAIL


def test_a_token_bought_with_other_credentials_is_replaced_ahead_once_it_is_old_enough() -> None:
    """A token bought with a Secret since changed serves on, and the replica with the new
    one fetches its own ahead, once the token is TOKEN_MAX_BACKOFF (300 s) old; while that
    fetch backs off, the token serves without another (a wrong new Secret: not every
    request a gettoken)."""
    old = replace(POLICY, credentials=credentials_of("ww1", "old-secret"))
    new = replace(POLICY, credentials=credentials_of("ww1", "new-secret"))
    bought = AppState(token=replace_token(credentials=old.credentials))
    assert decide(bought, 1299.0, new) is Action.SERVE  # < 300 s old: two in a rollout
    assert decide(bought, 1300.0, new) is Action.SERVE_AND_REFRESH
    assert decide(bought, 1300.0, old) is Action.SERVE  # its own
    legacy = AppState(token=TOKEN)  # bought before tokens kept their credentials
    assert decide(legacy, 1300.0, new) is Action.SERVE
    refused = after_failure(bought, classify_errcode(40001, "invalid"), 1300.0, new)
    assert refused.token == bought.token, "the valid token is kept"
    assert decide(refused, 1300.5, new) is Action.SERVE
    assert answer(refused, 1300.5, new).token == TOKEN.value
    assert decide(refused, 1301.0, new) is Action.SERVE_AND_REFRESH  # its backoff is over
    assert decide(refused, 8200.0, new) is Action.FETCH  # expired: callers wait for one


def replace_token(**changes: object) -> IssuedToken:
    return msgspec.structs.replace(TOKEN, **changes)


def test_consecutive_failures_back_off_longer_and_success_resets() -> None:
    down = network_failure("ConnectError")
    first = after_failure(None, down, now=100.0, policy=POLICY)
    second = after_failure(first, down, now=101.0, policy=POLICY)
    third = after_failure(second, down, now=103.0, policy=POLICY)
    records = [s.failure for s in (first, second, third)]
    assert [(f.attempts, f.retry_at) for f in records if f is not None] == [
        (1, 101.0),
        (2, 103.0),
        (3, 107.0),
    ]
    recovered = after_success(TOKEN)
    assert recovered == AppState(token=TOKEN)
    again = after_failure(recovered, down, now=2000.0, policy=POLICY)
    assert again.failure is not None and again.failure.attempts == 1


def test_a_failure_keeps_a_valid_token_but_drops_a_rejected_one() -> None:
    down = network_failure("ConnectError")
    assert after_failure(state(), down, now=7950.0, policy=POLICY).token == TOKEN
    dropped = after_failure(state(), down, now=7950.0, policy=POLICY, rejected=TOKEN.value)
    assert dropped.token is None


# ---------------------------------------------------------------- answers and the lock


def test_answers() -> None:
    ok = answer(state(), 2000.0, POLICY)
    assert (ok.ok, ok.token, ok.expires_at) == (True, TOKEN.value, TOKEN.expires_at)
    limited = LastFailure(failure=classify_errcode(45009, "limit"), attempts=1, retry_at=12.5)
    refused = answer(state(None, limited), 10.0, POLICY)
    assert (refused.ok, refused.kind, refused.errcode, refused.retry_after) == (
        False,
        "rate_limited",
        45009,
        2.5,
    )
    unavailable = answer(None, 0.0, POLICY)
    assert (unavailable.ok, unavailable.kind) == (False, "unavailable")
    # A backoff already over (a caller that waited out a refresh): retry now, not in -150 s.
    over = answer(state(None, limited), 162.5, POLICY)
    assert (over.kind, over.retry_after) == ("rate_limited", 0.0)


def test_a_permanent_failure_is_answered_only_while_its_backoff_holds() -> None:
    """A caller whose refresh did not finish in time heard the last failure recorded,
    even a bad secret from before the secret was fixed: the sender then failed the reply
    for good while the token was still coming."""
    bad = LastFailure(
        failure=classify_errcode(40001, "invalid secret"),
        attempts=1,
        retry_at=12.5,
        credentials=credentials_of("ww1", "old secret"),
    )
    assert answer(state(None, bad), 10.0, POLICY).kind == "bad_secret"
    assert answer(state(None, bad), 12.5, POLICY).kind == "unavailable"
    fixed = dataclasses.replace(POLICY, credentials=credentials_of("ww1", "new secret"))
    assert answer(state(None, bad), 10.0, fixed).kind == "unavailable"


def refusal(*, attempts: int, failed_at: float, by_restart: bool = False) -> LastFailure:
    """WeCom refusing this server's IP (60020), met ``attempts`` times in a row."""
    return LastFailure(
        failure=classify_errcode(60020, "not allow to access from your ip"),
        attempts=attempts,
        retry_at=failed_at + backoff_delay(attempts, POLICY),
        failed_at=failed_at,
        by_restart=by_restart,
    )


def test_a_refusal_from_before_a_restart_does_not_hold_the_new_replica() -> None:
    """Restarting the token service is how an operator says a refusal is fixed (the
    egress IP added to 企业可信IP): the replica started after it calls gettoken at once,
    not when the backoff ends. One running since holds, and so does a transient failure."""
    refused = AppState(failure=refusal(attempts=8, failed_at=100.0))  # holds until 228
    running = dataclasses.replace(POLICY, started_at=0.0)
    restarted = dataclasses.replace(POLICY, started_at=150.0)
    assert decide(refused, 200.0, running) is Action.FAIL
    assert decide(refused, 200.0, restarted) is Action.FETCH
    down = network_failure("down")
    busy = AppState(failure=LastFailure(failure=down, attempts=8, retry_at=228.0, failed_at=100.0))
    assert decide(busy, 200.0, restarted) is Action.FAIL


def test_only_a_refusal_met_by_skipping_a_backoff_holds_the_next_restart_a_minute() -> None:
    """A replica that skipped a refusal's backoff at its start and was refused again holds
    the replicas started after it RESTART_RETRY_S (a crash loop: a gettoken a minute).
    Refused again once that backoff was over, it skipped nothing: the operator's next
    restart calls gettoken at once."""
    first = refusal(attempts=8, failed_at=100.0)  # holds until 228
    started = dataclasses.replace(POLICY, started_at=150.0)
    after_the_backoff = after_failure(AppState(failure=first), first.failure, 240.0, started)
    assert after_the_backoff.failure is not None
    assert after_the_backoff.failure.by_restart is False
    next_start = dataclasses.replace(POLICY, started_at=250.0)
    assert decide(after_the_backoff, 255.0, next_start) is Action.FETCH
    skipping = after_failure(AppState(failure=first), first.failure, 200.0, started)
    assert skipping.failure is not None and skipping.failure.by_restart
    assert decide(skipping, 255.0, next_start) is Action.FAIL
    assert decide(skipping, 260.0, next_start) is Action.FETCH


# ---------------------------------------------------------------- tokens rejected in a row


def test_a_token_rejected_after_it_served_is_fetched_again_at_once() -> None:
    # TOKEN was fetched for no rejection: WeCom refusing it (early expiry) refetches now,
    # even a moment after its fetch.
    assert decide(state(), TOKEN.fetched_at, POLICY, rejected=TOKEN.value) is Action.FETCH
    # ... on a replica whose clock is behind the one that fetched it too
    assert decide(state(), TOKEN.fetched_at - 5, POLICY, rejected=TOKEN.value) is Action.FETCH


def test_tokens_rejected_in_a_row_are_refetched_with_a_growing_wait() -> None:
    """A WeCom refusing every token gettoken issues costs one gettoken per backoff, not one
    per failed send: each replacement waits min·2ⁿ⁻¹ after its fetch before the next."""
    fetches = [TOKEN.fetched_at]
    current = TOKEN
    now = TOKEN.fetched_at
    while now < TOKEN.fetched_at + 60:
        if decide(state(current), now, POLICY, rejected=current.value) is Action.FETCH:
            fresh = IssuedToken(value=f"t{len(fetches)}", fetched_at=now, expires_at=now + 7200)
            current = replacing(fresh, current, POLICY)
            fetches.append(now)
        now += 0.25  # a send refused every quarter of a second
    gaps = [b - a for a, b in itertools.pairwise(fetches)]
    # the first at once, then 1, 2, 4, 8, 16 s (TOKEN_MIN_BACKOFF=1, doubling)
    assert gaps == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0]
    held = answer(state(current), now, POLICY, rejected=current.value)
    assert (held.ok, held.kind) == (False, "rate_limited")
    assert held.retry_after == pytest.approx(fetches[-1] + 32.0 - now)
    assert "7 access_tokens in a row" in (held.message or "")
    # A caller that has not seen it rejected still gets the token.
    assert answer(state(current), now, POLICY).token == current.value


def test_the_same_token_issued_again_after_its_rejection_is_not_refetched_at_once() -> None:
    again = replacing(replace_value(TOKEN, fetched_at=5000.0), TOKEN, POLICY)
    assert again.value == TOKEN.value and again.rejected_in_a_row == 1
    reply = answer(state(again), 5000.0, POLICY, rejected=TOKEN.value)
    assert (reply.ok, reply.kind, reply.retry_after) == (False, "rate_limited", 1.0)
    assert decide(state(again), 5000.5, POLICY, rejected=TOKEN.value) is Action.FAIL
    assert decide(state(again), 5001.0, POLICY, rejected=TOKEN.value) is Action.FETCH


def test_a_failure_backoff_answers_before_the_streak() -> None:
    streak = replacing(replace_value(TOKEN, fetched_at=5000.0), TOKEN, POLICY)
    down = LastFailure(failure=network_failure("down"), attempts=3, retry_at=5010.0)
    reply = answer(state(streak, down), 5000.5, POLICY, rejected=streak.value)
    assert (reply.kind, reply.retry_after) == ("network", 9.5)


def test_a_replacement_rejected_during_a_backoff_keeps_its_record_to_pace_the_next_fetch() -> None:
    """While a failure's backoff holds, a rejected token is dropped so callers hear the
    failure; but a replacement rejected in turn stays: its streak says how long the next
    gettoken waits once the backoff is over."""
    streak = replacing(replace_value(TOKEN, fetched_at=5000.0), TOKEN, POLICY)
    down = LastFailure(failure=network_failure("down"), attempts=1, retry_at=5000.5)
    kept = state(streak, down)
    assert without_rejected(kept, 5000.2, POLICY, streak.value) is None
    assert decide(kept, 5000.6, POLICY, rejected=streak.value) is Action.FAIL  # until 5001
    assert decide(kept, 5001.0, POLICY, rejected=streak.value) is Action.FETCH
    holding = msgspec.structs.replace(down, retry_at=1000.5)
    plain = state(TOKEN, holding)
    assert without_rejected(plain, 1000.2, POLICY, TOKEN.value) == AppState(failure=holding)


def test_the_streak_survives_a_round_trip_through_the_bucket() -> None:
    streak = replacing(replace_value(TOKEN, fetched_at=5000.0), TOKEN, POLICY)
    raw = msgspec.json.encode(AppState(token=streak))
    assert msgspec.json.decode(raw, type=AppState).token == streak
    # A token of no streak is written as before: replicas of the previous build read it.
    assert b"rejected_in_a_row" not in msgspec.json.encode(AppState(token=TOKEN))


def replace_value(token: IssuedToken, *, fetched_at: float) -> IssuedToken:
    return msgspec.structs.replace(token, fetched_at=fetched_at, expires_at=fetched_at + 7200)


def test_a_fingerprint_is_short_and_hides_the_token() -> None:
    value = "a-very-secret-access-token"
    assert len(fingerprint(value)) == 8
    assert fingerprint(value) not in value and value not in fingerprint(value)


# ---------------------------------------------------------------- settings

GOOD = {
    "WECOM_CORP_ID": "ww1436e0e65a779aee",
    "WECOM_AGENT_ID": "1000002",
    "WECOM_SECRET": "app-secret-value-123",
}


def test_settings_defaults_and_the_secret_is_redacted() -> None:
    s = TokenSettings.from_env(GOOD)
    assert (s.refresh_margin_s, s.http_timeout_s, s.max_backoff_s, s.health_port) == (
        300.0,
        10.0,
        300.0,
        8083,
    )
    assert s.app == "ww1436e0e65a779aee-1000002"
    assert s.wecom.api_base == "https://qyapi.weixin.qq.com"
    assert s.wecom.secret in s.log.extra_secrets
    assert "app-secret-value-123" not in repr(s)
    assert s.refresh_timeout_s > s.http_timeout_s


@pytest.mark.parametrize(
    ("change", "variable"),
    [
        ({"TOKEN_REFRESH_MARGIN": "soon"}, "TOKEN_REFRESH_MARGIN"),
        ({"TOKEN_REFRESH_MARGIN": "-1"}, "TOKEN_REFRESH_MARGIN"),
        ({"TOKEN_HTTP_TIMEOUT": "0"}, "TOKEN_HTTP_TIMEOUT"),
        ({"TOKEN_MAX_BACKOFF": "forever"}, "TOKEN_MAX_BACKOFF"),
        ({"TOKEN_MIN_BACKOFF": "10", "TOKEN_MAX_BACKOFF": "5"}, "TOKEN_MIN_BACKOFF"),
        ({"WECOMBOT_HEALTH_PORT": "70000"}, "WECOMBOT_HEALTH_PORT"),
        ({"WECOM_SECRET": ""}, "WECOM_SECRET"),
        ({"WECOM_API_BASE": "qyapi.weixin.qq.com"}, "WECOM_API_BASE"),
    ],
)
def test_settings_errors_name_the_variable(change: dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        TokenSettings.from_env({**GOOD, **change})


def test_state_round_trips_as_json_without_defaults() -> None:
    raw = msgspec.json.encode(AppState(token=TOKEN))
    assert json.loads(raw) == {
        "token": {"value": TOKEN.value, "fetched_at": 1000.0, "expires_at": 8200.0}
    }
    assert msgspec.json.decode(raw, type=AppState) == AppState(token=TOKEN)


def test_the_client_waits_longer_than_the_service_may_take() -> None:
    """The service may wait out a crashed holder's lock, then refresh itself: two refresh
    budgets. A client giving up sooner (it waited 15 s, the service up to 24 s) was told
    "unavailable" while its token was on the way."""
    env = {"WECOM_CORP_ID": "ww1", "WECOM_AGENT_ID": "1000002", "WECOM_SECRET": "s3cret"}
    for timeout in ("", "12"):  # the default and the largest accepted
        settings = TokenSettings.from_env({**env, "TOKEN_HTTP_TIMEOUT": timeout})
        assert 2 * settings.refresh_timeout_s < tokens.DEFAULT_TIMEOUT_S
    with pytest.raises(ConfigError, match="TOKEN_HTTP_TIMEOUT"):
        TokenSettings.from_env({**env, "TOKEN_HTTP_TIMEOUT": "13"})
