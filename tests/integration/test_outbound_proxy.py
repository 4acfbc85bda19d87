"""The WeCom API calls (the token service's gettoken, the sender's message/send) and the
environment's proxy, read with their settings, against the simulated WeCom API over real
HTTP: through the proxy for WeCom's host, never for a loopback one (the sandbox's
simulator)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import free_port
from wecombot_common.settings import EnvReader, WeComApiSettings
from wecombot_common.sim.wecom_api import SimulatedWeComApi
from wecombot_sender.wecom import HttpMessageApi
from wecombot_token.domain import Failure
from wecombot_token.source import WeComTokenSource

pytestmark = pytest.mark.integration

CORP, SECRET, AGENT = "wwproxytest", "proxy-test-secret", 1000002


@pytest.fixture
async def wecom() -> AsyncIterator[SimulatedWeComApi]:
    async with SimulatedWeComApi(corp_id=CORP, secret=SECRET, agent_id=AGENT) as api:
        yield api


def _settings(api_base: str, **proxies: str) -> WeComApiSettings:
    """As the token service and the sender read theirs, proxy included."""
    env = EnvReader(
        {
            "WECOM_CORP_ID": CORP,
            "WECOM_AGENT_ID": str(AGENT),
            "WECOM_SECRET": SECRET,
            "WECOM_API_BASE": api_base,
            **proxies,
        }
    )
    settings = WeComApiSettings.read(env)
    env.raise_if_invalid()
    return settings


async def _token_and_send(settings: WeComApiSettings) -> None:
    source = WeComTokenSource(settings, timeout_s=5)
    try:
        token = await source.fetch()
    finally:
        await source.aclose()
    assert not isinstance(token, Failure), token
    api = HttpMessageApi(settings, timeout_s=5)
    try:
        await api.send_text(token.value, "zhang.san", "你好")
    finally:
        await api.aclose()


async def test_a_loopback_api_is_called_direct_whatever_the_proxy(
    wecom: SimulatedWeComApi,
) -> None:
    """A laptop's HTTP_PROXY without NO_PROXY took the sandbox's gettoken and sends to
    the proxy, which cannot reach this machine's loopback: no reply was ever sent."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    await _token_and_send(_settings(wecom.base_url, HTTP_PROXY=dead))
    assert wecom.gettoken_calls == 1
    assert [m.content for m in wecom.sent] == ["你好"]


async def test_the_wecom_api_calls_go_through_the_environment_proxy(
    wecom: SimulatedWeComApi,
) -> None:
    """Pods that reach qyapi.weixin.qq.com through an egress proxy: the calls go to the
    proxy in absolute form (here the simulator itself plays the proxy, and the API's host
    resolves nowhere else)."""
    await _token_and_send(_settings("http://qyapi.wecom.invalid", HTTP_PROXY=wecom.base_url))
    assert wecom.gettoken_calls == 1
    assert [m.content for m in wecom.sent] == ["你好"]
