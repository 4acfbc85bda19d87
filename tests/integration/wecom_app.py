"""One WeCom app for the integration tests that run the real gateway (doctor, console):
its credentials, its settings, and the gateway serving it on a free port."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx

from tests.conftest import free_port
from tests.waiting import until
from wecombot_common.crypto import generate_encoding_aes_key, generate_token
from wecombot_gateway.main import run_gateway
from wecombot_gateway.settings import GatewaySettings

CORP = "wwdoctortest01"
AGENT = 1000002
SECRET = "the-app-secret-0123456789"
TOKEN = generate_token()
KEY = generate_encoding_aes_key()


def wecom_env(api_base: str = "http://127.0.0.1:9", **extra: str) -> dict[str, str]:
    env = {
        "WECOM_CORP_ID": CORP,
        "WECOM_AGENT_ID": str(AGENT),
        "WECOM_SECRET": SECRET,
        "WECOM_TOKEN": TOKEN,
        "WECOM_ENCODING_AES_KEY": KEY,
        "WECOM_API_BASE": api_base,
    }
    env.update(extra)
    return env


async def until_ready(url: str, timeout: float = 15.0) -> None:
    """Poll a readiness endpoint until 200 (the server is ours, starting in this loop)."""
    async with httpx.AsyncClient(timeout=1.0) as http:

        async def ready() -> bool:
            try:
                return (await http.get(url)).status_code == 200
            except httpx.TransportError:
                return False

        await until(ready, timeout=timeout, what=f"{url} to answer 200")


@contextlib.asynccontextmanager
async def running_gateway(nats_url: str) -> AsyncIterator[str]:
    """The real gateway for this app, ready; yields its base URL."""
    port = free_port()
    settings = GatewaySettings.from_env(
        wecom_env(NATS_URL=nats_url, GATEWAY_PORT=str(port), GATEWAY_HOST="127.0.0.1")
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_gateway(settings, stop))
    base = f"http://127.0.0.1:{port}"
    try:
        await until_ready(f"{base}/readyz")
        yield base
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
