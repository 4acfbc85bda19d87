"""The ack floor the llm and the sender wait on: read at most every refresh_s; a failed
read keeps it, a lower answer lowers it (the consumer or its stream was made again)."""

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


async def test_a_slow_read_overtaken_by_a_later_one_does_not_undo_it() -> None:
    first_asked, release_first = asyncio.Event(), asyncio.Event()
    answers = iter([7, 12])
    now = [0.0]

    async def read() -> int | None:
        value = next(answers)
        if value == 7:  # the first read hangs past refresh_s
            first_asked.set()
            await release_first.wait()
        return value

    floor = SettledFloor(read, refresh_s=1.0, clock=lambda: now[0])
    slow = asyncio.create_task(floor.refresh())
    await first_asked.wait()
    now[0] = 1.5
    assert await floor.refresh() == 12  # a second read started and answered
    release_first.set()
    assert await slow == 12  # the older answer arrives last and is not taken
    assert floor.through == 12
