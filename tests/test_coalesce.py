"""Coalescer: callers asking at about the same time share one read; errors and cancellations
are not kept for later callers."""

from __future__ import annotations

import anyio
import pytest

from tests.conftest import within
from voxvault.coalesce import Coalescer

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_concurrent_callers_share_one_read() -> None:
    clock = Clock()
    shared: Coalescer[int] = Coalescer(1.0, clock=clock)
    reads = 0
    release = anyio.Event()
    results: list[int] = []

    async def read() -> int:
        nonlocal reads
        reads += 1
        await release.wait()
        return reads

    async def ask() -> None:
        results.append(await shared.get("rec-1", read))

    with within(30, "the callers of the shared read"):
        async with anyio.create_task_group() as group:
            for _ in range(50):
                group.start_soon(ask)
            await anyio.sleep(0.05)
            release.set()
    assert reads == 1
    assert results == [1] * 50


async def test_a_read_is_reused_until_it_is_older_than_max_age() -> None:
    clock = Clock()
    shared: Coalescer[int] = Coalescer(1.0, clock=clock)
    reads = 0

    async def read() -> int:
        nonlocal reads
        reads += 1
        return reads

    assert await shared.get("rec-1", read) == 1
    clock.now += 0.5
    assert await shared.get("rec-1", read) == 1
    assert await shared.get("rec-2", read) == 2  # another key reads for itself
    clock.now += 0.6
    assert await shared.get("rec-1", read) == 3


async def test_an_error_reaches_the_callers_of_that_read_only() -> None:
    clock = Clock()
    shared: Coalescer[int] = Coalescer(1.0, clock=clock)
    failing = True

    async def read() -> int:
        if failing:
            raise ConnectionError("database away")
        return 7

    with pytest.raises(ConnectionError):
        await shared.get("rec-1", read)
    failing = False
    clock.now += 1.0
    assert await shared.get("rec-1", read) == 7


async def test_a_cancelled_reader_leaves_no_read_behind_for_others() -> None:
    clock = Clock()
    shared: Coalescer[int] = Coalescer(60.0, clock=clock)
    started = anyio.Event()
    calls = 0

    async def slow() -> int:
        nonlocal calls
        calls += 1
        started.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def quick() -> int:
        nonlocal calls
        calls += 1
        return 5

    got: list[int] = []
    # A read kept after its reader was cancelled would leave the second caller waiting.
    with within(30, "the second caller's own read"):
        async with anyio.create_task_group() as group:
            reader = anyio.CancelScope()

            async def first() -> None:
                with reader:
                    await shared.get("rec-1", slow)

            async def second() -> None:
                await started.wait()
                got.append(await shared.get("rec-1", quick))

            group.start_soon(first)
            group.start_soon(second)
            await started.wait()
            await anyio.sleep(0.01)
            reader.cancel()
    assert got == [5]
    assert calls == 2
