"""Conformance suite for the BlobStore port: a new adapter passes by adding one fixture param."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import anyio
import pytest

from tests.conftest import within
from tests.s3 import pending_uploads, s3_bucket, s3_client
from voxvault.blobs import BlobSink, BlobStore, open_blob_store
from voxvault.blobs.base import LANE_BATCH_BYTES, PUT_QUEUE_BYTES, StagedLeftover
from voxvault.blobs.local import LocalBlobStore
from voxvault.errors import (
    BackendUnavailable,
    EmptyUpload,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["local", "s3"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[BlobStore]:
    with ExitStack() as stack:
        if request.param == "local":
            opened: BlobStore = LocalBlobStore(tmp_path / "blobs")
        else:
            bucket = stack.enter_context(s3_bucket(monkeypatch))
            opened = open_blob_store(bucket.url)
        yield opened
        await opened.close()


async def chunks_of(data: bytes, size: int = 7919) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def failing_after(data: bytes) -> AsyncIterator[bytes]:
    yield data
    raise ConnectionResetError("client went away")


async def all_keys(store: BlobStore, prefix: str = "") -> list[str]:
    return [info.key async for info in store.list(prefix)]


async def test_put_stream_returns_size_and_sha256_and_reads_back(store: BlobStore) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    stored = await store.put_stream("recordings/r1/original", chunks_of(data, 65536))
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert await store.read_all("recordings/r1/original") == data
    info = await store.stat("recordings/r1/original")
    assert info.size == len(data)


async def test_ranged_reads(store: BlobStore) -> None:
    data = bytes(range(256)) * 1000
    await store.put_bytes("a/b", data)
    assert await store.read_range("a/b", 0, 10) == data[:10]
    assert await store.read_range("a/b", 1000, 5000) == data[1000:6000]
    assert await store.read_range("a/b", len(data) - 3, 100) == data[-3:]
    assert await store.read_range("a/b", len(data), 10) == b""
    streamed = [c async for c in store.stream_range("a/b", 5, 100_000, chunk_size=4096)]
    assert all(len(c) <= 4096 for c in streamed)
    assert b"".join(streamed) == data[5:100_005]


async def test_put_replaces_existing_blob(store: BlobStore) -> None:
    await store.put_bytes("x/y", b"first version")
    await store.put_bytes("x/y", b"second")
    assert await store.read_all("x/y") == b"second"
    assert await all_keys(store) == ["x/y"]


async def test_list_by_prefix_in_key_order(store: BlobStore) -> None:
    for key in ["recordings/b/original", "recordings/a/original", "recordings/a/artifacts/t.srt"]:
        await store.put_bytes(key, b"1")
    await store.put_bytes("uploads/u1", b"2")
    assert await all_keys(store, "recordings/a/") == [
        "recordings/a/artifacts/t.srt",
        "recordings/a/original",
    ]
    assert await all_keys(store, "recordings/") == [
        "recordings/a/artifacts/t.srt",
        "recordings/a/original",
        "recordings/b/original",
    ]
    assert len(await all_keys(store)) == 4
    assert await all_keys(store, "nothing/") == []


async def test_delete_is_idempotent_and_delete_prefix_removes_all(store: BlobStore) -> None:
    await store.put_bytes("recordings/a/original", b"1")
    await store.put_bytes("recordings/a/artifacts/x", b"2")
    await store.put_bytes("recordings/ab/original", b"3")
    assert await store.delete("recordings/a/artifacts/x") is True
    assert await store.delete("recordings/a/artifacts/x") is False
    assert await store.delete_prefix("recordings/a/") == 1
    assert await all_keys(store) == ["recordings/ab/original"]


async def test_missing_blob_is_not_found(store: BlobStore) -> None:
    with pytest.raises(NotFound):
        await store.stat("recordings/none/original")
    with pytest.raises(NotFound):
        await store.read_range("recordings/none/original", 0, 10)


@pytest.mark.parametrize(
    "key", ["", "../x", "/abs", "a//b", "a/../b", "a/./b", ".hidden/x", "a/b/"]
)
async def test_keys_that_could_escape_are_refused(store: BlobStore, key: str) -> None:
    with pytest.raises(InvalidRequest):
        await store.put_bytes(key, b"data")
    assert await all_keys(store) == []


async def test_limit_exceeded_leaves_nothing(store: BlobStore) -> None:
    with pytest.raises(PayloadTooLarge):
        await store.put_stream("k/too-big", chunks_of(b"x" * 10_000, 1000), max_bytes=5000)
    assert await all_keys(store) == []
    await assert_no_staging_left(store)


async def test_empty_stream_is_refused_unless_allowed(store: BlobStore) -> None:
    with pytest.raises(EmptyUpload):
        await store.put_stream("k/empty", chunks_of(b""))
    assert await all_keys(store) == []
    stored = await store.put_stream("k/empty", chunks_of(b""), allow_empty=True)
    assert stored.size == 0
    assert stored.sha256 == hashlib.sha256(b"").hexdigest()


async def test_failed_stream_leaves_nothing_and_keeps_the_old_blob(store: BlobStore) -> None:
    await store.put_bytes("k/v", b"old")
    with pytest.raises(ConnectionResetError):
        await store.put_stream("k/v", failing_after(b"new bytes " * 100_000))
    assert await store.read_all("k/v") == b"old"
    assert await all_keys(store) == ["k/v"]
    await assert_no_staging_left(store)


async def test_cancelled_put_leaves_nothing(store: BlobStore) -> None:
    started = anyio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"a" * 100_000
        started.set()
        await anyio.sleep(30)
        yield b"never"

    async with anyio.create_task_group() as group:
        group.start_soon(store.put_stream, "k/cancelled", slow())
        with within(60, "the put to read past the first chunk"):
            await started.wait()
        group.cancel_scope.cancel()
    assert await all_keys(store) == []
    await assert_no_staging_left(store)


async def test_concurrent_puts_to_one_key_leave_one_complete_blob(store: BlobStore) -> None:
    bodies = [bytes([i]) * 300_000 for i in range(8)]
    async with anyio.create_task_group() as group:
        for body in bodies:
            group.start_soon(store.put_bytes, "k/race", body)
    assert await store.read_all("k/race") in bodies
    await assert_no_staging_left(store)


async def test_check_passes_and_describe_names_the_backend(store: BlobStore) -> None:
    await store.check()
    assert store.describe()["backend"]


class WrappedSink(BlobSink):
    """The adapter's own sink, with a hook that runs (on the put's thread) before each write."""

    def __init__(self, inner: BlobSink, before_write: Callable[[bytes], object]) -> None:
        self.inner = inner
        self.before_write = before_write

    def write(self, data: bytes) -> None:
        self.before_write(data)
        self.inner.write(data)

    def flush(self) -> None:
        self.inner.flush()

    def commit(self) -> None:
        self.inner.commit()

    def abort(self) -> None:
        self.inner.abort()


def wrap_sinks(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch, before_write: Callable[[bytes], object]
) -> None:
    open_sink = store._open_sink
    monkeypatch.setattr(store, "_open_sink", lambda key: WrappedSink(open_sink(key), before_write))


class CountingSource:
    """``total`` bytes in ``chunk``-sized pieces; records how far the store reads ahead of its sink.

    ``written`` is counted by the test's sink hook. At every pull, ``pulled - written`` is what
    the store holds in memory between the two (give or take the chunk being written).
    """

    def __init__(self, total: int, chunk: int = 64 * 1024) -> None:
        self.data = os.urandom(chunk) * (total // chunk)
        self.chunk = chunk
        self.pulled = 0
        self.written = 0
        self.most_ahead = 0
        self.queue_filled = anyio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), self.chunk):
            self.most_ahead = max(self.most_ahead, self.pulled - self.written)
            self.pulled += self.chunk
            if self.pulled >= PUT_QUEUE_BYTES:
                self.queue_filled.set()
            yield self.data[start : start + self.chunk]


async def test_a_stalled_sink_holds_the_stream_back_instead_of_buffering_it(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    source = CountingSource(4 * PUT_QUEUE_BYTES)

    def stall_then_count(data: bytes) -> None:
        gate.wait(30)
        source.written += len(data)

    wrap_sinks(store, monkeypatch, stall_then_count)
    async with anyio.create_task_group() as group:
        group.start_soon(store.put_stream, "k/slow", source)
        # The store cannot wait for room before it holds PUT_QUEUE_BYTES, so this is reached.
        with within(60, "the put to fill its queue"):
            await source.queue_filled.wait()
        await anyio.wait_all_tasks_blocked()
        held_back_at = source.pulled
        gate.set()
    # The queue, the batch that tipped it over and the chunk in the stalled write.
    bound = PUT_QUEUE_BYTES + LANE_BATCH_BYTES + 2 * source.chunk
    assert held_back_at <= bound
    assert source.most_ahead <= bound
    assert await store.read_all("k/slow") == source.data
    await assert_no_staging_left(store)


async def test_a_failing_sink_stops_the_put_early_and_leaves_nothing(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.put_bytes("k/v", b"old")

    def disk_full(_: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    wrap_sinks(store, monkeypatch, disk_full)
    source = CountingSource(4 * PUT_QUEUE_BYTES)
    with pytest.raises(OSError, match="No space left") as raised:
        await store.put_stream("k/v", source)
    assert raised.value.errno == errno.ENOSPC
    assert source.pulled <= PUT_QUEUE_BYTES + LANE_BATCH_BYTES + 2 * source.chunk
    assert await store.read_all("k/v") == b"old"
    await assert_no_staging_left(store)


async def test_cancelled_put_held_back_by_a_stalled_sink_leaves_nothing(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    wrap_sinks(store, monkeypatch, lambda _: gate.wait(30))
    source = CountingSource(4 * PUT_QUEUE_BYTES)
    async with anyio.create_task_group() as group:
        group.start_soon(store.put_stream, "k/cancelled", source)
        with within(60, "the put to fill its queue"):
            await source.queue_filled.wait()
        await anyio.wait_all_tasks_blocked()
        group.cancel_scope.cancel()
        gate.set()  # the write in progress finishes; then the put is aborted
    assert await all_keys(store) == []
    await assert_no_staging_left(store)


async def test_a_reused_buffer_is_stored_as_it_was_when_yielded(store: BlobStore) -> None:
    async def reusing() -> AsyncIterator[bytearray]:
        buffer = bytearray(4096)
        for i in range(64):
            buffer[:] = bytes([i]) * 4096
            yield buffer

    expected = b"".join(bytes([i]) * 4096 for i in range(64))
    stored = await store.put_stream("k/reused", cast(AsyncIterator[bytes], reusing()))
    assert stored.sha256 == hashlib.sha256(expected).hexdigest()
    assert await store.read_all("k/reused") == expected


async def test_ranges_on_chunk_boundaries(store: BlobStore) -> None:
    data = os.urandom(3 * 4096)
    await store.put_bytes("a/b", data)
    for start, length in [(0, 4096), (0, 8192), (4096, 8192), (0, 3 * 4096), (100, 3 * 4096)]:
        streamed = [c async for c in store.stream_range("a/b", start, length, chunk_size=4096)]
        assert all(streamed), "no empty chunks"
        assert b"".join(streamed) == data[start : start + length]
    assert [c async for c in store.stream_range("a/b", 0, 0)] == []


async def test_a_key_that_is_only_a_prefix_is_not_found(store: BlobStore) -> None:
    await store.put_bytes("a/b/c", b"data")
    with pytest.raises(NotFound):
        await store.stat("a/b")
    with pytest.raises(NotFound):
        await store.read_range("a/b", 0, 10)
    with pytest.raises(NotFound):
        await store.read_range("a/b", 0, 0)


async def assert_no_staging_left(store: BlobStore) -> None:
    """Nothing of a put is left where the store stages it: files, or multipart uploads."""
    if isinstance(store, LocalBlobStore):
        assert list(store.staging.iterdir()) == []
        return
    described = store.describe()
    assert described["backend"] == "s3"
    client = s3_client(described["endpoint"])
    assert pending_uploads(client, described["bucket"]) == []


# ---- what sweeps (voxvault gc, fsck) rely on ----------------------------------------------------


async def test_list_gives_each_blob_its_modification_time(store: BlobStore) -> None:
    before = datetime.now(UTC) - timedelta(seconds=2)  # the store's clock may round down
    await store.put_bytes("recordings/r1/original", b"bytes")
    after = datetime.now(UTC) + timedelta(seconds=2)
    (listed,) = [info async for info in store.list("recordings/")]
    assert listed.key == "recordings/r1/original"
    assert listed.size == 5
    assert before <= listed.modified_at <= after
    assert (await store.stat(listed.key)).modified_at == listed.modified_at


def crash_mid_put(store: BlobStore, key: str) -> None:
    """Leave what a process killed during a put leaves: staged bytes nobody commits or aborts."""
    if isinstance(store, LocalBlobStore):
        sink = store._open_sink(key)
        sink.write(b"x" * 1000)
        # The process dies: the kernel closes its files (and drops their locks); no abort runs.
        sink._close()  # type: ignore[attr-defined]
        return
    described = store.describe()
    client = s3_client(described["endpoint"])
    name = "/".join(part for part in (described["prefix"], key) if part)
    client.create_multipart_upload(Bucket=described["bucket"], Key=name)


async def test_a_crashed_puts_staging_is_a_leftover_until_removed(store: BlobStore) -> None:
    crash_mid_put(store, "recordings/r1/original")
    future = datetime.now(UTC) + timedelta(hours=1)
    leftovers = await store.staging_leftovers(older_than=future)
    if not store.lists_staging:
        # S3: obstore cannot list incomplete multipart uploads; the bucket's lifecycle rule
        # (AbortIncompleteMultipartUpload) removes them. They are never visible as blobs.
        assert leftovers == ()
        assert await all_keys(store) == []
        return
    (leftover,) = leftovers
    assert leftover.size == 1000
    # Younger than asked for: not a leftover yet.
    assert await store.staging_leftovers(older_than=leftover.modified_at) == ()
    assert await store.remove_staging(leftover) is True
    assert await store.remove_staging(leftover) is False
    assert await store.staging_leftovers(older_than=future) == ()
    await assert_no_staging_left(store)
    assert await all_keys(store) == []


async def test_a_live_puts_staging_is_never_a_leftover(store: BlobStore) -> None:
    data = os.urandom(300_000)
    sent_some, go_on = anyio.Event(), anyio.Event()

    async def held() -> AsyncIterator[bytes]:
        yield data[:100_000]
        sent_some.set()
        await go_on.wait()
        yield data[100_000:]

    future = datetime.now(UTC) + timedelta(hours=1)
    # A look at the staging that waited for the put (which waits for it) would wait forever.
    with within(60, "the look at the staging beside the put in flight"):
        async with anyio.create_task_group() as group:
            group.start_soon(store.put_stream, "recordings/r1/original", held())
            await sent_some.wait()
            await anyio.wait_all_tasks_blocked()
            # Every staged byte counts as old here; the put still holds its own.
            assert await store.staging_leftovers(older_than=future) == ()
            if isinstance(store, LocalBlobStore):
                (staged,) = store.staging.iterdir()
                leftover = StagedLeftover(f".staging/{staged.name}", 0, datetime.now(UTC))
                assert await store.remove_staging(leftover) is False
                assert staged.exists()
            go_on.set()
    assert await store.read_all("recordings/r1/original") == data
    await assert_no_staging_left(store)


@pytest.mark.parametrize("name", ["k/v", ".staging/../k/v", ".staging", "../k/v", "/k/v"])
async def test_remove_staging_never_removes_a_blob(store: BlobStore, name: str) -> None:
    await store.put_bytes("k/v", b"kept")
    assert await store.remove_staging(StagedLeftover(name, 4, datetime.now(UTC))) is False
    assert await store.read_all("k/v") == b"kept"


async def test_a_put_continues_a_running_hash_and_feeds_its_checks(store: BlobStore) -> None:
    first, second = os.urandom(70_000), os.urandom(50_000)
    running = hashlib.sha256(first)

    class Collect:
        def __init__(self) -> None:
            self.seen = bytearray()

        def update(self, data: bytes, /) -> None:
            self.seen += data

        def verify(self) -> None:
            pass

    check = Collect()
    stored = await store.put_stream("k/second", chunks_of(second), sha256=running, checks=[check])
    assert stored.size == len(second)
    assert stored.sha256 == running.hexdigest() == hashlib.sha256(first + second).hexdigest()
    assert bytes(check.seen) == second
    assert await store.read_all("k/second") == second


async def test_a_check_refusing_the_bytes_leaves_nothing(store: BlobStore) -> None:
    class Refuse:
        def update(self, data: bytes, /) -> None:
            pass

        def verify(self) -> None:
            raise ValueError("not these bytes")

    await store.put_bytes("k/v", b"old")
    with pytest.raises(ValueError, match="not these bytes"):
        await store.put_stream("k/v", chunks_of(b"new" * 10_000), checks=[Refuse()])
    assert await store.read_all("k/v") == b"old"
    await assert_no_staging_left(store)


@pytest.mark.parametrize("hashed_before", [True, False])
async def test_compose_joins_parts_in_order_and_keeps_them(
    store: BlobStore, hashed_before: bool
) -> None:
    parts = [os.urandom(size) for size in (1, 3 * 1024 * 1024 + 5, 0, 77_777)]
    keys = [f"uploads/u/parts/{i:08d}" for i in range(len(parts))]
    for key, data in zip(keys, parts, strict=True):
        await store.put_bytes(key, data)
    joined = b"".join(parts)
    digest = hashlib.sha256(joined).hexdigest()
    stored = await store.compose(
        "recordings/r/original", keys, sha256=digest if hashed_before else None
    )
    assert (stored.size, stored.sha256) == (len(joined), digest)
    assert await store.read_all("recordings/r/original") == joined
    for key, data in zip(keys, parts, strict=True):
        assert await store.read_all(key) == data
    await assert_no_staging_left(store)


async def test_compose_of_chunk_sized_parts_replaces_what_was_there(store: BlobStore) -> None:
    """Parts as resumable uploads make them (megabytes each; S3 joins these inside S3)."""
    parts = [os.urandom(size) for size in (5 * 1024 * 1024, 6 * 1024 * 1024 + 3, 1234)]
    keys = [f"uploads/u/parts/{i:08d}" for i in range(len(parts))]
    for key, data in zip(keys, parts, strict=True):
        await store.put_bytes(key, data)
    await store.put_bytes("recordings/r/original", b"an older blob")
    joined = b"".join(parts)
    digest = hashlib.sha256(joined).hexdigest()
    stored = await store.compose("recordings/r/original", keys, sha256=digest)
    assert (stored.size, stored.sha256) == (len(joined), digest)
    assert (await store.stat("recordings/r/original")).size == len(joined)
    assert hashlib.sha256(await store.read_all("recordings/r/original")).hexdigest() == digest
    assert sorted(await all_keys(store)) == sorted([*keys, "recordings/r/original"])
    await assert_no_staging_left(store)


@pytest.mark.parametrize("hashed_before", [True, False])
async def test_compose_of_a_missing_part_or_past_the_limit_leaves_nothing(
    store: BlobStore, hashed_before: bool
) -> None:
    await store.put_bytes("uploads/u/parts/a", b"a" * 6000)
    digest = "0" * 64 if hashed_before else None
    with pytest.raises(NotFound):
        await store.compose(
            "recordings/r/original", ["uploads/u/parts/a", "uploads/u/parts/b"], sha256=digest
        )
    with pytest.raises(PayloadTooLarge):
        await store.compose(
            "recordings/r/original", ["uploads/u/parts/a"], sha256=digest, max_bytes=5000
        )
    assert await all_keys(store) == ["uploads/u/parts/a"]
    await assert_no_staging_left(store)


async def test_compose_may_begin_with_the_blob_at_its_own_key(store: BlobStore) -> None:
    """What completing a resumable upload does when chunks followed its multipart upload."""
    head, tail = os.urandom(5 * 1024 * 1024), os.urandom(4321)
    await store.put_bytes("recordings/r/original", head)
    await store.put_bytes("uploads/u/parts/tail", tail)
    joined = head + tail
    digest = hashlib.sha256(joined).hexdigest()
    for hashed_before in (True, False):
        await store.put_bytes("recordings/r/original", head)
        stored = await store.compose(
            "recordings/r/original",
            ["recordings/r/original", "uploads/u/parts/tail"],
            sha256=digest if hashed_before else None,
        )
        assert (stored.size, stored.sha256) == (len(joined), digest)
        assert await store.read_all("recordings/r/original") == joined
    await assert_no_staging_left(store)


# ---- blobs assembled from parts (part_limits) ---------------------------------------------------


async def test_a_blob_is_assembled_from_parts_stored_one_by_one(store: BlobStore) -> None:
    key = "recordings/r/original"
    limits = store.part_limits
    if limits is None:
        with pytest.raises(NotImplementedError):
            await store.start_multipart(key)
        with pytest.raises(NotImplementedError):
            await store.put_part(key, "m", 1, chunks_of(b"x"), size=1)
        with pytest.raises(NotImplementedError):
            await store.complete_multipart(key, "m", [(1, "e")])
        with pytest.raises(NotImplementedError):
            await store.abort_multipart(key, "m")
        return
    first, other, last = (os.urandom(limits.min_bytes), os.urandom(limits.min_bytes), b"end")
    multipart_id = await store.start_multipart(key)
    running = hashlib.sha256()
    one = await store.put_part(
        key, multipart_id, 1, chunks_of(first, 65536), size=len(first), sha256=running
    )
    # Another attempt at the same bytes (which lost its race): stored, never listed.
    await store.put_part(key, multipart_id, 2, chunks_of(other, 65536), size=len(other))
    three = await store.put_part(key, multipart_id, 7, chunks_of(last), size=3, sha256=running)
    assert (one.number, one.size, three.number, three.size) == (1, len(first), 7, 3)
    assert one.etag
    assert three.etag
    assert three.sha256 == running.hexdigest() == hashlib.sha256(first + last).hexdigest()
    assert await all_keys(store) == []  # nothing shows before the completion
    await store.complete_multipart(key, multipart_id, [(1, one.etag), (7, three.etag)])
    assert await store.read_all(key) == first + last
    # The upload is over: aborting it (a late termination) leaves the blob alone.
    assert await store.abort_multipart(key, multipart_id) is False
    assert await store.read_all(key) == first + last
    await assert_no_staging_left(store)


async def test_a_part_cut_short_refused_or_too_long_is_not_stored(store: BlobStore) -> None:
    key = "recordings/r/original"
    if store.part_limits is None:
        return  # see test_a_blob_is_assembled_from_parts_stored_one_by_one
    data = os.urandom(300_000)

    class Refuse:
        def update(self, data: bytes, /) -> None:
            pass

        def verify(self) -> None:
            raise ValueError("not these bytes")

    multipart_id = await store.start_multipart(key)
    with pytest.raises(InvalidRequest, match="ended after"):
        await store.put_part(key, multipart_id, 1, chunks_of(data), size=len(data) + 1)
    with pytest.raises(PayloadTooLarge):
        await store.put_part(key, multipart_id, 2, chunks_of(data), size=len(data) - 1)
    with pytest.raises(ValueError, match="not these bytes"):
        await store.put_part(
            key, multipart_id, 3, chunks_of(data), size=len(data), checks=[Refuse()]
        )
    with pytest.raises(ConnectionResetError):
        await store.put_part(key, multipart_id, 4, failing_after(data), size=len(data) + 1)
    stored = await store.put_part(key, multipart_id, 5, chunks_of(data), size=len(data))
    # Only the last part was stored: the store refuses to complete with any other (the
    # refused part 3 held the same bytes, so it would have had the same ETag).
    for number in (1, 2, 3, 4):
        with pytest.raises(BackendUnavailable):
            await store.complete_multipart(key, multipart_id, [(number, stored.etag)])
    assert await all_keys(store) == []
    assert await store.abort_multipart(key, multipart_id) is True
    assert await store.abort_multipart(key, multipart_id) is False
    assert await all_keys(store) == []
    await assert_no_staging_left(store)


async def test_a_cancelled_part_is_not_stored(store: BlobStore) -> None:
    key = "recordings/r/original"
    if store.part_limits is None:
        return  # see test_a_blob_is_assembled_from_parts_stored_one_by_one
    data = os.urandom(200_000)
    sent_some = anyio.Event()

    async def held() -> AsyncIterator[bytes]:
        yield data[:100_000]
        sent_some.set()
        await anyio.sleep_forever()
        yield data[100_000:]

    multipart_id = await store.start_multipart(key)
    with within(60, "the cancelled part"):
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: store.put_part(key, multipart_id, 1, held(), size=len(data)))
            await sent_some.wait()
            group.cancel_scope.cancel()
    stored = await store.put_part(key, multipart_id, 2, chunks_of(data), size=len(data))
    with pytest.raises(BackendUnavailable):
        await store.complete_multipart(key, multipart_id, [(1, stored.etag)])
    await store.complete_multipart(key, multipart_id, [(2, stored.etag)])
    assert await store.read_all(key) == data
    await assert_no_staging_left(store)
