"""Local-filesystem BlobStore: the embedded default.

A put writes to ``.staging/`` under the root (same filesystem, so the final rename is atomic),
fsyncs the file, renames it into place and fsyncs the directory, so a blob is either absent or
complete and durable — through crashes and power loss.

A put holds an exclusive ``flock`` on its staging file from creation until the file is renamed
or removed, so a sweep (in any process on this machine) tells a live put's staging from what a
crashed process left: the kernel drops the lock with its holder.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISREG
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import anyio.to_thread

from voxvault.blobs.base import (
    READ_CHUNK_BYTES,
    AppendTarget,
    BlobInfo,
    BlobSink,
    BlobStore,
    ByteCheck,
    Digest,
    StagedLeftover,
    StoredBlob,
    fill_sink,
    too_large,
)
from voxvault.blobs.keys import validate_key
from voxvault.errors import BackendUnavailable, ConfigurationError, Conflict, NotFound

STAGING_DIR = ".staging"
# How much a put writes before asking the kernel to start writing it back. Without it, a put
# smaller than the dirty-page threshold reaches the disk only at the final fsync, which then
# takes as long again as the upload; with it, writeback overlaps the upload (RocksDB's
# ``bytes_per_sync`` does the same).
WRITEBACK_BYTES = 8 * 1024 * 1024
# The same for appends, which are synced one chunk at a time: the smaller this is, the less of
# a chunk its sync waits for.
APPEND_WRITEBACK_BYTES = 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2
# Errors that mean "copy_file_range cannot do this pair of files", not "the copy failed".
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP})


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


def _rename_into_place(staging: Path, final: Path, root: Path) -> None:
    """Rename ``staging`` to ``final``, creating its directories durably; the caller then
    fsyncs ``final``'s directory."""
    for attempt in range(2):
        _make_dirs_durable(final.parent, root)
        try:
            os.replace(staging, final)
            return
        except FileNotFoundError:
            # A concurrent delete pruned the empty directory between mkdir and rename.
            if attempt:
                raise


