"""wecombot gateway: WeCom callbacks in, ``MessageReceived`` events on JetStream out.

Modules, from pure to wired:

- ``settings``   GatewaySettings, read once from the environment
- ``errors``     why a callback is refused (typed; no HTTP statuses)
- ``parse``      envelope and message XML → MessageReceived; the dedupe key (pure)
- ``callback``   query, signature, replay window, decrypt, parse (pure, CPU only)
- ``body``       Content-Type and size guards for the POST body
- ``publisher``  the Publisher port and its JetStream adapter
- ``readiness``  the /readyz check
- ``app``        the aiohttp application: the only place errors become statuses
- ``main``       ``wecombot gateway``: connect, create the topology, serve, drain
"""

from __future__ import annotations

from .app import create_app
from .publisher import JetStreamPublisher, Publisher
from .settings import GatewaySettings

__all__ = ["GatewaySettings", "JetStreamPublisher", "Publisher", "create_app"]
