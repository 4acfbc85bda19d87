"""The seven measurements of issue #5, each on a fresh nats-server and fresh services,
and one that supports them (``reads``: how a conversation is read back).

Each scenario returns a plain dict (see ``bench.report`` for how it is shown). Sizes
come from :class:`Sizes` (``FULL`` for ``make bench``, ``QUICK`` for the smoke run).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
from nats.js import JetStreamContext

from wecombot_common import topology
from wecombot_common.bus import PipelinedAppender, ensure_topology, read_conversation
from wecombot_common.events import ReplyGenerated, decode_event
from wecombot_common.settings import EnvReader, NatsSettings
from wecombot_common.topology import ConversationRef

from .loadgen import percentiles
from .procs import (
    Callgrind,
    Fakes,
    OutcomeWatch,
    Profiler,
    Service,
    Stack,
    WeComApp,
    cpu_s,
    free_port,
    run_loadgen,
)

__all__ = ["FULL", "QUICK", "SCENARIOS", "Context", "Sizes"]


@dataclass(frozen=True)
class Sizes:
    # 1. gateway throughput vs a bare handler (closed loop, side by side, rounds)
    gw_connections: int = 32
    gw_warmup_s: float = 1.0
    gw_duration_s: float = 5.0
    gw_rounds: int = 3
    gw_prebuild: int = 100_000  # unique callbacks for the gateway: no MsgId repeats
    # the bare handlers' pool (capped by gw_prebuild): they append under their own ids,
    # so the pool may repeat; a smaller one is only quicker to build
    bare_prebuild: int = 20_000
    gw_pause_s: float = 0.5  # between two closed-loop rounds
    gw_settle_s: float = 1.0  # between the closed-loop rounds and the open-loop latency run
    # 1. instructions per callback (callgrind): the bare handler doing which parts
    instr_works: tuple[str, ...] = ("none", "http", "open", "append", "raw-append")
    instr_warmup: int = 200
    instr_count: int = 1000
    # 2. ack latency at a fixed offered rate (open loop)
    ack_rate: float = 300.0
    ack_duration_s: float = 10.0
    # 3. callback → message/send with a zero-latency model, steady rate
    pipe_rate: float = 50.0
    pipe_duration_s: float = 10.0
    # 4. llm fan-out: queued messages, slow model, one replica
    fan_messages: int = 2000
    fan_latency_s: float = 2.0
    fan_concurrency: int = 560
    # 5. scaling llm replicas, each capped
    scale_replicas: tuple[int, ...] = (1, 2, 4)
    scale_cap: int = 16
    scale_latency_s: float = 1.0
    scale_window_s: float = 6.0
    # 6. token economy
    token_sends: int = 10_000
    token_senders: int = 3
    token_services: int = 2
    # reading a conversation back: one long (cold), and catch-up reads of one new event
    read_events: int = 5000
    read_colds: int = 5
    read_catchups: int = 2000
    read_rounds: int = 3
    timeout_s: float = 240.0


FULL = Sizes()
QUICK = Sizes(
    gw_connections=8,
    gw_warmup_s=0.2,
    gw_duration_s=0.5,
    gw_rounds=1,
    gw_prebuild=6000,
    bare_prebuild=1000,
    gw_pause_s=0.1,
    gw_settle_s=0.2,
    instr_works=("none",),
    instr_warmup=20,
    instr_count=50,
    ack_rate=100.0,
    ack_duration_s=1.0,
    pipe_rate=20.0,
    pipe_duration_s=1.0,
    fan_messages=100,
    fan_latency_s=0.5,
    fan_concurrency=100,
    scale_replicas=(1, 2),
    scale_cap=4,
    scale_latency_s=0.2,
    scale_window_s=0.5,
    token_sends=200,
    token_senders=3,
    token_services=2,
    read_events=300,
    read_colds=1,
    read_catchups=100,
    read_rounds=1,
    timeout_s=60.0,
)


@dataclass
class Context:
    workdir: Path
    app: WeComApp
    fakes: Fakes
    sizes: Sizes
    loop: str
    profiler: Profiler
    memory: dict[str, dict[str, float | str]] = field(default_factory=dict)

    def stack(self, name: str) -> Stack:
        workdir = self.workdir / name
        workdir.mkdir(parents=True, exist_ok=True)
        return Stack(workdir, self.app, self.fakes, loop=self.loop)

    def note_idle(self, service: Service) -> None:
        entry = self.memory.setdefault(service.name, {})
        entry["idle"] = max(float(entry.get("idle", 0.0)), service.rss_mb())

    def note_loaded(self, service: Service, peak: float, load: str) -> None:
        entry = self.memory.setdefault(service.name, {})
        after = service.rss_mb()
        if after >= float(entry.get("after", 0.0)):
            entry["after"] = after
            entry["load"] = load
        entry["peak"] = max(float(entry.get("peak", 0.0)), peak)


@contextlib.asynccontextmanager
async def _rss_peaks(services: list[Service]) -> AsyncIterator[dict[int, float]]:
    """Sample every service's RSS 4 times a second; yields pid → peak MiB."""
    peaks: dict[int, float] = {s.pid: s.rss_mb() for s in services}

    async def sample() -> None:
        while True:
            for s in services:
                peaks[s.pid] = max(peaks[s.pid], s.rss_mb())
            await asyncio.sleep(0.25)

    task = asyncio.create_task(sample())
    try:
        yield peaks
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _ready(*services: Service) -> None:
    await asyncio.gather(*(s.ready() for s in services))