@functools.cache
def _writeback_starter() -> Callable[[int, int, int], None] | None:
    """Linux's ``sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)``, or None.

    It starts writeback of a range without waiting for it and keeps the pages cached. The os
    module does not expose it; ``posix_fadvise(DONTNEED)`` would also start writeback but evicts
    what is already clean, i.e. the recording that is about to be probed and played.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int

    def start(fd: int, offset: int, length: int) -> None:
        # A hint only: a failure here shows up again, and is reported, at the fsync of commit.
        function(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    return start


class _FileSink(BlobSink):
    """Writes to an open file from ``start`` on, asking the kernel to write back every
    ``writeback_bytes`` so that the final sync has little left to wait for."""

    def __init__(self, fd: int, start: int, writeback_bytes: int) -> None:
        self._fd = fd
        self._written = self._written_back = start
        self._writeback_bytes = writeback_bytes
        self._start_writeback = _writeback_starter()

    def write(self, data: bytes) -> None:
        done = os.pwrite(self._fd, data, self._written)
        if done < len(data):
            view = memoryview(data)
            while done < len(data):
                done += os.pwrite(self._fd, view[done:], self._written + done)
        self._wrote(len(data))

    def _wrote(self, count: int) -> None:
        self._written += count
        pending = self._written - self._written_back
        if self._start_writeback is not None and pending >= self._writeback_bytes:
            self._start_writeback(self._fd, self._written_back, pending)
            self._written_back = self._written


class _LocalSink(_FileSink):
    """A put: a new staging file, renamed into place on commit."""

    def __init__(self, store: LocalBlobStore, final: Path, staging: Path) -> None:
        self._store = store
        self._final = final
        self._staging = staging
        self._flushed = False
        super().__init__(
            os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666),
            0,
            WRITEBACK_BYTES,
        )
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BaseException:
            self.abort()
            raise

    def copy_from(self, source: int, length: int) -> None:
        """Append the first ``length`` bytes of the file open at ``source``, copied inside the
        kernel (no bytes through the process); ``OSError`` if it holds fewer."""
        offset = 0
        kernel_copy = hasattr(os, "copy_file_range")
        while offset < length:
            count = min(length - offset, WRITEBACK_BYTES)
            done = -1
            if kernel_copy:
                try:
                    done = os.copy_file_range(source, self._fd, count, offset, self._written)
                except OSError as exc:
                    if exc.errno not in _NO_KERNEL_COPY:
                        raise
                    kernel_copy = False
            if done < 0:
                data = _pread(source, count, offset)
                self.write(data)
                done = len(data)
            else:
                self._wrote(done)
            if done == 0:
                raise OSError(errno.EIO, "a part ended before its recorded size")
            offset += done

    def flush(self) -> None:
        os.fsync(self._fd)
        self._flushed = True

    def commit(self) -> None:
        if not self._flushed:
            os.fsync(self._fd)
        # The file stays open, and so locked, until it has its final name: a sweep never sees
        # an unlocked staging file that a put is about to rename.
        _rename_into_place(self._staging, self._final, self._store.root)
        self._close()
        _fsync_dir(self._final.parent)

    def abort(self) -> None:
        self._close()
        self._staging.unlink(missing_ok=True)

    def _close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class _AppendSink(_FileSink):
    """An append at ``offset`` to a held growable blob of ``size`` bytes: what lay past the
    offset is cut off on flush, which syncs; abort cuts the blob back to ``offset``. The file
    belongs to the ``_LocalAppendTarget``, which closes it."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        super().__init__(fd, offset, APPEND_WRITEBACK_BYTES)
        self._offset = offset
        self._size = size

    def flush(self) -> None:
        if self._size > self._written:
            os.ftruncate(self._fd, self._written)
        os.fdatasync(self._fd)
        self.commit_blocks = False

    def commit(self) -> None:
        # Durable since ``flush`` (then no I/O here); the caller's record of the blob's size
        # is what makes the bytes count.
        if self.commit_blocks:
            self.flush()

    def abort(self) -> None:
        os.ftruncate(self._fd, self._offset)


class _LocalAppendTarget(AppendTarget):
    def __init__(self, key: str, fd: int) -> None:
        self.key = key
        self.size = os.fstat(fd).st_size
        self._fd = fd

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
        sink = _AppendSink(self._fd, offset, self.size)
        try:
            stored = await fill_sink(
                sink,
                self.key,
                chunks,
                max_bytes=max_bytes,
                allow_empty=True,
                sha256=sha256,
                checks=checks,
                then=then,
            )
        except BaseException:
            self.size = os.fstat(self._fd).st_size  # cut back, unless it failed after ``then``
            raise
        self.size = offset + stored.size
        return stored


def _open_held(path: Path, root: Path, key: str) -> int:
    """Open (creating it durably if absent) and lock the growable blob at ``path``."""
    while True:
        _make_dirs_durable(path.parent, root)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            held = _hold_existing(path, key)
            if held is not None:
                return held
            continue  # removed as we opened it
        except FileNotFoundError:
            continue  # a concurrent delete pruned the empty directory between mkdir and open
        if _lock(fd, path, key):
            _fsync_dir(path.parent)
            return fd


