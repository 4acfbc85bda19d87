"""Run an aiohttp application on a host and port (0 = any free port), as one unit.

Shared by the simulators, the sandbox console and the health server::

    >>> site = await LocalSite.start(app, "127.0.0.1", 0)   # doctest: +SKIP
    >>> site.port                                         # doctest: +SKIP
    41235
    >>> await site.stop()                                 # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

__all__ = ["LocalSite"]


@dataclass(frozen=True, slots=True)
class LocalSite:
    runner: web.AppRunner
    port: int

    @classmethod
    async def start(
        cls, app: web.Application, host: str, port: int, **runner_options: Any
    ) -> LocalSite:
        """Serve ``app`` (no access log); ``port`` 0 binds a free one, see ``.port``."""
        runner = web.AppRunner(app, access_log=None, **runner_options)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        bound = runner.addresses[0][1] if port == 0 else port
        return cls(runner, int(bound))

    async def stop(self) -> None:
        """Stop listening, let in-flight requests finish (``shutdown_timeout``), clean up."""
        await self.runner.cleanup()