class CpuMeter:
    """CPU seconds each process uses between start() and stop(): per-message costs that
    hold on a machine shared with other work (wall-clock rates do not)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self._pids = pids
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> CpuMeter:
        self._start = {name: cpu_s(pid) for name, pid in self._pids.items()}
        return self

    def stop(self) -> dict[str, float]:
        self.used = {n: cpu_s(pid) - self._start[n] for n, pid in self._pids.items()}
        return self.used

    def per(self, count: int) -> dict[str, float]:
        """Microseconds of CPU per unit of work, per process."""
        return {n: round(1e6 * used / count, 1) for n, used in self.used.items()} if count else {}


def _pids(stack: Stack, services: list[Service]) -> dict[str, int]:
    pids: dict[str, int] = {}
    for svc in services:
        name = svc.name
        index = 1
        while name in pids:
            index += 1
            name = f"{svc.name}-{index}"
        pids[name] = svc.pid
    assert stack.nats.process is not None
    pids["nats-server"] = stack.nats.process.pid
    return pids


def _spec(ctx: Context, **fields: Any) -> dict[str, Any]:
    return {"wecom": ctx.app.loadgen(), **fields}


# ---------------------------------------------------------------- 1 + 2: gateway


async def gateway(ctx: Context) -> dict[str, Any]:
    """1. callbacks/s, gateway vs bare aiohttp, side by side; 2. ack latency, open loop."""
    s = ctx.sizes
    stack = ctx.stack("gateway")
    await stack.start_nats()
    try:
        gw = stack.start("gateway")
        bare, *parts = (
            _bare(ctx, stack, work)
            for work in ("none", "js-publish", "append", "raw-append", "http", "open")
        )
        await _ready(gw, bare, *parts)
        ctx.note_idle(gw)
        ctx.profiler.attach(gw, "gateway")
        meter = CpuMeter(_pids(stack, [gw, bare])).start()
        async with _rss_peaks([gw]) as peaks:
            closed = await run_loadgen(
                _spec(
                    ctx,
                    mode="closed",
                    targets=[
                        {
                            "name": "bare",
                            "url": stack.callback_url(bare),
                            "prebuild": min(s.gw_prebuild, s.bare_prebuild),
                        },
                        {"name": "gateway", "url": stack.callback_url(gw)},
                    ],
                    connections=s.gw_connections,
                    warmup=s.gw_warmup_s,
                    duration=s.gw_duration_s,
                    rounds=s.gw_rounds,
                    prebuild=s.gw_prebuild,
                    pause=s.gw_pause_s,
                    users=1000,
                ),
                stack.workdir / "loadgen.log",
            )
            meter.stop()
            steps = await _steps(ctx, stack, parts)
            await asyncio.sleep(s.gw_settle_s)
            latency = await run_loadgen(
                _spec(
                    ctx,
                    mode="open",
                    url=stack.callback_url(gw),
                    rate=s.ack_rate,
                    duration=s.ack_duration_s,
                    connections=16,
                    users=1000,
                    user_prefix="ack",
                ),
                stack.workdir / "loadgen.log",
            )
        await ctx.profiler.detach()
        ctx.note_loaded(gw, peaks[gw.pid], "gateway throughput + latency")
    finally:
        await stack.stop()
    sent = {name: sum(r["sent"] for r in rounds) for name, rounds in closed["rounds"].items()}
    cpu_us = {
        "gateway": round(1e6 * meter.used["gateway"] / sent["gateway"], 1),
        "nats-server": round(1e6 * meter.used["nats-server"] / sent["gateway"], 1),
        "bare": round(1e6 * meter.used["bare"] / sent["bare"], 1),
    }
    steps["gateway (all of it)"] = cpu_us["gateway"]
    bare_rates = [r["rate"] for r in closed["rounds"]["bare"]]
    gw_rates = [r["rate"] for r in closed["rounds"]["gateway"]]
    bare_rate = statistics.median(bare_rates)
    gw_rate = statistics.median(gw_rates)
    return {
        "throughput": {
            "bare_rates": bare_rates,
            "gateway_rates": gw_rates,
            "bare": bare_rate,
            "gateway": gw_rate,
            "ratio": gw_rate / bare_rate if bare_rate else 0.0,
            "ratios": [g / b for g, b in zip(gw_rates, bare_rates, strict=True) if b],
            "connections": s.gw_connections,
            "gateway_latency_ms": closed["rounds"]["gateway"][-1]["latency_ms"],
            "bare_latency_ms": closed["rounds"]["bare"][-1]["latency_ms"],
            "statuses": {
                name: [r["statuses"] for r in rounds] for name, rounds in closed["rounds"].items()
            },
            "wrapped": closed["wrapped"],
            "cpu_us": cpu_us,
            "steps_cpu_us": {"bare": cpu_us["bare"], **steps},
        },
        "latency": latency,
    }


def _bare(ctx: Context, stack: Stack, work: str, grind: Callgrind | None = None) -> Service:
    """bench/bare.py, alone (``none``) or with one part of the gateway's work."""
    port = free_port()
    name = "bare" if work == "none" else f"bare+{work}"
    service = Service(
        name,
        ["-m", "bench.bare", "--port", str(port), "--loop", ctx.loop, "--work", work],
        stack.env(),
        stack.workdir / f"{name}.log",
        f"http://127.0.0.1:{port}/healthz",
        port,
        launcher=grind.launcher(name) if grind else (),
    )
    stack.services.append(service)
    return service


