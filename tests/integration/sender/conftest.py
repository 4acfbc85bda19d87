"""Fixtures of the sender's integration tests (the harness is in harness.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest

from tests.conftest import NatsHandle
from wecombot_common.bus import ensure_topology
from wecombot_common.settings import EnvReader, NatsSettings
from wecombot_common.sim.wecom_api import SimulatedWeComApi

from .harness import AGENT, CORP, SECRET, Log, System


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedWeComApi]:
    async with SimulatedWeComApi(corp_id=CORP, secret=SECRET, agent_id=AGENT) as api:
        yield api


@pytest.fixture
async def system(nats_server: NatsHandle, sim: SimulatedWeComApi) -> AsyncIterator[System]:
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_topology(js, NatsSettings.read(EnvReader({})))
    log = Log()
    await log.start(js)
    system = System(nc=nc, js=js, sim=sim, log=log, url=nats_server.url)
    try:
        yield system
    finally:
        try:
            # A service that crashed, or did not stop within its budget, fails the test:
            # the other replica may have done all the work.
            await system.shutdown()
        finally:
            await nc.close()