def _hold_existing(path: Path, key: str) -> int | None:
    """Open and lock the growable blob at ``path`` if it exists (a few quick system calls, fit
    for the event loop); None if it does not."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        if _lock(fd, path, key):
            return fd


def _lock(fd: int, path: Path, key: str) -> bool:
    """Lock the open ``fd`` exclusively: True once held; ``Conflict`` if another holds it; False
    (closed) if it is no longer the file at ``path``, removed by the holder it waited for."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if _still_at(fd, path):
            return True
    except BlockingIOError:
        os.close(fd)
        raise Conflict(
            "another request is writing to this upload now", detail={"key": key}
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return False


def _still_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the one at ``path``."""
    held = os.fstat(fd)
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _leftover_if_unlocked(path: Path) -> StagedLeftover | None:
    """The staging file as a leftover, unless a put holds it (or it is gone or not a file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not S_ISREG(st.st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # a live put's
        return StagedLeftover(
            name=f"{STAGING_DIR}/{path.name}", size=st.st_size, modified_at=_mtime(st.st_mtime)
        )
    finally:
        os.close(fd)


def _open_regular(path: Path, key: str) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise NotFound(f"no blob at {key!r}") from None
    try:
        is_file = S_ISREG(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    if not is_file:
        os.close(fd)
        raise NotFound(f"no blob at {key!r}")
    return fd


def _pread(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset``, fewer only at the end of the file."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length and (more := os.pread(fd, length - got, offset + got)):
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _open_and_read(
    path: Path, key: str, offset: int, length: int, keep_open: bool
) -> tuple[int, bytes]:
    """Open the blob and read its first chunk in one thread hop; the fd is -1 unless kept."""
    fd = _open_regular(path, key)
    try:
        data = _pread(fd, length, offset) if length > 0 else b""
    except BaseException:
        os.close(fd)
        raise
    if keep_open and len(data) == length:
        return fd, data
    os.close(fd)
    return -1, data


class LocalBlobStore(BlobStore):
    scheme = "file"
    lists_staging = True
    appends_in_place = True

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

    async def local_copy(self, key: str, scratch: Path) -> Path:
        path = self._path(key)
        await self.stat(key)  # NotFound, like every other store
        return path

    @contextlib.asynccontextmanager
    async def appending(self, key: str) -> AsyncIterator[AppendTarget]:
        # An exclusive flock, held until the end: any process on this machine is kept out.
        path = self._path(key)
        fd = _hold_existing(path, key)
        if fd is None:
            fd = await anyio.to_thread.run_sync(_open_held, path, self.root, key)
        target = _LocalAppendTarget(key, fd)
        try:
            yield target
        finally:
            if target.size:
                os.close(fd)
            else:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._release_empty, fd, path)

    def _release_empty(self, fd: int, path: Path) -> None:
        """Close a held growable blob left empty, and remove it: an empty blob holds nothing an
        absent one does not."""
        try:
            path.unlink(missing_ok=True)
            self._prune_empty_dirs(path.parent)
        finally:
            os.close(fd)

    def _open_sink(self, key: str) -> BlobSink:
        return self._local_sink(key)

    def _local_sink(self, key: str) -> _LocalSink:
        return _LocalSink(self, self._path(key), self.staging / f"{uuid.uuid4().hex}.part")

    async def compose(
        self,
        key: str,
        parts: Sequence[str],
        *,
        sha256: str | None = None,
        max_bytes: int | None = None,
        sizes: Sequence[int] | None = None,
    ) -> StoredBlob:
        validate_key(key)
        if len(parts) == 1:
            size, digest = await anyio.to_thread.run_sync(
                self._link, key, parts[0], max_bytes, sha256 is None
            )
            return StoredBlob(key=key, size=size, sha256=sha256 or digest)
        # The sizes come with the open files here. Without a hash the bytes must be read
        # anyway: the streaming default does both.
        if sha256 is None:
            return await super().compose(key, parts, max_bytes=max_bytes)
        size = await anyio.to_thread.run_sync(self._compose, key, parts, max_bytes)
        return StoredBlob(key=key, size=size, sha256=sha256)

    def _link(self, key: str, part: str, max_bytes: int | None, hashing: bool) -> tuple[int, str]:
        """One part: a hard link shares its bytes instead of copying them (a blob is never
        changed in place, so the two stay the same); hashed first if ``hashing``."""
        source = self._path(part)
        fd = _open_regular(source, part)
        try:
            size = os.fstat(fd).st_size
            if max_bytes is not None and size > max_bytes:
                raise too_large(max_bytes)
            digest = hashlib.sha256()
            offset = 0
            while hashing and (data := _pread(fd, READ_CHUNK_BYTES, offset)):
                digest.update(data)
                offset += len(data)
        finally:
            os.close(fd)
        final = self._path(key)
        staging = self.staging / f"{uuid.uuid4().hex}.part"
        os.link(source, staging)
        try:
            _rename_into_place(staging, final, self.root)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        return size, digest.hexdigest()

    def _compose(self, key: str, parts: Sequence[str], max_bytes: int | None) -> int:
        sources: list[tuple[int, int]] = []
        try:
            for part in parts:
                fd = _open_regular(self._path(part), part)
                sources.append((fd, os.fstat(fd).st_size))
            size = sum(length for _, length in sources)
            if max_bytes is not None and size > max_bytes:
                raise too_large(max_bytes)
            sink = self._local_sink(key)
            try:
                for fd, length in sources:
                    sink.copy_from(fd, length)
                sink.commit()
            except BaseException:
                sink.abort()
                raise
            return size
        finally:
            for fd, _ in sources:
                os.close(fd)

    async def stream_range(
        self, key: str, start: int, length: int, *, chunk_size: int = READ_CHUNK_BYTES
    ) -> AsyncIterator[bytes]:
        # One thread hop per chunk: the first opens, reads and (for a range that fits in one
        # chunk, like most players' requests) closes; the fd read from stays the same one, so
        # a concurrent replace cannot mix two versions into one response.
        path = self._path(key)
        first = max(0, min(chunk_size, length))
        fd, data = await anyio.to_thread.run_sync(
            _open_and_read, path, key, start, first, length > first
        )
        if fd < 0:
            if data:
                yield data
            return
        try:
            yield data
            position, remaining = start + len(data), length - len(data)
            while remaining > 0:
                data = await anyio.to_thread.run_sync(
                    _pread, fd, min(chunk_size, remaining), position
                )
                if not data:
                    return
                position += len(data)
                remaining -= len(data)
                yield data
        finally:
            os.close(fd)

    async def stat(self, key: str) -> BlobInfo:
        path = self._path(key)
        try:
            st = await anyio.to_thread.run_sync(os.stat, path)
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"no blob at {key!r}") from None
        if not S_ISREG(st.st_mode):
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

    async def staging_leftovers(self, older_than: datetime) -> tuple[StagedLeftover, ...]:
        return await anyio.to_thread.run_sync(_staging_leftovers, self.staging, older_than)

    async def remove_staging(self, leftover: StagedLeftover) -> bool:
        return await anyio.to_thread.run_sync(_remove_staging, self.staging, leftover)

    async def check(self) -> None:
        def probe() -> None:
            marker = self.staging / f"ready-{uuid.uuid4().hex}"
            marker.write_bytes(b"")
            marker.unlink(missing_ok=True)  # a sweep with no grace may have taken it

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


def _staging_leftovers(staging: Path, older_than: datetime) -> tuple[StagedLeftover, ...]:
    found: list[StagedLeftover] = []
    try:
        entries = sorted(os.scandir(staging), key=lambda entry: entry.name)
    except FileNotFoundError:
        return ()
    for entry in entries:
        try:
            if entry.stat(follow_symlinks=False).st_mtime >= older_than.timestamp():
                continue
        except FileNotFoundError:
            continue
        leftover = _leftover_if_unlocked(Path(entry.path))
        if leftover is not None and leftover.modified_at < older_than:
            found.append(leftover)
    return tuple(found)


def _remove_staging(staging: Path, leftover: StagedLeftover) -> bool:
    directory, _, name = leftover.name.partition("/")
    if directory != STAGING_DIR or not name or "/" in name or name in (".", ".."):
        return False
    path = staging / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        # Exclusive: a put that still holds the file (a slow one, say) keeps it.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    finally:
        os.close(fd)
    return True


def _mtime(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)
