"""The load generator: plays WeCom towards a callback URL, in its own process.

Callbacks are built exactly as WeCom posts them (``CallbackBuilder``: inner XML,
AES-encrypted, signed, wrapped, unique MsgIds, many users) and serialised to raw HTTP/1.1
requests *before* the timed window, then sent over keep-alive connections by a lean
asyncio protocol (no HTTP client library in the loop), so the generator is not the
bottleneck. Reads one JSON spec on stdin, writes one JSON result on stdout::

    echo '{"mode": "closed", ...}' | python -m bench.loadgen

Modes
    ``closed``  N connections, each sending its next request as soon as the previous one
                is answered, for ``duration`` seconds after ``warmup``; several targets
                (the gateway and a bare handler) take turns for ``rounds`` rounds, so
                they are measured side by side under the same conditions.
    ``open``    a fixed offered rate, whatever the answers do (latency counts from the
                scheduled send time, so queueing in the generator is not hidden).
    ``burst``   send ``count`` callbacks as fast as possible (queueing work); a 503 is
                retried, as WeCom does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from wecombot_common.runtime import event_loop_name
from wecombot_common.sim.callbacks import CallbackBuilder

__all__ = ["HttpConnection", "Request", "build_requests", "percentiles"]


@dataclass(frozen=True, slots=True)
class Request:
    key: str  # the text sent (unique per request): joins a callback to its reply
    raw: bytes


def build_requests(spec: dict[str, Any], url: str, count: int, *, prefix: str) -> list[Request]:
    """``count`` signed, encrypted text callbacks from ``spec["users"]`` users."""
    wecom = spec["wecom"]
    builder = CallbackBuilder(
        corp_id=wecom["corp_id"],
        agent_id=int(wecom["agent_id"]),
        token=wecom["token"],
        encoding_aes_key=wecom["aes_key"],
    )
    parts = urlsplit(url)
    host = parts.netloc
    users = max(1, int(spec.get("users", 1000)))
    user_prefix = spec.get("user_prefix", "bench")
    out: list[Request] = []
    for i in range(count):
        key = f"{prefix}{i}"
        cb = builder.text(f"{user_prefix}{i % users}", key)
        query = "&".join(f"{k}={v}" for k, v in cb.query.items())  # hex / digits only
        head = (
            f"POST {parts.path}?{query} HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: text/xml\r\nContent-Length: {len(cb.body)}\r\n\r\n"
        ).encode("ascii")
        out.append(Request(key, head + cb.body))
    return out


class HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time; returns the status."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(cls, host, port)
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionError("connection closed"))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self._buf[:end]).lower()
        length = 0
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            stop = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : stop if stop >= 0 else len(head)])
        total = end + 4 + length
        if len(self._buf) < total:
            return
        status = int(head[9:12])
        del self._buf[:total]
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(status)

    async def request(self, raw: bytes) -> int:
        assert self._transport is not None
        if self.closed:
            raise ConnectionError("connection closed")
        self._waiter = asyncio.get_running_loop().create_future()
        self._transport.write(raw)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def percentiles(values_s: list[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds (nearest rank)."""
    if not values_s:
        return {"n": 0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values_s)

    def rank(p: float) -> float:
        index = min(len(ordered) - 1, max(0, round(p * len(ordered) + 0.5) - 1))
        return round(ordered[index] * 1000, 3)

    return {
        "n": len(ordered),
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": round(ordered[-1] * 1000, 3),
    }


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


# ---------------------------------------------------------------- closed loop


async def _closed_round(
    url: str, requests: Iterator[Request], spec: dict[str, Any]
) -> dict[str, Any]:
    host, port = _address(url)
    conns = [await HttpConnection.open(host, port) for _ in range(int(spec["connections"]))]
    start = time.perf_counter()
    measure_from = start + float(spec["warmup"])
    stop_at = measure_from + float(spec["duration"])
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    sent = 0

    async def worker(conn: HttpConnection) -> None:
        nonlocal sent
        while (t0 := time.perf_counter()) < stop_at:
            raw = next(requests).raw
            try:
                status = await conn.request(raw)
            except ConnectionError:
                conn = await HttpConnection.open(host, port)
                status = 0
            t1 = time.perf_counter()
            sent += 1
            if t0 >= measure_from and t1 <= stop_at:
                latencies.append(t1 - t0)
                statuses[str(status)] += 1

    await asyncio.gather(*(worker(c) for c in conns))
    for c in conns:
        c.close()
    ok = statuses.get("200", 0)
    return {
        "rate": ok / float(spec["duration"]),
        "sent": sent,  # warm-up included: the divisor of the servers' CPU time
        "latency_ms": percentiles(latencies),
        "statuses": dict(statuses),
    }


