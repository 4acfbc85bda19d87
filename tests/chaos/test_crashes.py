"""Crashes (kill -9) of llm, sender and token replicas at the worst moments.

Each scenario makes the moment deterministic (a slow model, a WeCom request held open)
instead of hoping a random kill lands in it, then checks what users saw and the log.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from tests.chaos.cluster import LONG_MARK, Cluster, reply_for
from wecombot_sender.split import split_text

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]


async def test_an_llm_replica_killed_in_the_middle_of_model_calls(
    cluster: Cluster, rng: random.Random
) -> None:
    await cluster.start_all(token=1, sender=1, gateway=1)
    doomed = cluster.start("llm")
    await cluster.started(doomed)
    cluster.model.latency_s = 30.0  # the doomed replica's model calls will not return
    users = [f"llm.crash{i}@corp" for i in range(8)]
    await asyncio.gather(*(cluster.say(u, f"{u} asks #1") for u in users))
    await cluster.model.wait_for_requests(len(users), timeout=20)
    survivor = cluster.start("llm")
    await cluster.started(survivor)
    cluster.model.latency_s = 0.3
    # More messages meanwhile: they wait behind the first ones, wherever they land.
    await asyncio.gather(*(cluster.say(u, f"{u} asks #2") for u in rng.sample(users, 5)))
    cluster.kill(doomed)  # eight model calls in flight
    await cluster.check(timeout=90)
    # The survivor answered everything once ack_wait (3 s) gave it the dead one's work.
    assert doomed.log_path.read_text().count('"llm.outcome_appended"') == 0
    asked = Counter(r.last_user_text for r in cluster.model.chat_requests)
    assert all(asked[f"{u} asks #1"] >= 2 for u in users), asked  # the lost call, again


@pytest.mark.parametrize("wecom_accepted", [False, True], ids=["never-accepted", "accepted"])
async def test_a_sender_killed_between_two_parts_of_a_long_reply(
    cluster: Cluster, wecom_accepted: bool
) -> None:
    await cluster.start_all(token=1, llm=1, gateway=1)
    doomed = cluster.start("sender")
    await cluster.started(doomed)
    user = "long.reader"
    text = f"tell me everything {LONG_MARK}"
    parts = split_text(reply_for(text))
    assert len(parts) >= 3
    # Part 2 (index 1) waits inside WeCom: before it is accepted, or accepted with the
    # answer held (the crash window between WeCom accepting and PartDelivered).
    hold = cluster.wecom.hold_sends(
        lambda touser, content: content == parts[1], after_accept=wecom_accepted
    )
    await cluster.say(user, text)
    await hold.wait_held(timeout=30)
    assert cluster.received()[user] == parts[: 1 + int(wecom_accepted)]
    cluster.kill(doomed)
    hold.release(accept=False)  # answers nobody: the sender is dead
    replacement = cluster.start("sender")
    await cluster.started(replacement)
    await cluster.say(user, "and one more thing")  # queued behind the long reply
    await cluster.check(timeout=60)
    # The replacement resumed after the recorded part 1, and WeCom's duplicate check
    # dropped the repeat of the part it had already accepted.
    dropped = [m.content for m in cluster.wecom.duplicates]
    assert dropped == ([parts[1]] if wecom_accepted else [])


async def test_the_token_service_killed_during_a_refresh(cluster: Cluster) -> None:
    doomed = cluster.start("token")
    await cluster.started(doomed)
    await cluster.start_all(llm=1, sender=2, gateway=1)
    await cluster.say("early.bird", "good morning")
    await cluster.answered(timeout=30)
    [first_token] = {m.access_token for m in cluster.wecom.sent}
    assert cluster.wecom.gettoken_calls == 1

    cluster.wecom.expire_tokens()  # every send now gets 42001: a refresh is needed
    hold = cluster.wecom.hold_gettoken()  # and it hangs inside WeCom
    users = [f"token.wait{i}" for i in range(6)]
    await asyncio.gather(*(cluster.say(u, f"{u} hello") for u in users))
    await hold.wait_held(timeout=30)
    cluster.kill(doomed)  # holding the cluster-wide refresh lock
    hold.release(accept=False)
    successor = cluster.start("token")
    await cluster.started(successor)
    await cluster.check(timeout=90)

    after = [m for m in cluster.wecom.sent if m.touser != "early.bird"]
    tokens = {m.access_token for m in after}
    assert len(tokens) == 1 and first_token not in tokens  # exactly one token in use
    # The held call issued none; the successor refreshed once (after the dead holder's
    # lock deadline), whatever the number of senders asking.
    assert cluster.wecom.gettoken_calls == 2
    assert cluster.log_count("token", "token.lock_taken_over") == 1
