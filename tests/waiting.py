"""Waiting for a condition under a deadline: the suite's polling helpers.

A test never sleeps to let something happen; it names what it waits for and how long
that may take, and the wait fails (AssertionError naming it) when the deadline passes.
``until`` waits for a condition; ``eventually`` waits for a value and returns it;
``until_sync`` is ``until`` for tests and fixtures without an event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["eventually", "until", "until_sync"]

T = TypeVar("T")


async def eventually(
    get: Callable[[], Awaitable[T | None]],
    *,
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.05,
) -> T:
    """Poll ``get`` until it returns something other than None, and return that;
    AssertionError naming ``what`` at the deadline (a callable ``what`` is asked then,
    so it can tell what was missing). An exception ``get`` raises ends the wait at once."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await get()
        if value is not None:
            return value
        if loop.time() > deadline:
            wanted = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g}s waiting for {wanted}")
        await asyncio.sleep(interval)


async def until(
    check: Callable[[], bool | Awaitable[bool]],
    *,
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.05,
) -> None:
    """Poll ``check`` (sync or async) until it holds; as :func:`eventually` otherwise."""

    async def holds() -> bool | None:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        return True if result else None

    await eventually(holds, timeout=timeout, what=what, interval=interval)


def until_sync(
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str | Callable[[], str],
    interval: float = 0.05,
) -> None:
    """:func:`until` for synchronous code (it blocks the thread while it polls)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            wanted = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g}s waiting for {wanted}")
        time.sleep(interval)
