"""The /readyz check: NATS connected and the conversation stream present::

ok, detail = await jetstream_ready(nc, js)()
"""

from __future__ import annotations

import asyncio

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from wecombot_common.runtime import Check
from wecombot_common.topology import CONVERSATION_STREAM

__all__ = ["jetstream_ready"]


def jetstream_ready(nc: NATS, js: JetStreamContext, *, timeout_s: float = 1.0) -> Check:
    """A readiness check for HealthServer's /readyz (probes expect an answer within ~1 s)."""

    async def check() -> tuple[bool, str]:
        if not nc.is_connected:
            return False, "NATS is not connected"
        try:
            await asyncio.wait_for(js.stream_info(CONVERSATION_STREAM), timeout_s)
        except nats.js.errors.NotFoundError:
            return False, f"stream {CONVERSATION_STREAM} does not exist"
        except (TimeoutError, nats.errors.Error) as exc:
            return False, f"JetStream unavailable: {type(exc).__name__}"
        return True, "ok"

    return check
