"""The ack floor the llm and the sender wait on: read at most every refresh_s (callers
meanwhile wait for a read on its way); a failed read keeps it, a lower answer lowers it
(the consumer or its stream was made again)."""

from __future__ import annotations

import asyncio

from wecombot_common.bus import SettledFloor


async def test_the_floor_is_read_at_most_every_refresh_s_and_a_failed_read_keeps_it() -> None:
    answers: list[int | None] = [5, None, 9]  # None: consumer_info failed
    reads: list[float] = []
    now = [100.0]

    async def read() -> int | None:
        reads.append(now[0])
        return answers.pop(0)

    floor = SettledFloor(read, refresh_s=1.0, clock=lambda: now[0])
    assert floor.through == 0  # nothing read yet
    assert await floor.refresh() == 5
    now[0] = 100.5
    assert await floor.refresh() == 5  # within refresh_s: not read again
    now[0] = 101.0
    assert await floor.refresh() == 5  # read, unknown: the floor stays
    now[0] = 102.5
    assert await floor.refresh() == 9
    assert floor.through == 9
    assert reads == [100.0, 101.0, 102.5]


async def test_a_consumer_made_again_lowers_the_floor() -> None:
    """Kept at the old floor, every later message of a recreated stream (its sequences
    start over) would skip its wait for an earlier one until a restart."""
    answers = [900, 0, 3]
    now = [0.0]

    async def read() -> int | None:
        return answers.pop(0)

    floor = SettledFloor(read, refresh_s=1.0, clock=lambda: now[0])
    assert await floor.refresh() == 900
    now[0] = 1.0
    assert await floor.refresh() == 0
    now[0] = 2.0
    assert await floor.refresh() == 3


async def test_callers_while_a_read_is_on_its_way_wait_for_its_answer() -> None:
    """They took the floor from before it: after the consumer was made again, every
    delivery but the first of a backlog fetched together skipped its order wait."""
    asked, release = asyncio.Event(), asyncio.Event()
    reads = 0
    now = [0.0]

    async def read() -> int | None:
        nonlocal reads
        reads += 1
        asked.set()
        await release.wait()
        return 3

    floor = SettledFloor(read, refresh_s=1.0, clock=lambda: now[0])
    floor.through = 900  # learned before the consumer was made again
    first = asyncio.create_task(floor.refresh())
    await asked.wait()
    second = asyncio.create_task(floor.refresh())  # within refresh_s, the read on its way
    await asyncio.sleep(0)
    assert not second.done()
    release.set()
    assert (await first, await second, reads) == (3, 3, 1)
