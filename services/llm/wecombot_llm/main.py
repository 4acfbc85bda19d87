"""Entrypoint of ``wecombot llm``: wire the adapters and run the work consumer.

Run in-process (tests, ``wecombot dev``) with the serve coroutine and a stop event::

    >>> stop = asyncio.Event()
    >>> task = asyncio.create_task(serve(LlmSettings.from_env(env), stop))  # doctest: +SKIP
    >>> stop.set(); await task                                              # doctest: +SKIP

Scale by running more replicas: they share the durable consumer, and the handler keeps
each user's replies in order and exactly once across them (see handler.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping

import structlog
from nats.aio.client import Client as NATS

from wecombot_common import metrics
from wecombot_common.bus import connect_when_ready, disconnect, ensure_topology
from wecombot_common.logs import configure_logging
from wecombot_common.runtime import DeferredCheck, HealthServer, run_service
from wecombot_common.topology import LLM_CONSUMER, RECEIVED_FILTER, work_consumer
from wecombot_common.worker import PullWorker

from .handler import HandlerConfig, LlmHandler
from .model import open_model
from .settings import LlmSettings
from .store import JetStreamLog

__all__ = ["main", "serve"]

log = structlog.get_logger(__name__)

# Deliveries waiting for an earlier message still count as pending; keep the cap far
# above what the replicas' concurrency can hold so waiting never starves fetching.
MAX_ACK_PENDING = 10_000


async def serve(settings: LlmSettings, stop: asyncio.Event) -> None:
    """Answer received messages until ``stop`` is set, then hand back and drain."""
    configure_logging(settings.log, service="llm", secrets=settings.secrets)
    if settings.offline:
        log.warning(
            "llm.offline_model",
            message="OPENAI_API_KEY is not set: replies come from the OFFLINE echo model, "
            "not from an LLM. Set OPENAI_API_KEY (see docs/providers.md).",
        )
    else:
        log.info("llm.model", base_url=settings.model.base_url, model=settings.model.model)
    # Health first: /healthz answers while NATS is still coming up (readiness does not).
    ready = DeferredCheck()
    health = HealthServer(settings.health_host, settings.health_port, ready=ready)
    await health.start()
    try:
        connected = await connect_when_ready(
            settings.nats, "wecombot-llm", stop, lambda js: ensure_topology(js, settings.nats)
        )
        if connected is None:
            return
        nc, _ = connected
        try:
            ready.attach(_nats_ready(nc))
            await _answer(settings, nc, stop)
        finally:
            await disconnect(nc, "wecombot-llm")
    finally:
        await health.stop()
        log.info("llm.stopped")


async def _answer(settings: LlmSettings, nc: NATS, stop: asyncio.Event) -> None:
    js = nc.jetstream()
    async with open_model(settings.model) as model:
        handler = LlmHandler(
            JetStreamLog(js, consumer=LLM_CONSUMER),
            model,
            HandlerConfig(
                policy=settings.policy,
                order_wait_s=settings.order_wait_s,
                cache_bytes=settings.cache_mb << 20,
            ),
            stopping=stop,
        )
        metrics.watch_cache("llm", handler.cache)
        worker = PullWorker(
            js,
            work_consumer(
                LLM_CONSUMER,
                RECEIVED_FILTER,
                ack_wait_s=settings.ack_wait_s,
                max_ack_pending=MAX_ACK_PENDING,
            ),
            handler,
            max_deliver=settings.max_deliver,
            # No per-key lock in the worker: the handler serialises a conversation
            # itself and must not hold it while waiting for an earlier message (that
            # message may be queued behind the lock).
            key=None,
            max_concurrency=settings.max_concurrency,
            grace_s=settings.shutdown_grace_s,
            connection=nc,
        )
        log.info("llm.started", concurrency=settings.max_concurrency)
        await worker.run(stop)


def _nats_ready(nc: NATS) -> Callable[[], Awaitable[tuple[bool, str]]]:
    async def ready() -> tuple[bool, str]:
        return (True, "nats connected") if nc.is_connected else (False, "nats not connected")

    return ready


def main(environ: Mapping[str, str]) -> int:
    return run_service(LlmSettings.from_env, serve, environ, service="llm")
