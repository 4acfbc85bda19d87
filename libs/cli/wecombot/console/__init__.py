"""The sandbox console: a WeCom-style chat on localhost that drives the real system.

``wecombot dev`` starts it in sandbox mode (``WECOMBOT_CONSOLE_PORT``, default 8090).
A message typed there becomes a callback built, encrypted and signed exactly as WeCom
builds it (:class:`~wecombot_common.sim.callbacks.CallbackBuilder`), posted to the real
gateway; the reply comes back through NATS → llm → sender → the simulated
``message/send`` and appears live (Server-Sent Events), next to the conversation's
events as JetStream appends them (an ordered consumer on ``wecombot.conv.>``).
Switches make the simulated WeCom misbehave: retry a callback after 5 s, expire the
access_tokens, fail the next N ``message/send`` calls with a chosen errcode.
"""

from __future__ import annotations

from .server import Console, ConsoleConfig

__all__ = ["Console", "ConsoleConfig"]
