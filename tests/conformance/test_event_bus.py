"""Conformance suite for the EventBus port: a new adapter passes by adding an entry to ADAPTERS."""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from dataclasses import dataclass

import anyio
import anyio.from_thread
import anyio.to_thread
import pytest
from pydantic import ValidationError

from tests.conftest import within
from tests.redis_server import redis_keys
from voxvault.errors import ConfigurationError
from voxvault.events import EventBus, EventBusClosed, ProgressEvent, Subscription, open_event_bus
from voxvault.events.memory import InMemoryEventBus

pytestmark = pytest.mark.anyio

# Small limits keep the tests fast; every adapter is built with these.
RETAIN = 8
BUFFER = 16
TTL_S = 60.0
QUIET = 0.05  # how long "nothing arrives" is waited for


class Clock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Harness:
    bus: EventBus
    clock: Clock | None
    """None when the adapter's retention follows a clock the test cannot move."""
    subscribed_channels: Callable[[], int]
    """Channels the adapter still tracks subscribers for: 0 once every subscription is left."""
    retained_channels: Callable[[], int] | None
    """Channels with replay history held by the adapter, when it can tell."""


def _memory(cleanup: ExitStack) -> Harness:
    clock = Clock()
    bus = InMemoryEventBus(retain=RETAIN, ttl_s=TTL_S, buffer=BUFFER, clock=clock)
    return Harness(
        bus,
        clock,
        subscribed_channels=lambda: len(bus._subscribers),
        retained_channels=lambda: len(bus._histories),
    )


def _redis(cleanup: ExitStack) -> Harness:
    from voxvault.events.redis import RedisEventBus

    keys = cleanup.enter_context(redis_keys())  # a key prefix of the test's own
    bus = RedisEventBus.from_url(keys.url, retain=RETAIN, ttl_s=TTL_S, buffer=BUFFER)
    # Retention follows Redis's clock (key TTLs): the TTL tests cannot move it.
    return Harness(
        bus, None, subscribed_channels=lambda: len(bus._channels), retained_channels=None
    )


ADAPTERS: dict[str, Callable[[ExitStack], Harness]] = {"memory": _memory, "redis": _redis}
"""Each builds a fresh bus; what it registers on the stack is undone after the test."""


async def _opened(name: str) -> AsyncIterator[Harness]:
    with ExitStack() as cleanup:
        built = ADAPTERS[name](cleanup)
        async with built.bus:
            yield built


@pytest.fixture(params=sorted(ADAPTERS))
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    async for built in _opened(request.param):
        yield built


# Retention tests move the adapter's clock. Redis keeps time itself (key TTLs); its retention
# is shown with real, short TTLs in tests/test_redis_events.py instead.
CLOCKED = ["memory"]


@pytest.fixture(params=CLOCKED)
async def clocked(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Harness, Clock]]:
    async for built in _opened(request.param):
        assert built.clock is not None
        yield built, built.clock


def event(progress: float = 0.0, status: str = "processing") -> ProgressEvent:
    return ProgressEvent(type="progress", status=status, stage="transcribe", progress=progress)


def ready() -> ProgressEvent:
    return ProgressEvent(type="status", status="ready", progress=1.0)


def failed() -> ProgressEvent:
    return ProgressEvent(type="status", status="failed", error="decoder crashed")


async def drain(subscription: Subscription) -> list[tuple[str, ProgressEvent]]:
    """Everything buffered now, stopping at the first quiet moment."""
    received: list[tuple[str, ProgressEvent]] = []
    with within(30, "a quiet moment on the subscription"):
        while (item := await subscription.next(QUIET)) is not None:
            received.append(item)
    return received


async def publish_all(bus: EventBus, channel: str, events: list[ProgressEvent]) -> list[str]:
    return [await bus.publish(channel, e) for e in events]


# --- the event model -------------------------------------------------------------------------


async def test_progress_is_a_finite_fraction() -> None:
    assert event(0.0).progress == 0.0
    assert event(1.0).progress == 1.0
    for bad in (-0.01, 1.01, math.nan, math.inf, -math.inf):
        with pytest.raises(ValidationError):
            event(bad)


async def test_ready_and_failed_are_terminal() -> None:
    assert ready().terminal
    assert failed().terminal
    for status in ("stored", "queued", "processing"):
        assert not event(status=status).terminal


async def test_events_are_immutable_since_subscribers_share_them() -> None:
    with pytest.raises(ValidationError):
        event().progress = 0.5  # type: ignore[misc]


# --- delivery --------------------------------------------------------------------------------


