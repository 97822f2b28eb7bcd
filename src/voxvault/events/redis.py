"""EventBus on Redis Streams: workers and API servers in different processes share progress.

``VOXVAULT_EVENTS_URL=redis://host:6379/0`` (or ``rediss://``; any option redis-py reads from
a URL query works too, e.g. ``?max_connections=50``). ``?prefix=...`` sets the key prefix
(default ``voxvault:events``), so tenants and test runs can share one Redis.

Layout. A channel is the stream ``<prefix>:<channel>``. ``publish`` runs ``XADD MAXLEN ~ 256``
and ``PEXPIRE`` (15 minutes) in one transaction, so the last events of a channel stay for
replay and an idle channel disappears by itself. The stream entry id is the event id, padded as
``<ms, 13 digits>-<seq, 6 digits>`` so that plain string order is publish order (as the
in-memory adapter does; a stream would need a million entries in one millisecond to overflow
the sequence).

Reading. Each bus (one per process) has **one reader task** on a dedicated connection that
runs ``XREAD BLOCK`` over every channel with a local subscription and fans entries out to them.
That is one connection per process whatever the number of SSE clients (1,000 subscribers on
two API processes: two blocked connections, not 1,000), and several clients of one recording
share one read. Each subscription remembers the last id it got, and the reader reads each
channel from the oldest of those, so a subscription joining late, or resuming from
``last_event_id``, never misses an entry; entries a subscription already has are skipped, so
none arrives twice. A new channel must join the blocked ``XREAD``: ``subscribe`` wakes the
reader by adding to a private stream (``<prefix>#wake:<uuid>``) the reader also blocks on.

A publish also reads, in the same transaction, what the channel got since its local
subscriptions last read and hands it to them at once: subscribers in the publishing process are
served without waiting for the reader, as with the in-memory bus.

Errors. Commands that cannot reach Redis raise ``BackendUnavailable`` (``publish``, entering
``subscribe``); after ``close`` they raise ``EventBusClosed``. A lost connection during a
subscription is **not** an error of the subscription: the reader logs it and reconnects with
backoff, and since every subscription knows the last id it got, it carries on from there
without a gap once Redis answers again (events trimmed or lost meanwhile, e.g. a Redis restart
without persistence, are gone; the SSE stream re-reads the database every second anyway).
Meanwhile ``next`` just times out, as when nothing happens, so an SSE response keeps polling
the database instead of failing.

Slow subscribers and terminal events follow the port's rules, applied to each subscription's
buffer as the reader fills it. Like every adapter, this bus is used from its event loop only.
Multi-key ``XREAD`` needs every channel on one node: Redis Cluster is not supported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import anyio.lowlevel
from pydantic import ValidationError
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import KeyT, StreamIdT

from voxvault.errors import BackendUnavailable, ConfigurationError
from voxvault.events.base import (
    BufferedSubscription,
    EventBus,
    EventBusClosed,
    ProgressEvent,
    Subscription,
)

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "voxvault:events"
DEFAULT_RETAIN = 256
"""Events kept per channel for replay (at least; ``MAXLEN ~`` trims in whole blocks)."""
DEFAULT_TTL_S = 15 * 60.0
"""How long a channel's stream outlives its last event; covers a browser's reconnect."""
DEFAULT_BUFFER = 1000
"""Events a subscription holds for its reader before it starts dropping stale progress."""
DEFAULT_MAX_CONNECTIONS = 50
"""Pool size unless the URL says ``max_connections``; a caller waits for a free connection."""
SOCKET_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 3.0
POOL_TIMEOUT_S = 5.0
READ_BLOCK_MS = 2000
"""Longest single XREAD wait; well under the socket timeout, so a dead link gets noticed."""
RECONNECT_DELAYS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
"""Pauses of the reader between attempts to reach Redis again; the last one repeats."""
WAKE_TTL_MS = 60_000

_FIELD = "data"
_ID = re.compile(r"(\d{1,20})-(\d{1,20})")

Entry = tuple[str, ProgressEvent]
StreamId = tuple[int, int]
"""A stream entry id ``ms-seq`` as numbers, which compare in stream order."""


def _parse_id(text: str) -> StreamId | None:
    match = _ID.fullmatch(text)
    return (int(match[1]), int(match[2])) if match else None


def _public_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]:013d}-{stream_id[1]:06d}"


def _redis_id(stream_id: StreamId) -> str:
    return f"{stream_id[0]}-{stream_id[1]}"


class _ReplacesResetConnections(AbstractConnection):
    """Reconnects before sending on a connection the peer closed while it sat in the pool.

    A reset (Redis restarted, a proxy or the network dropped the link) leaves the stream with an
    error but no end-of-file, so the pool hands the connection out again, and the write to its
    closed transport raises the event loop's own error (uvloop's RuntimeError, which ``serve``
    runs on) rather than ``ConnectionError``: neither the retry nor the adapter's error handling
    would catch it (redis-py issue #4287; its fix is in no release up to 8.1.0). Checked before
    each send, a closed transport is replaced: if Redis is back the command goes through, if it
    is still away the send fails with ``ConnectionError`` like any other.
    """

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        writer = self._writer
        if writer is not None and writer.transport.is_closing():
            await self.disconnect(nowait=True)
        await super().send_packed_command(command, check_health)


def _replacing_reset_connections(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` (plain, TLS or Unix socket, as the URL chose) with the check above."""
    if issubclass(cls, _ReplacesResetConnections):
        return cls
    made = type(cls.__name__, (_ReplacesResetConnections, cls), {})
    return cast(type[AbstractConnection], made)


class _RedisSubscription(BufferedSubscription):
    def __init__(self, limit: int, after: StreamId, *, resumed: bool) -> None:
        super().__init__(limit, resumed=resumed)
        self.after = after
        """The id of the newest entry of the channel this subscription has had (or skips)."""


class RedisEventBus(EventBus):
    """Progress events shared by every process on one Redis; see the module docstring."""

    def __init__(
        self,
        pool: BlockingConnectionPool,
        *,
        prefix: str = DEFAULT_PREFIX,
        retain: int = DEFAULT_RETAIN,
        ttl_s: float = DEFAULT_TTL_S,
        buffer: int = DEFAULT_BUFFER,
    ) -> None:
        if retain < 1 or buffer < 1 or not ttl_s >= 0.001:
            raise ValueError("retain, buffer and ttl_s must be positive")
        if not prefix:
            raise ValueError("the key prefix must not be empty")
        self._pool = pool
        self._redis = Redis(connection_pool=pool)
        self._prefix = prefix
        self._retain = retain
        self._ttl_ms = round(ttl_s * 1000)
        self._buffer = buffer
        socket_timeout = pool.connection_kwargs.get("socket_timeout")
        self._block_ms = (
            READ_BLOCK_MS
            if not socket_timeout
            else max(1, min(READ_BLOCK_MS, int(socket_timeout * 500)))
        )
        self._channels: dict[str, set[_RedisSubscription]] = {}
        self._wake_key = f"{prefix}#wake:{uuid.uuid4().hex}"
        self._reader: asyncio.Task[None] | None = None
        # The reader's own connection, named so that CLIENT LIST shows it.
        self.reader_name = f"voxvault-events-reader-{self._wake_key.rpartition(':')[2]}"
        self._reader_pool = ConnectionPool(
            connection_class=pool.connection_class,
            max_connections=1,
            **{**pool.connection_kwargs, "client_name": self.reader_name},
        )
        self._reader_client = Redis(
            connection_pool=self._reader_pool, single_connection_client=True
        )
        self._reading: dict[str, StreamId] | None = None
        """Where the XREAD in flight reads each channel from; None between two reads."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        retain: int = DEFAULT_RETAIN,
        ttl_s: float = DEFAULT_TTL_S,
        buffer: int = DEFAULT_BUFFER,
    ) -> RedisEventBus:
        """The bus a ``redis://`` or ``rediss://`` URL names; connects only when first used."""
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefix = next((value for name, value in reversed(query) if name == "prefix"), None)
        ours = {"prefix", "decode_responses"}
        rest = urlunsplit(parts._replace(query=urlencode([q for q in query if q[0] not in ours])))
        shown = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        defaults: dict[str, Any] = {
            "max_connections": DEFAULT_MAX_CONNECTIONS,
            "timeout": POOL_TIMEOUT_S,
            "socket_timeout": SOCKET_TIMEOUT_S,
            "socket_connect_timeout": CONNECT_TIMEOUT_S,
            "health_check_interval": 30,
            # One quick second try covers a pooled connection Redis closed meanwhile; more
            # would stall a worker's publish while Redis is down.
            "retry": Retry(NoBackoff(), 1, (RedisConnectionError,)),
        }
        try:
            # Options in the URL win over the defaults, as redis-py has it.
            pool = BlockingConnectionPool.from_url(rest, **{**defaults, "decode_responses": True})
            pool.connection_class = _replacing_reset_connections(pool.connection_class)
            # Unknown URL options fail now rather than at the first command.
            pool.connection_class(**pool.connection_kwargs)
            return cls(
                pool,
                prefix=DEFAULT_PREFIX if prefix is None else prefix,
                retain=retain,
                ttl_s=ttl_s,
                buffer=buffer,
            )
        except (ValueError, TypeError) as exc:
            raise ConfigurationError(f"event bus URL {shown!r}: {exc}") from exc

    # ---- the port ----------------------------------------------------------------------------

    async def publish(self, channel: str, event: ProgressEvent) -> str:
        await anyio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller publishes nothing
        self._check_usable()
        key = self._key(channel)
        local = self._channels.get(channel)
        since = min(s.after for s in local) if local else None
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xadd(key, {_FIELD: event.model_dump_json()}, maxlen=self._retain)
                pipe.pexpire(key, self._ttl_ms)
                if since is not None:  # what local subscribers have not had, this one included
                    pipe.xrange(key, min=f"({_redis_id(since)}", max="+")
                results = await pipe.execute()
        except RedisError as exc:
            raise self._unavailable("publish", exc) from exc
        new_id = _parse_id(str(results[0]))
        if new_id is None:  # pragma: no cover - Redis always answers with an entry id
            raise BackendUnavailable(f"Redis answered XADD with {results[0]!r}")
        if since is not None:
            self._fan_out(channel, since, results[2])
        return _public_id(new_id)

    @asynccontextmanager
    async def subscribe(
        self, channel: str, *, last_event_id: str | None = None
    ) -> AsyncIterator[Subscription]:
        self._check_usable()
        key = self._key(channel)
        resume_at = _parse_id(last_event_id) if last_event_id else None
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xrevrange(key, max="+", min="-", count=1)
                if resume_at is not None:
                    # The newest events back to resume_at: it is retained when it comes last.
                    pipe.xrevrange(key, max="+", min=_redis_id(resume_at), count=self._retain)
                results = await pipe.execute()
        except RedisError as exc:
            raise self._unavailable("subscribe", exc) from exc
        self._check_usable()  # closed while waiting for Redis
        newest = results[0]
        after = _parse_id(str(newest[0][0])) if newest else None
        replay: list[tuple[StreamId, ProgressEvent | None]] | None = None
        if resume_at is not None and results[1] and _parse_id(results[1][-1][0]) == resume_at:
            replay = self._decode(channel, reversed(results[1][:-1]))
        subscription = _RedisSubscription(self._buffer, after or (0, 0), resumed=replay is not None)
        for stream_id, item in replay or ():
            if item is not None:
                subscription.deliver((_public_id(stream_id), item))
        subscribers = self._channels.setdefault(channel, set())
        subscribers.add(subscription)
        try:
            await self._join_reader(channel, subscription.after)
            yield subscription
        finally:
            subscribers.discard(subscription)
            if not subscribers and self._channels.get(channel) is subscribers:
                del self._channels[channel]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for subscribers in self._channels.values():
            for subscription in subscribers:
                subscription.close()
        reader, self._reader = self._reader, None
        if reader is not None:
            # Cancelled again until it ends: on Python 3.11, redis-py can swallow a
            # cancellation that lands while a command is being sent (asyncio.wait_for).
            while not reader.done():
                reader.cancel()
                await asyncio.wait({reader}, timeout=0.1)
            if not reader.cancelled() and reader.exception() is not None:
                log.error("event bus: the reader had stopped", exc_info=reader.exception())
            with contextlib.suppress(RedisError), anyio.move_on_after(1):
                await self._redis.delete(self._wake_key)  # else it expires by itself
        await self._reader_client.aclose()
        await self._reader_pool.aclose()
        await self._redis.aclose()
        await self._pool.aclose()

    # ---- the reader --------------------------------------------------------------------------

    async def _join_reader(self, channel: str, after: StreamId) -> None:
        """Make sure the reader reads ``channel`` from ``after`` or earlier, starting it first."""
        if self._reader is None or self._reader.done():
            if self._reader is not None and not self._reader.cancelled():
                log.error("event bus: the reader had stopped", exc_info=self._reader.exception())
            self._reader = asyncio.create_task(self._read_forever(), name="voxvault-events")
            return  # its first XREAD has every channel
        reading = self._reading
        if reading is None:
            return  # between two reads: the next one includes the channel
        position = reading.get(channel)
        if position is not None and position <= after:
            return
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.xadd(self._wake_key, {"wake": "1"}, maxlen=1, approximate=False)
                pipe.pexpire(self._wake_key, WAKE_TTL_MS)
                await pipe.execute()
        except RedisError as exc:
            raise self._unavailable("subscribe", exc) from exc

    async def _read_forever(self) -> None:
        wake_from = "0-0"
        failures = 0
        while not self._closed:
            positions = {
                channel: min(s.after for s in subscribers)
                for channel, subscribers in self._channels.items()
                if subscribers
            }
            streams: dict[KeyT, StreamIdT] = {self._wake_key: wake_from}
            streams.update({self._key(c): _redis_id(p) for c, p in positions.items()})
            self._reading = positions
            try:
                reply = await self._reader_client.xread(
                    streams, count=self._retain, block=self._block_ms
                )
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                delay = RECONNECT_DELAYS_S[min(failures, len(RECONNECT_DELAYS_S) - 1)]
                if failures == 0:
                    log.warning("event bus: lost Redis (%s); reconnecting", exc)
                failures += 1
                await asyncio.sleep(delay)
                continue
            except RedisError:
                log.exception("event bus: reading from Redis failed; trying again")
                failures += 1
                await asyncio.sleep(RECONNECT_DELAYS_S[-1])
                continue
            finally:
                self._reading = None
            if failures:
                log.warning("event bus: reconnected to Redis")
                failures = 0
            for key, entries in _stream_items(reply):
                if key == self._wake_key:
                    wake_from = str(entries[-1][0])
                    continue
                channel = key[len(self._prefix) + 1 :]
                if channel in positions:
                    self._fan_out(channel, positions[channel], entries)

    def _fan_out(self, channel: str, since: StreamId, entries: Sequence[Any]) -> None:
        """Hand the entries of ``channel`` read after ``since`` to the subscriptions they are
        next for: those that had read up to ``since`` at least, each from its own position."""
        subscribers = self._channels.get(channel)
        if not subscribers or not entries:
            return
        decoded = self._decode(channel, entries)
        for subscription in subscribers:
            if subscription.after < since:
                continue  # it joined further back: the next read starts from its position
            for stream_id, item in decoded:
                if stream_id > subscription.after:
                    subscription.after = stream_id
                    if item is not None:
                        subscription.deliver((_public_id(stream_id), item))

    def _decode(
        self, channel: str, entries: Iterable[Any]
    ) -> list[tuple[StreamId, ProgressEvent | None]]:
        """Stream entries as events; None for one this bus did not write (it is skipped)."""
        decoded: list[tuple[StreamId, ProgressEvent | None]] = []
        for raw_id, fields in entries:
            stream_id = _parse_id(str(raw_id))
            if stream_id is None:  # pragma: no cover - Redis ids always look like this
                continue
            try:
                item: ProgressEvent | None = ProgressEvent.model_validate_json(fields[_FIELD])
            except (KeyError, TypeError, ValidationError):
                log.warning("event bus: skipping malformed entry %s of %s", raw_id, channel)
                item = None
            decoded.append((stream_id, item))
        return decoded

    # ---- helpers -----------------------------------------------------------------------------

    def _key(self, channel: str) -> str:
        return f"{self._prefix}:{channel}"

    def _unavailable(self, action: str, exc: RedisError) -> BackendUnavailable:
        if self._closed:
            return EventBusClosed("the event bus is closed")
        return BackendUnavailable(f"event bus: cannot {action}, Redis is unavailable: {exc}")

    def _check_usable(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise RuntimeError(
                "the Redis event bus is used from its event loop only; "
                "from a worker thread call anyio.from_thread.run(bus.publish, channel, event)"
            )
        if self._closed:
            raise EventBusClosed("the event bus is closed")


def _stream_items(reply: Any) -> list[tuple[str, Sequence[Any]]]:
    """XREAD's answer as (key, entries) pairs, for RESP2 (a list) and RESP3 (a map)."""
    if not reply:
        return []
    if isinstance(reply, Mapping):  # RESP3 wraps each stream's entries in one more list
        return [(str(key), nested[0] if nested else []) for key, nested in reply.items()]
    return [(str(key), entries) for key, entries in reply]
