"""The token service, in-process, against a real nats-server and a simulated WeCom API.

Several instances run ``serve()`` with their own NATS connections; callers use the same
TokenClient the sender uses. No mocks: the simulator is a real HTTP server on loopback
and counts every gettoken call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable

import httpx
import msgspec
import nats
import pytest
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, KeyValueConfig, RePublish
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from tests.conftest import NatsHandle, free_port
from tests.waiting import eventually, until
from wecombot_common.http import LoopbackServer
from wecombot_common.logs import REDACTED, redact
from wecombot_common.sim.wecom_api import SimulatedWeComApi
from wecombot_common.tokens import (
    TokenClient,
    TokenError,
    TokenReply,
    TokenRequest,
    TransientTokenError,
)
from wecombot_common.topology import (
    TOKEN_BUCKET,
    TOKEN_GET,
    TOKEN_INVALIDATE,
    TOKEN_SERVICE,
    token_bucket,
)
from wecombot_token import keeper as keeper_module
from wecombot_token.domain import AppState, Failure, IssuedToken, LastFailure, Lock
from wecombot_token.errors import StoreUnavailable
from wecombot_token.keeper import TokenKeeper
from wecombot_token.main import serve
from wecombot_token.settings import TokenSettings
from wecombot_token.source import WeComTokenSource
from wecombot_token.store import Claim, KvTokenStore, Snapshot, TokenStore, open_token_bucket

pytestmark = pytest.mark.integration


CORP_ID = "wwtokentest"
AGENT_ID = 1000002
SECRET = "sim-app-secret-0123456789"
APP = f"{CORP_ID}-{AGENT_ID}"


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedWeComApi]:
    async with SimulatedWeComApi(corp_id=CORP_ID, secret=SECRET, agent_id=AGENT_ID) as api:
        yield api


class Instance:
    """One token service process, in-process: serve() until stop is set."""

    def __init__(self, settings: TokenSettings) -> None:
        self.settings = settings
        self.stop_event = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(serve(self.settings, self.stop_event))
        url = f"http://127.0.0.1:{self.settings.health_port}/readyz"
        async with httpx.AsyncClient(timeout=1.0) as http:

            async def ready() -> bool | None:
                assert self.task is not None
                if self.task.done():
                    self.task.result()  # raise what stopped it
                return await answers_200(http, url)

            await eventually(ready, timeout=10.0, what="the token service ready")

    async def stop(self) -> None:
        self.stop_event.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 20.0)


async def answers_200(http: httpx.AsyncClient, url: str) -> bool | None:
    """True if ``url`` answers 200, None otherwise (for ``eventually``)."""
    with contextlib.suppress(httpx.HTTPError):
        return (await http.get(url)).status_code == 200 or None
    return None


def keeper_over(
    settings: TokenSettings, store: TokenStore, clock: Callable[[], float] = time.time
) -> tuple[TokenKeeper, WeComTokenSource]:
    """A keeper of APP over ``store`` as the service makes one, its gettoken client and
    its time on ``clock``; close both."""
    source = WeComTokenSource(settings.wecom, timeout_s=settings.http_timeout_s, clock=clock)
    keeper = TokenKeeper(
        APP,
        source,
        store,
        settings.policy,
        refresh_timeout_s=settings.refresh_timeout_s,
        clock=clock,
    )
    return keeper, source


def settings_for(nats_server: NatsHandle, sim: SimulatedWeComApi, **env: str) -> TokenSettings:
    return TokenSettings.from_env(
        {
            "NATS_URL": nats_server.url,
            "WECOM_CORP_ID": CORP_ID,
            "WECOM_AGENT_ID": str(AGENT_ID),
            "WECOM_SECRET": SECRET,
            "WECOM_API_BASE": sim.base_url,
            "WECOMBOT_HEALTH_PORT": str(free_port()),
            "TOKEN_HTTP_TIMEOUT": "3",
            "TOKEN_MIN_BACKOFF": "0.2",
            "TOKEN_MAX_BACKOFF": "2",
            **env,
        }
    )


@contextlib.asynccontextmanager
async def token_services(
    nats_server: NatsHandle, sim: SimulatedWeComApi, count: int = 1, **env: str
) -> AsyncIterator[list[Instance]]:
    started: list[Instance] = []
    try:
        for _ in range(count):
            instance = Instance(settings_for(nats_server, sim, **env))
            await instance.start()
            started.append(instance)
        yield started
    finally:
        await asyncio.gather(*(i.stop() for i in started))


@contextlib.asynccontextmanager
async def connections(nats_server: NatsHandle, count: int) -> AsyncIterator[list[NATS]]:
    clients = [await nats.connect(nats_server.url) for _ in range(count)]
    try:
        yield clients
    finally:
        await asyncio.gather(*(c.close() for c in clients))


async def ask(nc: NATS) -> TokenReply:
    """A raw get, to see expires_at as well as the token."""
    msg = await nc.request(TOKEN_GET, msgspec.json.encode(TokenRequest(app=APP)), timeout=10)
    return msgspec.json.decode(msg.data, type=TokenReply)


async def eventually_token(client: TokenClient) -> str:
    async def attempt() -> str | None:
        try:
            return await client.get(APP)
        except (TokenError, TransientTokenError):
            return None

    return await eventually(attempt, timeout=10, what="a token from the service")


async def requests_served(nc: NATS, instances: int) -> list[int]:
    """``get`` requests answered by each instance, from nats.micro's $SRV.STATS."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish(f"$SRV.STATS.{TOKEN_SERVICE}", b"", reply=inbox)
    counts = []
    for _ in range(instances):
        stats = json.loads((await sub.next_msg(timeout=5)).data)
        counts.append(next(e["num_requests"] for e in stats["endpoints"] if e["name"] == "get"))
    await sub.unsubscribe()
    return counts


