"""Small helpers the operator commands (``doctor``, ``dlq``) share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NATS

from wecombot_common import bus
from wecombot_common.settings import NatsSettings

__all__ = ["clip", "connect_once", "without_credentials"]


def without_credentials(url: str) -> str:
    """``url`` (a comma-separated list of server URLs) without any user, password or
    token: what may be printed of NATS_URL.

    >>> without_credentials("nats://bot:s3cr@t@nats-1:4222, tls://t0ken@nats-2:4222")
    'nats://nats-1:4222,tls://nats-2:4222'
    >>> without_credentials("nats://127.0.0.1:4222")
    'nats://127.0.0.1:4222'
    """
    hosts: list[str] = []
    for part in url.split(","):
        scheme, sep, rest = part.strip().partition("://")
        if not sep:  # no scheme: host[:port], or user:pass@host[:port]
            scheme, rest = "", scheme
        # The last "@" ends the userinfo: a password may contain "@" itself.
        hosts.append(f"{scheme}{sep}{rest.rpartition('@')[2]}")
    return ",".join(hosts)


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
