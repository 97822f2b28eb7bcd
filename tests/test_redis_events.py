"""The EventBus on Redis beyond the conformance suite: several processes, TTLs, outages.

Each bus here stands for one process (an API server or a worker): they share nothing but Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest
from redis.asyncio import Redis

from tests.conftest import free_port, within
from tests.redis_server import RedisKeys, redis_keys, with_query
from voxvault.errors import BackendUnavailable, ConfigurationError
from voxvault.events import EventBus, EventBusClosed, ProgressEvent, Subscription, open_event_bus
from voxvault.events.redis import DEFAULT_PREFIX, RedisEventBus

pytestmark = pytest.mark.anyio

RETAIN = 8
BUFFER = 16
QUIET = 0.05

BusFactory = Callable[..., Awaitable[RedisEventBus]]


@pytest.fixture
def keys() -> Iterator[RedisKeys]:
    with redis_keys() as opened:
        yield opened


@pytest.fixture
async def new_bus(keys: RedisKeys) -> AsyncIterator[BusFactory]:
    """Buses on the test's keys, as separate processes would each have; closed afterwards."""
    async with contextlib.AsyncExitStack() as stack:

        async def build(
            url: str | None = None, *, buffer: int = BUFFER, ttl_s: float = 60.0
        ) -> RedisEventBus:
            bus = RedisEventBus.from_url(url or keys.url, retain=RETAIN, buffer=buffer, ttl_s=ttl_s)
            await stack.enter_async_context(bus)
            return bus

        yield build


