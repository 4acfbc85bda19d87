"""Logging: secrets are redacted wherever they appear, in our lines and foreign ones."""

from __future__ import annotations

import json
import logging
from collections import namedtuple

import pytest
import structlog

from wecombot_common.logs import (
    EPHEMERAL_KEPT,
    REDACTED,
    LogSampler,
    configure_logging,
    redact,
    register_secret,
)
from wecombot_common.settings import LogSettings, Secret


def _lines(err: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


def test_configured_and_dynamic_secrets_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogSettings(), service="test", secrets=[Secret("corp-secret-42")])
    register_secret("access-token-xyz")
    log = structlog.get_logger("t")
    log.info("one", detail="uses corp-secret-42", nested={"k": ["access-token-xyz"]})
    logging.getLogger("third.party").warning("GET /x?access_token=abcdef123&y=1")
    try:
        raise RuntimeError("boom corp-secret-42")
    except RuntimeError:
        log.exception("two")
    err = capsys.readouterr().err
    assert "corp-secret-42" not in err
    assert "access-token-xyz" not in err
    assert "abcdef123" not in err
    lines = _lines(err)
    assert lines[0]["detail"] == f"uses {REDACTED}"
    assert lines[0]["service"] == "test"
    assert lines[1]["event"] == f"GET /x?access_token={REDACTED}&y=1"


def test_short_values_are_not_treated_as_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogSettings(), service="test", secrets=[Secret("ab")])
    structlog.get_logger("t").info("about ab")
    assert _lines(capsys.readouterr().err)[0]["event"] == "about ab"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("nats://wecombot:pw123456@nats:4222", f"nats://wecombot:{REDACTED}@nats:4222"),
        ("a,tls://u:p%40ss@h:1", f"a,tls://u:{REDACTED}@h:1"),
        ("nats://s3cr3t-token@h", f"nats://{REDACTED}@h"),  # NATS token auth
        ('{"url": "https://k:v@api/v1"}', f'{{"url": "https://k:{REDACTED}@api/v1"}}'),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("zhang.san@corp wrote http://h/a@b", "zhang.san@corp wrote http://h/a@b"),
        # The userinfo runs to the last '@' (nats-py reads the password as 'Xy7@kQ9z').
        ("nats://wecombot:Xy7@kQ9z@nats:4222", f"nats://wecombot:{REDACTED}@nats:4222"),
    ],
)
def test_passwords_in_url_userinfo_are_redacted_by_pattern(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_a_namedtuple_value_is_redacted_not_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    """Rebuilding a namedtuple from a generator raised TypeError inside the caller's log
    call (and a stdlib logger printed the raw arguments)."""
    configure_logging(LogSettings(), service="test")
    server = namedtuple("Server", "name url")("primary", "nats://u:Sup3rS3cret@h:4222")
    structlog.get_logger("t").info("connecting", server=server)
    logging.getLogger("third.party").warning("conn %s", server)
    lines = _lines(capsys.readouterr().err)
    assert lines[0]["server"] == ["primary", f"nats://u:{REDACTED}@h:4222"]
    assert lines[1]["event"] == f"conn Server(name='primary', url='nats://u:{REDACTED}@h:4222')"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Authorization: Bearer sk-live.A1_b2~c3+d4/e5==", f"Authorization: Bearer {REDACTED}"),
        ('{"Authorization": "Bearer abc.DEF"}', f'{{"Authorization": "Bearer {REDACTED}"}}'),
        ("sent bearer tok123 to the model", f"sent bearer {REDACTED} to the model"),
        ("BEARER\tTOK-9=", f"BEARER\t{REDACTED}"),
    ],
)
def test_bearer_tokens_are_redacted_by_pattern_without_being_registered(
    text: str, expected: str
) -> None:
    assert redact(text) == expected


def test_a_bearer_token_is_redacted_from_our_lines_and_foreign_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(LogSettings(), service="test")
    token = "sk-proj.Zx9_yW8-vU7~tS6+rQ5/pO4=="  # never registered
    structlog.get_logger("t").info("model.call", headers={"Authorization": f"Bearer {token}"})
    logging.getLogger("httpx").warning("sent Authorization: Bearer %s", token)
    err = capsys.readouterr().err
    assert "Zx9" not in err and "pO4" not in err
    lines = _lines(err)
    assert lines[0]["headers"] == {"Authorization": f"Bearer {REDACTED}"}
    assert lines[1]["event"] == f"sent Authorization: Bearer {REDACTED}"


