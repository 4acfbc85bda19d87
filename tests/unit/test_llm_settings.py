"""The llm's OPENAI_BASE_URL and OPENAI_API_KEY: whatever the settings accept, the model
client can be built and can send with; anything else stops start-up naming the variable
(exit 2), never quoting the key or a password."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import pytest
import yarl
from hypothesis import example, given
from hypothesis import strategies as st

from tests.conftest import free_port
from wecombot_common.errors import ConfigError
from wecombot_llm.model import OpenAIChatModel, provider_auth
from wecombot_llm.settings import LlmSettings

KEY = "sk-Distinct1veKey"


def _problems(env: dict[str, str]) -> list[str]:
    try:
        LlmSettings.from_env(env)
    except ConfigError as exc:
        return list(exc.problems)
    return []


@pytest.mark.parametrize(
    "url",
    [
        "http://user:Hunter2pw@llm.example/v1",
        "https://Hunter2pw@llm.example/v1",
        "https://user:Hunter2/pw@llm.example/v1",  # a '/' in it: does not even parse
    ],
)
def test_a_password_in_the_base_url_is_refused_without_showing_it(url: str) -> None:
    """It was accepted, then every call failed with aiohttp's 'Cannot combine
    AUTHORIZATION header with … credentials encoded in URL' (a ValueError that escaped
    the model's error handling)."""
    [problem] = _problems({"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": url})
    assert problem.startswith("OPENAI_BASE_URL ")
    assert "Hunter2" not in problem and "***@" in problem


def test_a_user_in_the_base_url_says_where_the_key_goes() -> None:
    [problem] = _problems({"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": "https://u:p@h/v1"})
    assert problem == (
        "OPENAI_BASE_URL must not hold user:password@ (the key goes in OPENAI_API_KEY), "
        "got 'https://***@h/v1'"
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        # ValueError from OpenAIChatModel(): exit 1 with a traceback, no setting named.
        ("http://[bad/v1", "does not parse as a URL"),
        ("http://llm.example:port/v1", "does not parse as a URL"),
        ("http://:8000/v1", "names no host"),
        ("http://llm example/v1", "must not hold spaces or control characters"),
    ],
)
def test_a_base_url_the_client_cannot_use_is_refused(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=f"OPENAI_BASE_URL {message}"):
        LlmSettings.from_env({"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": url})


@pytest.mark.parametrize(
    ("key", "where"),
    [
        ("sk-Distinct1ve\u00e9Key", "character 15 is U+00E9"),
        ("sk-Distinct1ve Key", "character 15 is a space"),
        ("sk-Distinct1ve\tKey", "character 15 is U+0009"),
        ("sk-Distinct1ve\u200bKey", "character 15 is U+200B"),  # zero width, pasted along
        ("\u201csk-Distinct1veKey\u201d", "character 1 is U+201C"),  # curly quotes
    ],
)
def test_a_key_that_is_no_header_value_is_refused_without_showing_it(key: str, where: str) -> None:
    """A non-ASCII key raised UnicodeEncodeError inside OpenAIChatModel() (exit 1, a
    traceback); one with a space or a control character cannot be sent either."""
    [problem] = _problems({"OPENAI_API_KEY": key})
    assert problem == (
        "OPENAI_API_KEY must be printable ASCII without spaces (it is sent in an HTTP "
        f"header): {where}"
    )
    assert "Distinct1ve" not in problem


def _build_and_close(env: dict[str, str]) -> httpx.Request:
    """The model client as the llm builds it, and the request it would send."""
    settings = LlmSettings.from_env(env).model

    async def build() -> httpx.Request:
        model = OpenAIChatModel(settings)
        await model.aclose()
        headers, params = provider_auth(settings)
        url = f"{settings.base_url}/chat/completions"
        return httpx.Request("POST", url, headers=headers, params=params, json={})

    return asyncio.run(build())


@given(
    rest=st.text(alphabet="ah09.-_:@[]/%\\ \x01é", max_size=16),
    key=st.text(alphabet="sk-09\\ \x01\x7fé€\u200b", min_size=1, max_size=8),
    azure=st.booleans(),
)
@example(rest="u:pw@llm.example/v1", key="sk", azure=False)
@example(rest="[bad/v1", key="sk", azure=False)
@example(rest="llm.example/v1", key="sk-é", azure=True)
@example(rest="[::1]:8000/v1", key="sk", azure=False)
def test_accepted_model_settings_build_a_client_that_can_send(
    rest: str, key: str, azure: bool
) -> None:
    """Accepted: OpenAIChatModel is built, and the request it sends is one httpx builds
    (headers encoded) and aiohttp's yarl reads. Refused: the problem names the variable."""
    env = {"OPENAI_BASE_URL": f"http://{rest}", "OPENAI_API_KEY": f"sk-{key}"}
    if azure:
        env["OPENAI_API_VERSION"] = "2024-10-21"
    if problems := _problems(env):
        assert all(p.startswith(("OPENAI_BASE_URL ", "OPENAI_API_KEY ")) for p in problems)
        return
    request = _build_and_close(env)
    assert yarl.URL(str(request.url)).host
    assert not yarl.URL(str(request.url)).user
    assert request.headers.raw


def test_the_llm_exits_2_naming_each_setting() -> None:
    """`wecombot llm` as it runs in a pod. Without the checks it started, and waited for
    NATS to build the model client (which then raised): here, past the timeout."""
    env = {
        **os.environ,
        "OPENAI_API_KEY": "sk-Distinct1ve\u00e9",
        "OPENAI_BASE_URL": "https://user:Hunter2pw@llm.example/v1",
        "NATS_URL": f"nats://127.0.0.1:{free_port()}",
        "WECOMBOT_HEALTH_PORT": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "wecombot", "llm"], env=env, capture_output=True, timeout=30
    )
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert "OPENAI_API_KEY must be printable ASCII" in err
    assert "OPENAI_BASE_URL must not hold user:password@" in err
    assert "Distinct1ve" not in err and "Hunter2" not in err
