"""The simulated WeCom API's tokens across a restart of the sandbox (``token_file``).

WeCom's tokens live 7200 s whoever restarts; a sandbox that forgot them answered the
first send after every ``make run`` with 40014, a fault nobody had asked for.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from wecombot_common.sim.wecom_api import SimulatedWeComApi

pytestmark = pytest.mark.integration

CORP, SECRET, AGENT = "wwsimtokens", "sim-tokens-secret", 1000002


def _api(token_file: Path | None) -> SimulatedWeComApi:
    return SimulatedWeComApi(corp_id=CORP, secret=SECRET, agent_id=AGENT, token_file=token_file)


async def _token(api: SimulatedWeComApi) -> str:
    async with httpx.AsyncClient() as client:
        answer = await client.get(
            f"{api.base_url}/cgi-bin/gettoken", params={"corpid": CORP, "corpsecret": SECRET}
        )
    return str(answer.json()["access_token"])


async def _send(api: SimulatedWeComApi, token: str) -> int:
    body = {"touser": "zhang.san", "msgtype": "text", "agentid": AGENT, "text": {"content": "hi"}}
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"{api.base_url}/cgi-bin/message/send", params={"access_token": token}, json=body
        )
    return int(answer.json()["errcode"])


async def test_a_restarted_sandbox_accepts_the_tokens_it_issued(tmp_path: Path) -> None:
    file = tmp_path / "sandbox-tokens.json"
    async with _api(file) as first:
        token = await _token(first)
        assert await _send(first, token) == 0
    assert file.stat().st_mode & 0o777 == 0o600  # a token, even a sandbox's
    async with _api(file) as restarted:
        assert await _send(restarted, token) == 0
        assert await _send(restarted, "never-issued") == 40014
    async with _api(None) as forgetful:  # without the file: unknown, as before
        assert await _send(forgetful, token) == 40014


async def test_an_expired_token_stays_expired_after_a_restart(tmp_path: Path) -> None:
    file = tmp_path / "sandbox-tokens.json"
    async with _api(file) as first:
        token = await _token(first)
        first.expire_tokens()
        assert await _send(first, token) == 42001
    async with _api(file) as restarted:
        assert await _send(restarted, token) == 42001
        fresh = await _token(restarted)
        assert await _send(restarted, fresh) == 0
