"""Settings: names are a public interface; bad values stop start-up with a clear message."""

from __future__ import annotations

import pytest

from wecombot_common.errors import ConfigError
from wecombot_common.settings import (
    EnvReader,
    LogSettings,
    NatsSettings,
    Secret,
    WeComApiSettings,
    WeComCallbackSettings,
)

GOOD = {
    "WECOM_CORP_ID": "ww1436e0e65a779aee",
    "WECOM_AGENT_ID": "1000002",
    "WECOM_SECRET": "app-secret-value-123",
    "WECOM_TOKEN": "hJqcu3uJ9Tn2gXPmxx2w9kkCkCE2EPYo",
    "WECOM_ENCODING_AES_KEY": "6qkdMrq68nTKduznJYO1A37W2oEgpkMUvkttRToqhUt",
}


def _callback(env: dict[str, str]) -> WeComCallbackSettings:
    reader = EnvReader(env)
    settings = WeComCallbackSettings.read(reader)
    reader.raise_if_invalid()
    return settings


def test_good_values_are_read() -> None:
    s = _callback(GOOD)
    assert s.app == "ww1436e0e65a779aee-1000002"
    assert s.token.reveal() == GOOD["WECOM_TOKEN"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"WECOM_ENCODING_AES_KEY": "short"}, "WECOM_ENCODING_AES_KEY must be 43 characters"),
        ({"WECOM_ENCODING_AES_KEY": "!" * 43}, "WECOM_ENCODING_AES_KEY must contain only"),
        ({"WECOM_AGENT_ID": "abc"}, "WECOM_AGENT_ID must be a number"),
        ({"WECOM_CORP_ID": "ww.1"}, "WECOM_CORP_ID must be letters and digits"),
        ({"WECOM_TOKEN": ""}, "WECOM_TOKEN is required"),
        ({"WECOM_CORP_ID": ""}, "WECOM_CORP_ID is required"),
    ],
)
def test_bad_values_name_the_variable(change: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _callback({**GOOD, **change})


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        _callback({})
    text = str(info.value)
    for name in ("WECOM_CORP_ID", "WECOM_AGENT_ID", "WECOM_TOKEN", "WECOM_ENCODING_AES_KEY"):
        assert name in text


def test_secrets_never_show_in_reprs() -> None:
    s = _callback(GOOD)
    api = WeComApiSettings.read(EnvReader(GOOD))
    for text in (repr(s), str(s), repr(api), str(Secret("x"))):
        assert GOOD["WECOM_TOKEN"] not in text
        assert GOOD["WECOM_ENCODING_AES_KEY"] not in text
        assert GOOD["WECOM_SECRET"] not in text


def test_defaults_match_the_documented_interface() -> None:
    env = EnvReader({})
    nats = NatsSettings.read(env)
    api = WeComApiSettings.read(env, need_secret=False)
    log = LogSettings.read(env)
    assert nats.url == "nats://127.0.0.1:4222"
    assert api.api_base == "https://qyapi.weixin.qq.com"
    assert (log.level, log.format) == ("info", "json")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL must be one of debug|info|warning|error"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT must be one of json|console"),
        ({"NATS_URL": "http://x:4222"}, "NATS_URL must be nats://"),
        ({"WECOM_API_BASE": "qyapi"}, "WECOM_API_BASE must be a URL"),
        ({"NATS_USER": "gateway"}, "NATS_USER and NATS_PASSWORD go together"),
        ({"WECOMBOT_DUPLICATE_WINDOW": "5"}, "WECOMBOT_DUPLICATE_WINDOW must be a number"),
    ],
)
def test_other_bad_values(env: dict[str, str], message: str) -> None:
    reader = EnvReader(env)
    LogSettings.read(reader)
    NatsSettings.read(reader)
    WeComApiSettings.read(reader, need_secret=False)
    with pytest.raises(ConfigError, match=message):
        reader.raise_if_invalid()
