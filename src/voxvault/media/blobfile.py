"""A read-only, seekable file object over a blob, for libraries that want a file (PyAV).

It must be used from a worker thread started by ``anyio.to_thread``: each read that misses its
block cache calls back into the event loop to read a range from the BlobStore, so probing works
the same on local files and on object storage without downloading the whole blob.
"""

from __future__ import annotations

import io

import anyio.from_thread

from voxvault.blobs.base import BlobStore

BLOCK_BYTES = 1024 * 1024


class BlobFile(io.RawIOBase):
    def __init__(self, store: BlobStore, key: str, size: int) -> None:
        self._store = store
        self._key = key
        self._size = size
        self._position = 0
        self._block_start = -1
        self._block = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._position >= self._size:
            return 0
        block_start = self._position - self._position % BLOCK_BYTES
        if block_start != self._block_start:
            self._block = anyio.from_thread.run(
                self._store.read_range, self._key, block_start, BLOCK_BYTES
            )
            self._block_start = block_start
        offset = self._position - block_start
        chunk = self._block[offset : offset + len(buffer)]
        buffer[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)