# Pairs of secrets where one is a prefix, suffix or infix of the other, the shorter
# registered first. Replacing the shorter first, inside the longer, would leave the rest
# of the longer in the line. Many independent pairs, so that even a registry iterated in
# set (hash) order would almost surely get one of them wrong.
NESTED_SECRETS = [
    pair
    for i in range(8)
    for pair in (
        (f"k{i}Pfx-short", f"k{i}Pfx-short-LONGTAIL{i}"),  # prefix
        (f"k{i}Sfx-short", f"HEAD{i}-k{i}Sfx-short"),  # suffix
        (f"k{i}Mid-short", f"HEAD{i}-k{i}Mid-short-TAIL{i}"),  # infix
    )
]


def test_a_secret_holding_another_is_redacted_whole_not_around_the_shorter(
    capsys: pytest.CaptureFixture[str],
) -> None:
    shorter = [Secret(short) for short, _ in NESTED_SECRETS]
    configure_logging(LogSettings(), service="test", secrets=shorter)  # at start-up
    for _, longer in NESTED_SECRETS:
        register_secret(longer)  # at run time, as the sender does its access token
    log = structlog.get_logger("t")
    for short, longer in NESTED_SECRETS:
        log.info("pair", longer=f"<{longer}>", shorter=f"<{short}>")
    err = capsys.readouterr().err
    lines = _lines(err)
    assert len(lines) == len(NESTED_SECRETS)
    for line in lines:
        assert (line["longer"], line["shorter"]) == (f"<{REDACTED}>", f"<{REDACTED}>")
    for short, longer in NESTED_SECRETS:
        head, _, tail = longer.partition(short)
        for part in (short, head, tail):  # nothing of either secret is left
            assert not part or part not in err, part


def test_secrets_that_overlap_leave_nothing_of_either() -> None:
    first, second = "AAAAAAAAXYZ123", "XYZ123BBBBBBBB"  # the end of one starts the other
    register_secret(first)
    register_secret(second)
    text = f"a {first[:8]}{second} b {second} c {first}{first} d"
    assert redact(text) == f"a {REDACTED} b {REDACTED} c {REDACTED} d"


def test_only_the_latest_ephemeral_secrets_are_kept() -> None:
    """An access token every two hours for as long as a process lives: kept all, each
    log line checked thousands of them. The latest EPHEMERAL_KEPT are redacted; a
    setting's secret, for good."""
    register_secret("setting-secret-kept-for-good")
    tokens = [f"access-token-{i:04d}-xyz" for i in range(EPHEMERAL_KEPT + 5)]
    for token in tokens:
        register_secret(token, ephemeral=True)
    oldest_kept = tokens[5]
    register_secret(oldest_kept, ephemeral=True)  # seen again (in use): the latest once more
    register_secret("access-token-new-xyz", ephemeral=True)  # so the next oldest goes
    line = " ".join(["setting-secret-kept-for-good", *tokens])
    redacted = redact(line).split(" ")
    assert redacted[0] == REDACTED
    kept = {oldest_kept, *tokens[-(EPHEMERAL_KEPT - 2) :]}
    assert [r == REDACTED for r in redacted[1:]] == [t in kept for t in tokens]


@pytest.mark.parametrize("name", ["access_token", "corpsecret", "api_key", "apikey", "api-key"])
def test_credentials_in_a_query_are_redacted_by_pattern(name: str) -> None:
    assert redact(f"GET /x?{name}=S1abcdef&y=1") == f"GET /x?{name}={REDACTED}&y=1"


def test_the_password_runs_from_the_first_colon_of_the_userinfo() -> None:
    assert redact("nats://user:pa:ss@host:4222") == f"nats://user:{REDACTED}@host:4222"


