"""Logging: secrets are redacted wherever they appear, in our lines and foreign ones."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from wecombot_common.logs import REDACTED, configure_logging, register_secret
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
