"""``wecombot setup``: create the streams, or bring them to the configured settings.

Every service creates the streams it relies on when they are missing (an idempotent
create: the same config again changes nothing). Under the production NATS permissions
(deploy/nats/auth.conf) no service may *change* a stream, so a new
``WECOMBOT_STREAM_REPLICAS``, ``WECOMBOT_DUPLICATE_WINDOW``, ``WECOMBOT_HISTORY_MAX_AGE``
or ``WECOMBOT_HISTORY_MAX_MB`` is applied by this command, run as the ``setup`` NATS user
(the Kubernetes Job ``wecombot-setup``, see docs/deploy.md). Until then the services keep
retrying (not ready), rather than run against a stream that differs from their settings.

Settings come from the environment, and from a ``.env`` in the working directory for
the values not set there, as ``dev``, ``doctor`` and ``dlq`` read it: a ``NATS_URL`` kept
in ./.env was ignored, and setup applied its settings to the default broker, another
system's. The image holds no ``.env`` (.dockerignore): the Job reads its ConfigMap alone.

Waits for NATS, and for its JetStream to answer (``nats.not_ready`` says when it does not:
not enabled, or still starting), until SIGTERM/SIGINT or the Job's deadline. Settings the
broker can never meet end the wait: ``WECOMBOT_STREAM_REPLICAS`` above 1 on a server that
is not clustered, or a ``WECOMBOT_HISTORY_MAX_MB`` its store cannot reserve, fails at
once, naming the setting, rather than burn the Job's deadline
(:func:`wecombot_common.bus.connect_when_ready`). Exit codes: 0 the streams match the
settings, 1 stopped before that, 2 bad configuration (or one the broker cannot meet).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from wecombot_common import topology
from wecombot_common.bus import connect_when_ready, disconnect, ensure_topology
from wecombot_common.logs import configure_logging
from wecombot_common.runtime import run_service
from wecombot_common.settings import EnvReader, LogSettings, NatsSettings

from .shared import read_dotenv

__all__ = ["CLIENT_NAME", "SetupSettings", "main", "run_setup"]

CLIENT_NAME = "wecombot-setup"

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SetupSettings:
    nats: NatsSettings
    log: LogSettings

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SetupSettings:
        env = EnvReader(environ)
        nats_ = NatsSettings.read(env)
        log_ = LogSettings.read(env)
        env.raise_if_invalid()
        return cls(nats=nats_, log=replace(log_, extra_secrets=nats_.secrets))


async def run_setup(settings: SetupSettings, stop: asyncio.Event) -> bool:
    """Create or update WECOMBOT and WECOMBOT_DLQ; False if stopped before done."""
    connected = await connect_when_ready(
        settings.nats, CLIENT_NAME, stop, lambda js: ensure_topology(js, settings.nats)
    )
    if connected is None:
        log.error("setup.stopped", detail="stopped before the streams were in place")
        return False
    nc, _ = connected
    await disconnect(nc, CLIENT_NAME)
    log.info(
        "setup.done",
        streams=[topology.CONVERSATION_STREAM, topology.DEAD_LETTER_STREAM],
        replicas=settings.nats.stream_replicas,
        duplicate_window_s=settings.nats.duplicate_window_s,
        history_max_age_s=settings.nats.history_max_age_s,
        history_max_mb=(settings.nats.history_max_bytes or 0) // 2**20,
    )
    return True


async def serve(settings: SetupSettings, stop: asyncio.Event) -> int:
    """:func:`run_setup` with logging configured: the exit code (0 done, 1 stopped)."""
    configure_logging(settings.log, service="setup")
    return 0 if await run_setup(settings, stop) else 1


def main(environ: Mapping[str, str]) -> int:
    """Entry point of ``wecombot setup``: the exit code (see the module docstring)."""
    env = dict(environ)
    read_dotenv(Path(".env"), env)  # as dev, doctor and dlq do: values not set already
    return run_service(SetupSettings.from_env, serve, env, service="setup")
