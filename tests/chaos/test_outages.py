"""What is around the services failing: the broker restarting, WeCom down, the model
rate-limiting, WeCom retrying callbacks, poison messages; and services being replaced
one by one (a rolling restart) under load."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter, defaultdict
from typing import Any

import pytest

from tests.chaos.cluster import APP, Cluster, model_reply
from tests.e2e.harness import ProcessService
from tests.waiting import until
from wecombot_common import topology
from wecombot_common.events import DeliveryFailed
from wecombot_common.sim.openai_api import Fault
from wecombot_common.topology import ConversationRef

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]


def _ended(cluster: Cluster) -> list[tuple[str, int | None, str]]:
    """Each service process that has ended: (name, exit code, log)."""
    return [(s.name, s.proc.returncode, str(s.log_path)) for s in cluster.exited()]


async def _load(cluster: Cluster, rng: random.Random, users: list[str], rounds: int) -> None:
    """Each user says ``rounds`` things, pausing a (seeded) moment between them."""
    pauses = {u: [rng.uniform(0.0, 0.6) for _ in range(rounds)] for u in users}

    async def one(user: str) -> None:
        for i, pause in enumerate(pauses[user]):
            await asyncio.sleep(pause)  # think time, not synchronisation
            await cluster.say(user, f"{user} says #{i}")

    await asyncio.gather(*(one(u) for u in users))


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_nats_server_restarted_mid_load(
    cluster: Cluster, rng: random.Random, how: str
) -> None:
    await cluster.start_all(token=1, llm=2, sender=2, gateway=1)
    users = [f"broker.user{i}" for i in range(10)]
    load = asyncio.create_task(_load(cluster, rng, users, 6))
    await until(lambda: len(cluster.said) >= 15, timeout=30, what="the load to be going")
    # SIGTERM (a clean restart) or SIGKILL (a crash) while messages are in flight.
    await asyncio.to_thread(cluster.nats.stop if how == "stop" else cluster.nats.kill)
    # Nothing can be stored: the gateway must not say 200, so WeCom keeps the message.
    during = cluster.stack.client.text("outage.user", "said during the outage")
    assert await cluster.post(during, cluster.gateway_ports[0]) == 503
    await until(lambda: cluster.statuses[503] >= len(users), timeout=30, what="503s")
    await asyncio.to_thread(cluster.nats.start)
    await cluster.say("outage.user", "said during the outage", callback=during)
    await load
    # A broker killed -9 loses its latest consumer state (one node, nothing replicated):
    # a reply whose send was in flight comes back as a *first* delivery, so nothing
    # tells the sender it may repeat a part. Production runs 3 replicas (see
    # docs/reliability.md). A user has one part in flight at most: it may come twice.
    await cluster.check(timeout=90, repeats=0 if how == "stop" else len(users) + 1)
    # Every service recovered by itself: each process started is still running.
    assert _ended(cluster) == []
    assert Counter(s.name for s in cluster.alive()) == {
        "token": 1,
        "llm": 2,
        "sender": 2,
        "gateway": 1,
    }


async def test_wecom_api_down_for_a_while(cluster: Cluster, rng: random.Random) -> None:
    await cluster.start_all(token=1, llm=1, sender=2, gateway=1)
    await cluster.say("warm.up", "hello")
    await cluster.answered(timeout=30)
    cluster.wecom.set_down(True)
    users = [f"down.user{i}" for i in range(8)]
    load = asyncio.create_task(_load(cluster, rng, users, 3))
    # Down long enough that senders gave up retrying in process and handed replies back.
    await until(
        lambda: cluster.log_count("sender", "worker.retry") >= 4,
        timeout=60,
        what="replies handed back while WeCom is down",
    )
    cluster.wecom.set_down(False)
    await load
    await cluster.check(timeout=120)


async def test_the_model_rate_limits_with_retry_after(cluster: Cluster, rng: random.Random) -> None:
    await cluster.start_all(token=1, llm=2, sender=1, gateway=1)
    cluster.model.fail_always(Fault.rate_limited(retry_after="1"))
    users = [f"limited.user{i}" for i in range(6)]
    load = asyncio.create_task(_load(cluster, rng, users, 2))
    await until(
        lambda: len(cluster.model.chat_requests) >= 3 * len(users),
        timeout=60,
        what="rate-limited model calls",
    )
    cluster.model.fail_always(None)
    await load
    await cluster.check(timeout=120)
    # Every retry waited at least what Retry-After asked for.
    arrivals: dict[str | None, list[float]] = defaultdict(list)
    for request in cluster.model.chat_requests:
        arrivals[request.last_user_text].append(request.at)
    gaps = [b - a for times in arrivals.values() for a, b in itertools.pairwise(times)]
    assert gaps and min(gaps) >= 0.95, sorted(gaps)[:3]


async def test_callback_retries_while_the_first_copy_is_processed(cluster: Cluster) -> None:
    await cluster.start_all(token=1, llm=2, sender=1, gateway=2)
    # The model (in this process) holds every answer until the late copies were sent.
    answering = asyncio.Event()

    async def held_reply(messages: list[dict[str, Any]]) -> str:
        await answering.wait()
        return model_reply(messages)

    cluster.model.reply = held_reply
    users = [f"retry.user{i}" for i in range(6)]
    callbacks = [cluster.stack.client.text(u, f"{u} are you there?") for u in users]
    try:
        # WeCom gave up waiting and retried: copies arrive together at both gateways.
        copies = [cluster.post(cb, port) for cb in callbacks for port in cluster.gateway_ports * 2]
        assert set(await asyncio.gather(*copies)) == {200}
        await cluster.model.wait_for_requests(len(users), timeout=20)
        # More copies while the model is answering the first one.
        late = [cluster.post(cb, port) for cb in callbacks for port in cluster.gateway_ports]
        assert set(await asyncio.gather(*late)) == {200}
        for user, cb in zip(users, callbacks, strict=True):
            await cluster.say(user, f"{user} are you there?", callback=cb)  # one more: 200
        # Nothing answered yet, and no copy became a model call of its own.
        assert cluster.wecom.sent == []
        assert len(cluster.model.chat_requests) == len(users)
    finally:
        answering.set()
    await cluster.check(timeout=60)
    # ... and one after the answer went out.
    assert {await cluster.post(cb, cluster.gateway_ports[1]) for cb in callbacks} == {200}
    await cluster.check(timeout=30)  # each stored once, answered once


async def test_poison_messages_do_not_block_anyone(cluster: Cluster) -> None:
    await cluster.start_all(token=1, llm=1, sender=1, gateway=1)
    root = ConversationRef(APP, "poisoned").root
    # An event nobody can decode, on the llm's input and on the sender's.
    await cluster.js.publish(f"{root}.in", b"\x00not an event")
    await cluster.js.publish(f"{root}.llm.reply", b'{"type": "ReplyGenerated"}')
    # A user WeCom always refuses.
    cluster.wecom.reject_user("left.company", 81013)
    refused = cluster.stack.client.text("left.company", "are you still there?")
    await cluster.deliver(refused)
    # The conversations behind them, and everyone else, move on at once.
    await cluster.say("poisoned", "hello after the poison")
    await cluster.say("bystander", "hello")
    await cluster.answered(timeout=20)
    await until(
        lambda: cluster.log_count("sender", "sender.delivery_failed") == 1,
        timeout=20,
        what="the refused reply to be recorded",
    )
    cluster.wecom.faults.always_fail_users.clear()
    await cluster.say("left.company", "back again")
    await cluster.check(timeout=30, dead_letters=3, skip_users=["left.company"])
    assert cluster.received()["left.company"] == ["echo: back again"]
    failed = [e for _, e in await cluster.events() if isinstance(e, DeliveryFailed)]
    assert [(e.conversation, e.errcode) for e in failed] == [("left.company", 81013)]
    letters = await cluster.dead_letters()
    reasons = {(d["Wecombot-Dlq-Consumer"], d["Wecombot-Dlq-Subject"]): d for d in letters}
    assert reasons[("llm", f"{root}.in")]["Wecombot-Dlq-Reason"].startswith("undecodable")
    assert reasons[("sender", f"{root}.llm.reply")]["Wecombot-Dlq-Reason"].startswith("undecodable")
    refused_root = ConversationRef(APP, "left.company").root
    assert "81013" in reasons[("sender", f"{refused_root}.llm.reply")]["Wecombot-Dlq-Reason"]


async def test_a_rolling_restart_under_load_loses_nothing(
    cluster: Cluster, rng: random.Random
) -> None:
    await cluster.start_all(token=2, llm=2, sender=2, gateway=2)
    replaced: list[ProcessService] = []
    cluster.model.latency_s = lambda: rng.uniform(0.2, 1.0)
    users = [f"rolling.user{i}" for i in range(16)]
    load = asyncio.create_task(_load(cluster, rng, users, 8))
    for name in ("token", "llm", "sender", "gateway"):
        for old in cluster.alive(name):
            fresh = cluster.start(name)
            await cluster.started(fresh)
            if name == "gateway":
                cluster.retire(old)
            # SIGTERM: a clean exit, within 12 s (killed and failed past it).
            assert await old.terminate(timeout=12) == 0, name
            replaced.append(old)
    await load
    await cluster.check(timeout=120)
    # Only the replaced processes ended; their successors all still run.
    assert cluster.exited() == replaced, _ended(cluster)
    assert Counter(s.name for s in cluster.alive()) == {
        "token": 2,
        "llm": 2,
        "sender": 2,
        "gateway": 2,
    }


async def test_sigterm_hands_back_model_calls_it_cannot_finish(cluster: Cluster) -> None:
    await cluster.start_all(token=1, sender=1, gateway=1)
    leaving = cluster.start("llm")  # LLM_SHUTDOWN_GRACE=5 (chaos env)
    await cluster.started(leaving)
    cluster.model.latency_s = 30.0  # far longer than the grace
    users = [f"handback.user{i}" for i in range(4)]
    await asyncio.gather(*(cluster.say(u, f"{u} slow question") for u in users))
    await cluster.model.wait_for_requests(len(users), timeout=20)
    staying = cluster.start("llm")
    await cluster.started(staying)
    cluster.model.latency_s = 0.1
    # Stops within 10 s (the 5 s grace, then hand back): killed and failed past it.
    assert await leaving.terminate(timeout=10) == 0
    await cluster.check(timeout=30)
    info = await cluster.js.consumer_info(topology.CONVERSATION_STREAM, topology.LLM_CONSUMER)
    assert info.num_ack_pending == 0
    assert "worker.handed_back" in cluster.logs("llm")
