"""``wecombot sender``: wire the adapters and run the outcome consumer until stopped.

The CLI (``wecombot sender``) calls ``main(os.environ)``; tests call :func:`serve` with
settings and a stop event, next to the real token service.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping

import structlog
from nats.aio.client import Client as NATS

from wecombot_common import metrics
from wecombot_common.bus import connect_when_ready, disconnect, ensure_topology
from wecombot_common.logs import configure_logging
from wecombot_common.runtime import DeferredCheck, HealthServer, run_service
from wecombot_common.tokens import TokenClient
from wecombot_common.topology import OUTCOME_FILTER, SENDER_CONSUMER, work_consumer
from wecombot_common.worker import PullWorker

from .handler import ConversationCache, DeliveryPolicy, ReplySender, conversation_key
from .settings import SenderSettings
from .wecom import HttpMessageApi

__all__ = ["main", "serve"]

log = structlog.get_logger(__name__)

CLIENT_NAME = "wecombot-sender"


async def serve(settings: SenderSettings, stop: asyncio.Event) -> None:
    """Deliver outcome events until ``stop`` is set; then hand back what is in flight."""
    configure_logging(settings.log, service="sender")
    # Health first: /healthz answers while NATS is still coming up (readiness does not).
    ready = DeferredCheck()
    health = HealthServer(settings.health_host, settings.health_port, ready)
    await health.start()
    try:
        connected = await connect_when_ready(
            settings.nats, CLIENT_NAME, stop, lambda js: ensure_topology(js, settings.nats)
        )
        if connected is None:
            return
        nc, _ = connected
        ready.attach(_ready(nc))
        api = HttpMessageApi(
            settings.wecom, timeout_s=settings.http_timeout_s, message_type=settings.message_type
        )
        try:
            await _consume(settings, nc, api, stop)
        finally:
            await api.aclose()
            await disconnect(nc, "wecombot-sender")
    finally:
        await health.stop()
        log.info("sender.stopped")


async def _consume(
    settings: SenderSettings, nc: NATS, api: HttpMessageApi, stop: asyncio.Event
) -> None:
    js = nc.jetstream()
    cache = ConversationCache(js, max_bytes=settings.cache_mb << 20)
    metrics.watch_cache("sender", cache)
    sender = ReplySender(
        js,
        TokenClient(nc),
        api,
        app=settings.wecom.app,
        policy=DeliveryPolicy(
            order_wait_s=settings.order_wait_s,
            retry_attempts=settings.retry_attempts,
            per_user_per_minute=settings.per_user_per_minute,
            per_user_per_hour=settings.per_user_per_hour,
            check_slack_s=math.ceil(2 * settings.http_timeout_s) + 10,
        ),
        cache=cache,
        stopping=stop,
    )
    worker = PullWorker(
        js,
        work_consumer(
            SENDER_CONSUMER,
            OUTCOME_FILTER,
            ack_wait_s=settings.ack_wait_s,
            max_ack_pending=10_000,
        ),
        sender.handle,
        max_deliver=settings.max_deliver,
        key=conversation_key,
        max_concurrency=settings.max_concurrency,
        connection=nc,
    )
    sender.queued_behind = worker.queued
    log.info("sender.started", app=settings.wecom.app, consumer=SENDER_CONSUMER)
    await worker.run(stop)


def _ready(nc: NATS) -> Callable[[], Awaitable[tuple[bool, str]]]:
    async def check() -> tuple[bool, str]:
        return (True, "nats connected") if nc.is_connected else (False, "nats disconnected")

    return check


def main(environ: Mapping[str, str]) -> int:
    return run_service(SenderSettings.from_env, serve, environ, service="sender")