async def test_events_arrive_in_publish_order_with_increasing_ids(harness: Harness) -> None:
    bus = harness.bus
    sent = [event(n / 40) for n in range(41)]
    ids: list[str] = []
    received: list[tuple[str, ProgressEvent]] = []
    async with bus.subscribe("rec-1") as sub:
        for start in range(0, len(sent), BUFFER):  # read as fast as it comes: nothing dropped
            ids += await publish_all(bus, "rec-1", sent[start : start + BUFFER])
            received += await drain(sub)
    assert [i for i, _ in received] == ids
    assert [e for _, e in received] == sent
    assert all(a < b for a, b in itertools.pairwise(ids))  # plain string order
    assert all(i and "\n" not in i and i.isascii() for i in ids)


async def test_a_subscription_starts_at_subscribe_time(harness: Harness) -> None:
    bus = harness.bus
    await bus.publish("rec-1", event(0.1))
    async with bus.subscribe("rec-1") as sub:
        assert sub.resumed is False
        assert await sub.next(QUIET) is None
        second = await bus.publish("rec-1", event(0.2))
        assert await sub.next(1) == (second, event(0.2))


async def test_channels_are_independent(harness: Harness) -> None:
    bus = harness.bus
    async with bus.subscribe("rec-a") as a, bus.subscribe("rec-b") as b:
        id_a = await bus.publish("rec-a", event(0.1))
        id_b = await bus.publish("rec-b", ready())
        assert await drain(a) == [(id_a, event(0.1))]
        assert await drain(b) == [(id_b, ready())]


async def test_every_subscriber_of_a_channel_gets_every_event(harness: Harness) -> None:
    bus = harness.bus
    async with bus.subscribe("rec-1") as first, bus.subscribe("rec-1") as second:
        ids = await publish_all(bus, "rec-1", [event(0.1), event(0.2), ready()])
        expected = list(zip(ids, [event(0.1), event(0.2), ready()], strict=True))
        assert await drain(first) == expected
        assert await drain(second) == expected


async def test_next_returns_none_on_timeout_and_wakes_on_publish(harness: Harness) -> None:
    bus = harness.bus
    published: list[str] = []

    async def publish_later() -> None:
        await anyio.sleep(QUIET)
        published.append(await bus.publish("rec-1", event(0.5)))

    async with bus.subscribe("rec-1") as sub:
        with anyio.fail_after(1):
            assert await sub.next(QUIET / 5) is None
            assert await sub.next(0) is None
        async with anyio.create_task_group() as group:
            group.start_soon(publish_later)
            with anyio.fail_after(1):  # woken by the publish, long before the timeout
                item = await sub.next(30)
        assert item == (published[0], event(0.5))


async def test_an_async_for_reads_the_same_stream(harness: Harness) -> None:
    bus = harness.bus
    async with bus.subscribe("rec-1") as sub:
        ids = await publish_all(bus, "rec-1", [event(0.3), ready()])
        received: list[tuple[str, ProgressEvent]] = []
        with anyio.fail_after(1):
            async for event_id, item in sub:
                received.append((event_id, item))
                if item.terminal:
                    break
    assert received == [(ids[0], event(0.3)), (ids[1], ready())]


async def test_a_cancelled_wait_loses_no_event(harness: Harness) -> None:
    bus = harness.bus
    async with bus.subscribe("rec-1") as sub:
        with anyio.move_on_after(QUIET):
            await sub.next(30)
        first = await bus.publish("rec-1", event(0.1))
        with anyio.CancelScope() as scope:
            scope.cancel()
            await sub.next(30)  # cancelled while an event is waiting for it
        assert await sub.next(1) == (first, event(0.1))


async def test_publishing_from_a_worker_thread_goes_through_the_loop(harness: Harness) -> None:
    bus = harness.bus

    def worker() -> str:
        return anyio.from_thread.run(bus.publish, "rec-1", event(0.7))

    async with bus.subscribe("rec-1") as sub:
        event_id = await anyio.to_thread.run_sync(worker)
        assert await sub.next(1) == (event_id, event(0.7))


# --- replay ----------------------------------------------------------------------------------


async def test_replay_after_last_event_id_then_live(harness: Harness) -> None:
    bus = harness.bus
    sent = [event(n / 10) for n in range(5)]
    ids = await publish_all(bus, "rec-1", sent)
    async with bus.subscribe("rec-1", last_event_id=ids[1]) as sub:
        assert sub.resumed is True
        live = await bus.publish("rec-1", ready())
        received = await drain(sub)
    assert received == [*zip(ids[2:], sent[2:], strict=True), (live, ready())]


async def test_resuming_at_the_newest_event_replays_nothing(harness: Harness) -> None:
    bus = harness.bus
    ids = await publish_all(bus, "rec-1", [event(0.1), event(0.2)])
    async with bus.subscribe("rec-1", last_event_id=ids[-1]) as sub:
        assert sub.resumed is True
        assert await sub.next(QUIET) is None


