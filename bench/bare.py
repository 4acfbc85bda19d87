"""The baseline: a bare aiohttp handler that reads the body and answers 200.

Same framework, same runner settings (no access log) and the same event loop as the
gateway (``--loop``), so the ratio gateway / bare is the cost of verify + decrypt + parse
+ JetStream publish-ack, not of HTTP::

    python -m bench.bare --port 8090 --loop uvloop

``--work`` adds one part of the gateway's work to the bare handler, so scenario 1 can
show where the gateway's CPU goes, measured in the same run and the same process shape:

- ``append``: append one ``MessageReceived`` (a fresh ``Nats-Msg-Id`` each time) through
  the gateway's ``PipelinedAppender``, await the PubAck (NATS from ``NATS_URL``);
- ``js-publish``: the same append through ``bus.append_event`` (nats-py's
  ``js.publish``, a request per append), which the gateway used before;
- ``raw-append``: the same append through ``bench/rawappend.py``, the smallest hand-made
  NATS client that can do it (an experiment: how much of the append is nats-py's);
- ``open``: what the gateway does before the append, with its own code
  (``CallbackReader``: the query, the body guards, signature, replay window, AES, both
  XML documents, the event) and the dedupe key (settings from the ``WECOM_*``
  environment);
- ``http``: only the HTTP half of ``open`` (``CallbackReader.read_http``: the query's
  shape, the media type and size guards, the body read under the size limit), so
  ``open`` minus ``http`` is the opener itself.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web

from wecombot_common.http import LocalSite

Work = Callable[[web.Request], Awaitable[None]]
APPENDS = ("append", "js-publish", "raw-append")


async def _read(request: web.Request) -> None:
    await request.read()


async def _append_work(how: str) -> Work:
    """``append``, ``js-publish`` or ``raw-append``: one event appended per request."""
    from urllib.parse import urlsplit

    from bench.rawappend import RawAppender
    from wecombot_common import bus
    from wecombot_common.events import MessageReceived, TextPayload
    from wecombot_common.settings import EnvReader, NatsSettings

    settings = NatsSettings.read(EnvReader(os.environ))
    nc = await bus.connect(settings, "wecombot-bench-bare")
    await bus.ensure_topology(nc.jetstream(), settings)
    js = nc.jetstream()
    keys = itertools.count()
    event = MessageReceived(
        app="ww-bench",
        conversation="bench.user",
        correlation_id="1",
        occurred_at=datetime.now(UTC),
        msg_type="text",
        msg_id="1",
        from_user="bench.user",
        to_user="ww-bench",
        agent_id=1,
        create_time=int(time.time()),
        payload=TextPayload(content="你好，请帮我写一个周报的提纲"),
    )
    append: Callable[..., Awaitable[object]]
    if how == "append":
        append = (await bus.PipelinedAppender.start(nc)).append
    elif how == "raw-append":
        url = urlsplit(settings.url)
        append = (await RawAppender.start(url.hostname or "127.0.0.1", url.port or 4222)).append
    else:

        async def append(event: MessageReceived, *, msg_id: str, timeout: float) -> object:
            return await bus.append_event(js, event, msg_id=msg_id, timeout=timeout)

    async def work(request: web.Request) -> None:
        await request.read()
        await append(event, msg_id=f"bare:{next(keys)}", timeout=2.0)

    return work


def _open_work(http_only: bool) -> Work:
    from wecombot_gateway.app import CallbackReader
    from wecombot_gateway.parse import dedupe_key
    from wecombot_gateway.settings import GatewaySettings

    reader = CallbackReader(GatewaySettings.from_env(os.environ))

    async def work(request: web.Request) -> None:
        if http_only:
            await reader.read_http(request)
        else:
            dedupe_key(await reader.read(request))

    return work


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok")


async def serve(port: int, path: str, work_name: str) -> None:
    if work_name in APPENDS:
        work = await _append_work(work_name)
    elif work_name in ("open", "http"):
        work = _open_work(http_only=work_name == "http")
    else:
        work = _read

    async def receive(request: web.Request) -> web.Response:
        await work(request)
        return web.Response()

    app = web.Application()
    app.router.add_post(path, receive)
    app.router.add_get("/healthz", _healthz)
    site = await LocalSite.start(app, "127.0.0.1", port)
    try:
        await asyncio.Event().wait()
    finally:
        await site.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/wecom/callback")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--work", choices=("none", *APPENDS, "http", "open"), default="none")
    args = parser.parse_args()
    coro = serve(args.port, args.path, args.work)
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(coro)
    else:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
