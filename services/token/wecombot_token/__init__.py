"""wecombot's token service: the only owner of WeCom access_tokens.

Modules, from pure to wired:

- ``domain``: freshness, error kinds, backoff, the lock's staleness (no I/O);
- ``source``: the gettoken HTTP call (httpx), failures as values;
- ``store``: the shared state and the refresh lock in the JetStream KV bucket;
- ``keeper``: answer from memory, refresh once cluster-wide;
- ``endpoints``: the nats.micro service (``get``, ``invalidate``);
- ``settings`` and ``main``: configuration and wiring (``wecombot token``).
"""
