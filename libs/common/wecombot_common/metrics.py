"""Prometheus metrics of every service, served as ``GET /metrics`` beside ``/healthz``.

One registry per process (prometheus_client's default, which also carries the process's
CPU, memory and open files). Every service's metrics are defined here, so names and
labels are one list (docs/deploy.md, Metrics); a process only ever moves its own. Label values
are closed sets (outcomes, error class names), or bounded (WeCom's errcodes, by
:class:`BoundedLabel`), never user ids, message text or anything secret::

    GATEWAY_CALLBACKS.labels(result="stored").inc()

The scrape is the same route on each service's health port (the gateway's: its own port,
which the Ingress does not route: it forwards only the callback path).
"""

from __future__ import annotations

from typing import Protocol

from aiohttp import hdrs, web
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

__all__ = [
    "CACHE_BYTES",
    "CACHE_CONVERSATIONS",
    "CONSUMER_ACK_PENDING",
    "CONSUMER_OLDEST_SECONDS",
    "CONSUMER_PENDING",
    "GATEWAY_CALLBACKS",
    "GATEWAY_REFUSALS",
    "LLM_MODEL_SECONDS",
    "LLM_OUTCOMES",
    "OTHER",
    "SENDER_PARTS",
    "SENDER_REPLIES",
    "SENDER_WECOM_ERRORS",
    "TOKEN_FETCHES",
    "TOKEN_REQUESTS",
    "WORKER_HANDLER_SECONDS",
    "WORKER_IN_FLIGHT",
    "WORKER_SETTLED",
    "WORKER_WAITING",
    "BoundedLabel",
    "metrics_route",
    "watch_cache",
]

OTHER = "other"


class BoundedLabel:
    """The values of a label that come from outside (WeCom's errcodes): each gets its own
    series up to ``limit`` distinct values in this process, any later one is ``other``,
    so that answers making codes up (a front end, a proxy, a faulty build of WeCom's)
    cannot grow every scrape and Prometheus's memory without bound. Values in ``known``
    (the documented ones) always keep their own and do not count::

        >>> label = BoundedLabel(limit=1, known=frozenset({81013}))
        >>> [label(code) for code in (123, 456, 81013, 123)]
        ['123', 'other', '81013', '123']
    """

    def __init__(self, *, limit: int, known: frozenset[int] = frozenset()) -> None:
        self._limit = limit
        self._known = known
        self._seen: set[int] = set()

    def __call__(self, value: int) -> str:
        if value in self._known or value in self._seen:
            return str(value)
        if len(self._seen) < self._limit:
            self._seen.add(value)
            return str(value)
        return OTHER


# ---------------------------------------------------------------- gateway

GATEWAY_CALLBACKS = Counter(
    "wecombot_gateway_callbacks",
    "Callbacks answered, by result: stored (200, appended), duplicate (200, already "
    "stored), ignored (200, an event with no sender: 微信客服's), refused (4xx or 503, see "
    "wecombot_gateway_refusals_total), failed (500), url_verified (GET, the echostr "
    "answered)",
    ["result"],
)
GATEWAY_REFUSALS = Counter(
    "wecombot_gateway_refusals",
    "Callbacks refused, by HTTP status and reason (the error class, as in the "
    "callback.rejected log line)",
    ["status", "reason"],
)

# ---------------------------------------------------------------- workers (llm, sender)

