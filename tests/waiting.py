"""Waiting for a condition under a deadline: the suite's one polling helper.

A test never sleeps to let something happen; it names what it waits for and how long
that may take, and the wait fails (AssertionError naming it) when the deadline passes.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

__all__ = ["until"]


async def until(
    check: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.05,
) -> None:
    """Poll ``check`` (sync or async) until it holds; AssertionError naming ``what`` at
    the deadline (a callable ``what`` is asked then, so it can tell what was missing).
    An exception ``check`` raises ends the wait at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            wanted = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g}s waiting for {wanted}")
        await asyncio.sleep(interval)
