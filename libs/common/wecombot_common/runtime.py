"""Process plumbing shared by every service: signals, exit codes, the health server.

Each service exposes ``async def serve(settings, stop: asyncio.Event) -> None`` and its
``main`` calls :func:`run_service`, so SIGTERM/SIGINT mean the same everywhere: set
``stop``; the service stops taking work, finishes or hands back what it holds, drains.
A one-shot command (``wecombot setup``) runs the same way, its ``serve`` returning its
exit code.

Exit codes: 0 clean stop, 2 bad configuration, 1 anything else.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import structlog
from aiohttp import web

from .errors import ConfigError
from .http import LocalSite, name_server
from .metrics import metrics_route
from .settings import EnvReader

__all__ = [
    "Check",
    "DeferredCheck",
    "HealthServer",
    "ServiceStop",
    "cancel_until_done",
    "event_loop_choice",
    "event_loop_name",
    "fail",
    "retried_until_stopped",
    "run_service",
    "unless_stopped",
]

S = TypeVar("S")
T = TypeVar("T")
log = structlog.get_logger(__name__)


Serve = Callable[[S, asyncio.Event], Awaitable[int | None]]


def run_service(
    load: Callable[[Mapping[str, str]], S],
    serve: Serve[S],
    environ: Mapping[str, str],
    *,
    service: str,
) -> int:
    """Load settings (exit 2 with the message on ConfigError), then serve until a signal;
    the exit code is what ``serve`` returns (None: 0). ``service`` names the process in
    a settings problem's line, as its log lines name it once logging is configured."""
    try:
        settings = load(environ)
        loop = event_loop_name(environ)
    except ConfigError as exc:
        _say_config_error(exc, environ, service)
        return 2
    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        return runner.run(_serve_until_signal(serve, settings))


def _say_config_error(exc: ConfigError, environ: Mapping[str, str], service: str) -> None:
    """The settings' problems, before logging is configured (its own settings may be
    among them): as the JSON line the service logs every other start-up refusal with
    (``service.config_error``), for a pod's log pipeline, unless ``LOG_FORMAT=console``
    (a terminal: text). A ConfigError's text never holds a secret."""
    if (environ.get("LOG_FORMAT") or "").strip().lower() == "console":
        print(f"wecombot: {exc}", file=sys.stderr)
        return
    line = {
        "event": "service.config_error",
        "level": "error",
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "error": str(exc),
        "problems": list(exc.problems) or [str(exc)],
        "service": service,
    }
    print(json.dumps(line, ensure_ascii=False), file=sys.stderr)


def event_loop_choice(environ: Mapping[str, str]) -> str:
    """``WECOMBOT_EVENT_LOOP`` as written (``auto``, ``uvloop`` or ``asyncio``), or a
    ConfigError; whether uvloop is installed is :func:`event_loop_name`'s question (doctor
    asks this one: it may run on another machine than the services)."""
    env = EnvReader(environ)
    choice = env.choice("WECOMBOT_EVENT_LOOP", "auto", ("auto", "uvloop", "asyncio"))
    env.raise_if_invalid()
    return choice


def event_loop_name(environ: Mapping[str, str]) -> str:
    """The event loop :func:`run_service` runs: ``WECOMBOT_EVENT_LOOP`` = ``auto`` (the
    default: uvloop when it is installed, else asyncio's), ``uvloop`` or ``asyncio``.

    uvloop cut the services' CPU per message by 10-18 % (docs/benchmarks.md); it is
    optional, so a platform without it runs asyncio's loop.

    >>> event_loop_name({"WECOMBOT_EVENT_LOOP": "asyncio"})
    'asyncio'
    """
    choice = event_loop_choice(environ)
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("WECOMBOT_EVENT_LOOP=uvloop, but uvloop is not installed") from None
        return "asyncio"
    return "uvloop"


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


class ServiceStop(asyncio.Event):
    """The ``stop`` that :func:`run_service` hands to ``serve``: set by SIGTERM or SIGINT,
    or by :func:`fail` when the service cannot go on; the process then exits 1 once
    ``serve`` has stopped, so that Kubernetes (or whoever runs it) starts it again."""

    def __init__(self) -> None:
        super().__init__()
        self.failure: str | None = None


def fail(stop: asyncio.Event, reason: str) -> None:
    """Stop the service as failed (exit 1, the first ``reason`` logged as
    ``service.failed``). ``stop`` not made by :func:`run_service` (a test's own event)
    is only set."""
    if isinstance(stop, ServiceStop) and stop.failure is None:
        stop.failure = reason
    stop.set()


async def _serve_until_signal(serve: Serve[S], s: S) -> int:
    stop = ServiceStop()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        code = await serve(s, stop)
    except ConfigError as exc:
        log.error("service.config_error", error=str(exc))
        return 2
    except Exception:
        # Through the log, so its secrets are redacted: Python's own report of an
        # uncaught exception goes to stderr as it is (a URL with a password, say).
        log.exception("service.crashed")
        return 1
    if stop.failure is not None:
        log.error("service.failed", reason=stop.failure)
        return 1
    return code or 0


