"""The WeCom API calls (the token service's gettoken, the sender's message/send) and the
environment's proxy, against the simulated WeCom API over real HTTP: through the proxy
for WeCom's host, never for a loopback one (the sandbox's simulator)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import free_port
from wecombot_common.settings import Secret, WeComApiSettings
from wecombot_common.sim.wecom_api import SimulatedWeComApi
from wecombot_sender.wecom import HttpMessageApi
from wecombot_token.domain import Failure
from wecombot_token.source import WeComTokenSource

pytestmark = pytest.mark.integration

CORP, SECRET, AGENT = "wwproxytest", "proxy-test-secret", 1000002
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture
def proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


@pytest.fixture
async def wecom() -> AsyncIterator[SimulatedWeComApi]:
    async with SimulatedWeComApi(corp_id=CORP, secret=SECRET, agent_id=AGENT) as api:
        yield api


def _settings(api_base: str) -> WeComApiSettings:
    return WeComApiSettings(corp_id=CORP, agent_id=AGENT, secret=Secret(SECRET), api_base=api_base)


async def _token_and_send(api_base: str) -> None:
    source = WeComTokenSource(_settings(api_base), timeout_s=5)
    try:
        token = await source.fetch()
    finally:
        await source.aclose()
    assert not isinstance(token, Failure), token
    api = HttpMessageApi(_settings(api_base), timeout_s=5)
    try:
        await api.send_text(token.value, "zhang.san", "你好")
    finally:
        await api.aclose()


async def test_a_loopback_api_is_called_direct_whatever_the_proxy(
    proxy_env: pytest.MonkeyPatch, wecom: SimulatedWeComApi
) -> None:
    """A laptop's HTTP_PROXY without NO_PROXY took the sandbox's gettoken and sends to
    the proxy, which cannot reach this machine's loopback: no reply was ever sent."""
    proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens
    await _token_and_send(wecom.base_url)
    assert wecom.gettoken_calls == 1
    assert [m.content for m in wecom.sent] == ["你好"]


async def test_the_wecom_api_calls_go_through_the_environment_proxy(
    proxy_env: pytest.MonkeyPatch, wecom: SimulatedWeComApi
) -> None:
    """Pods that reach qyapi.weixin.qq.com through an egress proxy: the calls go to the
    proxy in absolute form (here the simulator itself plays the proxy, and the API's host
    resolves nowhere else)."""
    proxy_env.setenv("HTTP_PROXY", wecom.base_url)
    await _token_and_send("http://qyapi.wecom.invalid")
    assert wecom.gettoken_calls == 1
    assert [m.content for m in wecom.sent] == ["你好"]
