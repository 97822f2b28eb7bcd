"""The BlobStore port.

The base class owns the public behaviour every adapter shares: streaming from an async iterator
in flat memory, size and sha256 computed on the way, upload limits, and leaving nothing behind
when a put fails or is cancelled. Adapters implement the small primitives below the line.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol

import anyio
import anyio.to_thread

from voxvault.blobs.keys import validate_key
from voxvault.errors import EmptyUpload, PayloadTooLarge

READ_CHUNK_BYTES = 1024 * 1024
FILE_CHUNK_BYTES = 1024 * 1024

# Received bytes that may wait for each of a put's threads. Past this the event loop stops
# reading the body until the thread has caught up by half, so a slow disk throttles the client
# through TCP instead of filling memory; below it, the loop never waits for hashing or the disk.
PUT_QUEUE_BYTES = 8 * 1024 * 1024


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


class BlobSink(ABC):
    """One put in progress: bytes go to a staging place and become visible only on commit.

    The base class calls its methods from worker threads, never from the event loop, and one
    at a time: writes in order from the put's writing thread, then commit or abort once no
    write can still be running. So implementations block freely and need no locking.
    """

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    @abstractmethod
    def commit(self) -> None:
        """Make the bytes durable and visible under the key, atomically."""

    @abstractmethod
    def abort(self) -> None:
        """Discard everything written; must be safe to call after a failed write or commit."""


class _Lane:
    """One thread that passes a put's chunks, in order, to ``consume`` while the loop receives.

    A put runs two lanes, one hashing and one writing to the sink: hashlib and file writes
    release the GIL, so both overlap each other and the event loop reading the socket. The
    loop never waits for a lane until ``PUT_QUEUE_BYTES`` are queued in it; then it waits until
    half of them are consumed.
    """

    def __init__(self, consume: Callable[[bytes], object], name: str) -> None:
        self._consume = consume
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
        threading.Thread(target=self._run, name=f"voxvault-{name}", daemon=True).start()

    # ---- event-loop side ----------------------------------------------------------------------

    def push(self, chunk: bytes) -> bool:
        """Queue a chunk without blocking; True when the loop should ``wait_for_room`` now."""
        with self._cond:
            if self._error is not None:
                raise self._error
            self._chunks.append(chunk)
            self._queued += len(chunk)
            self._cond.notify_all()
            return self._queued >= PUT_QUEUE_BYTES

    async def wait_for_room(self) -> None:
        # Leaving the helper behind on cancellation is safe: ``abandon`` wakes it up.
        await anyio.to_thread.run_sync(
            self._wait, self._has_room, abandon_on_cancel=True, limiter=self._limiter
        )
        self._raise_error()

    async def drain(self) -> None:
        """Wait until every queued chunk is consumed; raises what ``consume`` raised."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        await anyio.to_thread.run_sync(self._wait, self._is_finished, limiter=self._limiter)
        self._raise_error()

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


class BlobStore(ABC):
    scheme: ClassVar[str]
    lists_staging: ClassVar[bool] = False
    """Whether ``staging_leftovers`` can see what crashed puts left; a store that cannot (S3:
    obstore cannot list incomplete multipart uploads) relies on the store's own expiry."""

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
        digest = sha256 if sha256 is not None else hashlib.sha256()
        lanes: list[_Lane] = []
        size = 0
        try:
            lanes += [_Lane(digest.update, "hash"), _Lane(sink.write, "write")]
            lanes += [_Lane(check.update, "check") for check in checks]
            async for chunk in chunks:
                if not chunk:
                    continue
                if not isinstance(chunk, bytes):
                    # The lanes read the chunk later; a reused buffer could change under them.
                    chunk = bytes(chunk)
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise too_large(max_bytes)
                full = [lane for lane in lanes if lane.push(chunk)]
                for lane in full:
                    await lane.wait_for_room()
            if size == 0 and not allow_empty:
                raise EmptyUpload("the upload is empty")
            for lane in lanes:
                await lane.drain()
            for check in checks:
                check.verify()
            await anyio.to_thread.run_sync(sink.commit)
        except BaseException:
            with anyio.CancelScope(shield=True):
                # The sink is aborted only once no lane can be writing to it any more.
                for lane in lanes:
                    await lane.abandon()
                await anyio.to_thread.run_sync(sink.abort)
            raise
        return StoredBlob(key=key, size=size, sha256=digest.hexdigest())

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
