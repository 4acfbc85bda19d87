"""Small helpers the operator commands (``doctor``, ``dlq``) share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS

from wecombot_common import bus
from wecombot_common.settings import NatsSettings, without_credentials

__all__ = ["clip", "connect_once", "without_credentials"]


def clip(text: str, limit: int = 160) -> str:
    """``text`` on one line (whitespace runs become one space), at most ``limit`` long.

    >>> clip("a  long\\nanswer", 8)
    'a long …'
    """
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


async def connect_once(
    settings: NatsSettings,
    name: str,
    *,
    connect_timeout_s: float,
    error_cb: Callable[[Exception], Awaitable[None]],
) -> NATS:
    """Connect with one attempt per server and no reconnects: a command answers at once
    that NATS is unreachable rather than waiting for it (nats-py treats 0 attempts as
    "retry forever", hence 1). The caller bounds the whole with a timeout."""
    return await bus.connect(
        settings,
        name,
        allow_reconnect=False,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.1,
        connect_timeout=connect_timeout_s,
        error_cb=error_cb,
    )
