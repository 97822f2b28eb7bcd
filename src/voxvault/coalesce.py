"""One read shared by every caller that asks for the same thing at about the same time.

A thousand browsers following one recording's progress would otherwise each re-read it from the
database every second; through ``Coalescer`` they share one read per second per process. Written
here because the libraries that cache coroutine results (async-lru, aiocache) key by call, not by
freshness, and keep results after an error or a cancellation where this must not.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")
PRUNE_ABOVE = 1024  # entries kept before the stale ones are dropped


@dataclass
class _Read(Generic[T]):
    started: float
    done: anyio.Event = field(default_factory=anyio.Event)
    value: T | None = None
    error: Exception | None = None
    finished: bool = False


class Coalescer(Generic[T]):
    def __init__(self, max_age_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._reads: dict[Hashable, _Read[T]] = {}

    async def get(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``'s result, from a read begun under ``max_age_s`` ago when there is one."""
        while True:
            now = self._clock()
            current = self._reads.get(key)
            if current is None or (
                current.done.is_set() and now - current.started >= self.max_age_s
            ):
                return await self._read(key, read, now)
            await current.done.wait()
            if current.finished:
                if current.error is not None:
                    raise current.error
                return current.value  # type: ignore[return-value]
            # The reader was cancelled before it finished: read again (or join a newer read).

    async def _read(self, key: Hashable, read: Callable[[], Awaitable[T]], now: float) -> T:
        entry: _Read[T] = _Read(started=now)
        self._reads[key] = entry
        if len(self._reads) > PRUNE_ABOVE:
            self._prune(now)
        try:
            entry.value = await read()
            entry.finished = True
            return entry.value
        except Exception as exc:
            entry.error, entry.finished = exc, True
            raise
        finally:
            if not entry.finished and self._reads.get(key) is entry:
                del self._reads[key]  # cancelled: nobody may reuse a read that never ended
            entry.done.set()

    def _prune(self, now: float) -> None:
        for key, entry in list(self._reads.items()):
            if entry.done.is_set() and now - entry.started >= self.max_age_s:
                del self._reads[key]
