"""``GET /metrics``: what an operator's Prometheus sees after real traffic.

The four services run in this one process (as ``wecombot dev`` runs them), so the
gateway's scrape carries every service's metrics; each counter is read before and after
the traffic, so other tests in the process do not matter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import NatsHandle
from tests.e2e.harness import Samples, Stack, sample_key, samples_of
from tests.waiting import until
from wecombot_common.topology import LLM_CONSUMER, SENDER_CONSUMER

pytestmark = pytest.mark.e2e


@pytest.fixture
async def stack(nats_server: NatsHandle, tmp_path: Path) -> AsyncIterator[Stack]:
    async with Stack(nats_server.url, tmp_path) as s:
        await s.start_in_process("token", "llm", "sender", "gateway")
        yield s


async def _scrape(stack: Stack) -> tuple[httpx.Response, Samples]:
    response = await stack.http.get(f"http://127.0.0.1:{stack.gateway_port}/metrics")
    assert response.status_code == 200, response.text
    return response, samples_of(response.text)


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get(sample_key(name, **labels), 0.0)


async def test_counters_move_with_a_reply_and_a_refusal(stack: Stack) -> None:
    _, before = await _scrape(stack)

    await stack.say("metrics.user", "how are you?")
    await stack.wait_replies("metrics.user", 1)
    forged = stack.client.text("metrics.user", "forged")
    forged = dataclasses.replace(forged, query={**forged.query, "msg_signature": "0" * 40})
    assert (await stack.post(forged)).status_code == 403

    expected: Samples = {
        sample_key("wecombot_gateway_callbacks_total", result="stored"): 1,
        sample_key("wecombot_gateway_callbacks_total", result="refused"): 1,
        sample_key("wecombot_gateway_refusals_total", status="403", reason="SignatureError"): 1,
        sample_key("wecombot_llm_outcomes_total", outcome="ReplyGenerated"): 1,
        sample_key("wecombot_llm_model_seconds_count", result="answered"): 1,
        sample_key("wecombot_sender_parts_total", result="sent"): 1,
        sample_key("wecombot_sender_replies_total", result="delivered"): 1,
        sample_key("wecombot_worker_settled_total", consumer=LLM_CONSUMER, result="acked"): 1,
        sample_key("wecombot_worker_settled_total", consumer=SENDER_CONSUMER, result="acked"): 1,
        sample_key("wecombot_token_fetches_total", result="ok"): 1,
        sample_key("wecombot_token_requests_total", endpoint="get", result="ok"): 1,
    }

    async def caught_up() -> bool:
        _, after = await _scrape(stack)
        grown = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in expected}
        assert all(grown[k] <= n for k, n in expected.items()), grown  # none counted twice
        return grown == expected

    # The sender acks after WeCom has the reply: wait for the scrape to catch up.
    await until(caught_up, timeout=10, what="the counters")

    response, after = await _scrape(stack)
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    openmetrics = await stack.http.get(
        f"http://127.0.0.1:{stack.gateway_port}/metrics",
        headers={"Accept": "application/openmetrics-text;version=1.0.0"},
    )
    assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")
    assert _value(after, "wecombot_worker_in_flight", consumer=LLM_CONSUMER) == 0
    for service in ("llm", "sender"):  # the conversation just answered is kept
        assert _value(after, "wecombot_cache_conversations", service=service) >= 1
        assert _value(after, "wecombot_cache_bytes", service=service) > 1000
    assert _value(after, "process_resident_memory_bytes") > 0
    issued = list(stack.wecom._tokens)  # every access_token WeCom handed out
    assert issued
    for secret in (stack.wecom.secret, "sk-e2e-model-key", *issued):
        assert secret not in response.text