WORKER_SETTLED = Counter(
    "wecombot_worker_settled",
    "JetStream deliveries settled, by consumer and how: acked, retried (nak with "
    "backoff), dead_lettered, handed_back (nak at once: stopping, or a delivery the "
    "broker made late, after the fetch that asked for it), left (not naked: the broker "
    "had no heartbeat of ours for 2/3 of ack_wait and has likely given it to another "
    "replica; its ack_wait passes it on)",
    ["consumer", "result"],
)
WORKER_IN_FLIGHT = Gauge(
    "wecombot_worker_in_flight",
    "Deliveries in the process now, by consumer: working (at most its "
    "*_MAX_CONCURRENCY) or waiting without a slot (wecombot_worker_waiting)",
    ["consumer"],
)
WORKER_WAITING = Gauge(
    "wecombot_worker_waiting",
    "Deliveries that gave up their slot to wait (for an earlier message of their "
    "conversation, for WeCom's pacing, for a token service), by consumer: in_flight - "
    "waiting are working",
    ["consumer"],
)
CONSUMER_PENDING = Gauge(
    "wecombot_consumer_pending",
    "Messages of the consumer's subjects not delivered yet (its backlog), as the broker "
    "counts them, read every 15 s by each replica (the same figure on each: take max)",
    ["consumer"],
)
CONSUMER_ACK_PENDING = Gauge(
    "wecombot_consumer_ack_pending",
    "Messages delivered and not yet settled (acked, dead-lettered), read as "
    "wecombot_consumer_pending is",
    ["consumer"],
)
CONSUMER_OLDEST_SECONDS = Gauge(
    "wecombot_consumer_oldest_unsettled_seconds",
    "Age of the oldest message the consumer has not settled, delivered or not (0 when "
    "none): how far behind the pipeline is, read as wecombot_consumer_pending is",
    ["consumer"],
)
WORKER_HANDLER_SECONDS = Histogram(
    "wecombot_worker_handler_seconds",
    "Time a handler took over one delivery, from its turn (after earlier messages of the "
    "same conversation) to its outcome, by consumer: model and WeCom calls included",
    ["consumer"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)

CACHE_BYTES = Gauge(
    "wecombot_cache_bytes",
    "Bytes of conversations a replica keeps in memory between messages, as its cache "
    "counts them (at most LLM_CACHE_MB or SENDER_CACHE_MB, but for those in use), by "
    "service: llm, sender",
    ["service"],
)
CACHE_CONVERSATIONS = Gauge(
    "wecombot_cache_conversations",
    "Conversations a replica keeps in memory between messages, by service: llm, sender",
    ["service"],
)


class _Cache(Protocol):
    bytes: int

    def __len__(self) -> int: ...


def watch_cache(service: str, cache: _Cache) -> None:
    """Report ``cache``'s size as wecombot_cache_bytes and _conversations, read at each
    scrape."""
    CACHE_BYTES.labels(service).set_function(lambda: cache.bytes)
    CACHE_CONVERSATIONS.labels(service).set_function(lambda: len(cache))


# ---------------------------------------------------------------- llm

LLM_OUTCOMES = Counter(
    "wecombot_llm_outcomes",
    "Outcomes appended (duplicates of a stored one not counted), by event type: "
    "ReplyGenerated, ReplyFailed (the model failed: the apology), ConversationReset",
    ["outcome"],
)
LLM_MODEL_SECONDS = Histogram(
    "wecombot_llm_model_seconds",
    "Model calls, retries included, by result: answered or failed",
    ["result"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120),
)

# ---------------------------------------------------------------- sender

SENDER_PARTS = Counter(
    "wecombot_sender_parts",
    "Reply parts accepted by WeCom message/send, by result: sent, deduplicated (WeCom's "
    "duplicate check dropped a resend)",
    ["result"],
)
SENDER_REPLIES = Counter(
    "wecombot_sender_replies",
    "Replies closed, by result: delivered (every part), failed (DeliveryFailed, dead-lettered)",
    ["result"],
)
SENDER_WECOM_ERRORS = Counter(
    "wecombot_sender_wecom_errors",
    "message/send calls that did not deliver, by WeCom errcode (-1: WeCom busy, or no "
    "usable answer: a timeout, a connection error, an HTTP error; other: an undocumented "
    "code past the first 32 such in this process)",
    ["errcode"],
)

# ---------------------------------------------------------------- token

TOKEN_FETCHES = Counter(
    "wecombot_token_fetches",
    "gettoken calls made by this replica, by result: ok, or the failure kind (as in the "
    "token.fetch_failed log line)",
    ["result"],
)
TOKEN_REQUESTS = Counter(
    "wecombot_token_requests",
    "Token requests answered over NATS, by endpoint (get, invalidate) and result: ok, "
    "the error kind the caller is told, bad_request (a malformed request: answered 400) "
    "or crashed (a bug: answered 500)",
    ["endpoint", "result"],
)


def metrics_route(registry: CollectorRegistry = REGISTRY) -> web.RouteDef:
    """``GET /metrics`` in Prometheus' text format."""

    async def scrape(request: web.Request) -> web.Response:
        # The format the scraper asks for (Prometheus 2 and 3, OpenMetrics), else 0.0.4.
        encode, content_type = choose_encoder(request.headers.get(hdrs.ACCEPT, ""))
        return web.Response(body=encode(registry), headers={hdrs.CONTENT_TYPE: content_type})

    return web.get("/metrics", scrape)
