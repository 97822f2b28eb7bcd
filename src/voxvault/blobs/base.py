"""The BlobStore port.

The base class owns the public behaviour every adapter shares: streaming from an async iterator
in flat memory, size and sha256 computed on the way, upload limits, and leaving nothing behind
when a put fails or is cancelled. Adapters implement the small primitives below the line.

A store that can assemble a blob from parts sent one by one (S3's multipart uploads:
``part_limits``) takes the chunks of a resumable upload as parts of the recording's own blob,
which then appears whole when the upload completes, without a byte being copied.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol

import anyio
import anyio.to_thread

from voxvault.blobs.keys import validate_key
from voxvault.errors import EmptyUpload, InvalidRequest, PayloadTooLarge

READ_CHUNK_BYTES = 1024 * 1024
FILE_CHUNK_BYTES = 1024 * 1024

# Received bytes that may wait for each of a put's threads. Past this the event loop stops
# reading the body until the thread has caught up by half, so a slow disk throttles the client
# through TCP instead of filling memory; below it, the loop never waits for hashing or the disk.
PUT_QUEUE_BYTES = 8 * 1024 * 1024
# Received bytes handed to the lanes at once: each hand-over wakes every lane's thread, and a
# request body arrives in pieces of a few hundred kilobytes.
LANE_BATCH_BYTES = 1024 * 1024


class Digest(Protocol):
    """A running hash, as hashlib makes them."""

    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...

    def copy(self) -> Digest: ...


class ByteCheck(Protocol):
    """Something a put feeds every byte to and asks, before committing, whether to go on."""

    def update(self, data: bytes, /) -> None: ...

    def verify(self) -> None:
        """Raise to refuse the bytes fed; the put then leaves nothing behind."""


class _KnownDigest:
    """A hash already known: a put that is given one hashes nothing."""

    def __init__(self, hexdigest: str) -> None:
        self._hexdigest = hexdigest

    def update(self, data: bytes, /) -> None:
        pass

    def hexdigest(self) -> str:
        return self._hexdigest

    def copy(self) -> Digest:
        return self


@dataclass(frozen=True, slots=True)
class StoredBlob:
    key: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class BlobInfo:
    key: str
    size: int
    modified_at: datetime


@dataclass(frozen=True, slots=True)
class StagedLeftover:
    """Bytes a put staged and nobody will commit: its process died before commit or abort.

    ``name`` is the store's own handle for it (shown to operators, passed to ``remove_staging``).
    """

    name: str
    size: int
    modified_at: datetime


@dataclass(frozen=True, slots=True)
class PartLimits:
    """What a store's multipart uploads accept (S3: parts of 5 MiB to 5 GiB, numbered 1 to
    10,000)."""

    min_bytes: int
    """Every part of an assembled blob but its last is at least this big."""
    max_bytes: int
    max_number: int


@dataclass(frozen=True, slots=True)
class StoredPart:
    """A part stored in a multipart upload (``BlobStore.put_part``)."""

    number: int
    etag: str
    """The store's name for the part's bytes, which ``complete_multipart`` is given back."""
    size: int
    sha256: str


class BlobSink(ABC):
    """One put in progress: bytes go to a staging place and become visible only on commit.

    The base class calls its methods from worker threads, never from the event loop (but a
    ``commit`` that does no I/O, see ``commit_blocks``), and one at a time: writes in order
    from the put's writing thread, then ``flush`` from that thread, then commit or abort once
    no write can still be running. So implementations block freely and need no locking.
    """

    commit_blocks: bool = True
    """False while the sink's ``commit`` would do no I/O: it is then called on the event loop."""

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    def flush(self) -> None:  # noqa: B027 - a sink that syncs nothing early needs nothing here
        """Make the bytes written so far durable; called from the writing thread after the last
        write, while the put's other lanes may still be hashing, and before commit (which is
        not called if the put then fails: abort is)."""

    @abstractmethod
    def commit(self) -> None:
        """Make the bytes durable (if ``flush`` has not) and visible under the key, atomically."""

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written; must be safe to call after a failed write or commit."""


class PartSink(BlobSink):
    """A put of one part of a multipart upload; ``commit`` sets ``etag``."""

    etag: str = ""


class _ExactSize:
    """Refuses a part that ends before the size it was announced with (its sender went away):
    the store was promised that many bytes."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._seen = 0

    def update(self, data: bytes, /) -> None:
        self._seen += len(data)

    def verify(self) -> None:
        if self._seen != self._size:
            raise InvalidRequest(f"the part ended after {self._seen} of its {self._size} bytes")


