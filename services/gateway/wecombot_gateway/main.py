"""``wecombot gateway``: wire settings, NATS and the HTTP app; run until SIGTERM/SIGINT.

Start-up: listen at once (/healthz answers; /readyz and callbacks answer 503 until NATS
is ready, so WeCom retries), connect to NATS (nats-py keeps retrying an unreachable
server), create the topology (retried with exponential backoff while JetStream is
unavailable), then accept callbacks.
Shutdown (``stop`` set): stop accepting connections, let in-flight callbacks finish (each
is bounded by GATEWAY_PUBLISH_TIMEOUT), then drain NATS::

    main({"WECOM_CORP_ID": "ww1", ...})
    # → 0
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping

import structlog
from aiohttp import web
from nats.aio.client import Client as NATS

from wecombot_common import bus
from wecombot_common.errors import ConfigError
from wecombot_common.logs import configure_logging
from wecombot_common.runtime import run_service

from .app import create_app, runner_options, stop_keeping_alive
from .publisher import JetStreamPublisher, Pending
from .readiness import jetstream_ready
from .settings import GatewaySettings

__all__ = ["CLIENT_NAME", "main", "run_gateway", "serve"]

CLIENT_NAME = "wecombot-gateway"
_SHUTDOWN_GRACE_S = 1.0  # on top of the publish timeout, for the response to be written

log = structlog.get_logger(__name__)


def main(environ: Mapping[str, str]) -> int:
    """Entry point of ``wecombot gateway``: 0 clean stop, 2 bad configuration, 1 crash."""
    return run_service(GatewaySettings.from_env, serve, environ, service="gateway")


async def serve(settings: GatewaySettings, stop: asyncio.Event) -> None:
    """Configure logging (secrets redacted), then run the gateway until ``stop`` is set."""
    configure_logging(settings.log, service="gateway", secrets=settings.secrets)
    await run_gateway(settings, stop)


async def run_gateway(settings: GatewaySettings, stop: asyncio.Event) -> None:
    """Everything but logging set-up (tests run this with structlog left as they set it)."""
    # Listen first: /healthz answers while NATS is still coming up (callbacks get 503
    # and WeCom retries), so a liveness probe never restarts a gateway waiting for NATS.
    pending = Pending()
    connected: tuple[NATS, None] | None = None
    try:
        async with _listening(settings, pending):
            connected = await bus.connect_when_ready(
                settings.nats, CLIENT_NAME, stop, lambda js: bus.ensure_topology(js, settings.nats)
            )
            if connected is not None:
                nc, _ = connected
                js = nc.jetstream()
                appender = await bus.PipelinedAppender.start(nc)
                pending.attach(
                    JetStreamPublisher(appender, timeout_s=settings.publish_timeout_s),
                    jetstream_ready(nc, js),
                )
                log.info("gateway.ready")
                await stop.wait()
            log.info("gateway.stopping")
    finally:
        if connected is not None:
            await bus.disconnect(connected[0], "wecombot-gateway")
    log.info("gateway.stopped")


@contextlib.asynccontextmanager
async def _listening(settings: GatewaySettings, pending: Pending) -> AsyncIterator[None]:
    app = create_app(settings, pending, ready=pending.ready)
    runner = web.AppRunner(
        app,
        shutdown_timeout=settings.publish_timeout_s + _SHUTDOWN_GRACE_S,
        **runner_options(settings),
    )
    await runner.setup()
    try:
        await _start_site(runner, settings)
        log.info(
            "gateway.listening",
            host=settings.host,
            port=settings.port,
            callback_path=settings.callback_path,
            app=settings.app,
        )
        yield
    finally:
        stop_keeping_alive(app)
        # Closes the listener first, then waits for in-flight requests (shutdown_timeout).
        await runner.cleanup()


async def _start_site(runner: web.AppRunner, settings: GatewaySettings) -> None:
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
    except OSError as exc:  # address in use, not ours to bind…: fix the settings (exit 2)
        raise ConfigError(
            f"cannot listen on {settings.host}:{settings.port} (GATEWAY_HOST, GATEWAY_PORT): "
            f"{exc.strerror or exc}"
        ) from exc
