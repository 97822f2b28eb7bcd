"""The local store's growable blobs (``appending``): one writer at a time, across processes;
appends at an offset drop what lay past it; a refused append leaves the blob as it was; and a
single-part compose shares the bytes instead of copying them."""

from __future__ import annotations

import hashlib
import os
import select
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from voxvault.blobs.local import LocalBlobStore
from voxvault.errors import Conflict, PayloadTooLarge

pytestmark = pytest.mark.anyio

KEY = "uploads/u/parts/grown"
HOLDER_TIMEOUT_S = 60


async def pieces(data: bytes, size: int = 65_536) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class Refuse:
    def update(self, data: bytes, /) -> None:
        pass

    def verify(self) -> None:
        raise ValueError("not these bytes")


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


async def test_appends_grow_the_blob_and_hash_each_stream(store: LocalBlobStore) -> None:
    first, second = os.urandom(300_000), os.urandom(123_457)
    running = hashlib.sha256()
    async with store.appending(KEY) as blob:
        assert blob.size == 0
        stored = await blob.append(0, pieces(first), sha256=running)
        assert (stored.size, stored.sha256) == (len(first), hashlib.sha256(first).hexdigest())
    async with store.appending(KEY) as blob:
        assert blob.size == len(first)
        stored = await blob.append(len(first), pieces(second), sha256=running)
        assert stored.size == len(second)
        assert stored.sha256 == hashlib.sha256(first + second).hexdigest()
    assert await store.read_all(KEY) == first + second


async def test_an_append_drops_what_lay_past_its_offset(store: LocalBlobStore) -> None:
    kept, tail, chunk = b"k" * 1000, b"t" * 5000, b"c" * 700
    async with store.appending(KEY) as blob:
        await blob.append(0, pieces(kept + tail))
    async with store.appending(KEY) as blob:
        await blob.append(len(kept), pieces(chunk))
    assert await store.read_all(KEY) == kept + chunk


@pytest.mark.parametrize("failure", ["check", "limit", "stream"])
async def test_a_failed_append_cuts_the_blob_back_to_its_offset(
    store: LocalBlobStore, failure: str
) -> None:
    kept = b"k" * 1000

    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * 4000
        raise ConnectionResetError("client went away")

    failing = {
        "check": (pieces(b"x" * 9000), {"checks": [Refuse()]}, ValueError),
        "limit": (pieces(b"x" * 9000), {"max_bytes": 8999}, PayloadTooLarge),
        "stream": (broken(), {}, ConnectionResetError),
    }
    stream, options, error = failing[failure]
    async with store.appending(KEY) as blob:
        await blob.append(0, pieces(kept))
        with pytest.raises(error):
            await blob.append(len(kept), stream, **options)  # type: ignore[arg-type]
    assert await store.read_all(KEY) == kept


async def test_a_blob_held_elsewhere_is_a_conflict_until_released(
    store: LocalBlobStore, tmp_path: Path
) -> None:
    other = LocalBlobStore(tmp_path / "blobs")  # another open file description, as in a process
    async with store.appending(KEY) as blob:
        await blob.append(0, pieces(b"a" * 10))
        with pytest.raises(Conflict):
            async with other.appending(KEY):
                pass
    async with other.appending(KEY) as blob:
        assert blob.size == 10


def test_another_process_holding_the_blob_makes_a_conflict(
    store: LocalBlobStore, tmp_path: Path
) -> None:
    path = tmp_path / "blobs" / KEY
    path.parent.mkdir(parents=True)
    path.write_bytes(b"abc")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys; f = open(sys.argv[1], 'rb'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); sys.stdin.read()",
            str(path),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        readable, _, _ = select.select([holder.stdout], [], [], HOLDER_TIMEOUT_S)
        assert readable, f"the other process did not take its lock within {HOLDER_TIMEOUT_S} s"
        assert holder.stdout.readline() == "held\n"

        async def take() -> None:
            async with store.appending(KEY):
                pass

        with pytest.raises(Conflict):
            anyio.run(take)
    finally:
        try:
            holder.communicate("", timeout=HOLDER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
            raise
    assert path.read_bytes() == b"abc"


async def test_a_blob_left_empty_is_removed_with_its_directories(
    store: LocalBlobStore, tmp_path: Path
) -> None:
    async with store.appending(KEY) as blob:
        with pytest.raises(ValueError, match="not these bytes"):
            await blob.append(0, pieces(b"x" * 100), checks=[Refuse()])
    assert not (tmp_path / "blobs" / "uploads").exists()
    assert [info.key async for info in store.list()] == []


@pytest.mark.parametrize("hashed_before", [True, False])
async def test_compose_of_one_part_shares_its_bytes_and_outlives_it(
    store: LocalBlobStore, tmp_path: Path, hashed_before: bool
) -> None:
    data = os.urandom(2_000_003)
    async with store.appending(KEY) as blob:
        await blob.append(0, pieces(data))
    await store.put_bytes("recordings/r/original", b"an older blob")
    digest = hashlib.sha256(data).hexdigest()
    stored = await store.compose(
        "recordings/r/original", [KEY], sha256=digest if hashed_before else None
    )
    assert (stored.size, stored.sha256) == (len(data), digest)
    root = tmp_path / "blobs"
    assert os.path.samefile(root / KEY, root / "recordings/r/original")  # no bytes copied
    await store.delete(KEY)
    assert await store.read_all("recordings/r/original") == data
    assert list((root / ".staging").iterdir()) == []


async def test_then_records_the_durable_bytes_and_a_failure_there_cuts_them_back(
    store: LocalBlobStore,
) -> None:
    kept, chunk = b"k" * 1000, os.urandom(300_000)
    seen: list[int] = []

    async def record(size: int) -> None:
        seen.append(size)
        # Durable and on the file by now, whatever the hash is still doing.
        assert await store.read_all(KEY) == kept + chunk

    async def refuse(size: int) -> None:
        raise RuntimeError("the row moved on")

    running = hashlib.sha256(kept)
    async with store.appending(KEY) as blob:
        await blob.append(0, pieces(kept))
        stored = await blob.append(len(kept), pieces(chunk), sha256=running, then=record)
        assert seen == [len(chunk)]
        assert stored.sha256 == hashlib.sha256(kept + chunk).hexdigest()
        with pytest.raises(RuntimeError, match="moved on"):
            await blob.append(len(kept) + len(chunk), pieces(b"late" * 100), then=refuse)
        assert blob.size == len(kept) + len(chunk)
    assert await store.read_all(KEY) == kept + chunk
