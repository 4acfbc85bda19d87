"""A service asked to stop while NATS is away stops cleanly: no crash report, exit 0.

nats-py's ``close()`` during a reconnect with unsent data (a callback's append the
gateway already answered 503) writes into the dead transport and raises half-way; the
gateway reported ``service.crashed`` and exited 1 on a rollout during a NATS outage.
"""

from __future__ import annotations

import httpx
import pytest
from structlog.testing import capture_logs

from tests.conftest import NatsHandle
from tests.integration.wecom_app import AGENT, CORP, KEY, TOKEN, running_gateway
from tests.waiting import until
from wecombot_common.sim.callbacks import CallbackBuilder

pytestmark = pytest.mark.integration


async def test_the_gateway_stops_cleanly_with_an_append_unsent_while_nats_is_away(
    nats_server: NatsHandle,
) -> None:
    wecom = CallbackBuilder(corp_id=CORP, agent_id=AGENT, token=TOKEN, encoding_aes_key=KEY)
    with capture_logs() as logs:
        # leaving the block awaits run_gateway: it must return, not raise
        async with running_gateway(nats_server.url) as base, httpx.AsyncClient() as http:
            nats_server.stop()

            async def unready() -> bool:
                return (await http.get(f"{base}/readyz")).status_code == 503

            await until(unready, timeout=15, what="the gateway to see NATS gone")
            callback = wecom.text("zhang.san", "sent while NATS is away")
            answer = await http.post(
                f"{base}/wecom/callback",
                params=callback.query,
                content=callback.body,
                headers={"Content-Type": "text/xml"},
                timeout=15,
            )
            assert answer.status_code == 503  # WeCom retries it; nothing is lost
    events = [e["event"] for e in logs]
    assert "gateway.stopped" in events
    assert "service.crashed" not in events
