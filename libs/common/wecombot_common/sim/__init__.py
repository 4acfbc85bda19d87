"""Small real servers that play external SaaS on loopback: WeCom's API and an
OpenAI-compatible model. Used by the tests, the benchmarks and the sandbox (``wecombot
dev`` without WeCom settings) — never by production paths that talk to the real thing."""