def test_a_secret_of_six_characters_is_redacted_and_its_repeats_too() -> None:
    register_secret("abc123")
    assert redact("x abc123 y") == f"x {REDACTED} y"
    register_secret("zyxzyx")
    assert redact("zyxzyxzyx") == REDACTED  # overlapping occurrences: nothing left


def test_numbers_flags_and_nulls_stay_what_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    """A JSON line's counts, flags and nulls stay numbers, booleans and null: a log query
    on ``seq > 100`` or ``latency_ms`` needs numbers (only text is redacted)."""
    configure_logging(LogSettings(), service="test")
    structlog.get_logger("t").info("n", seq=123456, latency_ms=12.5, duplicate=False, why=None)
    line = _lines(capsys.readouterr().err)[0]
    assert (line["seq"], line["latency_ms"], line["duplicate"], line["why"]) == (
        123456, 12.5, False, None,
    )  # fmt: skip


def test_lists_and_tuples_stay_lists_and_tuples_redacted_item_by_item(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging(LogSettings(), service="test", secrets=[Secret("s3cret-value")])
    structlog.get_logger("t").info("hosts", hosts=["a", "s3cret-value"], pair=("b", "s3cret-value"))
    line = _lines(capsys.readouterr().err)[0]
    assert line["hosts"] == ["a", REDACTED] and line["pair"] == ["b", REDACTED]


def test_http_client_loggers_are_kept_at_warning() -> None:
    """httpx logs every request's URL at info: message/send's carries the access_token."""
    configure_logging(LogSettings(level="info"), service="test")
    for noisy in ("httpx", "httpcore", "aiohttp.access"):
        assert logging.getLogger(noisy).level == logging.WARNING
    configure_logging(LogSettings(level="error"), service="test")
    assert logging.getLogger("httpx").level == logging.ERROR


def test_a_sampler_writes_a_burst_per_period_and_then_says_how_many_it_did_not() -> None:
    now = [0.0]
    sampler = LogSampler(burst=2, period_s=30.0, clock=lambda: now[0])
    assert [sampler.take("refused") for _ in range(5)] == [0, 0, None, None, None]
    assert sampler.take("timeout") == 0  # another kind has its own burst
    now[0] = 29.9
    assert sampler.take("refused") is None
    now[0] = 30.0  # a new period: written, with the 4 it left out
    assert [sampler.take("refused") for _ in range(3)] == [4, 0, None]
    assert sampler.take("timeout") == 0
    every = LogSampler(burst=None, period_s=1.0, clock=lambda: now[0])
    assert [every.take("x") for _ in range(50)] == [0] * 50


def test_a_sampler_remembers_a_bounded_number_of_kinds_and_tells_what_it_left_out() -> None:
    """A kind may carry a varying text (nats-py names the subject a permission was
    refused on): the table must not grow with every text for as long as it runs."""
    now = [0.0]
    sampler = LogSampler(burst=1, period_s=30.0, clock=lambda: now[0], max_kinds=4)
    for i in range(4):
        assert sampler.take(i) == 0
        assert sampler.take(i) is None
    now[0] = 30.0  # the four periods are over: forgotten when a fifth kind comes
    assert sampler.take("new") == 0
    assert sampler.take(0) == 0  # remembered no longer: its one suppressed line is lost
    for i in range(100):  # all current: the oldest go
        sampler.take(f"flood {i}")
    assert len(sampler._kinds) <= 4
    assert sampler.take("flood 99") is None  # the newest is still known
    assert sampler.reset() == 1 and sampler.reset() == 0


def test_a_librarys_warning_goes_through_the_log_pipeline_redacted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """warnings.warn wrote to stderr itself: no redaction, and no JSON line for the
    collector."""
    import warnings

    # An earlier test's capture, undone by pytest's own warning capture around each test,
    # still counts as on for logging: start from off.
    logging.captureWarnings(False)
    configure_logging(LogSettings(), service="test", secrets=[Secret("corp-secret-42")])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("retrying with corp-secret-42", ResourceWarning, stacklevel=1)
    finally:
        logging.captureWarnings(False)
    err = capsys.readouterr().err
    assert "corp-secret-42" not in err
    [line] = [line for line in _lines(err) if "retrying with" in str(line["event"])]
    assert f"ResourceWarning: retrying with {REDACTED}" in str(line["event"])
