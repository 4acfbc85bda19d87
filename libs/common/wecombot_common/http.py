"""Run an aiohttp application on a host and port (0 = any free port), as one unit.

Shared by the simulators, the sandbox console and the health server::

    site = await LocalSite.start(app, "127.0.0.1", 0)
    site.port
    # → 41235
    await site.stop()

The servers the services expose (the gateway's callback, every health and metrics port)
also call :func:`name_server`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Self

from aiohttp import hdrs, web

__all__ = ["SERVER_NAME", "LocalSite", "LoopbackServer", "name_server"]

SERVER_NAME = "wecombot"


def name_server(app: web.Application, *, stopping: asyncio.Event | None = None) -> None:
    """Answer ``Server: wecombot`` instead of aiohttp's ``Python/3.x aiohttp/3.y.z``: a
    scanner learns which versions to try its exploits on from that header (the first
    finding of a penetration test). aiohttp only sets it when a response has none.

    Not covered: a request aiohttp cannot parse at all (a bad request line or header) is
    answered by aiohttp itself, before any application, with its own header and a body
    quoting what it could not parse. An ingress or load balancer in front refuses those
    first (docs/security.md).

    ``stopping``: once it is set, every answer also closes its connection and says so
    (``Connection: close``), so that no client sends another request on a connection the
    stop is about to close. In the same hook: one more per answer was ≈ 4k instructions
    on the gateway's callback path.
    """
    app.on_response_prepare.append(_name if stopping is None else partial(_name_or_close, stopping))


async def _name(_: web.Request, response: web.StreamResponse) -> None:
    response.headers[hdrs.SERVER] = SERVER_NAME


async def _name_or_close(
    stopping: asyncio.Event, _: web.Request, response: web.StreamResponse
) -> None:
    response.headers[hdrs.SERVER] = SERVER_NAME
    if stopping.is_set():
        response.force_close()  # the server closes it after this answer
        # Said too: this hook runs once the headers are made, before they are written.
        response.headers[hdrs.CONNECTION] = "close"


@dataclass(frozen=True, slots=True)
class LocalSite:
    runner: web.AppRunner
    port: int

    @classmethod
    async def start(
        cls,
        app: web.Application,
        host: str,
        port: int,
        *,
        backlog: int = 128,
        **runner_options: Any,
    ) -> LocalSite:
        """Serve ``app`` (no access log); ``port`` 0 binds a free one, see ``.port``."""
        runner = web.AppRunner(app, access_log=None, **runner_options)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, backlog=backlog).start()
        except BaseException:
            await runner.cleanup()
            raise
        bound = runner.addresses[0][1] if port == 0 else port
        return cls(runner, int(bound))

    async def stop(self) -> None:
        """Stop listening, let in-flight requests finish (``shutdown_timeout``), clean up."""
        await self.runner.cleanup()


class LoopbackServer:
    """Base of the small real servers that play external SaaS (WeCom's API, a model):
    a subclass sets ``host``/``port`` and gives :meth:`routes`; this serves them."""

    host: str
    port: int
    runner_options: ClassVar[dict[str, Any]] = {}
    backlog: ClassVar[int] = 128
    _site: LocalSite | None = None

    def routes(self) -> list[web.RouteDef]:
        raise NotImplementedError

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(self.routes())
        return app

    async def start(self) -> None:
        """Listen (``port`` 0: a free one, then ``port`` is the bound one)."""
        self._site = await LocalSite.start(
            self.app(), self.host, self.port, backlog=self.backlog, **self.runner_options
        )
        self.port = self._site.port

    async def stop(self) -> None:
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
