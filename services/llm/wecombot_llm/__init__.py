"""wecombot llm: received messages → one outcome each (answer, notice, reset or apology).

Pure logic: ``conversation`` (the fold and what to do next), ``gate`` (allowlist and
per-user flood control), ``decide``, ``commands``, ``prompt``, ``retry``. Adapters:
``store`` (the JetStream log), ``model`` (OpenAI-compatible HTTP, offline echo).
``handler`` runs the per-message algorithm; ``main`` wires it all.
"""
