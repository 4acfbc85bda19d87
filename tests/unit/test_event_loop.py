"""runtime.run_service's event loop: uvloop when installed (auto), or as configured."""

from __future__ import annotations

import asyncio
import importlib.util
import json

import pytest

from wecombot_common.errors import ConfigError
from wecombot_common.logs import configure_logging
from wecombot_common.runtime import event_loop_name, run_service
from wecombot_common.settings import LogSettings, Secret

HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def test_auto_prefers_uvloop_when_installed() -> None:
    expected = "uvloop" if HAVE_UVLOOP else "asyncio"
    assert event_loop_name({}) == expected
    assert event_loop_name({"WECOMBOT_EVENT_LOOP": " AUTO "}) == expected


def test_asyncio_can_be_forced() -> None:
    assert event_loop_name({"WECOMBOT_EVENT_LOOP": "asyncio"}) == "asyncio"


def test_a_bad_value_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="WECOMBOT_EVENT_LOOP"):
        event_loop_name({"WECOMBOT_EVENT_LOOP": "trio"})


@pytest.mark.parametrize("choice", ["asyncio", "auto"])
def test_run_service_serves_on_the_chosen_loop(choice: str) -> None:
    seen: list[str] = []

    async def serve(settings: str, stop: asyncio.Event) -> None:
        seen.append(type(asyncio.get_running_loop()).__module__)

    code = run_service(
        lambda env: "settings", serve, {"WECOMBOT_EVENT_LOOP": choice}, service="test"
    )
    assert code == 0
    uses_uvloop = choice == "auto" and HAVE_UVLOOP
    assert seen[0].startswith("uvloop") == uses_uvloop


def test_run_service_refuses_a_bad_loop_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    async def serve(settings: str, stop: asyncio.Event) -> None:  # pragma: no cover
        raise AssertionError("must not run")

    assert run_service(lambda env: "s", serve, {"WECOMBOT_EVENT_LOOP": "nope"}, service="test") == 2
    assert "WECOMBOT_EVENT_LOOP" in capsys.readouterr().err


def test_a_crash_is_exit_1_through_the_redacting_log(capsys: pytest.CaptureFixture[str]) -> None:
    """Python's own report of an uncaught exception is printed as it is: a secret in its
    message (a URL with a password nats-py refuses, say) reached stderr unredacted."""
    configure_logging(LogSettings(), service="test", secrets=[Secret("pa55-in-url")])

    async def serve(settings: str, stop: asyncio.Event) -> None:
        raise ValueError("netloc 'bot:pa55-in-url@host' contains invalid characters")

    assert run_service(lambda env: "s", serve, {}, service="test") == 1
    err = capsys.readouterr().err
    assert "pa55-in-url" not in err
    [crash] = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert crash["event"] == "service.crashed" and crash["level"] == "error"
    assert "ValueError" in crash["exception"]
