"""``wecombot dev``'s own two settings: the console port and the model label."""

from __future__ import annotations

import socket

import pytest

from wecombot.dev import CONSOLE_PORT, console_port, model_label


def test_console_port() -> None:
    assert console_port({"WECOMBOT_CONSOLE_PORT": "18090"}) == 18090
    assert console_port({"WECOMBOT_CONSOLE_PORT": "0"}) is None  # off


def test_the_default_console_port_falls_back_to_any_free_port_when_taken() -> None:
    with socket.socket() as holder:
        try:
            holder.bind(("127.0.0.1", CONSOLE_PORT))
        except OSError:
            held_here = False  # another process holds it: taken all the same
        else:
            held_here = True
        assert console_port({}) == 0  # taken: any free port
    if not held_here:
        pytest.skip(f"port {CONSOLE_PORT} is held by another process: cannot free it")
    # Released: the default again.
    assert console_port({}) == CONSOLE_PORT


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
