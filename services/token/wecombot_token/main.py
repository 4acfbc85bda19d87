"""``wecombot token``: the only owner of WeCom access_tokens.

Wiring only: settings → logging → NATS → KV bucket → keeper → endpoints + /readyz; on
stop the endpoints stop first, waiting requests get one refresh to be answered, and the
connection drains.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from wecombot_common.bus import connect_when_ready, disconnect
from wecombot_common.logs import configure_logging
from wecombot_common.runtime import (
    Check,
    DeferredCheck,
    HealthServer,
    cancel_until_done,
    retried_until_stopped,
    run_service,
)
from wecombot_common.topology import TOKEN_BUCKET

from .endpoints import TokenEndpoints
from .errors import StoreUnavailable
from .keeper import TokenKeeper
from .settings import TokenSettings
from .source import WeComTokenSource
from .store import KvTokenStore, open_token_bucket

__all__ = ["main", "serve"]

log = structlog.get_logger(__name__)

CLIENT_NAME = "wecombot-token"


def bucket_ready(nc: NATS, kv: KeyValue, *, timeout_s: float = 1.0) -> Check:
    """Ready = NATS connected and the token bucket answers (probes wait ~1 s)."""

    async def check() -> tuple[bool, str]:
        if not nc.is_connected:
            return False, "NATS is not connected"
        try:
            await asyncio.wait_for(kv.status(), timeout_s)
        except (nats.errors.Error, TimeoutError) as exc:
            return False, f"token bucket unavailable: {type(exc).__name__}"
        return True, "ok"

    return check


async def serve(settings: TokenSettings, stop: asyncio.Event) -> None:
    configure_logging(settings.log, service="token")
    # Health first: /healthz answers while NATS is still coming up (readiness does not).
    ready = DeferredCheck()
    health = HealthServer(settings.health_host, settings.health_port, ready)
    await health.start()
    try:
        await _serve_connected(settings, stop, ready)
    finally:
        await health.stop()
        log.info("token.stopped")


async def _serve_connected(
    settings: TokenSettings, stop: asyncio.Event, ready: DeferredCheck
) -> None:
    connected = await connect_when_ready(
        settings.nats,
        CLIENT_NAME,
        stop,
        lambda js: open_token_bucket(js, replicas=settings.nats.stream_replicas),
    )
    if connected is None:
        return
    nc, kv = connected
    try:
        async with contextlib.AsyncExitStack() as cleanup:
            source = WeComTokenSource(settings.wecom, timeout_s=settings.http_timeout_s)
            cleanup.push_async_callback(source.aclose)
            store = KvTokenStore(
                kv,
                settings.app,
                reopen=lambda: open_token_bucket(
                    nc.jetstream(), replicas=settings.nats.stream_replicas
                ),
            )
            cleanup.push_async_callback(store.close)
            keeper = TokenKeeper(
                settings.app,
                source,
                store,
                settings.policy,
                refresh_timeout_s=settings.refresh_timeout_s,
            )
            cleanup.push_async_callback(keeper.close)

            # Not ready until the bucket is followed: a NATS cluster still electing its
            # leaders may open the bucket, then time the watcher's consumer out. Read
            # first: a bucket deleted since it was opened is made again (``load``), where
            # a watch alone would be refused for good.
            async def follow() -> None:
                await store.load()
                await store.watch(keeper.adopt)

            if not await retried_until_stopped(
                follow,
                stop,
                retry_on=(StoreUnavailable,),
                event="token.watch_not_ready",
                bucket=TOKEN_BUCKET,
            ):
                return
            resyncing = asyncio.create_task(_resync_after_reconnects(nc, keeper))
            cleanup.push_async_callback(cancel_until_done, resyncing)
            endpoints = TokenEndpoints(keeper)
            await endpoints.start(nc)
            cleanup.push_async_callback(endpoints.stop, settings.refresh_timeout_s)
            ready.attach(bucket_ready(nc, kv))
            log.info(
                "token.started",
                app=settings.app,
                api_base=settings.wecom.api_base,
                refresh_margin_s=settings.refresh_margin_s,
                health_port=settings.health_port,
            )
            await stop.wait()
            log.info("token.stopping", app=settings.app)
    finally:
        await disconnect(nc, "wecombot-token")


async def _resync_after_reconnects(nc: NATS, keeper: TokenKeeper, poll_s: float = 0.5) -> None:
    """After each reconnection, ``keeper.resync()`` until the bucket answers.

    Polls nats-py's reconnect count: its reconnected callback is awaited inside the
    reconnection loop, which a bucket slow to answer there would hold up, and an error
    there would send back to reconnecting."""
    done = nc.stats["reconnects"]
    while True:
        await asyncio.sleep(poll_s)
        count = nc.stats["reconnects"]
        if count == done or not nc.is_connected:
            continue
        try:
            await keeper.resync()
        except StoreUnavailable as exc:
            log.info("token.resync_pending", reason=str(exc))
            continue
        except Exception:  # never end the loop: the next reconnection needs it too
            log.exception("token.resync_failed")
            continue
        done = count
        log.info("token.resynced", reconnects=count)


def main(environ: Mapping[str, str]) -> int:
    return run_service(TokenSettings.from_env, serve, environ, service="token")