async def run_closed(spec: dict[str, Any]) -> dict[str, Any]:
    targets: list[dict[str, str]] = spec["targets"]
    # A target may take fewer (the bare handler does not care whether MsgIds repeat).
    pools = {
        t["name"]: build_requests(
            spec, t["url"], int(t.get("prebuild", spec["prebuild"])), prefix="c"
        )
        for t in targets
    }
    wrapped: Counter[str] = Counter()

    def cycle(name: str) -> Iterator[Request]:
        while True:
            yield from pools[name]
            wrapped[name] += 1

    streams = {name: cycle(name) for name in pools}
    results: dict[str, list[dict[str, Any]]] = {t["name"]: [] for t in targets}
    for _ in range(int(spec["rounds"])):
        for target in targets:
            results[target["name"]].append(
                await _closed_round(target["url"], streams[target["name"]], spec)
            )
            await asyncio.sleep(float(spec.get("pause", 0.5)))
    return {"rounds": results, "wrapped": dict(wrapped)}


# ---------------------------------------------------------------- open loop


async def run_open(spec: dict[str, Any]) -> dict[str, Any]:
    url = spec["url"]
    host, port = _address(url)
    rate = float(spec["rate"])
    count = max(1, int(rate * float(spec["duration"])))
    requests = build_requests(spec, url, count, prefix=spec.get("prefix", "o"))
    idle = [await HttpConnection.open(host, port) for _ in range(int(spec["connections"]))]
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    sent_at: dict[str, float] = {}
    late = 0
    record = bool(spec.get("record"))

    async def one(req: Request, scheduled: float, wall: float) -> None:
        conn = idle.pop() if idle else await HttpConnection.open(host, port)
        if record:
            sent_at[req.key] = wall
        try:
            status = await conn.request(req.raw)
        except ConnectionError:
            status = 0
        latencies.append(time.perf_counter() - scheduled)
        statuses[str(status)] += 1
        if not conn.closed:
            idle.append(conn)

    tasks: list[asyncio.Task[None]] = []
    t0 = time.perf_counter() + 0.05
    wall0 = time.time() + (t0 - time.perf_counter())
    for i, req in enumerate(requests):
        scheduled = t0 + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.001:
            late += 1
        tasks.append(asyncio.create_task(one(req, scheduled, wall0 + i / rate)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    for c in idle:
        c.close()
    return {
        "offered_rate": rate,
        "sent": count,
        "elapsed_s": round(elapsed, 3),
        "late_sends": late,
        "latency_ms": percentiles(latencies),
        "statuses": dict(statuses),
        "sent_at": sent_at if record else {},
    }


# ---------------------------------------------------------------- burst


async def run_burst(spec: dict[str, Any]) -> dict[str, Any]:
    url = spec["url"]
    host, port = _address(url)
    requests = build_requests(spec, url, int(spec["count"]), prefix=spec.get("prefix", "q"))
    queue = iter(requests)
    statuses: Counter[str] = Counter()
    retries = 0

    async def worker() -> None:
        nonlocal retries
        conn = await HttpConnection.open(host, port)
        for req in queue:
            for _ in range(20):
                try:
                    status = await conn.request(req.raw)
                except ConnectionError:
                    conn = await HttpConnection.open(host, port)
                    status = 0
                if status == 200:
                    break
                retries += 1
                await asyncio.sleep(0.1)  # WeCom retries a callback it got no 200 for
            statuses[str(status)] += 1
        conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(int(spec["connections"]))))
    elapsed = time.perf_counter() - start
    return {
        "count": len(requests),
        "elapsed_s": round(elapsed, 3),
        "rate": round(len(requests) / elapsed, 1),
        "retries": retries,
        "statuses": dict(statuses),
    }


_MODES = {"closed": run_closed, "open": run_open, "burst": run_burst}


def main() -> None:
    spec = json.loads(sys.stdin.read())
    runner = _MODES[spec["mode"]]
    if event_loop_name({}) == "uvloop":  # the generator's own loop: as cheap as possible
        import uvloop

        result = uvloop.run(runner(spec))
    else:
        result = asyncio.run(runner(spec))
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.write(json.dumps(result))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