@pytest.mark.parametrize("stranger", ["", "garbage", "0-0", "9999999999999-999999"])
async def test_an_unknown_last_event_id_replays_nothing(harness: Harness, stranger: str) -> None:
    bus = harness.bus
    await publish_all(bus, "rec-1", [event(0.1), event(0.2)])
    async with bus.subscribe("rec-1", last_event_id=stranger) as sub:
        assert sub.resumed is False
        assert await sub.next(QUIET) is None
        newer = await bus.publish("rec-1", event(0.4))
        assert await sub.next(1) == (newer, event(0.4))


async def test_an_id_for_a_channel_without_history_replays_nothing(harness: Harness) -> None:
    async with harness.bus.subscribe("never-published", last_event_id="0-0") as sub:
        assert sub.resumed is False
        assert await sub.next(QUIET) is None


async def test_an_id_trimmed_from_the_history_replays_nothing(harness: Harness) -> None:
    bus = harness.bus
    sent = [event(n / 20) for n in range(RETAIN + 2)]
    ids = await publish_all(bus, "rec-1", sent)
    async with bus.subscribe("rec-1", last_event_id=ids[1]) as sub:
        assert sub.resumed is False  # ids[0] and ids[1] are gone: resuming would leave a gap
        assert await sub.next(QUIET) is None
    async with bus.subscribe("rec-1", last_event_id=ids[2]) as sub:  # the oldest retained
        assert sub.resumed is True
        assert await drain(sub) == list(zip(ids[3:], sent[3:], strict=True))


async def test_replay_and_live_meet_without_gap_or_duplicate(harness: Harness) -> None:
    bus = harness.bus
    total = RETAIN * 3
    published: list[str] = []
    halfway = anyio.Event()

    async def publisher() -> None:
        for n in range(total):
            published.append(await bus.publish("rec-1", event(n / total)))
            if n == RETAIN:
                halfway.set()
            await anyio.sleep(0)

    async with anyio.create_task_group() as group:
        group.start_soon(publisher)
        await halfway.wait()
        resume_at = len(published) - 3  # a few events back, inside the retained window
        async with bus.subscribe("rec-1", last_event_id=published[resume_at]) as sub:
            assert sub.resumed is True
            received: list[str] = []
            with anyio.fail_after(2):
                while len(received) < total - resume_at - 1:
                    item = await sub.next(1)
                    assert item is not None
                    received.append(item[0])
            assert await sub.next(QUIET) is None
    assert received == published[resume_at + 1 :]


async def test_history_is_forgotten_a_ttl_after_the_last_event(
    clocked: tuple[Harness, Clock],
) -> None:
    harness, clock = clocked
    bus = harness.bus
    first = await bus.publish("rec-1", event(0.1))
    clock.advance(TTL_S * 0.6)
    second = await bus.publish("rec-1", event(0.2))  # keeps the channel, first id included
    clock.advance(TTL_S * 0.6)
    async with bus.subscribe("rec-1", last_event_id=first) as sub:
        assert sub.resumed is True
        assert await drain(sub) == [(second, event(0.2))]
    clock.advance(TTL_S * 0.6)
    async with bus.subscribe("rec-1", last_event_id=second) as sub:
        assert sub.resumed is False
        assert await sub.next(QUIET) is None


async def test_idle_channels_do_not_accumulate(clocked: tuple[Harness, Clock]) -> None:
    harness, clock = clocked
    assert harness.retained_channels is not None
    bus = harness.bus
    for n in range(500):
        await bus.publish(f"rec-{n}", event(0.1))
    assert harness.retained_channels() == 500
    clock.advance(TTL_S + 1)
    await bus.publish("rec-new", event(0.1))
    assert harness.retained_channels() == 1


# --- slow subscribers ------------------------------------------------------------------------


async def test_a_slow_subscriber_loses_the_oldest_progress_but_no_terminal_event(
    harness: Harness,
) -> None:
    bus = harness.bus
    sent = [event(0.0), ready(), *[event(n / 100) for n in range(1, BUFFER + 4)]]
    async with bus.subscribe("rec-1") as sub:
        with anyio.fail_after(2):  # the reader is not reading: publish must not wait for it
            ids = await publish_all(bus, "rec-1", sent)
        received = await drain(sub)
        assert sub.dropped == len(sent) - BUFFER
    kept = [(ids[1], sent[1]), *zip(ids[-(BUFFER - 1) :], sent[-(BUFFER - 1) :], strict=True)]
    assert received == kept