Check = Callable[[], Awaitable[tuple[bool, str]]]


class HealthServer:
    """``GET /healthz`` (the process answers), ``GET /readyz`` (its checks pass) and
    ``GET /metrics`` (Prometheus, :mod:`wecombot_common.metrics`).

    ``ready`` answers ``(ready, detail)``; port 0 serves nothing (the routes can still be
    mounted on another app, as the gateway does)::

    health = HealthServer("0.0.0.0", 8081, ready=check)
    """

    def __init__(self, host: str, port: int, ready: Check) -> None:
        self.host = host
        self.port = port
        self._ready = ready
        self._site: LocalSite | None = None

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        ok, detail = await self._ready()
        return web.json_response(
            {"status": "ready" if ok else "not ready", "detail": detail}, status=200 if ok else 503
        )

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/healthz", self._healthz),
            web.get("/readyz", self._readyz),
            metrics_route(),
        ]

    async def start(self) -> None:
        if self.port == 0:
            return
        app = web.Application()
        app.add_routes(self.routes())
        name_server(app)
        try:
            self._site = await LocalSite.start(app, self.host, self.port)
        except OSError as exc:  # the port is taken: fix the setting (exit 2), no traceback
            raise ConfigError(
                f"cannot listen on {self.host}:{self.port} (WECOMBOT_HEALTH_HOST, "
                f"WECOMBOT_HEALTH_PORT): {exc.strerror or exc}"
            ) from exc

    async def stop(self) -> None:
        if self._site is not None:
            site, self._site = self._site, None
            await site.stop()


async def unless_stopped(
    work: Awaitable[T],
    stop: asyncio.Event,
    *,
    discard: Callable[[T], Awaitable[None]] | None = None,
) -> T | None:
    """Await ``work`` unless ``stop`` is set first (then cancel it and return None)::

    nc = await unless_stopped(bus.connect(settings, "x"), stop, discard=close)

    ``discard``: for a result the work produced all the same, cancelled too late (a
    connection made as the stop came): nobody else will close it. Cancelled itself,
    this cancels the work too.
    """
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    await cancel_until_done(task)
    if not task.cancelled():
        late = task.result()  # an error it ended with instead is raised
        if discard is not None:
            await discard(late)
    return None


async def retried_until_stopped(
    attempt: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
    *,
    retry_on: tuple[type[BaseException], ...],
    event: str,
    first_retry_s: float = 0.5,
    max_retry_s: float = 15.0,
    **fields: object,
) -> bool:
    """``attempt()`` until it returns (True), again with exponential backoff while it
    raises one of ``retry_on`` (a warning ``event`` with ``fields``, the error and the
    next delay each time), or until ``stop`` is set (False). Any other error raises::

        if not await retried_until_stopped(worker.ensure_consumer, stop,
                                           retry_on=(TimeoutError,),
                                           event="worker.consumer_not_ready"):
            return  # stopped while waiting

    For what a service needs of its broker at start, which a NATS cluster still
    electing its leaders times out or refuses for a while: waited for, not ready, as
    Kubernetes would restart it, without the crash."""
    delay = first_retry_s
    while True:
        try:
            await attempt()
            return True
        except retry_on as exc:
            log.warning(event, **fields, error=f"{type(exc).__name__}: {exc}", retry_in_s=delay)
        if await unless_stopped(asyncio.sleep(delay, result=True), stop) is None:
            return False
        delay = min(delay * 2, max_retry_s)


async def cancel_until_done(*tasks: asyncio.Future[Any], every_s: float = 0.5) -> None:
    """Cancel ``tasks`` and wait until each has ended, cancelling again the ones that
    go on. On Python 3.11, ``asyncio.wait_for`` swallows a cancellation that arrives as
    what it waits for completes (bpo-42130), and nats-py connects and reads inside
    ``wait_for``: cancelled once, a loop (the first connection to a broker that is not
    there, a watcher) could go on for good, and whoever awaited it with it. Their
    results and errors are left in them, read (no "never retrieved" warning). If the
    caller is cancelled meanwhile, the tasks are cancelled once more and left."""
    for task in tasks:
        task.add_done_callback(_retrieve)
    pending = {task for task in tasks if not task.done()}
    try:
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=every_s)
    except asyncio.CancelledError:
        for task in pending:
            task.cancel()
        raise


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class DeferredCheck:
    """A readiness check that says "not ready" until the real one is attached.

    Services serve /healthz and /readyz from the start, before NATS is reachable, so a
    liveness probe never restarts a pod that is only waiting for the broker.
    """

    __slots__ = ("_check", "_waiting")

    def __init__(self, waiting: str = "connecting to NATS") -> None:
        self._check: Check | None = None
        self._waiting = waiting

    def attach(self, check: Check) -> None:
        self._check = check

    async def __call__(self) -> tuple[bool, str]:
        if self._check is None:
            return False, self._waiting
        return await self._check()
