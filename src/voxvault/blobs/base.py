"""The BlobStore port.

The base class owns the public behaviour every adapter shares: streaming from an async iterator
in flat memory, size and sha256 computed on the way, upload limits, and leaving nothing behind
when a put fails or is cancelled. Adapters implement the small primitives below the line.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

import anyio

from voxvault.blobs.keys import validate_key
from voxvault.errors import EmptyUpload, PayloadTooLarge

READ_CHUNK_BYTES = 1024 * 1024


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


class BlobWriter(ABC):
    """One put in progress: bytes go to a staging place and become visible only on commit."""

    @abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abstractmethod
    async def commit(self) -> None:
        """Make the bytes durable and visible under the key, atomically."""

    @abstractmethod
    async def abort(self) -> None:
        """Discard everything written; must be safe to call after a failed write."""


class BlobStore(ABC):
    scheme: ClassVar[str]

    # ---- public behaviour -------------------------------------------------------------------

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        max_bytes: int | None = None,
        allow_empty: bool = False,
    ) -> StoredBlob:
        """Store the stream under ``key`` (replacing any blob there) and return its size and hash.

        Raises ``PayloadTooLarge`` as soon as the stream passes ``max_bytes`` and ``EmptyUpload``
        for an empty stream unless ``allow_empty``; in every failure, nothing is left behind.
        """
        validate_key(key)
        writer = await self._open_writer(key)
        digest = hashlib.sha256()
        size = 0
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise PayloadTooLarge(
                        f"the upload exceeds the limit of {max_bytes} bytes",
                        detail={"max_bytes": max_bytes},
                    )
                digest.update(chunk)
                await writer.write(chunk)
            if size == 0 and not allow_empty:
                raise EmptyUpload("the upload is empty")
            await writer.commit()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await writer.abort()
            raise
        return StoredBlob(key=key, size=size, sha256=digest.hexdigest())

    async def put_bytes(self, key: str, data: bytes, *, allow_empty: bool = True) -> StoredBlob:
        async def once() -> AsyncIterator[bytes]:
            yield data

        return await self.put_stream(key, once(), allow_empty=allow_empty)

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
    async def _open_writer(self, key: str) -> BlobWriter: ...

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

    async def close(self) -> None:  # noqa: B027 - adapters without resources need nothing here
        """Release connections; the default has nothing to release."""
