"""EventBus inside this process: the embedded default, where the server runs its own workers.

Everything happens on the event loop thread, so there are no locks: ``publish`` appends to the
channel's history and to each subscriber's buffer in one synchronous step, which is also what
makes replay-then-live gapless. A call from another thread is refused loudly rather than
corrupting state (worker threads go through ``anyio.from_thread.run``).

Ids are ``<unix ms, 13 digits>-<sequence, 6 digits>``, like a Redis stream entry id padded to a
fixed width, so string order is publish order. Taking the wall clock (never going back) means
an id a browser kept from before a restart is unknown here, rather than naming some other
event of the same channel.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel

from voxvault.events.base import (
    BufferedSubscription,
    EventBus,
    EventBusClosed,
    ProgressEvent,
    Subscription,
)

DEFAULT_RETAIN = 256
"""Events kept per channel for replay: far more than one processing run publishes per minute."""
DEFAULT_TTL_S = 15 * 60.0
"""How long a channel's history outlives its last event; covers a browser's reconnect."""
DEFAULT_BUFFER = 1000
"""Events a subscription holds for its reader before it starts dropping stale progress."""

_MAX_SEQ = 999_999

Entry = tuple[str, ProgressEvent]


class _History:
    __slots__ = ("events", "last_at")

    def __init__(self, retain: int) -> None:
        self.events: deque[Entry] = deque(maxlen=retain)
        self.last_at = 0.0


class InMemoryEventBus(EventBus):
    """Progress events for subscribers in this process; see ``voxvault.events.base``.

    ``clock`` (monotonic seconds) only decides when idle channels are forgotten.
    """

    def __init__(
        self,
        *,
        retain: int = DEFAULT_RETAIN,
        ttl_s: float = DEFAULT_TTL_S,
        buffer: int = DEFAULT_BUFFER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if retain < 1 or buffer < 1 or not ttl_s > 0:
            raise ValueError("retain, buffer and ttl_s must be positive")
        self._retain = retain
        self._ttl_s = ttl_s
        self._buffer = buffer
        self._clock = clock
        # Least recently published first, so forgetting idle channels looks at the front only.
        self._histories: OrderedDict[str, _History] = OrderedDict()
        self._subscribers: dict[str, set[BufferedSubscription]] = {}
        self._thread: int | None = None
        self._closed = False
        self._last_ms = -1
        self._seq = 0

    @classmethod
    def from_url(cls, url: str) -> InMemoryEventBus:
        return cls()

    async def publish(self, channel: str, event: ProgressEvent) -> str:
        await anyio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller publishes nothing
        self._check_usable()
        now = self._clock()
        self._forget_idle(now)
        history = self._histories.get(channel)
        if history is None:
            history = self._histories[channel] = _History(self._retain)
        else:
            self._histories.move_to_end(channel)
        entry = (self._new_id(), event)
        history.events.append(entry)
        history.last_at = now
        for subscription in self._subscribers.get(channel, ()):
            subscription.deliver(entry)
        # Let subscribers run; shielded, so the caller always learns the id of what it published.
        await anyio.lowlevel.cancel_shielded_checkpoint()
        return entry[0]

    @asynccontextmanager
    async def subscribe(
        self, channel: str, *, last_event_id: str | None = None
    ) -> AsyncIterator[Subscription]:
        self._check_usable()
        self._forget_idle(self._clock())
        replay = self._retained_after(channel, last_event_id)
        subscription = BufferedSubscription(self._buffer, resumed=replay is not None)
        for entry in replay or ():
            subscription.deliver(entry)
        # No await between the replay and joining the channel: nothing published falls between.
        subscribers = self._subscribers.setdefault(channel, set())
        subscribers.add(subscription)
        try:
            yield subscription
        finally:
            subscribers.discard(subscription)
            if not subscribers and self._subscribers.get(channel) is subscribers:
                del self._subscribers[channel]

    async def close(self) -> None:
        self._check_thread()
        self._closed = True
        self._histories.clear()
        for subscribers in self._subscribers.values():
            for subscription in subscribers:
                subscription.close()

    def _retained_after(self, channel: str, last_event_id: str | None) -> list[Entry] | None:
        """The retained events after ``last_event_id``, or None when it is not retained."""
        history = self._histories.get(channel)
        if last_event_id is None or history is None:
            return None
        events = list(history.events)
        for index, (event_id, _) in enumerate(events):
            if event_id == last_event_id:
                return events[index + 1 :]
        return None

    def _forget_idle(self, now: float) -> None:
        cutoff = now - self._ttl_s
        while self._histories:
            channel, history = next(iter(self._histories.items()))
            if history.last_at > cutoff:
                break
            del self._histories[channel]

    def _new_id(self) -> str:
        ms = time.time_ns() // 1_000_000
        if ms > self._last_ms:
            self._last_ms, self._seq = ms, 0
        elif self._seq < _MAX_SEQ:
            self._seq += 1
        else:  # a million events in one millisecond: borrow the next one, order still holds
            self._last_ms, self._seq = self._last_ms + 1, 0
        return f"{self._last_ms:013d}-{self._seq:06d}"

    def _check_usable(self) -> None:
        self._check_thread()
        if self._closed:
            raise EventBusClosed("the event bus is closed")

    def _check_thread(self) -> None:
        ident = threading.get_ident()
        if self._thread is None:
            self._thread = ident
        elif ident != self._thread:
            raise RuntimeError(
                "the in-memory event bus is used from its event loop's thread only; "
                "from a worker thread call anyio.from_thread.run(bus.publish, channel, event)"
            )
