"""The bounds of the services' numeric settings, at their edges: the last value each
accepts and the first it refuses (a mutation review found the edges untested)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest

from tests.unit.test_settings import GOOD
from wecombot_common.errors import ConfigError
from wecombot_gateway.settings import GatewaySettings
from wecombot_llm.settings import LlmSettings
from wecombot_sender.settings import SenderSettings
from wecombot_token.settings import TokenSettings

Read = Callable[[Mapping[str, str]], object]


@pytest.mark.parametrize(
    ("read", "name", "accepted", "refused"),
    [
        (LlmSettings.from_env, "LLM_TEMPERATURE", "2", "2.5"),
        (LlmSettings.from_env, "LLM_MAX_TURNS", "0", "-1"),
        (SenderSettings.from_env, "SENDER_HTTP_TIMEOUT", "0.1", "0"),
        (SenderSettings.from_env, "SENDER_RETRY_ATTEMPTS", "0", "-1"),
        (TokenSettings.from_env, "TOKEN_REFRESH_MARGIN", "3600", "3601"),
        # under WeCom's 5 s, or WeCom gives up on the callback before we answer
        (GatewaySettings.from_env, "GATEWAY_PUBLISH_TIMEOUT", "4.5", "5"),
    ],
)
def test_each_bound_holds_at_its_edge(read: Read, name: str, accepted: str, refused: str) -> None:
    read({**GOOD, name: accepted})
    with pytest.raises(ConfigError, match=f"{name} must be"):
        read({**GOOD, name: refused})


def test_the_backoff_may_be_one_fixed_step() -> None:
    token = TokenSettings.from_env({**GOOD, "TOKEN_MIN_BACKOFF": "5", "TOKEN_MAX_BACKOFF": "5"})
    assert (token.min_backoff_s, token.max_backoff_s) == (5.0, 5.0)


def test_history_is_kept_at_least_as_long_as_the_duplicate_window() -> None:
    """JetStream refuses a stream whose duplicate window is longer than its max age: the
    age is raised to the window, and the llm's history age with it (it must not keep
    as history what the stream has dropped, nor drop what it keeps)."""
    env = {**GOOD, "WECOMBOT_HISTORY_MAX_AGE": "3600", "WECOMBOT_DUPLICATE_WINDOW": "7200"}
    assert LlmSettings.from_env(env).policy.history_max_age_s == 7200