async def test_ten_thousand_gets_cost_one_gettoken_and_a_restart_reuses_it(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    async with (
        token_services(nats_server, sim, count=2),
        connections(nats_server, 3) as ncs,
    ):
        clients = [TokenClient(nc) for nc in ncs]
        tokens = await asyncio.gather(*(clients[i % 3].get(APP) for i in range(10_000)))
        assert sim.gettoken_calls == 1
        assert len(set(tokens)) == 1
        served = await requests_served(ncs[0], instances=2)
        assert sum(served) == 10_000
        assert min(served) > 0, f"one instance served nothing: {served}"

    # Both stopped; a fresh instance finds the token in KV.
    async with token_services(nats_server, sim), connections(nats_server, 1) as (nc,):
        assert await TokenClient(nc).get(APP) == tokens[0]
        assert sim.gettoken_calls == 1


@pytest.mark.parametrize("gone", [False, True], ids=["slot freed", "bucket deleted"])
async def test_a_bucket_that_cannot_be_followed_yet_is_waited_for_not_ready(
    nats_server: NatsHandle, sim: SimulatedWeComApi, gone: bool
) -> None:
    """A NATS cluster still electing its leaders can open the bucket, then time out the
    consumer its watcher needs: the replica exited 1 (a crash loop under Kubernetes, a
    dead service in-process) where the llm and the sender wait. Here the stream refuses
    the watcher's consumer while a consumer of ours holds its only slot: the service
    asks again with backoff, not ready, and serves once the slot is free, or once the
    bucket deleted meanwhile is made again."""
    async with connections(nats_server, 1) as (nc,):
        js = nc.jetstream()
        stream = f"KV_{TOKEN_BUCKET}"
        await open_token_bucket(js, replicas=1)
        config = (await js.stream_info(stream)).config
        await js.delete_stream(stream)
        await js.add_stream(dataclasses.replace(config, max_consumers=1))
        await js.add_consumer(
            stream, ConsumerConfig(durable_name="slot", ack_policy=AckPolicy.NONE)
        )
        asked: list[str] = []

        async def count(msg: Msg) -> None:
            asked.append(msg.subject)

        await nc.subscribe(f"$JS.API.CONSUMER.CREATE.{stream}.>", cb=count)
        await nc.subscribe(f"$JS.API.CONSUMER.CREATE.{stream}", cb=count)
        instance = Instance(settings_for(nats_server, sim))
        task = asyncio.create_task(serve(instance.settings, instance.stop_event))
        try:
            await until(
                lambda: len(asked) >= 2 or task.done(), timeout=10, what="the watch asked twice"
            )
            assert not task.done(), task.exception()
            ready = f"http://127.0.0.1:{instance.settings.health_port}/readyz"
            async with httpx.AsyncClient(timeout=2.0) as http:
                assert (await http.get(ready)).status_code == 503
                if gone:  # deleted since the service opened it: made again
                    await js.delete_stream(stream)
                else:
                    await js.delete_consumer(stream, "slot")
                await eventually(
                    lambda: answers_200(http, ready), timeout=20, what="the service ready"
                )
            assert await eventually_token(TokenClient(nc))
            assert sim.gettoken_calls == 1

            # One watcher: once the bucket was made again, ``load`` restarted the watch a
            # refused attempt had asked for, and the watch asked again left that one
            # running, never stopped, every change handled twice. (A watcher stopped
            # leaves its consumer until its inactive threshold: those still bound to a
            # subscriber are counted.)
            async def one_watching() -> bool:
                consumers = await js.consumers_info(stream)
                return sum(bool(c.push_bound) for c in consumers) == 1

            await until(one_watching, timeout=5, what="one watcher of the bucket")
        finally:
            instance.stop_event.set()
            await asyncio.wait_for(task, 20.0)


async def test_a_replica_stopping_answers_the_requests_already_routed_to_it(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    """nats.micro's stop() dropped them (nats-py discards an unsubscribed subscription's
    pending messages): on a rolling restart under load, each such caller waited its
    whole timeout. Drained, every request gets its answer."""
    async with (
        token_services(nats_server, sim, count=2) as (first, _other),
        connections(nats_server, 1) as (nc,),
    ):
        assert (await ask(nc)).ok
        body = msgspec.json.encode(TokenRequest(app=APP))
        answered = 0
        some_answered = asyncio.Event()

        async def one() -> bool:
            nonlocal answered
            try:
                reply = await nc.request(TOKEN_GET, body, timeout=5)
            except nats.errors.TimeoutError:
                return False
            answered += 1
            if answered == 20:
                some_answered.set()
            return msgspec.json.decode(reply.data, type=TokenReply).ok

        # Enough that `first` still holds some when it stops (all in this one loop).
        calls = [asyncio.create_task(one()) for _ in range(20_000)]
        await some_answered.wait()
        await first.stop()  # as SIGTERM would, with requests still routed to it
        results = await asyncio.gather(*calls)
        assert all(results), f"{results.count(False)} of 20,000 unanswered"


async def test_after_a_broker_restart_every_replica_follows_a_replaced_token(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    """Replicas answer from memory, kept current by a KV watcher, an ordered consumer
    that goes silent across a broker restart until nats-py's heartbeat check resets it
    (15-20 s). Meanwhile a replica kept answering a token another had replaced, even
    one WeCom had rejected: every send it served failed."""
    async with (
        token_services(nats_server, sim, count=2),
        connections(nats_server, 1) as [nc],
    ):
        client = TokenClient(nc, timeout=5)
        old = await eventually_token(client)
        nats_server.stop()
        nats_server.start()

        async def both_back() -> bool:
            try:
                return len(await requests_served(nc, 2)) == 2
            except (nats.errors.Error, TimeoutError):
                return False

        await until(both_back, timeout=30, what="both replicas answering again")
        new = await client.invalidate(APP, old)
        assert new != old

        async def all_fresh() -> bool:
            got = await asyncio.gather(*(client.get(APP) for _ in range(20)))
            return old not in got

        await until(all_fresh, timeout=8, what="every replica answering the new token")


async def test_refresh_ahead_happens_once_per_lifetime_without_blocking_callers(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    # A 4 s token with a 15 s margin is inside the margin from birth: the first get after
    # half its life (2 s) starts the refresh. Its gettoken is held inside WeCom, so every
    # caller answered meanwhile was answered without waiting for it.
    sim.expires_in = 4
    async with (
        token_services(nats_server, sim, count=2, TOKEN_REFRESH_MARGIN="15"),
        connections(nats_server, 3) as ncs,
    ):
        first = await ask(ncs[0])
        assert first.token is not None and first.expires_at is not None
        refresh = sim.hold_gettoken(limit=1)

        async def refresh_started() -> bool | None:
            reply = await ask(ncs[0])
            assert reply.token == first.token
            return True if refresh.held else None

        await eventually(refresh_started, timeout=10, what="the refresh held at WeCom")
        try:
            async with asyncio.timeout(5):  # a caller blocked on the refresh never returns
                during = await asyncio.gather(*(ask(ncs[i % 3]) for i in range(30)))
        except TimeoutError:
            raise AssertionError("a caller waited for the refresh's gettoken") from None
        assert {reply.token for reply in during} == {first.token}, "the still-valid token"
        # Held gettokens are counted when they finish: a second refresh would show here.
        assert sim.gettoken_calls == 1, "one refresh at a time, cluster-wide"
        refresh.release()

        lifetimes: dict[str, float] = {first.token: first.expires_at}

        async def three_tokens() -> bool | None:
            asked = time.time()
            reply = await ask(ncs[len(lifetimes) % 3])
            assert reply.ok and reply.token is not None and reply.expires_at is not None
            assert asked < reply.expires_at, "a caller got an expired token"
            lifetimes.setdefault(reply.token, reply.expires_at)
            return True if len(lifetimes) >= 3 else None

        await eventually(
            three_tokens, timeout=15.0, what=lambda: f"three tokens, have {len(lifetimes)}"
        )
        assert sim.gettoken_calls == 3, "one gettoken per lifetime, cluster-wide"


class ReissuingWeCom(LoopbackServer):
    """gettoken as WeCom's older doc told it (有效期内重复获取返回相同结果): while the
    token it issued lives, on the test's clock, it answers that token again with the life
    it has left; a new one after it expires."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.host, self.port = "127.0.0.1", 0
        self.clock = clock
        self.gettoken_calls = 0
        self.issued: tuple[str, float] | None = None  # the token and its expiry

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/cgi-bin/gettoken", self._gettoken)]

    async def _gettoken(self, request: web.Request) -> web.Response:
        self.gettoken_calls += 1
        now = self.clock()
        if self.issued is None or now >= self.issued[1]:
            self.issued = (secrets.token_urlsafe(24), now + 7200)
        token, expiry = self.issued
        left = round(expiry - now)
        return web.json_response(
            {"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": left}
        )


async def test_a_token_gettoken_answers_again_is_not_refreshed_ahead_over_and_over(
    nats_server: NatsHandle,
) -> None:
    """Each refresh ahead got the same token back with the life it had left, always in
    its second half: the next refresh came at half the time left, ten gettokens before
    each expiry. One refresh ahead tells: the token serves until it expires, and the
    gettoken then brings a new one. The clock is the test's, stepped a second at a time
    through the token's life, each refresh behind an answer awaited before the next."""
    now = [time.time()]

    def clock() -> float:
        return now[0]

    async with ReissuingWeCom(clock) as wecom, connections(nats_server, 1) as (nc,):
        settings = TokenSettings.from_env(
            {
                "NATS_URL": nats_server.url,
                "WECOM_CORP_ID": CORP_ID,
                "WECOM_AGENT_ID": str(AGENT_ID),
                "WECOM_SECRET": SECRET,
                "WECOM_API_BASE": f"http://127.0.0.1:{wecom.port}",
            }
        )
        store = KvTokenStore(await open_token_bucket(nc.jetstream(), replicas=1), APP)
        keeper, source = keeper_over(settings, store, clock)
        await store.watch(keeper.adopt)
        start = now[0]
        calls_at: dict[int, int] = {}  # seconds since the first fetch -> gettokens so far
        served: list[str] = []
        try:
            for second in range(7261):
                now[0] = start + second
                reply = await keeper.get(APP)
                assert reply.ok and reply.token and reply.expires_at is not None
                assert reply.expires_at > now[0], f"an expired token at {second} s"
                if reply.token not in served:
                    served.append(reply.token)
                await until(
                    lambda: not keeper._inflight, timeout=10, what="the refresh behind a get"
                )
                calls_at[second] = wecom.gettoken_calls
        finally:
            await keeper.close()
            await store.close()
            await source.aclose()
    assert calls_at[6899] == 1, "refreshed ahead before the margin"
    assert calls_at[7199] == 2, "one refresh ahead, which got the same token back"
    assert calls_at[7260] == 3, "one gettoken at its expiry"
    assert len(served) == 2


async def test_a_burst_of_invalidates_refreshes_once(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    async with (
        token_services(nats_server, sim, count=2),
        connections(nats_server, 3) as ncs,
    ):
        clients = [TokenClient(nc) for nc in ncs]
        old = await clients[0].get(APP)
        sim.expire_tokens()  # what made the senders see 42001
        fresh = await asyncio.gather(*(clients[i % 3].invalidate(APP, old) for i in range(50)))
        assert sim.gettoken_calls == 2
        assert len(set(fresh)) == 1 and fresh[0] != old
        new = fresh[0]

        # A late report of the old token, or of one never issued: no gettoken.
        assert await clients[1].invalidate(APP, old) == new
        assert await clients[2].invalidate(APP, "not-a-token-we-issued") == new
        assert sim.gettoken_calls == 2

        async def everyone_has_new() -> bool | None:
            got = await asyncio.gather(*(clients[i % 3].get(APP) for i in range(30)))
            return True if set(got) == {new} else None

        await eventually(everyone_has_new, timeout=10, what="every replica serving the new token")
        assert sim.gettoken_calls == 2


async def test_tokens_wecom_keeps_rejecting_are_refetched_with_backoff_not_per_report(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    """A WeCom that refuses every token its gettoken issues: each failed send reports its
    token, and without a limit each report would cost a gettoken. The first report of a
    token that served refetches at once; a replacement rejected in turn waits
    TOKEN_MIN_BACKOFF·2ⁿ⁻¹ after its fetch, answered as rate_limited with retry_after."""
    # Long enough for the 20 reports below to fit in it on a loaded machine.
    backoff = 5
    async with (
        token_services(
            nats_server, sim, count=2, TOKEN_MIN_BACKOFF=str(backoff), TOKEN_MAX_BACKOFF="60"
        ),
        connections(nats_server, 2) as ncs,
    ):
        clients = [TokenClient(nc) for nc in ncs]
        first = await clients[0].get(APP)
        second = await clients[1].invalidate(APP, first)  # served, then rejected: at once
        assert second != first and sim.gettoken_calls == 2

        for i in range(20):  # the replacement rejected too, by every sender, again and again
            with pytest.raises(TransientTokenError) as held:
                await clients[i % 2].invalidate(APP, second)
            assert held.value.kind == "rate_limited"
            assert held.value.retry_after is not None and 0 < held.value.retry_after <= backoff
        assert "2 access_tokens in a row" in str(held.value)
        assert sim.gettoken_calls == 2
        assert await clients[0].get(APP) == second  # nobody else is held back

        async def refetched() -> str | None:
            try:
                return await clients[1].invalidate(APP, second)
            except TransientTokenError:
                return None

        third = await eventually(
            refetched, timeout=2 * backoff + 5, what="a gettoken once the wait is over"
        )
        assert third not in (first, second) and sim.gettoken_calls == 3
        with pytest.raises(TransientTokenError) as held:
            await clients[0].invalidate(APP, third)  # the third in a row: twice the wait
        retry_after = held.value.retry_after
        assert retry_after is not None and backoff < retry_after <= 2 * backoff
        assert sim.gettoken_calls == 3


@pytest.mark.parametrize(
    ("errcode", "kind", "hints"),
    [
        (40001, "bad_secret", ["WECOM_SECRET is wrong", "Secret again"]),
        (40013, "bad_corp_id", ["WECOM_CORP_ID is wrong"]),
        (60020, "untrusted_ip", ["trusted IP", "企业可信IP", "not allow to access from your ip"]),
    ],
)
async def test_wecom_refusals_are_typed_and_recover(
    nats_server: NatsHandle, sim: SimulatedWeComApi, errcode: int, kind: str, hints: list[str]
) -> None:
    async with token_services(nats_server, sim), connections(nats_server, 1) as (nc,):
        client = TokenClient(nc)
        sim.fail_gettoken(errcode)
        with pytest.raises(TokenError) as info:
            await client.get(APP)
        assert info.value.kind == kind
        assert info.value.errcode == errcode
        for hint in hints:
            assert hint in str(info.value)
        assert sim.gettoken_calls == 1

        # The operator fixed it: after the backoff the next get succeeds.
        await eventually_token(client)
        assert sim.gettoken_calls == 2


async def test_a_wrong_new_secret_is_told_at_once_while_the_token_it_inherited_serves(
    nats_server: NatsHandle, sim: SimulatedWeComApi, capsys: pytest.CaptureFixture[str]
) -> None:
    """The token is kept per app, not per Secret: a WECOM_SECRET changed to a wrong one
    served the token the right one had bought until it expired (up to 2 h), then every
    send failed. Once that token is TOKEN_MAX_BACKOFF old (2 s here), a replica with other
    credentials fetches one of its own, ahead: the wrong Secret is said at once, and the
    valid token goes on serving meanwhile."""
    async with token_services(nats_server, sim), connections(nats_server, 1) as (nc,):
        bought = await ask(nc)
    assert bought.ok and sim.gettoken_calls == 1

    capsys.readouterr()
    async with (
        token_services(nats_server, sim, WECOM_SECRET="changed-to-a-wrong-one", LOG_FORMAT="json"),
        connections(nats_server, 1) as (nc,),
    ):

        async def wrong_secret_tried() -> bool | None:
            reply = await ask(nc)
            assert (reply.ok, reply.token) == (True, bought.token), reply
            return True if sim.gettoken_calls == 2 else None

        await eventually(wrong_secret_tried, timeout=10, what="a gettoken with the new Secret")
        reply = await ask(nc)  # the failure is recorded: still the valid token
        assert (reply.ok, reply.token) == (True, bought.token)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line[:1] == "{"]
    [failed] = [line for line in lines if line["event"] == "token.fetch_failed"]
    assert (failed["reason"], failed["kind"]) == ("credentials_changed", "bad_secret")


async def test_a_restart_calls_gettoken_again_at_once_after_a_refusal(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    """docs/deploy.md: after adding the egress IP to 企业可信IP, restart the token
    service to retry at once. The refusal's backoff was kept in the bucket, so the new
    pods answered 60020 without asking WeCom until it was over (up to
    TOKEN_MAX_BACKOFF), and the sender dead-lettered every reply meanwhile."""
    slow = {"TOKEN_MIN_BACKOFF": "120", "TOKEN_MAX_BACKOFF": "300"}
    sim.fail_gettoken(60020)
    async with token_services(nats_server, sim, **slow), connections(nats_server, 1) as (nc,):
        with pytest.raises(TokenError) as refused:
            await TokenClient(nc).get(APP)
        assert refused.value.kind == "untrusted_ip"
        with pytest.raises(TokenError):  # the backoff holds for the replica that failed
            await TokenClient(nc).get(APP)
    assert sim.gettoken_calls == 1

    # The operator adds the IP, then restarts the token service.
    async with token_services(nats_server, sim, **slow), connections(nats_server, 1) as (nc,):
        assert await TokenClient(nc).get(APP)
    assert sim.gettoken_calls == 2


async def test_a_pod_in_a_crash_loop_does_not_call_gettoken_at_every_start(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    """A refusal met by a replica that had just started (its start skipped the backoff)
    holds those started after it for a minute: a crash loop every few seconds is not a
    refused gettoken every few seconds (WeCom limits the callers of gettoken)."""
    slow = {"TOKEN_MIN_BACKOFF": "120", "TOKEN_MAX_BACKOFF": "300"}
    sim.fail_gettoken(60020, times=3)
    for _ in range(4):  # four starts in a row, each refused
        async with (
            token_services(nats_server, sim, **slow),
            connections(nats_server, 1) as (nc,),
        ):
            with pytest.raises(TokenError):
                await TokenClient(nc).get(APP)
    assert sim.gettoken_calls == 2, "the first start's, and the second's (it skipped)"


async def test_rate_limited_backs_off_cluster_wide_without_calling_wecom(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    async with (
        token_services(nats_server, sim, count=2, TOKEN_MIN_BACKOFF="1.5"),
        connections(nats_server, 2) as ncs,
    ):
        clients = [TokenClient(nc) for nc in ncs]
        sim.fail_gettoken(45009)
        with pytest.raises(TransientTokenError) as info:
            await clients[0].get(APP)
        assert info.value.kind == "rate_limited"
        assert info.value.retry_after is not None and 0 < info.value.retry_after <= 1.5

        # While backing off, every replica answers at once and nobody calls WeCom.
        results = await asyncio.gather(
            *(clients[i % 2].get(APP) for i in range(20)), return_exceptions=True
        )
        assert all(
            isinstance(r, TransientTokenError) and r.kind == "rate_limited" and r.retry_after
            for r in results
        ), results
        assert sim.gettoken_calls == 1

        await eventually_token(clients[1])
        assert sim.gettoken_calls == 2


async def test_wecom_down_is_a_network_error_and_recovers(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    async with token_services(nats_server, sim), connections(nats_server, 1) as (nc,):
        client = TokenClient(nc)
        sim.set_down(True)
        with pytest.raises(TransientTokenError) as info:
            await client.get(APP)
        assert info.value.kind == "network"
        assert info.value.retry_after is not None
        sim.set_down(False)
        await eventually_token(client)
        assert sim.gettoken_calls == 1


async def test_unknown_app_is_refused_without_calling_wecom(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    async with token_services(nats_server, sim), connections(nats_server, 1) as (nc,):
        client = TokenClient(nc)
        with pytest.raises(TokenError) as info:
            await client.get("wwother-1000003")
        assert info.value.kind == "unknown_app"
        with pytest.raises(TokenError) as info:
            await client.invalidate("wwother-1000003", "whatever-token")
        assert info.value.kind == "unknown_app"
        assert sim.gettoken_calls == 0


async def test_tokens_and_the_secret_never_reach_the_logs(
    nats_server: NatsHandle, sim: SimulatedWeComApi, capsys: pytest.CaptureFixture[str]
) -> None:
    issued: list[str] = []
    async with (
        token_services(nats_server, sim, LOG_LEVEL="debug", LOG_FORMAT="json"),
        connections(nats_server, 1) as (nc,),
    ):
        client = TokenClient(nc)
        issued.append(await client.get(APP))
        issued.append(await client.invalidate(APP, issued[0]))
        sim.fail_gettoken(60020)

        async def refused() -> bool | None:
            try:
                await client.invalidate(APP, issued[1])  # a replacement: held a moment
            except TransientTokenError:
                return None
            except TokenError:
                return True
            raise AssertionError("gettoken was to fail with 60020")

        await eventually(refused, timeout=10, what="the next gettoken refused")
    output = capsys.readouterr().err
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    events = [line["event"] for line in lines]
    assert "token.fetched" in events and "token.fetch_failed" in events
    assert all(len(line["fingerprint"]) == 8 for line in lines if line["event"] == "token.fetched")
    for secret in (*issued, SECRET):
        assert secret not in output
    # Every token a replica holds is hidden from any line, quoted bare as well (a
    # library's error, a front end's page), not only after access_token=.
    assert [redact(f"<{token}>") for token in issued] == [f"<{REDACTED}>"] * 2


async def test_a_crashed_holders_lock_is_taken_over_after_one_refresh(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    """A replica claimed the refresh and died: its lock stays in the bucket. It is taken
    over once a replica has seen it held for one refresh (TOKEN_HTTP_TIMEOUT + 2 s, 5 s
    here), timed on that replica's own clock, and never before."""
    fetched_at: list[float] = []  # when WeCom answered each gettoken
    sim.observe_calls(lambda call: fetched_at.append(time.monotonic()))
    async with token_services(nats_server, sim), connections(nats_server, 1) as (nc,):
        kv = await nc.jetstream().key_value(TOKEN_BUCKET)
        dead = Lock(holder="dead", deadline=time.time() + 1.0)
        await kv.create(f"{APP}.lock", msgspec.json.encode(dead))
        asked_at = time.monotonic()
        with capture_logs() as logs:  # the services have configured logging by now
            token = await TokenClient(nc).get(APP)
    assert token
    assert len(fetched_at) == sim.gettoken_calls == 1
    assert fetched_at[0] - asked_at >= 5.0, "the lock was taken over before one refresh"
    taken = [e["previous_holder"] for e in logs if e["event"] == "token.lock_taken_over"]
    assert taken == ["dead"]


@pytest.mark.parametrize("ahead_s", [3600.0, -3600.0], ids=["hour ahead", "hour behind"])
async def test_a_dead_holders_clock_does_not_decide_when_its_lock_is_taken_over(
    nats_server: NatsHandle, sim: SimulatedWeComApi, ahead_s: float
) -> None:
    """The deadline in a lock is the holder's wall clock. One that died with its clock
    an hour ahead left every replica waiting for that hour (each get answered
    "unavailable", no gettoken); one an hour behind, taken over at once, is a live
    holder's lock as a reader 20 s ahead saw it (next test)."""
    async with token_services(nats_server, sim), connections(nats_server, 1) as (nc,):
        kv = await nc.jetstream().key_value(TOKEN_BUCKET)
        dead = Lock(holder="dead", deadline=time.time() + ahead_s)
        await kv.create(f"{APP}.lock", msgspec.json.encode(dead))
        token = await TokenClient(nc).get(APP)
    assert token
    assert sim.gettoken_calls == 1


async def test_a_replica_whose_clock_runs_ahead_leaves_a_live_lock_alone(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    """Replica B's clock runs 20 s ahead of A's (more than one refresh, 12 s here): B
    found A's lock, just taken, past its deadline, took it over and called gettoken
    while A's call was still waiting for WeCom: two gettokens for one refresh."""

    class Watched(KvTokenStore):  # the store as it is, its claims kept for the test
        claims: list[Claim]

        async def claim(self, holder: str, now: float, hold_s: float) -> Claim:
            self.claims.append(claimed := await super().claim(holder, now, hold_s))
            return claimed

    settings = settings_for(nats_server, sim, TOKEN_HTTP_TIMEOUT="10")
    hold = sim.hold_gettoken(limit=1)
    async with connections(nats_server, 2) as (nc_a, nc_b):
        replicas = []
        for nc, skew in ((nc_a, 0.0), (nc_b, 20.0)):
            store = Watched(await open_token_bucket(nc.jetstream(), replicas=1), APP)
            store.claims = []

            def clock(skew: float = skew) -> float:
                return time.time() + skew

            keeper, source = keeper_over(settings, store, clock)
            await store.watch(keeper.adopt)
            replicas.append((keeper, store, source))
        (a, _, _), (b, b_store, _) = replicas
        try:
            first = asyncio.create_task(a.get(APP))
            await hold.wait_held()
            second = asyncio.create_task(b.get(APP))
            await until(lambda: b_store.claims != [], timeout=10, what="B's claim of the lock")
            hold.release()
            replies = await asyncio.gather(first, second)
        finally:
            for keeper, store, source in replicas:
                await keeper.close()
                await store.close()
                await source.aclose()
    assert [r.ok for r in replies] == [True, True]
    assert replies[0].token == replies[1].token
    assert b_store.claims[0].revision is None, "B took over A's live lock"
    assert sim.gettoken_calls == 1


async def test_a_bucket_deleted_while_running_is_made_again(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    """Deleted by hand, or its storage lost: every request that had to read it was
    answered "unavailable" until a restart. And a replica that had read the old bucket
    ignored the new one (its revisions start again lower): asked again about the token
    WeCom rejected, it answered that very token, until a restart."""
    async with (
        token_services(nats_server, sim, count=2),
        connections(nats_server, 1) as (nc,),
    ):
        client = TokenClient(nc)
        old = await client.get(APP)
        js = nc.jetstream()
        await js.delete_key_value(TOKEN_BUCKET)
        with capture_logs() as logs:
            new = await client.invalidate(APP, old)  # as after WeCom's 40014
        assert new != old
        assert "token.bucket_missing" in [e["event"] for e in logs]
        kv = await js.key_value(TOKEN_BUCKET)
        assert msgspec.json.decode((await kv.get(f"{APP}.token")).value, type=AppState).token
        # Senders still given the old token by the other replica (from its memory) have
        # it rejected and say so: both replicas answer the new one, from then on too.
        assert {await client.invalidate(APP, old) for _ in range(20)} == {new}
        assert {await client.get(APP) for _ in range(20)} == {new}
        assert sim.gettoken_calls == 2


async def test_a_token_fetched_when_it_cannot_be_stored_is_still_answered(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    """WeCom issued it, the bucket would not take it: it was thrown away, the caller told
    "unavailable", and the next caller cost another gettoken."""
    async with token_services(nats_server, sim), connections(nats_server, 1) as (nc,):
        held = sim.hold_gettoken(limit=1)
        asking = asyncio.create_task(TokenClient(nc).get(APP))
        await held.wait_held()
        await nc.jetstream().delete_key_value(TOKEN_BUCKET)  # the save will find no stream
        with capture_logs() as logs:
            held.release()
            token = await asking
        assert token and "token.save_failed" in [e["event"] for e in logs]
        assert await TokenClient(nc).get(APP) == token
        assert sim.gettoken_calls == 1


async def test_an_existing_bucket_is_brought_to_our_config_and_keeps_its_token(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    async with connections(nats_server, 1) as (nc,):
        js = nc.jetstream()
        # Left by an older release (or made by hand): more history, another description,
        # every write republished to a plain subject, reads served by any replica, and a
        # TTL (`nats kv add --ttl`) that dropped the token before it expired (one more
        # gettoken) and the refresh lock of a replica still calling gettoken (two).
        kv = await js.create_key_value(
            KeyValueConfig(
                bucket=TOKEN_BUCKET,
                history=5,
                description="made by hand",
                republish=RePublish(src=f"$KV.{TOKEN_BUCKET}.>", dest="leak.>"),
                direct=True,
                ttl=600,
            )
        )
        leaked: list[bytes] = []

        async def overheard(msg: Msg) -> None:
            leaked.append(msg.data)

        await nc.subscribe("leak.>", cb=overheard)
        async with token_services(nats_server, sim):
            token = await TokenClient(nc).get(APP)
        config = (await js.stream_info(f"KV_{TOKEN_BUCKET}")).config
        assert config.max_msgs_per_subject == 1
        assert config.description == token_bucket(replicas=1).description
        assert config.republish is None and not config.allow_direct
        assert not config.max_age, "the bucket still drops what it holds"
        await nc.flush()  # a republished write would have come before this round trip
        assert not [data for data in leaked if token.encode() in data], "the token republished"
        # Updated in place, not recreated: the token it stored is still there, and a
        # second start (same config) changes nothing and fetches nothing.
        kv = await js.key_value(TOKEN_BUCKET)  # no direct reads any more
        assert (await kv.get(f"{APP}.token")).value
        async with token_services(nats_server, sim):
            assert await TokenClient(nc).get(APP) == token
        assert sim.gettoken_calls == 1


async def test_an_undecodable_token_value_is_replaced_by_a_fresh_token(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    async with connections(nats_server, 1) as (nc,):
        js = nc.jetstream()
        kv = await js.create_key_value(token_bucket(replicas=1))
        await kv.put(f"{APP}.token", b"not json at all")  # e.g. `nats kv put` by hand
        async with token_services(nats_server, sim):
            token = await TokenClient(nc).get(APP)
        assert token and sim.gettoken_calls == 1
        stored = msgspec.json.decode((await kv.get(f"{APP}.token")).value or b"", type=AppState)
        assert stored.token is not None and stored.token.value == token


async def test_a_newer_builds_failure_of_a_kind_unknown_here_keeps_its_token(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    """A newer build's replica records a failed refresh ahead under a kind this build does
    not know (its ErrorKind grew), beside the token still valid, during a rolling upgrade
    or before a rollback. Read as nothing, the valid token was dropped: an older replica
    called gettoken, and one that failed wrote its failure over the token for every
    replica, so sends failed while a valid token had been in the bucket."""
    now = time.time()
    state = {
        "token": {"value": "valid-token", "fetched_at": now - 60, "expires_at": now + 3600},
        "failure": {
            "failure": {"kind": "a_kind_of_a_newer_build", "message": "its words", "errcode": 1},
            "attempts": 1,
            "retry_at": now + 30,
            "failed_at": now - 1,
        },
    }
    async with connections(nats_server, 1) as (nc,):
        kv = await nc.jetstream().create_key_value(token_bucket(replicas=1))
        await kv.put(f"{APP}.token", json.dumps(state).encode())
        sim.set_down(True)  # a gettoken would fail, as the newer build's did
        async with token_services(nats_server, sim):
            assert await TokenClient(nc).get(APP) == "valid-token"
        assert sim.gettoken_calls == 0
        kept = msgspec.json.decode((await kv.get(f"{APP}.token")).value or b"", type=dict)
        assert kept["token"]["value"] == "valid-token"
        # Its backoff holds here too: the failure is read as this build reads an errcode
        # it does not know.
        store = KvTokenStore(kv, APP)
        failure = (await store.load()).state.failure  # type: ignore[union-attr]
        assert failure is not None and failure.retry_at == now + 30
        assert (failure.failure.kind, failure.failure.message) == ("wecom_error", "its words")


async def test_an_undecodable_lock_is_taken_over_at_once(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    async with connections(nats_server, 1) as (nc,):
        kv = await nc.jetstream().create_key_value(token_bucket(replicas=1))
        await kv.create(f"{APP}.lock", b"\x00garbage")
        async with token_services(nats_server, sim):
            # No deadline can be read from it, so nobody is waited for.
            token = await asyncio.wait_for(TokenClient(nc).get(APP), 5.0)
        assert token and sim.gettoken_calls == 1
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get(f"{APP}.lock")  # released after the refresh


async def test_a_malformed_request_gets_a_400_and_the_service_goes_on(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    async with token_services(nats_server, sim), connections(nats_server, 1) as (nc,):
        cases = [
            (TOKEN_GET, b"{not json", "not a TokenRequest"),
            (TOKEN_GET, b'{"token": "x"}', "not a TokenRequest"),  # no app
            (TOKEN_INVALIDATE, msgspec.json.encode(TokenRequest(app=APP)), "needs the token"),
            # nested past msgspec's depth (RecursionError: answered 500, not counted)
            (
                TOKEN_GET,
                b'{"app":"x","junk":' + b"[" * 2000 + b"]" * 2000 + b"}",
                "recursion depth",
            ),
            (TOKEN_GET, b'{"app":"' + b"x" * 5000 + b'"}', "over 4096 bytes"),
        ]
        before = {e: _bad_requests(e) for e in ("get", "invalidate")}
        for subject, data, reason in cases:
            msg = await nc.request(subject, data, timeout=5)
            assert msg.headers is not None
            assert msg.headers.get("Nats-Service-Error-Code") == "400", subject
            assert reason in msg.headers.get("Nats-Service-Error", "")
        # Published with no reply subject (`nats pub`): nobody to answer; respond() raised
        # and the error reached the logs as a crash. Handled in order on its subject, so
        # the answer to the request after it says it was seen.
        with capture_logs() as logs:
            await nc.publish(TOKEN_GET, msgspec.json.encode(TokenRequest(app=APP)))
            assert await TokenClient(nc).get(APP)
        assert [e["event"] for e in logs if e["log_level"] in ("warning", "error")] == []
        assert [
            e["endpoint"] for e in logs if e["event"] == "token.request_without_reply_subject"
        ] == ["get"]
        # Counted where Prometheus sees them (this process runs the service).
        assert _bad_requests("get") - before["get"] == 5
        assert _bad_requests("invalidate") - before["invalidate"] == 1
        assert sim.gettoken_calls == 1


def _bad_requests(endpoint: str) -> float:
    labels = {"endpoint": endpoint, "result": "bad_request"}
    return REGISTRY.get_sample_value("wecombot_token_requests_total", labels) or 0.0


async def test_a_stopping_instance_answers_the_callers_waiting_for_its_refresh(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    # The first gettoken is held inside WeCom, so the caller waits on the refresh. The
    # instance is told to stop; only once it has stopped taking requests and begun its
    # grace does WeCom answer: the caller still gets the token.
    held = sim.hold_gettoken(limit=1)
    instance = Instance(settings_for(nats_server, sim))
    await instance.start()
    async with connections(nats_server, 1) as (nc,):
        with capture_logs() as logs:
            try:
                caller = asyncio.create_task(ask(nc))
                await held.wait_held()
                instance.stop_event.set()
                await until(
                    lambda: any(e["event"] == "token.stop_grace" for e in logs),
                    timeout=10,
                    what="the stopping instance's grace",
                )
                held.release()
                reply = await asyncio.wait_for(caller, 10)
                assert reply.ok and reply.token is not None
            finally:
                held.release()
                await instance.stop()
    [grace] = [e for e in logs if e["event"] == "token.stop_grace"]
    assert grace["waiting"] == 1
    assert not [e for e in logs if e["event"] == "token.stop_unanswered"]
    assert sim.gettoken_calls == 1


async def test_a_token_reported_rejected_during_a_backoff_is_no_longer_served(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    """A refresh ahead failed (WeCom busy): no gettoken until its backoff ends. WeCom
    then refuses the token early (40014): the sender's invalidate was answered with the
    failure, but every get kept handing the refused token out, and every send failed."""
    now = time.time()
    refused = IssuedToken(value="refused-by-wecom-Hq2", fetched_at=now - 60, expires_at=now + 7000)
    busy = LastFailure(
        failure=Failure(kind="network", message="WeCom is busy (WeCom errcode -1)", errcode=-1),
        attempts=1,
        retry_at=now + 120,
        failed_at=now - 1,
    )
    async with connections(nats_server, 1) as (nc,):
        kv = await nc.jetstream().create_key_value(token_bucket(replicas=1))
        await kv.put(f"{APP}.token", msgspec.json.encode(AppState(token=refused, failure=busy)))
        async with token_services(nats_server, sim):
            client = TokenClient(nc)
            assert await client.get(APP) == refused.value  # served while the backoff holds
            with pytest.raises(TransientTokenError) as reported:
                await client.invalidate(APP, refused.value)
            with pytest.raises(TransientTokenError) as asked:
                await client.get(APP)
        stored = msgspec.json.decode((await kv.get(f"{APP}.token")).value or b"", type=AppState)
    assert (reported.value.kind, asked.value.kind) == ("network", "network")
    assert asked.value.retry_after is not None and asked.value.retry_after > 60
    assert stored == AppState(failure=busy)
    assert sim.gettoken_calls == 0


async def test_a_bucket_failing_fast_costs_one_refresh_attempt_not_one_a_get(
    nats_server: NatsHandle, sim: SimulatedWeComApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token is in its refresh margin, so each get starts a refresh behind its
    answer; the bucket refuses at once (as a JetStream leader election answers). Each
    get started one more: a KV request and a `token.refresh_aborted` warning per get,
    at the rate of sends."""

    class FailingFast(KvTokenStore):  # the real store, made to refuse on demand
        failing = False
        loads = 0

        async def load(self) -> Snapshot:
            if self.failing:
                self.loads += 1
                raise StoreUnavailable("no leader (as a JetStream election answers)")
            return await super().load()

    monkeypatch.setattr(keeper_module, "_PAUSE_AFTER_ABORT_S", 3600.0)  # not timed here
    settings = settings_for(nats_server, sim)
    now = time.time()
    due = IssuedToken(value="due-for-refresh-Kq7", fetched_at=now - 7000, expires_at=now + 100)
    async with connections(nats_server, 1) as (nc,):
        kv = await open_token_bucket(nc.jetstream(), replicas=1)
        await kv.put(f"{APP}.token", msgspec.json.encode(AppState(token=due)))
        store = FailingFast(kv, APP)
        keeper, source = keeper_over(settings, store)
        keeper.adopt(await store.load())
        store.failing = True
        try:
            with capture_logs() as logs:
                assert (await keeper.get(APP)).token == due.value

                def aborted() -> list[dict[str, object]]:
                    return [e for e in logs if e["event"] == "token.refresh_aborted"]

                await until(lambda: aborted() != [], timeout=10, what="the refresh aborted")
                for _ in range(49):  # within the pause after it (an hour here)
                    assert (await keeper.get(APP)).token == due.value
                    await asyncio.sleep(0)  # a refresh started behind it would run now
        finally:
            await keeper.close()
            await store.close()
            await source.aclose()
    assert store.loads == len(aborted()) == 1
    assert sim.gettoken_calls == 0


@pytest.mark.parametrize("removal", ["delete", "purge"])
async def test_a_token_removed_by_hand_is_fetched_again(
    nats_server: NatsHandle, sim: SimulatedWeComApi, removal: str
) -> None:
    """`nats kv del` or `nats kv purge` of the token's key (to make the replicas fetch a
    new one) left a marker whose read raised AttributeError in every request: no token,
    for any sender, until the key was written by hand."""
    async with connections(nats_server, 1) as (nc,), token_services(nats_server, sim):
        client = TokenClient(nc)
        first = await client.get(APP)
        kv = await nc.jetstream().key_value(token_bucket(replicas=1).bucket)
        await getattr(kv, removal)(f"{APP}.token")
        fetched = sim.gettoken_calls

        async def fetched_again() -> bool:
            with contextlib.suppress(TransientTokenError):  # until it has a new one
                await client.invalidate(APP, first)
            return sim.gettoken_calls > fetched

        await eventually(fetched_again, timeout=10, what="a new gettoken")
        assert await client.get(APP)


async def test_a_token_the_bucket_would_not_take_is_kept_over_the_one_it_replaced(
    nats_server: NatsHandle, sim: SimulatedWeComApi
) -> None:
    """A sender reported the token rejected; the replacement WeCom issued could not be
    written (the connection to NATS dropped, a leader election): the replica answered it
    all the same (token.save_failed). But its next read of the bucket, unchanged since (the
    resync after the reconnection, another caller's request), put the rejected token back
    in its memory: served again to every get, and replaced by one more gettoken."""

    class RefusingSaves(KvTokenStore):  # the real store, made to refuse writes on demand
        refusing = False

        async def save(self, state: AppState, last: int) -> int | None:
            if self.refusing:
                raise StoreUnavailable("token bucket unavailable: ConnectionClosedError")
            return await super().save(state, last)

    settings = settings_for(nats_server, sim)
    now = time.time()
    rejected = IssuedToken(
        value="rejected-by-wecom-Zt4", fetched_at=now - 600, expires_at=now + 6600
    )
    async with connections(nats_server, 1) as (nc,):
        kv = await open_token_bucket(nc.jetstream(), replicas=1)
        await kv.put(f"{APP}.token", msgspec.json.encode(AppState(token=rejected)))
        store = RefusingSaves(kv, APP)
        keeper, source = keeper_over(settings, store)
        await store.watch(keeper.adopt)
        try:
            store.refusing = True
            with capture_logs() as logs:
                new = (await keeper.invalidate(APP, rejected.value)).token
            assert new is not None and new != rejected.value
            assert "token.save_failed" in [e["event"] for e in logs]
            store.refusing = False
            await keeper.resync()  # as after NATS reconnected
            assert (await keeper.get(APP)).token == new, "the rejected token served again"
            # A sender another replica had given the rejected token reports it too.
            assert (await keeper.invalidate(APP, rejected.value)).token == new
            assert (await keeper.get(APP)).token == new
        finally:
            await keeper.close()
            await store.close()
            await source.aclose()
        stored = msgspec.json.decode((await kv.get(f"{APP}.token")).value or b"", type=AppState)
    assert stored.token is not None and stored.token.value == new, "written once it could be"
    assert sim.gettoken_calls == 1