async def _steps(ctx: Context, stack: Stack, servers: list[Service]) -> dict[str, float]:
    """CPU µs per request of the bare handler doing one part of the gateway's work each
    (one closed-loop round each, the same load as the side-by-side rounds)."""
    s = ctx.sizes
    meter = CpuMeter({srv.name: srv.pid for srv in servers}).start()
    result = await run_loadgen(
        _spec(
            ctx,
            mode="closed",
            targets=[{"name": srv.name, "url": stack.callback_url(srv)} for srv in servers],
            connections=s.gw_connections,
            warmup=s.gw_warmup_s,
            duration=s.gw_duration_s,
            rounds=1,
            prebuild=min(s.gw_prebuild, s.bare_prebuild),
            pause=s.gw_pause_s,
            users=1000,
        ),
        stack.workdir / "loadgen.log",
    )
    meter.stop()
    rounds = {srv.name: result["rounds"][srv.name][0] for srv in servers}
    for name, measured in rounds.items():
        if set(measured["statuses"]) != {"200"}:  # the work failed: the figure would lie
            raise RuntimeError(f"{name} answered {measured['statuses']}; see its log")
    return {name: round(1e6 * meter.used[name] / r["sent"], 1) for name, r in rounds.items()}


# ---------------------------------------------------------------- 1: instructions


