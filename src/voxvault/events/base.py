"""The EventBus port: progress of the processing pipeline, published as it happens.

A worker publishes a ``ProgressEvent`` on the channel of the recording it processes; each
Server-Sent-Events response subscribes to one channel and forwards what arrives. The bus is a
fast path, not the record: the database stays the truth, and a client that missed events gets
a fresh snapshot from it. That is why the guarantees below are about order and never blocking
the worker rather than durability.

Guarantees every adapter gives (``tests/conformance/test_event_bus.py`` checks them):

* **Ids.** ``publish`` returns the event's id: an opaque ASCII string, unique within its
  channel, and strictly greater in plain string order than every earlier id of the channel,
  so ``sorted()`` and ``<`` give publish order. (An adapter on Redis Streams zero-pads both
  parts of the entry id ``ms-seq`` to fixed widths.) An id is also what a browser sends back in
  ``Last-Event-ID``, so it holds no newline.
* **Delivery.** A subscription receives every event published on its channel after
  ``subscribe`` was entered, once each, in publish order. Channels are independent, and every
  subscriber of a channel receives every event.
* **Replay.** The bus retains the last events of each channel for a while (a count and a TTL
  counted from the channel's last event; idle channels are forgotten, so memory stays bounded
  with many recordings). Subscribing with ``last_event_id`` set to a retained id first replays
  the events retained after it, then continues live with no duplicate and no gap between the
  two; ``Subscription.resumed`` is then true. An id the bus no longer retains (trimmed,
  expired, from before a restart, or malformed) replays nothing and ``resumed`` is false: the
  caller must send a snapshot from the database instead.
* **Slow subscribers.** ``publish`` never waits for a subscriber. Each subscription buffers a
  bounded number of events; when it is full, the oldest buffered non-terminal event is dropped
  (``Subscription.dropped`` counts them) — a later event supersedes it anyway. Terminal events
  (``ready``/``failed``) are never dropped, since they tell the client to stop listening.
* **Threads.** Call the bus from the event loop only. Code on a worker thread publishes with
  ``anyio.from_thread.run(bus.publish, channel, event)``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Annotated, Self

import anyio
import anyio.lowlevel
from pydantic import BaseModel, ConfigDict, Field

from voxvault.errors import BackendUnavailable

TERMINAL_STATUSES = frozenset({"ready", "failed"})
"""Recording statuses after which no more progress comes (until the recording is re-run)."""


class EventBusClosed(BackendUnavailable):
    """The bus was closed (shutdown) or lost its backend; subscriptions end with this."""


class ProgressEvent(BaseModel):
    """One step of a recording's processing, as a browser receives it.

    Frozen, because every subscriber of a channel receives the same instance.
    """

    model_config = ConfigDict(frozen=True)

    type: str
    """What happened: ``snapshot`` (the full state, sent first), ``status``, ``progress``."""
    status: str
    """The recording's status: stored, queued, processing, ready, failed, ..."""
    stage: str | None = None
    """The pipeline stage running: probe, normalize, transcribe, export, playback."""
    progress: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0
    """Fraction of the work done, 0..1."""
    job_id: str | None = None
    error: str | None = None
    """Why processing failed, when ``status`` is ``failed``."""

    @property
    def terminal(self) -> bool:
        """Processing has ended: an SSE stream closes after forwarding this event."""
        return self.status in TERMINAL_STATUSES


class Subscription(ABC):
    """Events of one channel, in publish order, as ``(event_id, event)`` pairs.

    Iterate with ``async for`` (it ends when the bus closes), or call ``next(timeout)`` to wake
    up periodically — to send a keep-alive or re-check the database — without losing an event:
    cancelling a wait never consumes one. One task consumes a subscription at a time.
    """

    @abstractmethod
    async def next(self, timeout: float) -> tuple[str, ProgressEvent] | None:  # noqa: ASYNC109
        """The next event, waiting up to ``timeout`` seconds; None when none came in time.

        Raises ``EventBusClosed`` once the bus is closed and the events buffered before that
        have been returned. (A timeout argument rather than the caller's cancel scope, because
        running out of time here is the normal case — time for a keep-alive — not an error.)
        """

    @property
    @abstractmethod
    def resumed(self) -> bool:
        """True when ``last_event_id`` was retained, so nothing after it was missed.

        False when no id was given or the bus no longer knew it: send a snapshot.
        """

    @property
    @abstractmethod
    def dropped(self) -> int:
        """Events dropped so far because this subscription's buffer was full.

        When it grows, the client missed intermediate progress; a snapshot brings it back.
        """

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> tuple[str, ProgressEvent]:
        try:
            item = await self.next(math.inf)
        except EventBusClosed:
            raise StopAsyncIteration from None
        assert item is not None  # an infinite wait returns only with an event
        return item


class BufferedSubscription(Subscription):
    """A subscription fed by its bus through ``deliver`` (never waiting), read with ``next``.

    Adapters share it: the bus decides what to deliver, this keeps the port's buffer rules.
    """

    def __init__(self, limit: int, *, resumed: bool) -> None:
        self._buffer: deque[tuple[str, ProgressEvent]] = deque()
        self._limit = limit
        self._resumed = resumed
        self._dropped = 0
        self._closed = False
        self._waiter: anyio.Event | None = None

    @property
    def resumed(self) -> bool:
        return self._resumed

    @property
    def dropped(self) -> int:
        return self._dropped

    def deliver(self, entry: tuple[str, ProgressEvent]) -> None:
        """Buffer an event without ever waiting; see the port's rule for a full buffer."""
        full = len(self._buffer) >= self._limit
        if full and not self._drop_oldest_progress() and not entry[1].terminal:
            # Only terminal events are buffered: they stay, and so would a terminal newcomer
            # (there are a few per run at most). The stale one is this progress event.
            self._dropped += 1
            return
        self._buffer.append(entry)
        self._wake()

    def _drop_oldest_progress(self) -> bool:
        for index, (_, event) in enumerate(self._buffer):
            if not event.terminal:
                del self._buffer[index]
                self._dropped += 1
                return True
        return False

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None:
            self._waiter.set()

    async def next(self, timeout: float) -> tuple[str, ProgressEvent] | None:  # noqa: ASYNC109 - see the port
        if self._waiter is not None:
            raise RuntimeError("another task is already waiting on this subscription")
        if self._buffer or self._closed:
            await anyio.lowlevel.checkpoint()
        else:
            waiter = self._waiter = anyio.Event()
            try:
                with anyio.move_on_after(timeout):
                    await waiter.wait()
            finally:
                self._waiter = None
        # Nothing is taken before this point, so a cancelled wait loses no event.
        if self._buffer:
            return self._buffer.popleft()
        if self._closed:
            raise EventBusClosed("the event bus is closed")
        return None


class EventBus(ABC):
    """Publish progress per channel (a recording id); subscribe to one channel at a time."""

    @abstractmethod
    async def publish(self, channel: str, event: ProgressEvent) -> str:
        """Publish the event on the channel and return its id; never waits for subscribers.

        From the event loop only (see the module docstring for worker threads). Raises
        ``EventBusClosed`` after ``close``.
        """

    @abstractmethod
    def subscribe(
        self, channel: str, *, last_event_id: str | None = None
    ) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe while the context is entered; leaving it unsubscribes.

        With ``last_event_id`` (a browser's ``Last-Event-ID``), the retained events after it
        come first. Entering raises ``EventBusClosed`` after ``close``.
        """

    @abstractmethod
    async def close(self) -> None:
        """Stop: open subscriptions end after their buffered events. Safe to call twice."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
