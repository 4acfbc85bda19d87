"""Fixtures of the chaos suite (``make chaos``): a cluster of real service processes on a
real nats-server, and the seed every random choice comes from.

The seed is printed at the start of each test; set ``WECOMBOT_CHAOS_SEED`` to replay a
failure with the same choices (which replica is killed, when, what users say). Process
scheduling is the OS's, so a replay repeats the schedule, not every interleaving.
"""

from __future__ import annotations

import os
import random
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from tests.chaos.cluster import Cluster, cluster_of
from tests.conftest import NatsHandle


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    value = int(os.environ.get("WECOMBOT_CHAOS_SEED") or secrets.randbelow(2**32))
    print(f"\n[chaos] {request.node.name}: WECOMBOT_CHAOS_SEED={value}", flush=True)
    return value


@pytest.fixture
def rng(seed: int) -> random.Random:
    return random.Random(seed)


@pytest.fixture
async def cluster(
    nats_server: NatsHandle, js: JetStreamContext, tmp_path: Path
) -> AsyncIterator[Cluster]:
    async with cluster_of(nats_server, js, tmp_path) as c:
        yield c