async def instructions(ctx: Context) -> dict[str, Any]:
    """1, counted: instructions per callback of the gateway, the bare handler and the
    bare handler doing each part of the gateway's work, under callgrind.

    Scenario 1's CPU µs say what each part costs in a serving process; this says how
    much of that is instructions executed and how much is executing them slowly (cache
    misses), with a count that does not move with the machine's load. Each server gets
    its own burst of the same kind of callbacks (32 connections, as in scenario 1) after
    a warm-up; a server that answers anything but 200 fails the scenario.
    """
    missing = Callgrind.missing()
    if missing is not None:
        return {"skipped": missing}
    s = ctx.sizes
    stack = ctx.stack("instructions")
    grind = Callgrind(stack.workdir)
    await stack.start_nats()
    try:
        servers = [_bare(ctx, stack, work, grind) for work in s.instr_works]
        servers.append(stack.start("gateway", launcher=grind.launcher("gateway")))
        # Python under valgrind starts ≈ 9x slower than without it, uninstrumented
        # (≈ 45x instrumented: the gateway's imports 0.8 s, 7 s, 38 s).
        await asyncio.gather(*(srv.ready(timeout=s.timeout_s) for srv in servers))
        per_callback: dict[str, float] = {}
        for srv in servers:
            await grind.instrument(srv)
            await _burst(ctx, stack, srv, s.instr_warmup, "warm")
            await grind.zero(srv)
            await _burst(ctx, stack, srv, s.instr_count, "count")
            per_callback[srv.name] = await grind.dump(srv) / s.instr_count
    finally:
        await stack.stop()
    return {
        "callbacks": s.instr_count,
        "per_callback": per_callback,
        "ratio": per_callback["bare"] / per_callback["gateway"],
    }


async def _burst(ctx: Context, stack: Stack, server: Service, count: int, prefix: str) -> None:
    """``count`` callbacks to ``server`` as fast as it answers; each must be a 200."""
    result = await run_loadgen(
        _spec(
            ctx,
            mode="burst",
            url=stack.callback_url(server),
            count=count,
            connections=ctx.sizes.gw_connections,
            users=1000,
            prefix=f"{prefix}-{server.name}-",
        ),
        stack.workdir / "loadgen.log",
    )
    if result["statuses"] != {"200": count} or result["retries"]:
        raise RuntimeError(f"{server.name} answered {result['statuses']}; see its log")


# ---------------------------------------------------------------- 3: pipeline


async def pipeline(ctx: Context) -> dict[str, Any]:
    """Callback sent → message/send received, zero-latency model, steady open-loop rate."""
    s = ctx.sizes
    await ctx.fakes.reset(model_latency=0.0)
    stack = ctx.stack("pipeline")
    await stack.start_nats()
    try:
        services = [stack.start(n) for n in ("token", "llm", "sender", "gateway")]
        await _ready(*services)
        for svc in services:
            ctx.note_idle(svc)
        gw = services[-1]
        url = stack.callback_url(gw)
        # Warm up: connections, the token, the consumers' first fetches.
        warm = max(5, int(s.pipe_rate))
        await run_loadgen(
            _spec(ctx, mode="open", url=url, rate=s.pipe_rate, duration=warm / s.pipe_rate,
                  connections=4, users=warm, user_prefix="warm", prefix="w"),
            stack.workdir / "loadgen.log",
        )  # fmt: skip
        await _wait_sent(ctx, warm, s.timeout_s)
        for svc in services:
            ctx.profiler.attach(svc, f"pipeline-{svc.name}")
        count = int(s.pipe_rate * s.pipe_duration_s)
        meter = CpuMeter(_pids(stack, services)).start()
        async with _rss_peaks(services) as peaks:
            result = await run_loadgen(
                _spec(ctx, mode="open", url=url, rate=s.pipe_rate, duration=s.pipe_duration_s,
                      connections=4, users=count, user_prefix="pipe", prefix="p", record=True),
                stack.workdir / "loadgen.log",
            )  # fmt: skip
            delivered = await _wait_sent(ctx, warm + count, s.timeout_s)
        meter.stop()
        await ctx.profiler.detach()
        for svc in services:
            ctx.note_loaded(svc, peaks[svc.pid], "pipeline")
    finally:
        await stack.stop()
    stats = await ctx.fakes.stats(sent=True)
    sent_at: dict[str, float] = result["sent_at"]
    latencies = []
    for _user, content, at in stats["messages"]:
        key = content.removeprefix("echo: ")
        if key in sent_at:
            latencies.append(at - sent_at[key])
    return {
        "rate": s.pipe_rate,
        "messages": count,
        "delivered": len(latencies),
        "complete": delivered,
        "latency_ms": percentiles(latencies),
        "gateway_ack_ms": result["latency_ms"],
        "cpu_us": meter.per(count),
        "statuses": result["statuses"],
    }