class AppendTarget(ABC):
    """A blob that grows in place, held by one writer at a time (``BlobStore.appending``).

    Each append writes at an offset, dropping whatever lay past it, and is durable once it
    returns. The holder decides which offset is right (the caller's own record of what is
    durable): bytes past that offset are a chunk nobody recorded, e.g. one a crash cut short.
    """

    key: str
    size: int
    """The blob's size when it was taken (only its holder changes it)."""

    @abstractmethod
    async def append(
        self,
        offset: int,
        chunks: AsyncIterable[bytes],
        *,
        max_bytes: int | None = None,
        sha256: Digest | None = None,
        checks: Sequence[ByteCheck] = (),
        then: Callable[[int], Awaitable[object]] | None = None,
    ) -> StoredBlob:
        """Write the stream at ``offset`` and make it durable, as ``BlobStore.put_stream`` puts
        one (limits, running hash, checks), except that an empty stream is allowed; the size
        and hash returned are the stream's. On any failure the blob is cut back to ``offset``.

        ``then`` is awaited with the stream's size once its bytes are durable and verified
        (shielded; the hash may still be catching up meanwhile): the place to record them. If
        it raises, the blob is cut back to ``offset`` and the append raises that."""


class _LaneThreads:
    """Daemon threads that run lanes, each kept a while for the next: a put starts several
    lanes, and starting a thread for each cost it a wait for that thread every time."""

    IDLE_S = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = 0
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def run(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put(job)
                return
        threading.Thread(target=self._serve, args=(job,), name="voxvault-lane", daemon=True).start()

    def _serve(self, job: Callable[[], None]) -> None:
        while True:
            job()
            with self._lock:
                self._idle += 1
            while True:
                try:
                    job = self._jobs.get(timeout=self.IDLE_S)
                    break
                except queue.Empty:
                    with self._lock:
                        # Jobs are put under the lock: none can arrive between this look and
                        # the thread leaving the idle count.
                        if self._jobs.empty():
                            self._idle -= 1
                            return


_lane_threads = _LaneThreads()


class _Lane:
    """One thread that passes a put's chunks, in order, to ``consume`` while the loop receives,
    then calls ``finish`` once the loop has closed it (not if it abandoned it).

    A put runs two lanes, one hashing and one writing to the sink: hashlib and file writes
    release the GIL, so both overlap each other and the event loop reading the socket. The
    loop never waits for a lane until ``PUT_QUEUE_BYTES`` are queued in it; then it waits until
    half of them are consumed.
    """

    def __init__(
        self, consume: Callable[[bytes], object], finish: Callable[[], object] | None = None
    ) -> None:
        self._consume = consume
        self._finish = finish
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._closed = False
        self._abandoned = False
        self._finished = False
        self._error: BaseException | None = None
        # Waits run in helper threads under a limiter of their own, so that uploads held back
        # by a slow disk cannot use up the tokens of anyio's default thread limiter.
        self._limiter = anyio.CapacityLimiter(1)
        _lane_threads.run(self._run)

    # ---- event-loop side ----------------------------------------------------------------------

    def push(self, chunks: Sequence[bytes], size: int) -> bool:
        """Queue chunks of ``size`` bytes in all without blocking; True when the loop should
        ``wait_for_room`` now."""
        with self._cond:
            if self._error is not None:
                raise self._error
            self._chunks.extend(chunks)
            self._queued += size
            self._cond.notify_all()
            return self._queued >= PUT_QUEUE_BYTES

    async def wait_for_room(self) -> None:
        # Leaving the helper behind on cancellation is safe: ``abandon`` wakes it up.
        await anyio.to_thread.run_sync(
            self._wait, self._has_room, abandon_on_cancel=True, limiter=self._limiter
        )
        self._raise_error()

    @staticmethod
    async def drain(lanes: Sequence[_Lane]) -> None:
        """Wait until every chunk queued in ``lanes`` is consumed (one thread hop for them all);
        raises what a ``consume`` raised."""
        for lane in lanes:
            with lane._cond:
                lane._closed = True
                lane._cond.notify_all()

        def wait_all() -> None:
            for lane in lanes:
                lane._wait(lane._is_finished)

        if lanes:
            await anyio.to_thread.run_sync(wait_all, limiter=lanes[0]._limiter)
        for lane in lanes:
            lane._raise_error()

    async def abandon(self) -> None:
        """Drop the queued chunks and wait until ``consume`` is no longer running."""
        with self._cond:
            self._abandoned = True
            self._chunks.clear()
            self._queued = 0
            self._cond.notify_all()
        await anyio.to_thread.run_sync(self._wait, self._is_finished, limiter=self._limiter)

    def _raise_error(self) -> None:
        with self._cond:
            if self._error is not None:
                raise self._error

    def _has_room(self) -> bool:
        return self._queued <= PUT_QUEUE_BYTES // 2 or self._finished or self._abandoned

    def _is_finished(self) -> bool:
        return self._finished

    def _wait(self, predicate: Callable[[], bool]) -> None:
        with self._cond:
            self._cond.wait_for(predicate)

    # ---- lane thread --------------------------------------------------------------------------

    def _next_chunk(self) -> bytes | None:
        """The next chunk, or None when the loop has closed or abandoned the lane."""
        with self._cond:
            self._cond.wait_for(lambda: self._chunks or self._closed or self._abandoned)
            if self._abandoned or not self._chunks:
                return None
            chunk = self._chunks.popleft()
            self._queued -= len(chunk)
            if self._queued <= PUT_QUEUE_BYTES // 2:
                self._cond.notify_all()
            return chunk

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            while (chunk := self._next_chunk()) is not None:
                self._consume(chunk)
            with self._cond:
                finish = None if self._abandoned else self._finish
            if finish is not None:
                finish()
        except BaseException as exc:
            error = exc
        with self._cond:
            self._error = error
            self._finished = True
            self._chunks.clear()
            self._queued = 0
            self._cond.notify_all()


def too_large(max_bytes: int) -> PayloadTooLarge:
    """What a store raises once a blob being written passes ``max_bytes``."""
    return PayloadTooLarge(
        f"the upload exceeds the limit of {max_bytes} bytes", detail={"max_bytes": max_bytes}
    )


async def fill_sink(
    sink: BlobSink,
    key: str,
    chunks: AsyncIterable[bytes],
    *,
    max_bytes: int | None = None,
    allow_empty: bool = False,
    sha256: Digest | None = None,
    checks: Sequence[ByteCheck] = (),
    then: Callable[[int], Awaitable[object]] | None = None,
) -> StoredBlob:
    """Stream ``chunks`` into ``sink`` and commit it, or abort it on any failure (``put_stream``
    and appends share this: see ``BlobStore.put_stream`` for the arguments).

    ``then`` is awaited with the size once the bytes are committed, shielded from cancellation,
    while the hash may still be catching up; if it raises, the sink is aborted after all (for
    appends, whose abort cuts the bytes back; a put's commit cannot be undone, so puts pass
    none). The hash is taken last: nothing but the returned ``sha256`` waits for it."""
    digest = sha256 if sha256 is not None else hashlib.sha256()
    lanes: list[_Lane] = []
    size = 0
    try:
        lanes += [_Lane(digest.update), _Lane(sink.write, finish=sink.flush)]
        lanes += [_Lane(check.update) for check in checks]
        batch: list[bytes] = []
        batched = 0

        async def hand_over() -> None:
            nonlocal batch, batched
            full = [lane for lane in lanes if lane.push(batch, batched)]
            batch, batched = [], 0
            for lane in full:
                await lane.wait_for_room()

        async for chunk in chunks:
            if not chunk:
                continue
            if not isinstance(chunk, bytes):
                # The lanes read the chunk later; a reused buffer could change under them.
                chunk = bytes(chunk)
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise too_large(max_bytes)
            batch.append(chunk)
            batched += len(chunk)
            if batched >= LANE_BATCH_BYTES:
                await hand_over()
        if batch:
            await hand_over()
        if size == 0 and not allow_empty:
            raise EmptyUpload("the upload is empty")
        hashing, rest = lanes[0], lanes[1:]
        await _Lane.drain(rest)
        for check in checks:
            check.verify()
        if sink.commit_blocks:
            await anyio.to_thread.run_sync(sink.commit)
        else:
            sink.commit()
        if then is not None:
            with anyio.CancelScope(shield=True):
                await then(size)
    except BaseException:
        with anyio.CancelScope(shield=True):
            # The sink is aborted only once no lane can be writing to it any more.
            for lane in lanes:
                await lane.abandon()
            await anyio.to_thread.run_sync(sink.abort)
        raise
    # Committed (and taken up by ``then``): from here on nothing is undone.
    await _Lane.drain([hashing])
    return StoredBlob(key=key, size=size, sha256=digest.hexdigest())


class BlobStore(ABC):
    scheme: ClassVar[str]
    lists_staging: ClassVar[bool] = False
    """Whether ``staging_leftovers`` can see what crashed puts left; a store that cannot (S3:
    obstore cannot list incomplete multipart uploads) relies on the store's own expiry."""

    appends_in_place: ClassVar[bool] = False
    """Whether ``appending`` works here: a blob grown in place (local files; S3 objects are
    immutable, so chunks there are separate blobs joined at the end by ``compose``)."""

    part_limits: ClassVar[PartLimits | None] = None
    """Where the store can assemble a blob from parts stored one by one (S3's multipart uploads:
    ``start_multipart``, ``put_part``, ``complete_multipart``), what it accepts of them; None
    where it cannot (local files grow in place instead, ``appending``)."""

    # ---- public behaviour -------------------------------------------------------------------

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        max_bytes: int | None = None,
        allow_empty: bool = False,
        sha256: Digest | None = None,
        checks: Sequence[ByteCheck] = (),
    ) -> StoredBlob:
        """Store the stream under ``key`` (replacing any blob there) and return its size and hash.

        Raises ``PayloadTooLarge`` as soon as the stream passes ``max_bytes`` and ``EmptyUpload``
        for an empty stream unless ``allow_empty``; in every failure, nothing is left behind.

        ``sha256`` continues a running hash (updated in place) instead of starting one, so that
        bytes stored in several puts are hashed once as they arrive; the returned ``sha256`` is
        then the running one. Each of ``checks`` sees every byte, in a thread of its own, and is
        asked to ``verify`` before the commit.
        """
        validate_key(key)
        sink = await anyio.to_thread.run_sync(self._open_sink, key)
        return await fill_sink(
            sink,
            key,
            chunks,
            max_bytes=max_bytes,
            allow_empty=allow_empty,
            sha256=sha256,
            checks=checks,
        )

    async def compose(
        self,
        key: str,
        parts: Sequence[str],
        *,
        sha256: str | None = None,
        max_bytes: int | None = None,
        sizes: Sequence[int] | None = None,
    ) -> StoredBlob:
        """Store the blobs ``parts``, one after the other, under ``key``; the parts stay.

        ``sizes`` are the parts' sizes when the caller has just checked them, so that a store
        which needs them does not ask for them again.

        ``sha256`` is the caller's hash of those bytes, taken as they arrived, so that they are
        not read back to be hashed; without it they are hashed on the way. ``NotFound`` for a
        missing part, ``PayloadTooLarge`` past ``max_bytes``; in every failure, nothing is left
        behind. Streamed through ``put_stream`` here; a store that can join blobs without
        moving their bytes through the process does that instead.
        """

        async def chunks() -> AsyncIterator[bytes]:
            for part in parts:
                info = await self.stat(part)
                async for chunk in self.stream_range(part, 0, info.size):
                    yield chunk

        known = _KnownDigest(sha256) if sha256 is not None else None
        return await self.put_stream(
            key, chunks(), max_bytes=max_bytes, allow_empty=True, sha256=known
        )

    def appending(self, key: str) -> AbstractAsyncContextManager[AppendTarget]:
        """Hold the growable blob at ``key`` (created empty if absent) for appending, or raise
        ``Conflict`` at once when another writer, in any process, holds it. Only where
        ``appends_in_place``. Once such a blob is composed into another, append no more: the
        store may share its bytes with the composed blob instead of copying them."""
        raise NotImplementedError(f"{type(self).__name__} cannot append in place")

    async def put_part(
        self,
        key: str,
        multipart_id: str,
        number: int,
        chunks: AsyncIterable[bytes],
        *,
        size: int,
        sha256: Digest | None = None,
        checks: Sequence[ByteCheck] = (),
    ) -> StoredPart:
        """Store the stream, which must be exactly ``size`` bytes, as part ``number`` of the
        multipart upload ``multipart_id`` of ``key`` (``start_multipart``); only where
        ``part_limits``. Nothing shows at ``key`` until the upload is completed with the part.

        As ``put_stream`` stores one (running hash, checks), in flat memory whatever the size; a
        stream that ends early (``InvalidRequest``), runs past ``size`` (``PayloadTooLarge``),
        fails or fails a check stores no part. A part stored under a number already used
        replaces the one there: callers give each attempt a number of its own.
        """
        limits = self.part_limits
        if limits is None:
            raise NotImplementedError(f"{type(self).__name__} cannot store parts")
        validate_key(key)
        if not 1 <= number <= limits.max_number:
            raise ValueError(f"part numbers go from 1 to {limits.max_number}, not {number}")
        if not 1 <= size <= limits.max_bytes:
            raise ValueError(f"a part holds 1 to {limits.max_bytes} bytes, not {size}")
        sink = await anyio.to_thread.run_sync(self._open_part_sink, key, multipart_id, number, size)
        stored = await fill_sink(
            sink, key, chunks, max_bytes=size, sha256=sha256, checks=[*checks, _ExactSize(size)]
        )
        return StoredPart(number=number, etag=sink.etag, size=stored.size, sha256=stored.sha256)

    async def start_multipart(self, key: str) -> str:
        """Begin a multipart upload of ``key`` and return its id; only where ``part_limits``.
        One that is neither completed nor aborted holds its parts invisibly (S3: until the
        bucket's lifecycle rule for incomplete multipart uploads removes them)."""
        raise NotImplementedError(f"{type(self).__name__} cannot store parts")

    async def complete_multipart(
        self, key: str, multipart_id: str, parts: Sequence[tuple[int, str]]
    ) -> None:
        """Make the blob at ``key`` of ``parts``, (number, ETag) pairs in ascending numbers,
        replacing any blob there; the upload's parts not listed are dropped. ``NotFound`` when
        the store knows no such upload (completed or aborted before)."""
        raise NotImplementedError(f"{type(self).__name__} cannot store parts")

    async def abort_multipart(self, key: str, multipart_id: str) -> bool:
        """Drop the multipart upload with its parts; False when the store knows no such upload
        (completed or aborted before). A blob at ``key`` is never touched."""
        raise NotImplementedError(f"{type(self).__name__} cannot store parts")

    async def put_bytes(self, key: str, data: bytes, *, allow_empty: bool = True) -> StoredBlob:
        async def once() -> AsyncIterator[bytes]:
            yield data

        return await self.put_stream(key, once(), allow_empty=allow_empty)

    async def put_file(self, key: str, path: Path, *, allow_empty: bool = True) -> StoredBlob:
        """Store a local file's bytes under ``key``."""

        async def chunks() -> AsyncIterator[bytes]:
            async with await anyio.open_file(path, "rb") as handle:
                while chunk := await handle.read(FILE_CHUNK_BYTES):
                    yield chunk

        return await self.put_stream(key, chunks(), allow_empty=allow_empty)

    async def local_copy(self, key: str, scratch: Path) -> Path:
        """A local file holding the blob's bytes, for tools that need a path (decoders).

        Downloaded into the ``scratch`` directory here; a store on local disk hands out the
        blob's own file instead, which the caller must only read.
        """
        info = await self.stat(key)
        await anyio.Path(scratch).mkdir(parents=True, exist_ok=True)
        target = scratch / "source"
        async with await anyio.open_file(target, "wb") as handle:
            async for part in self.stream_range(key, 0, info.size):
                await handle.write(part)
        return target

    async def presigned_url(
        self, key: str, ttl_s: int, public_endpoint: str | None = None
    ) -> str | None:
        """A URL the store itself serves the blob at (with ranges) until ``ttl_s`` runs out, or
        ``None`` when the store cannot (local disk: VoxVault signs and serves its own links)."""
        return None

    async def read_range(self, key: str, start: int, length: int) -> bytes:
        """Read ``length`` bytes from ``start`` (fewer only at the end of the blob)."""
        parts = [part async for part in self.stream_range(key, start, length)]
        return b"".join(parts)

    async def read_all(self, key: str) -> bytes:
        info = await self.stat(key)
        return await self.read_range(key, 0, info.size)

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every blob under ``prefix`` (which must end in '/'); returns how many."""
        validate_key(prefix.rstrip("/"))
        keys = [info.key async for info in self.list(prefix)]
        for key in keys:
            await self.delete(key)
        return len(keys)

    # ---- adapter primitives -----------------------------------------------------------------

    @abstractmethod
    def _open_sink(self, key: str) -> BlobSink:
        """Start a put to ``key``; called in a worker thread, so it may block."""

    def _open_part_sink(self, key: str, multipart_id: str, number: int, size: int) -> PartSink:
        """Start a put of part ``number`` of ``size`` bytes (checked by the caller: the sink is
        written exactly that many before its commit); called in a worker thread."""
        raise NotImplementedError(f"{type(self).__name__} cannot store parts")

    @abstractmethod
    def stream_range(
        self, key: str, start: int, length: int, *, chunk_size: int = READ_CHUNK_BYTES
    ) -> AsyncIterator[bytes]:
        """Yield the bytes ``[start, start + length)``; raises ``NotFound`` for a missing key."""

    @abstractmethod
    async def stat(self, key: str) -> BlobInfo:
        """Size and modification time; raises ``NotFound`` for a missing key."""

    @abstractmethod
    def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        """Every committed blob whose key starts with ``prefix``, in key order."""

    @abstractmethod
    async def delete(self, key: str) -> bool:
        """Delete one blob; returns False when there was none. Idempotent."""

    @abstractmethod
    async def check(self) -> None:
        """Raise ``BackendUnavailable`` unless the store can be read and written now."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """What ``/v1/storage-info`` shows of this store: backend, location, free space."""

    async def staging_leftovers(self, older_than: datetime) -> tuple[StagedLeftover, ...]:
        """What crashed puts left in staging, last written before ``older_than``; never the
        staging of a put still in progress, in this process or another. The default sees none."""
        return ()

    async def remove_staging(self, leftover: StagedLeftover) -> bool:
        """Remove a leftover unless a put took it up meanwhile; False when nothing was removed."""
        return False

    async def close(self) -> None:  # noqa: B027 - adapters without resources need nothing here
        """Release connections; the default has nothing to release."""
