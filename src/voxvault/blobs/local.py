"""Local-filesystem BlobStore: the embedded default.

A put writes to ``.staging/`` under the root (same filesystem, so the final rename is atomic),
fsyncs the file, renames it into place and fsyncs the directory, so a blob is either absent or
complete and durable — through crashes and power loss.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import anyio.to_thread

from voxvault.blobs.base import READ_CHUNK_BYTES, BlobInfo, BlobStore, BlobWriter
from voxvault.blobs.keys import validate_key
from voxvault.errors import BackendUnavailable, ConfigurationError, NotFound

STAGING_DIR = ".staging"
WRITE_BUFFER_BYTES = 1024 * 1024


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durable(path: Path, root: Path) -> None:
    """Create ``path`` and any missing parents below ``root``, fsyncing each new entry's parent."""
    missing: list[Path] = []
    current = path
    while current != root and not current.is_dir():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        _fsync_dir(directory.parent)


class _LocalWriter(BlobWriter):
    def __init__(self, store: LocalBlobStore, final: Path, staging: Path) -> None:
        self._store = store
        self._final = final
        self._staging = staging
        self._file = staging.open("xb")
        self._buffer = bytearray()

    async def write(self, data: bytes) -> None:
        # Small network chunks are gathered so that the thread hop is paid per megabyte.
        self._buffer += data
        if len(self._buffer) >= WRITE_BUFFER_BYTES:
            await self._flush()

    async def _flush(self) -> None:
        if self._buffer:
            data, self._buffer = bytes(self._buffer), bytearray()
            await anyio.to_thread.run_sync(self._file.write, data)

    async def commit(self) -> None:
        await self._flush()
        await anyio.to_thread.run_sync(self._commit_sync)

    def _commit_sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        for attempt in range(2):
            _make_dirs_durable(self._final.parent, self._store.root)
            try:
                os.replace(self._staging, self._final)
                break
            except FileNotFoundError:
                # A concurrent delete pruned the empty directory between mkdir and rename.
                if attempt:
                    raise
        _fsync_dir(self._final.parent)

    async def abort(self) -> None:
        def discard() -> None:
            self._file.close()
            self._staging.unlink(missing_ok=True)

        await anyio.to_thread.run_sync(discard)


class LocalBlobStore(BlobStore):
    scheme = "file"

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.staging = self.root / STAGING_DIR
        self.staging.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_url(cls, url: str) -> LocalBlobStore:
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ConfigurationError(f"a file:// blob URL needs an absolute path, got {url!r}")
        return cls(Path(unquote(parts.path)))

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    async def _open_writer(self, key: str) -> BlobWriter:
        final = self._path(key)
        staging = self.staging / f"{uuid.uuid4().hex}.part"
        return await anyio.to_thread.run_sync(_LocalWriter, self, final, staging)

    async def stream_range(
        self, key: str, start: int, length: int, *, chunk_size: int = READ_CHUNK_BYTES
    ) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            handle = await anyio.open_file(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no blob at {key!r}") from None
        async with handle:
            await handle.seek(start)
            remaining = length
            while remaining > 0:
                data = await handle.read(min(chunk_size, remaining))
                if not data:
                    return
                remaining -= len(data)
                yield data

    async def stat(self, key: str) -> BlobInfo:
        path = self._path(key)
        try:
            st = await anyio.to_thread.run_sync(path.stat)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"no blob at {key!r}") from None
        if not path.is_file():
            raise NotFound(f"no blob at {key!r}")
        return BlobInfo(key=key, size=st.st_size, modified_at=_mtime(st.st_mtime))

    def _list_sync(self, prefix: str) -> list[BlobInfo]:
        found: list[BlobInfo] = []
        # Walk only the directory the prefix points into, not the whole store.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return found
        for dirpath, dirnames, filenames in os.walk(base):
            if Path(dirpath) == self.root and STAGING_DIR in dirnames:
                dirnames.remove(STAGING_DIR)
            for name in filenames:
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    st = full.stat()
                    found.append(
                        BlobInfo(key=key, size=st.st_size, modified_at=_mtime(st.st_mtime))
                    )
        found.sort(key=lambda info: info.key)
        return found

    async def list(self, prefix: str = "") -> AsyncIterator[BlobInfo]:
        for info in await anyio.to_thread.run_sync(self._list_sync, prefix):
            yield info

    async def delete(self, key: str) -> bool:
        path = self._path(key)

        def remove() -> bool:
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                return False
            self._prune_empty_dirs(path.parent)
            return True

        return await anyio.to_thread.run_sync(remove)

    def _prune_empty_dirs(self, directory: Path) -> None:
        while directory != self.root and directory.is_relative_to(self.root):
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    async def check(self) -> None:
        def probe() -> None:
            marker = self.staging / f"ready-{uuid.uuid4().hex}"
            marker.write_bytes(b"")
            marker.unlink()

        try:
            await anyio.to_thread.run_sync(probe)
        except OSError as exc:
            raise BackendUnavailable(
                f"the blob directory {self.root} is not writable: {exc}"
            ) from exc

    def describe(self) -> dict[str, Any]:
        usage = shutil.disk_usage(self.root)
        return {
            "backend": "local",
            "location": str(self.root),
            "free_bytes": usage.free,
            "total_bytes": usage.total,
        }


def _mtime(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)
