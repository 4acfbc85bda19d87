"""Fake WeCom API and fake model for the benchmarks, in their own process.

The project's simulators (``SimulatedWeComApi``: gettoken + message/send,
``SimulatedOpenAIApi``: chat completions with ``latency_s``) on loopback ports, plus a
small control API the orchestrator uses between and after scenarios::

    python -m bench.fakes --corp-id ww… --agent-id 1000002 --secret s --ports-file f.json

    GET  /stats           counters; ``?sent=1`` adds every message/send (user, text, time)
    POST /reset?latency=2 forget everything, set the model's latency (seconds)

The model is counted at the door: requests in flight, their peak, and when the first
request arrived (wall clock).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from wecombot_common.http import LocalSite
from wecombot_common.runtime import event_loop_name
from wecombot_common.sim.openai_api import SimulatedOpenAIApi
from wecombot_common.sim.wecom_api import SimulatedWeComApi

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class CountingModel(SimulatedOpenAIApi):
    """SimulatedOpenAIApi that counts requests in flight (and keeps no request bodies)."""

    # A listen backlog for a thousand connections opened at once (aiohttp's default of
    # 128 drops SYNs, and the clients' retries would be measured as model latency); a
    # real provider sits behind load balancers that never make us wait like that.
    backlog = 4096

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reset_counters()

    def reset_counters(self) -> None:
        self.in_flight = 0
        self.peak_in_flight = 0
        self.first_at: float | None = None
        self.requests.clear()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        app.add_routes(self.routes())
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if self.first_at is None:
            self.first_at = time.time()
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await handler(request)
        finally:
            self.in_flight -= 1
            self.requests.clear()  # the simulator records every request: not needed here


class Fakes:
    def __init__(self, args: argparse.Namespace) -> None:
        self.wecom = SimulatedWeComApi(
            corp_id=args.corp_id, secret=args.secret, agent_id=args.agent_id
        )
        self.model = CountingModel(latency_s=args.model_latency)

    async def stats(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = {
            "gettoken_calls": self.wecom.gettoken_calls,
            "sent": len(self.wecom.sent),
            "first_sent_at": self.wecom.sent[0].at if self.wecom.sent else None,
            "last_sent_at": self.wecom.sent[-1].at if self.wecom.sent else None,
            "distinct_sent": len({(m.touser, m.content) for m in self.wecom.sent}),
            "model_peak_in_flight": self.model.peak_in_flight,
            "model_first_at": self.model.first_at,
        }
        if request.query.get("sent"):
            body["messages"] = [[m.touser, m.content, m.at] for m in self.wecom.sent]
        return web.json_response(body)

    async def reset(self, request: web.Request) -> web.Response:
        self.wecom.sent.clear()
        self.wecom.gettoken_calls = 0
        self.model.reset_counters()
        if "latency" in request.query:
            self.model.latency_s = float(request.query["latency"])
        return web.json_response({"ok": True})

    async def run(self, ports_file: Path) -> None:
        await self.wecom.start()
        await self.model.start()
        control = web.Application()
        control.add_routes([web.get("/stats", self.stats), web.post("/reset", self.reset)])
        site = await LocalSite.start(control, "127.0.0.1", 0)
        tmp = ports_file.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {"wecom": self.wecom.base_url, "model": self.model.base_url, "control": site.port}
            )
        )
        tmp.rename(ports_file)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corp-id", required=True)
    parser.add_argument("--agent-id", type=int, required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--model-latency", type=float, default=0.0)
    parser.add_argument("--ports-file", type=Path, required=True)
    args = parser.parse_args()
    fakes = Fakes(args)
    if event_loop_name({}) == "uvloop":  # the fakes are not under test: keep them cheap
        import uvloop

        uvloop.run(fakes.run(args.ports_file))
    else:
        asyncio.run(fakes.run(args.ports_file))


if __name__ == "__main__":
    main()
