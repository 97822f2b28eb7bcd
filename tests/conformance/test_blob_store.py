"""Conformance suite for the BlobStore port: a new adapter passes by adding one fixture param."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from voxvault.blobs import BlobStore
from voxvault.blobs.local import LocalBlobStore
from voxvault.errors import EmptyUpload, InvalidRequest, NotFound, PayloadTooLarge

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["local"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "local":
        opened: BlobStore = LocalBlobStore(tmp_path / "blobs")
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


async def assert_no_staging_left(store: BlobStore) -> None:
    if isinstance(store, LocalBlobStore):
        assert list(store.staging.iterdir()) == []
