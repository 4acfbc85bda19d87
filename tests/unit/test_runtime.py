"""Stopping work that may not stop when told once."""

from __future__ import annotations

import asyncio
import contextlib
import gc

import pytest
from structlog.testing import capture_logs

from wecombot_common.runtime import cancel_until_done, retried_until_stopped, unless_stopped


async def _stubborn(cancels_swallowed: int, arrived: asyncio.Event) -> str:
    """Work that goes on after a cancellation, as a task inside Python 3.11's
    ``asyncio.wait_for`` does when the cancellation meets what it waits for completing
    (bpo-42130): nats-py's first connection to a broker that is not there, say."""
    arrived.set()
    for _ in range(cancels_swallowed):
        with contextlib.suppress(asyncio.CancelledError):  # swallowed
            await asyncio.Event().wait()  # forever, unless cancelled
    await asyncio.Event().wait()
    return "never"


async def test_work_that_swallows_a_cancellation_still_stops_when_stop_is_set() -> None:
    """One cancel and an await: the service (wecombot setup, waiting for NATS) never
    exited on SIGTERM."""
    stop, arrived = asyncio.Event(), asyncio.Event()
    waiting = asyncio.create_task(unless_stopped(_stubborn(2, arrived), stop))
    await arrived.wait()
    stop.set()
    async with asyncio.timeout(10):
        assert await waiting is None


async def test_cancel_until_done_ends_every_task_and_leaves_their_outcomes() -> None:
    arrived = [asyncio.Event() for _ in range(3)]
    stubborn = [
        asyncio.create_task(_stubborn(n, e)) for n, e in zip((0, 1, 3), arrived, strict=True)
    ]

    async def failing() -> None:
        raise ValueError("its own error")

    failed = asyncio.create_task(failing())
    finished = asyncio.create_task(asyncio.sleep(0, result="done"))
    for event in arrived:
        await event.wait()
    await asyncio.wait({failed, finished})
    async with asyncio.timeout(10):
        await cancel_until_done(*stubborn, failed, finished, every_s=0.01)
    assert all(task.cancelled() for task in stubborn)
    assert isinstance(failed.exception(), ValueError) and finished.result() == "done"


async def test_a_cancelled_caller_leaves_no_task_running_nor_an_unread_error() -> None:
    """Whoever waits in cancel_until_done may be cancelled itself (its own stop): the
    tasks are cancelled once more, and what they end with is read when they end."""
    unread: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unread.append(context))
    arrived, swallowed, raised = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def raises_when_cancelled() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            arrived.set()
            await asyncio.Event().wait()
        swallowed.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raised.set()
            raise ValueError("its own error, on the way out") from None

    try:
        task = asyncio.create_task(raises_when_cancelled())
        await arrived.wait()
        caller = asyncio.create_task(cancel_until_done(task, every_s=3600))
        await swallowed.wait()  # the caller cancelled it once, and it went on
        caller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        async with asyncio.timeout(10):
            await raised.wait()
            await asyncio.wait({task})
        del task  # its error unread by this test: only cancel_until_done may read it
        gc.collect()
        assert unread == []
    finally:
        loop.set_exception_handler(None)


async def test_retried_until_stopped_backs_off_and_says_why_until_it_succeeds() -> None:
    tries: list[float] = []
    loop = asyncio.get_running_loop()

    async def attempt() -> None:
        tries.append(loop.time())
        if len(tries) < 4:
            raise TimeoutError("no answer yet")

    with capture_logs() as logs:
        done = await retried_until_stopped(
            attempt,
            asyncio.Event(),
            retry_on=(TimeoutError,),
            event="x.not_ready",
            first_retry_s=0.01,
            max_retry_s=0.02,
            consumer="llm",
        )
    assert done is True and len(tries) == 4
    said = [e for e in logs if e["event"] == "x.not_ready"]
    assert [e["retry_in_s"] for e in said] == [0.01, 0.02, 0.02]  # doubled, then capped
    assert said[0]["error"] == "TimeoutError: no answer yet" and said[0]["consumer"] == "llm"
    assert said[0]["log_level"] == "warning"


async def test_retried_until_stopped_ends_false_when_stopped_while_waiting() -> None:
    """A service waiting for its broker at start still stops at once on SIGTERM."""
    stop = asyncio.Event()
    tries = 0

    async def attempt() -> None:
        nonlocal tries
        tries += 1
        stop.set()  # the SIGTERM comes during the first wait
        raise TimeoutError

    async with asyncio.timeout(10):  # the wait is an hour: only the stop ends it
        done = await retried_until_stopped(
            attempt, stop, retry_on=(TimeoutError,), event="x", first_retry_s=3600
        )
    assert done is False and tries == 1


async def test_retried_until_stopped_raises_what_no_retry_fixes() -> None:
    async def attempt() -> None:
        raise PermissionError("refused")

    with pytest.raises(PermissionError):
        async with asyncio.timeout(10):  # retried instead, it would never end
            await retried_until_stopped(
                attempt, asyncio.Event(), retry_on=(TimeoutError,), event="x"
            )
