"""The ack floor the llm and the sender wait on: read at most every refresh_s, never
lowered (a consumer's floor only moves forward; an unknown one reads as 0)."""

from __future__ import annotations

from wecombot_common.bus import SettledFloor


async def test_the_floor_is_read_at_most_every_refresh_s_and_never_lowered() -> None:
    answers = [5, 0, 9]  # 0: consumer_info failed
    reads: list[float] = []
    now = [100.0]

    async def read() -> int:
        reads.append(now[0])
        return answers.pop(0)

    floor = SettledFloor(read, refresh_s=1.0, clock=lambda: now[0])
    assert floor.through == 0  # nothing read yet
    assert await floor.refresh() == 5
    now[0] = 100.5
    assert await floor.refresh() == 5  # within refresh_s: not read again
    now[0] = 101.0
    assert await floor.refresh() == 5  # read, unknown (0): the floor stays
    now[0] = 102.5
    assert await floor.refresh() == 9
    assert floor.through == 9
    assert reads == [100.0, 101.0, 102.5]