async def test_terminal_events_survive_any_flood(harness: Harness) -> None:
    bus = harness.bus
    flood = [event(n / (BUFFER * 3)) for n in range(BUFFER * 3)]
    async with bus.subscribe("rec-1") as sub:
        first = await bus.publish("rec-1", failed())
        ids = await publish_all(bus, "rec-1", flood[: BUFFER * 2])
        again = await bus.publish("rec-1", ready())  # the recording was processed again
        ids += await publish_all(bus, "rec-1", flood[BUFFER * 2 :])
        received = await drain(sub)
        dropped = sub.dropped
    assert [e for _, e in received if e.terminal] == [failed(), ready()]
    assert [i for i, _ in received][:1] == [first]
    assert again in [i for i, _ in received]
    progress = [i for i, e in received if not e.terminal]
    assert progress == ids[-len(progress) :]  # the newest progress, still in order
    assert len(received) == BUFFER
    assert dropped == len(flood) + 2 - BUFFER


# --- subscribing and closing -----------------------------------------------------------------


async def test_leaving_a_subscription_unsubscribes(harness: Harness) -> None:
    bus = harness.bus
    async with bus.subscribe("rec-1"), bus.subscribe("rec-1"), bus.subscribe("rec-2"):
        assert harness.subscribed_channels() == 2
    assert harness.subscribed_channels() == 0

    with pytest.raises(RuntimeError, match="handler failed"):
        async with bus.subscribe("rec-1"):
            raise RuntimeError("handler failed")
    with anyio.move_on_after(QUIET):
        async with bus.subscribe("rec-1") as sub:
            await sub.next(30)  # the client went away: the request is cancelled
    assert harness.subscribed_channels() == 0
    await bus.publish("rec-1", event(0.1))  # nobody to deliver to, nothing kept per subscriber
    assert harness.subscribed_channels() == 0


async def test_closing_the_bus_ends_its_subscriptions(harness: Harness) -> None:
    bus = harness.bus
    received: list[ProgressEvent] = []

    async def reader(sub: Subscription) -> None:
        async for _, item in sub:
            received.append(item)

    async with bus.subscribe("rec-1") as iterated, bus.subscribe("rec-1") as polled:
        with within(30, "the iterating reader to end with the bus"):
            async with anyio.create_task_group() as group:
                group.start_soon(reader, iterated)
                await publish_all(bus, "rec-1", [event(0.1), event(0.2)])
                with anyio.fail_after(1):
                    await bus.close()
        assert received == [event(0.1), event(0.2)]
        assert [e for _, e in await drain_until_closed(polled)] == received
    await bus.close()  # twice is fine
    with pytest.raises(EventBusClosed):
        await bus.publish("rec-1", event(0.3))
    with pytest.raises(EventBusClosed):
        async with bus.subscribe("rec-1"):
            pass


async def drain_until_closed(sub: Subscription) -> list[tuple[str, ProgressEvent]]:
    """What was buffered before the bus closed; then ``next`` raises instead of waiting."""
    received: list[tuple[str, ProgressEvent]] = []
    with anyio.fail_after(1):
        while True:
            try:
                item = await sub.next(30)
            except EventBusClosed:
                return received
            assert item is not None
            received.append(item)


# --- the in-memory adapter -------------------------------------------------------------------


async def test_memory_bus_refuses_calls_from_another_thread() -> None:
    async with InMemoryEventBus() as bus:
        await bus.publish("rec-1", event(0.1))

        def elsewhere() -> str:
            return anyio.run(bus.publish, "rec-1", event(0.2))  # a second event loop

        with pytest.raises(RuntimeError, match=r"anyio\.from_thread\.run"):
            await anyio.to_thread.run_sync(elsewhere)


async def test_memory_subscription_has_one_reader_at_a_time() -> None:
    async with InMemoryEventBus() as bus, bus.subscribe("rec-1") as sub:

        async def read() -> None:
            await sub.next(30)

        async with anyio.create_task_group() as group:
            group.start_soon(read)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(RuntimeError, match="already waiting"):
                await sub.next(0)
            group.cancel_scope.cancel()


async def test_memory_bus_limits_must_be_positive() -> None:
    for limits in ({"retain": 0}, {"buffer": 0}, {"ttl_s": 0.0}, {"ttl_s": math.nan}):
        with pytest.raises(ValueError, match="positive"):
            InMemoryEventBus(**limits)


# --- the registry ----------------------------------------------------------------------------


async def test_open_event_bus_by_url() -> None:
    for url in ("memory", "memory://"):
        bus = open_event_bus(url)
        assert isinstance(bus, InMemoryEventBus)
        await bus.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("kafka://broker:9092", "unsupported"),
        ("", "use one of: memory, redis, rediss"),
    ],
)
async def test_open_event_bus_rejects_unknown_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        open_event_bus(url)
