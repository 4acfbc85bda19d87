"""A thousand messages from a hundred users while llm, sender and token replicas are
killed (-9) and restarted at random: nothing lost, nothing twice, every user's replies in
order.

Replay a failure with the seed it printed: ``WECOMBOT_CHAOS_SEED=<seed> make chaos``.
The seed fixes what users say, when they pause and which replica is killed when;
process scheduling still varies from run to run.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter

import pytest

from tests.chaos.cluster import LONG_MARK, Cluster
from wecombot_common.events import MessageReceived, TextPayload

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(420)]

USERS = 100
MESSAGES_PER_USER = 10
LONG_REPLIES_PER_USER = 2  # at most; keeps every user under WeCom's 30 messages a minute
VICTIMS = ("llm", "sender", "token")


def _script(rng: random.Random) -> dict[str, list[tuple[float, str]]]:
    """Per user: (pause before it, text) for each message."""
    script: dict[str, list[tuple[float, str]]] = {}
    for i in range(USERS):
        user = f"soak.user{i:03d}@corp"
        longs = set(rng.sample(range(MESSAGES_PER_USER), rng.randint(0, LONG_REPLIES_PER_USER)))
        script[user] = [
            (rng.uniform(0.0, 5.0), f"{user} #{n}" + (f" {LONG_MARK}" if n in longs else ""))
            for n in range(MESSAGES_PER_USER)
        ]
    return script


async def _users(cluster: Cluster, script: dict[str, list[tuple[float, str]]]) -> None:
    async def one(user: str) -> None:
        for pause, text in script[user]:
            await asyncio.sleep(pause)  # the user thinking, not synchronisation
            await cluster.say(user, text)

    await asyncio.gather(*(one(u) for u in script))


async def _monkey(cluster: Cluster, rng: random.Random, stop: asyncio.Event) -> None:
    """Kill -9 a random replica every 1–3 s; it comes back 0–2 s later (a pod restart)."""

    async def pause(seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    while True:
        await pause(rng.uniform(1.0, 3.0))
        if stop.is_set():
            return
        name = rng.choice(VICTIMS)
        replicas = sorted(cluster.alive(name), key=lambda s: s.proc.pid)
        victim = replicas[rng.randrange(len(replicas))]
        cluster.kill(victim)
        await asyncio.sleep(rng.uniform(0.0, 2.0))  # the restart delay
        await cluster.started(cluster.start(name))


async def test_a_thousand_messages_while_replicas_are_killed_at_random(
    cluster: Cluster, rng: random.Random, seed: int
) -> None:
    script = _script(rng)
    monkey_rng = random.Random(rng.getrandbits(64))
    latency_rng = random.Random(rng.getrandbits(64))
    await cluster.start_all(token=2, llm=2, sender=2, gateway=1)
    cluster.model.latency_s = lambda: latency_rng.uniform(0.05, 0.6)

    started = time.monotonic()
    stop = asyncio.Event()
    monkey = asyncio.create_task(_monkey(cluster, monkey_rng, stop))
    try:
        await _users(cluster, script)
    finally:
        stop.set()
        await monkey
    said_in = time.monotonic() - started
    await cluster.check(timeout=240)
    took = time.monotonic() - started

    # The log holds exactly the scripted messages (what check() compares, the replies,
    # is derived from cluster.said; this holds it to the script itself).
    stored = [e for _, e in await cluster.events() if isinstance(e, MessageReceived)]
    assert len(stored) == USERS * MESSAGES_PER_USER
    assert Counter(
        (e.from_user, e.payload.content) for e in stored if isinstance(e.payload, TextPayload)
    ) == Counter((user, text) for user, lines in script.items() for _, text in lines)
    kills = Counter(cluster.kills)
    print(
        f"[chaos] seed={seed}: {len(cluster.said)} messages said in {said_in:.0f}s, all "
        f"answered in {took:.0f}s; kills {dict(kills)}; gateway answers {dict(cluster.statuses)}",
        flush=True,
    )
    assert sum(kills.values()) >= 5, kills
