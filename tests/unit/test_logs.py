"""Logging: secrets are redacted wherever they appear, in our lines and foreign ones."""

from __future__ import annotations

import json
import logging
from collections import namedtuple

import pytest
import structlog

from wecombot_common.logs import REDACTED, configure_logging, redact, register_secret
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
