"""``wecombot dev``'s own two settings: the console port and the model label."""

from __future__ import annotations

import pytest

from wecombot.dev import CONSOLE_PORT, console_port, model_label


def test_console_port() -> None:
    assert console_port({"WECOMBOT_CONSOLE_PORT": "18090"}) == 18090
    assert console_port({"WECOMBOT_CONSOLE_PORT": "0"}) is None  # off
    # the default, or any free port (0) when another process holds it
    assert console_port({}) in (CONSOLE_PORT, 0)


@pytest.mark.parametrize("raw", ["abc", "70000", "-1", "80.5"])
def test_a_malformed_console_port_names_the_variable(raw: str) -> None:
    with pytest.raises(ValueError, match="WECOMBOT_CONSOLE_PORT must be a port number"):
        console_port({"WECOMBOT_CONSOLE_PORT": raw})


def test_model_label() -> None:
    assert model_label({}) == ("offline echo model (OPENAI_API_KEY unset)", True)
    assert model_label({"OPENAI_API_KEY": "sk"}) == ("gpt-4o-mini at api.openai.com", False)
    deepseek = {
        "OPENAI_API_KEY": "sk",
        "OPENAI_BASE_URL": "https://api.deepseek.com/v1",
        "OPENAI_MODEL": "deepseek-chat",
    }
    assert model_label(deepseek) == ("deepseek-chat at api.deepseek.com", False)
