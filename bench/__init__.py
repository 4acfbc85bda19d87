"""wecombot's benchmark suite (``make bench``, ``make bench-quick``); not tests.

Everything runs as real processes on loopback, as in production: nats-server, the
services (``python -m wecombot <service>``), a fake WeCom API and a fake model
(``bench.fakes``), a bare aiohttp handler to compare the gateway with (``bench.bare``),
and a load generator that plays WeCom: signed, encrypted callbacks over HTTP, built
before the timed window (``bench.loadgen``). ``bench.run`` orchestrates the scenarios
and writes the table to docs/benchmarks.md.
"""
