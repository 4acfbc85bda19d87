"""The baseline: a bare aiohttp handler that reads the body and answers 200.

Same framework, same runner settings (no access log) and the same event loop as the
gateway (``--loop``), so the ratio gateway / bare is the cost of verify + decrypt + parse
+ JetStream publish-ack, not of HTTP::

    python -m bench.bare --port 8090 --loop uvloop
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web


async def _receive(request: web.Request) -> web.Response:
    await request.read()
    return web.Response()


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def serve(port: int, path: str) -> None:
    app = web.Application()
    app.router.add_post(path, _receive)
    app.router.add_get("/healthz", _healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/wecom/callback")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(serve(args.port, args.path))
    else:
        asyncio.run(serve(args.port, args.path))


if __name__ == "__main__":
    main()