async def _wait_sent(ctx: Context, count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while (await ctx.fakes.stats())["sent"] < count:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)
    return True


# ---------------------------------------------------------------- 4: fan-out


async def fanout(ctx: Context) -> dict[str, Any]:
    """2,000 queued messages from distinct users, a 2 s model, one llm replica."""
    s = ctx.sizes
    await ctx.fakes.reset(model_latency=s.fan_latency_s)
    stack = ctx.stack("fanout")
    await stack.start_nats()
    watch = OutcomeWatch()
    try:
        gw = stack.start("gateway")
        await gw.ready()
        await watch.start(stack.nats.url)
        queued = await run_loadgen(
            _spec(ctx, mode="burst", url=stack.callback_url(gw), count=s.fan_messages,
                  connections=16, users=s.fan_messages, user_prefix="fan", prefix="f"),
            stack.workdir / "loadgen.log",
        )  # fmt: skip
        llm = stack.start(
            "llm",
            LLM_MAX_CONCURRENCY=str(s.fan_concurrency),
            LLM_SHUTDOWN_GRACE="2",
            LLM_REQUEST_TIMEOUT=str(max(30, s.fan_latency_s * 10)),
        )
        await llm.ready()
        ctx.profiler.attach(llm, "fanout-llm")
        meter = CpuMeter(_pids(stack, [llm])).start()
        async with _rss_peaks([llm]) as peaks:
            complete = await watch.wait_for(s.fan_messages, s.timeout_s)
        meter.stop()
        await ctx.profiler.detach()
        ctx.note_loaded(llm, peaks[llm.pid], f"fan-out ({s.fan_messages} in flight)")
        stats = await ctx.fakes.stats()
    finally:
        await watch.stop()
        await stack.stop()
    first = stats["model_first_at"] or 0.0
    last = max(watch.times) if watch.times else first
    span = last - first
    done = len(watch.times)
    return {
        "messages": s.fan_messages,
        "outcomes": done,
        "complete": complete,
        "model_latency_s": s.fan_latency_s,
        "concurrency": s.fan_concurrency,
        "span_s": span,
        "rate": done / span if span > 0 else 0.0,
        "ideal_rate": s.fan_messages / (s.fan_latency_s * -(-s.fan_messages // s.fan_concurrency)),
        "peak_in_flight": stats["model_peak_in_flight"],
        "queued": queued,
        "thread_pool_ceiling": 8 / s.fan_latency_s,
        "cpu_us": meter.per(done),
    }


# ---------------------------------------------------------------- 5: scaling


async def scaling(ctx: Context) -> dict[str, Any]:
    """1, 2, 4 llm replicas with a fixed LLM_MAX_CONCURRENCY each: throughput ratio."""
    s = ctx.sizes
    per_replica = s.scale_cap / s.scale_latency_s
    runs: dict[int, dict[str, Any]] = {}
    for replicas in s.scale_replicas:
        await ctx.fakes.reset(model_latency=s.scale_latency_s)
        stack = ctx.stack(f"scaling-{replicas}")
        await stack.start_nats()
        watch = OutcomeWatch()
        try:
            gw = stack.start("gateway")
            llms = [
                stack.start("llm", LLM_MAX_CONCURRENCY=str(s.scale_cap), LLM_SHUTDOWN_GRACE="1")
                for _ in range(replicas)
            ]
            await _ready(gw, *llms)
            await watch.start(stack.nats.url)
            lead = s.scale_latency_s + 1.0
            count = int(replicas * per_replica * (lead + s.scale_window_s + 1.0) * 1.3)
            started = time.time()
            await run_loadgen(
                _spec(ctx, mode="burst", url=stack.callback_url(gw), count=count,
                      connections=16, users=count, user_prefix=f"scale{replicas}-",
                      prefix="s"),
                stack.workdir / "loadgen.log",
            )  # fmt: skip
            window_start = started + lead
            await asyncio.sleep(max(0.0, window_start + s.scale_window_s - time.time()))
            done = watch.between(window_start, window_start + s.scale_window_s)
            stats = await ctx.fakes.stats()
        finally:
            await watch.stop()
            await stack.stop()
        runs[replicas] = {
            "rate": done / s.scale_window_s,
            "ideal": replicas * per_replica,
            "peak_in_flight": stats["model_peak_in_flight"],
            "queued": count,
        }
    base = runs[s.scale_replicas[0]]["rate"] or 1.0
    for run in runs.values():
        run["ratio"] = run["rate"] / base
    return {
        "cap": s.scale_cap,
        "latency_s": s.scale_latency_s,
        "window_s": s.scale_window_s,
        "runs": runs,
    }


# ---------------------------------------------------------------- 6: token economy


async def tokens(ctx: Context) -> dict[str, Any]:
    """gettoken calls for N sends across 3 sender replicas (and 2 token replicas)."""
    s = ctx.sizes
    await ctx.fakes.reset(model_latency=0.0)
    stack = ctx.stack("tokens")
    await stack.start_nats()
    try:
        toks = [stack.start("token") for _ in range(s.token_services)]
        senders = [stack.start("sender") for _ in range(s.token_senders)]
        await _ready(*toks, *senders)
        for svc in (*toks, *senders):
            ctx.note_idle(svc)
        for i, svc in enumerate(senders):
            ctx.profiler.attach(svc, f"tokens-sender-{i}")
        meter = CpuMeter(_pids(stack, [*toks, *senders])).start()
        async with _rss_peaks([*toks, *senders]) as peaks:
            await _inject_outcomes(stack.nats.url, ctx.app.app, s.token_sends)
            complete = await _wait_sent(ctx, s.token_sends, s.timeout_s)
        meter.stop()
        await ctx.profiler.detach()
        for svc in (*toks, *senders):
            ctx.note_loaded(svc, peaks[svc.pid], f"{s.token_sends} sends")
        stats = await ctx.fakes.stats()
    finally:
        await stack.stop()
    span = (stats["last_sent_at"] or 0.0) - (stats["first_sent_at"] or 0.0)
    return {
        "sends": stats["sent"],
        "distinct": stats["distinct_sent"],
        "complete": complete,
        "senders": s.token_senders,
        "token_services": s.token_services,
        "gettoken_calls": stats["gettoken_calls"],
        "send_rate": stats["sent"] / span if span > 0 else 0.0,
        "cpu_us": meter.per(stats["sent"]),
    }


async def _inject_outcomes(url: str, app: str, count: int) -> None:
    """Append ``count`` ReplyGenerated outcomes (distinct users) as the llm would, up to
    2,000 awaiting their PubAck at a time."""
    nc = await nats.connect(url)
    appender = await PipelinedAppender.start(nc)
    window = asyncio.Semaphore(2000)

    async def append(i: int) -> None:
        event = ReplyGenerated(
            app=app, conversation=f"tok{i}", correlation_id=f"t{i}", text=f"t{i}"
        )
        async with window:
            await appender.append(event, msg_id=f"outcome:{event.event_id}", timeout=60)

    try:
        await asyncio.gather(*(append(i) for i in range(count)))
    finally:
        await appender.close()
        await nc.close()


# ---------------------------------------------------------------- reading a conversation


async def reads(ctx: Context) -> dict[str, Any]:
    """How the llm and the sender read a conversation back (``bus.read_conversation``):
    batched direct gets against the way they read before, one ``get_msg`` per event
    and one more for "not found" (here as ``_one_by_one``), alternately in one run on one
    nats-server, from this process: a cold read of a long conversation (a replica that
    restarted, or let the conversation go from its cache) and a catch-up read of one new
    event (every message, on a cached conversation). Wall time and CPU of this process
    and of nats-server, per read."""
    s = ctx.sizes
    stack = ctx.stack("reads")
    await stack.start_nats()
    nc = await nats.connect(stack.nats.url)
    try:
        js = nc.jetstream(timeout=30)
        await ensure_topology(js, NatsSettings.read(EnvReader({})))
        conv = ConversationRef(ctx.app.app, "reader")
        appender = await PipelinedAppender.start(nc)
        last = 0
        for i in range(s.read_events):
            # a user's question and a few lines of answer: ≈ 700 bytes an event stored
            event = ReplyGenerated(
                app=conv.app, conversation=conv.user, correlation_id=f"r{i}", text="答" * 180
            )
            last = (await appender.append(event, msg_id=f"read:{i}", timeout=30)).seq
        await appender.close()
        assert stack.nats.process is not None
        meter_pids = {"bench": os.getpid(), "nats-server": stack.nats.process.pid}
        ways: dict[str, Callable[[int], Any]] = {
            "one by one": lambda after: _one_by_one(js, conv, after),
            "batched": lambda after: _batched(js, conv, after),
        }
        cold: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
        catchup: dict[str, list[dict[str, float]]] = {way: [] for way in ways}
        for _ in range(s.read_rounds):
            for way, read in ways.items():
                cold[way].append(await _timed(meter_pids, s.read_colds, read, 0, s.read_events))
                catchup[way].append(await _timed(meter_pids, s.read_catchups, read, last - 1, 1))
    finally:
        await nc.close()
        await stack.stop()

    def median(runs: list[dict[str, float]]) -> dict[str, float]:
        return {key: statistics.median(r[key] for r in runs) for key in runs[0]}

    cold_m = {way: median(runs) for way, runs in cold.items()}
    catchup_m = {way: median(runs) for way, runs in catchup.items()}
    return {
        "events": s.read_events,
        "catchups": s.read_catchups,
        "rounds": s.read_rounds,
        "cold": cold_m,
        "catchup": catchup_m,
        "cold_ratio": cold_m["one by one"]["wall_us"] / cold_m["batched"]["wall_us"],
        "catchup_ratio": catchup_m["one by one"]["wall_us"] / catchup_m["batched"]["wall_us"],
    }


async def _timed(
    pids: dict[str, int], count: int, read: Callable[[int], Any], after: int, expected: int
) -> dict[str, float]:
    """``count`` reads after seq ``after``: wall and CPU µs per read."""
    meter = CpuMeter(pids).start()
    started = time.perf_counter()
    for _ in range(count):
        got = await read(after)
        assert got == expected, (got, expected)
    wall = time.perf_counter() - started
    meter.stop()
    per = meter.per(count)
    return {"wall_us": 1e6 * wall / count, **{f"{n}_cpu_us": us for n, us in per.items()}}


async def _batched(js: JetStreamContext, conv: ConversationRef, after: int) -> int:
    return len([stored async for stored in read_conversation(js, conv, after_seq=after)])


async def _one_by_one(js: JetStreamContext, conv: ConversationRef, after: int) -> int:
    """The read as it was before the batches: a direct get per event, then one that finds
    nothing; each event decoded, as the batched read does."""
    seq, count = after + 1, 0
    while True:
        try:
            raw = await js.get_msg(
                topology.CONVERSATION_STREAM,
                seq=seq,
                subject=conv.all_events,
                next=True,
                direct=True,
            )
        except nats.js.errors.NotFoundError:
            return count
        assert raw.seq is not None
        decode_event(raw.data or b"")
        seq, count = raw.seq + 1, count + 1


SCENARIOS: dict[str, Callable[[Context], Any]] = {
    "gateway": gateway,
    "instructions": instructions,
    "pipeline": pipeline,
    "fanout": fanout,
    "scaling": scaling,
    "tokens": tokens,
    "reads": reads,
}