@pytest.fixture
async def inspect(keys: RedisKeys) -> AsyncIterator[Redis]:
    client = Redis.from_url(keys.server_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


def event(progress: float = 0.0) -> ProgressEvent:
    return ProgressEvent(
        type="progress", status="processing", stage="transcribe", progress=progress
    )


def ready() -> ProgressEvent:
    return ProgressEvent(type="status", status="ready", progress=1.0)


async def drain(sub: Subscription, wait: float = QUIET) -> list[tuple[str, ProgressEvent]]:
    received: list[tuple[str, ProgressEvent]] = []
    with within(30, "a quiet moment on the subscription"):
        while (item := await sub.next(wait)) is not None:
            received.append(item)
    return received


async def receive(sub: Subscription, count: int, timeout: float = 5) -> list[str]:
    """The ids of the next ``count`` events, failing when they do not all come in time."""
    ids: list[str] = []
    with anyio.fail_after(timeout):
        while len(ids) < count:
            item = await sub.next(timeout)
            if item is not None:
                ids.append(item[0])
    return ids


# --- several processes -----------------------------------------------------------------------


async def test_a_worker_publishes_and_an_api_process_receives(new_bus: BusFactory) -> None:
    worker, api = await new_bus(), await new_bus()
    sent = [event(0.1), event(0.5), ready()]
    async with api.subscribe("rec-1") as sub:
        ids = [await worker.publish("rec-1", e) for e in sent]
        with anyio.fail_after(5):
            received = [await sub.next(5) for _ in sent]
        assert await sub.next(QUIET) is None
    assert received == list(zip(ids, sent, strict=True))
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


async def test_ids_from_several_publishers_order_one_channel(new_bus: BusFactory) -> None:
    first, second, api = await new_bus(), await new_bus(), await new_bus()
    async with api.subscribe("rec-1") as sub:
        ids: list[str] = []
        for n in range(BUFFER):  # no more than the buffer holds, since nobody reads meanwhile
            ids.append(await (first if n % 2 else second).publish("rec-1", event(n / BUFFER)))
        received = await receive(sub, len(ids))
    assert received == ids
    assert all(len(i) == 20 and i[13] == "-" for i in ids)  # 13 digits, dash, 6 digits
    assert ids == sorted(ids)


async def test_replay_works_across_processes(new_bus: BusFactory) -> None:
    worker, api = await new_bus(), await new_bus()
    sent = [event(n / 5) for n in range(5)]
    ids = [await worker.publish("rec-1", e) for e in sent]
    async with api.subscribe("rec-1", last_event_id=ids[1]) as sub:  # another server's id
        assert sub.resumed is True
        live = await worker.publish("rec-1", ready())
        with anyio.fail_after(5):
            received = [await sub.next(5) for _ in range(4)]
    assert received == [*zip(ids[2:], sent[2:], strict=True), (live, ready())]


async def test_a_late_subscriber_joins_a_busy_channel_without_gap(new_bus: BusFactory) -> None:
    worker, api = await new_bus(), await new_bus(buffer=1000)  # nothing dropped here
    total = 60
    published: list[str] = []
    started = anyio.Event()

    async def publish() -> None:
        for n in range(total):
            published.append(await worker.publish("rec-1", event(n / total)))
            if n == 10:
                started.set()
            await anyio.sleep(0.002)

    async with api.subscribe("rec-1") as early, anyio.create_task_group() as group:
        group.start_soon(publish)
        await started.wait()
        resume_at = len(published) - 2
        async with api.subscribe("rec-1", last_event_id=published[resume_at]) as late:
            assert late.resumed is True
            late_ids = await receive(late, total - resume_at - 1)
        early_ids = await receive(early, total)
    assert late_ids == published[resume_at + 1 :]
    assert early_ids == published


async def test_one_process_follows_many_channels(new_bus: BusFactory) -> None:
    worker, api = await new_bus(), await new_bus()
    channels = [f"rec-{n}" for n in range(100)]
    async with contextlib.AsyncExitStack() as stack:
        subs = [await stack.enter_async_context(api.subscribe(c)) for c in channels]
        ids = [await worker.publish(c, event(0.5)) for c in channels]
        for sub, event_id in zip(subs, ids, strict=True):
            assert await receive(sub, 1) == [event_id]
        assert len(api._channels) == len(channels)
    assert api._channels == {}


async def test_a_slow_reader_in_another_process_keeps_terminal_events(
    new_bus: BusFactory,
) -> None:
    worker, api = await new_bus(), await new_bus()
    async with api.subscribe("rec-1") as sub:
        ids = [await worker.publish("rec-1", event(n / 100)) for n in range(BUFFER * 2)]
        done = await worker.publish("rec-1", ready())
        ids += [await worker.publish("rec-1", event(0.99)) for _ in range(BUFFER)]
        await anyio.sleep(0.3)  # the reader has filled the buffer meanwhile
        received = await drain(sub)
    assert (done, ready()) in received
    assert len(received) == BUFFER
    assert sub.dropped == len(ids) + 1 - BUFFER
    assert [i for i, _ in received] == sorted(i for i, _ in received)


# --- keys in Redis ---------------------------------------------------------------------------


async def test_streams_are_bounded_and_expire(
    new_bus: BusFactory, keys: RedisKeys, inspect: Redis
) -> None:
    bus = await new_bus(ttl_s=60)
    for n in range(300):
        await bus.publish("rec-1", event(n / 300))
    key = f"{keys.prefix}:rec-1"
    assert await inspect.type(key) == "stream"
    assert RETAIN <= await inspect.xlen(key) < 300  # MAXLEN ~ trims in whole blocks
    assert 0 < await inspect.pttl(key) <= 60_000


async def test_a_channel_is_forgotten_a_ttl_after_its_last_event(
    new_bus: BusFactory, keys: RedisKeys, inspect: Redis
) -> None:
    worker = await new_bus(ttl_s=0.3)
    first = await worker.publish("rec-1", event(0.1))
    await anyio.sleep(0.2)
    second = await worker.publish("rec-1", event(0.2))  # renews the TTL
    await anyio.sleep(0.2)
    async with worker.subscribe("rec-1", last_event_id=first) as sub:
        assert sub.resumed is True
        assert await drain(sub) == [(second, event(0.2))]
    with anyio.fail_after(5):
        while await inspect.exists(f"{keys.prefix}:rec-1"):
            await anyio.sleep(0.05)
    async with worker.subscribe("rec-1", last_event_id=second) as sub:
        assert sub.resumed is False


async def test_prefixes_keep_tenants_apart(new_bus: BusFactory, keys: RedisKeys) -> None:
    ours = await new_bus()
    theirs = await new_bus(with_query(keys.server_url, prefix=f"{keys.prefix}-other"))
    async with ours.subscribe("rec-1") as sub:
        their_id = await theirs.publish("rec-1", event(0.1))
        assert await sub.next(0.2) is None
    async with ours.subscribe("rec-1", last_event_id=their_id) as sub:
        assert sub.resumed is False
    stored = keys.keys()
    assert f"{keys.prefix}-other:rec-1" in stored
    assert f"{keys.prefix}:rec-1" not in stored


async def test_an_entry_written_by_someone_else_is_skipped(
    new_bus: BusFactory, keys: RedisKeys, inspect: Redis
) -> None:
    api = await new_bus()
    async with api.subscribe("rec-1") as sub:
        await inspect.xadd(f"{keys.prefix}:rec-1", {"data": "not json"})
        await inspect.xadd(f"{keys.prefix}:rec-1", {"other": "field"})
        good = await api.publish("rec-1", event(0.3))
        assert await drain(sub) == [(good, event(0.3))]


# --- Redis unreachable -----------------------------------------------------------------------


async def test_an_unreachable_redis_is_backend_unavailable() -> None:
    bus = RedisEventBus.from_url(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    async with bus:
        with anyio.fail_after(10):
            with pytest.raises(BackendUnavailable, match="Redis is unavailable"):
                await bus.publish("rec-1", event(0.1))
            with pytest.raises(BackendUnavailable, match="Redis is unavailable"):
                async with bus.subscribe("rec-1"):
                    pass  # pragma: no cover
    with pytest.raises(EventBusClosed):
        await bus.publish("rec-1", event(0.1))


async def test_a_subscription_survives_a_cut_reader_connection(
    new_bus: BusFactory, inspect: Redis
) -> None:
    worker, api = await new_bus(), await new_bus()
    async with api.subscribe("rec-1") as sub:
        first = await worker.publish("rec-1", event(0.1))
        assert await receive(sub, 1) == [first]
        clients = await inspect.client_list()
        reader = [c["id"] for c in clients if c["name"] == api.reader_name]
        assert len(reader) == 1
        assert await inspect.client_kill_filter(_id=reader[0]) == 1
        second = await worker.publish("rec-1", event(0.2))
        assert await receive(sub, 1) == [second]


class Proxy:
    """A TCP relay to Redis that a test can take down and bring back: a network outage."""

    def __init__(self, target_url: str) -> None:
        target = urlsplit(target_url)
        self.target = (target.hostname or "127.0.0.1", target.port or 6379)
        self.port = free_port()
        netloc = target.netloc.rpartition("@")
        self.url = urlunsplit(
            target._replace(netloc=f"{netloc[0]}{netloc[1]}127.0.0.1:{self.port}")
        )
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._links):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            redis_r, redis_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        self._links |= {client_w, redis_w}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            client_w.close()
            redis_w.close()

        await asyncio.gather(pipe(client_r, redis_w), pipe(redis_r, client_w))
        self._links -= {client_w, redis_w}


async def test_a_subscription_waits_out_an_outage_and_misses_nothing(
    new_bus: BusFactory, keys: RedisKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="voxvault.events.redis")
    proxy = Proxy(keys.url)
    await proxy.start()
    try:
        worker, api = await new_bus(), await new_bus(proxy.url)
        async with api.subscribe("rec-1") as sub:
            first = await worker.publish("rec-1", event(0.1))
            assert await receive(sub, 1) == [first]
            await proxy.stop()
            with pytest.raises(BackendUnavailable):
                await api.publish("rec-1", event(0.2))
            during = [await worker.publish("rec-1", event(n / 10)) for n in range(3, 6)]
            assert await sub.next(0.5) is None  # no error: just nothing, as when idle
            await proxy.start()
            assert await receive(sub, 3, timeout=10) == during
            after = await worker.publish("rec-1", ready())
            assert await receive(sub, 1) == [after]
        logged = [r.getMessage() for r in caplog.records]
        assert any("lost Redis" in m for m in logged)
        assert any("reconnected" in m for m in logged)
    finally:
        await proxy.stop()


# --- the registry ----------------------------------------------------------------------------


async def test_open_event_bus_by_redis_url(keys: RedisKeys) -> None:
    bus = open_event_bus(keys.url)
    assert isinstance(bus, RedisEventBus)
    async with bus:
        event_id = await bus.publish("rec-1", event(0.1))
    assert keys.keys() == [f"{keys.prefix}:rec-1"]
    assert event_id

    for url in ("redis://localhost:6379/0", "rediss://cache.example:6380"):
        other: EventBus = open_event_bus(url)  # nothing connects before the first use
        assert isinstance(other, RedisEventBus)
        assert other._prefix == DEFAULT_PREFIX
        await other.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://localhost:6379/0?prefix=", "prefix must not be empty"),
        ("redis://localhost:6379/0?socket_timeout=soon", "socket_timeout"),
        ("redis://localhost:6379/0?no_such_option=1", "no_such_option"),
        ("redis", "redis"),
    ],
)
async def test_open_event_bus_rejects_bad_redis_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        open_event_bus(url)


async def test_a_closed_bus_refuses_work_and_ends_subscriptions(new_bus: BusFactory) -> None:
    bus = await new_bus()
    async with bus.subscribe("rec-1") as sub:
        await bus.close()
        with pytest.raises(EventBusClosed):
            await sub.next(1)
    with pytest.raises(EventBusClosed):
        async with bus.subscribe("rec-1"):
            pass  # pragma: no cover
